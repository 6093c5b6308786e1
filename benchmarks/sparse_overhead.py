"""Training-throughput overhead of the sparse layer: masks (static) and RigL vs the same dense model.

Natural (non-adversarial) training steps -- the worst case for the relative overhead, since a
PGD-10 step costs ~11x more compute while the mask work stays the same. Model: ``small-cnn`` on
1x28x28 random inputs (batch 128), SGD with Nesterov momentum, 90% ERK sparsity, RigL with its
default update interval (100 steps). The three variants start from the same weights and are
interleaved **step by step** (rotating the order), so machine load hits all of them alike. Per
variant the median step time is reported; for RigL the extra time of its update steps (dense
gradient stash + drop/grow) is added amortised over all steps:
``median(ordinary steps) + sum(update step - median) / steps``.

A second, less noisy measure times ``optimizer.step()`` alone with and without the mask hooks.

Usage::

    .venv/bin/python benchmarks/sparse_overhead.py               # 400 steps per variant
    .venv/bin/python benchmarks/sparse_overhead.py --steps 1000 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robust_agc.models import create_model  # noqa: E402
from robust_agc.sparse import apply_masks, create_scheduler  # noqa: E402


def _build(mode: str, base: nn.Module, sparsity: float, total_steps: int):
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    sched = None
    if mode != "dense":
        masks = apply_masks(model, sparsity=sparsity, distribution="erk", generator=0)
        masks.attach(opt)
        sched = create_scheduler(mode, masks, total_steps=total_steps, optimizer=opt)
    return model, opt, sched


def _one_step(model, opt, sched, x, y) -> tuple[float, bool]:
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    updated = sched is not None and sched.step() is not None
    return time.perf_counter() - t0, updated


def _time_optimizer_step(model, opt, x, y, reps: int) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    times = []
    for _ in range(reps):
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.clone()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small-cnn", choices=["small-cnn", "mnist-cnn"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = create_model(args.model, num_classes=10, in_channels=1, input_size=28)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    total = (args.steps + args.warmup) * 100  # topology updates never stop during the run
    modes = ["dense", "static", "rigl"]
    built = {m: _build(m, base, args.sparsity, total) for m in modes}

    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{args.model} batch {args.batch}, natural training, sparsity {args.sparsity} ERK, "
        f"RigL interval {built['rigl'][2].update_interval}, {args.steps} timed steps per variant"
    )
    times: dict[str, list[float]] = {m: [] for m in modes}
    upd: dict[str, list[bool]] = {m: [] for m in modes}
    for t in range(args.warmup + args.steps):
        order = modes[t % 3 :] + modes[: t % 3]
        for m in order:
            dt, updated = _one_step(*built[m], x, y)
            if t >= args.warmup:
                times[m].append(dt)
                upd[m].append(updated)
    rigl_sched = built["rigl"][2]
    cost: dict[str, float] = {}
    for m in modes:
        ordinary = [dt for dt, u in zip(times[m], upd[m]) if not u]
        med = statistics.median(ordinary)
        extra = sum(dt - med for dt, u in zip(times[m], upd[m]) if u)
        cost[m] = med + extra / len(times[m])
    dense = cost["dense"]
    print(f"{'variant':<8} {'ms/step':>9} {'img/s':>7} {'ratio vs dense':>15} {'update steps':>13}")
    for m in modes:
        n_upd = sum(upd[m])
        print(
            f"{m:<8} {1000 * cost[m]:>9.2f} {args.batch / cost[m]:>7.0f} "
            f"{cost[m] / dense:>15.3f} {n_upd:>13}"
        )
    if any(upd["rigl"]):
        med = statistics.median(dt for dt, u in zip(times["rigl"], upd["rigl"]) if not u)
        mean_upd = statistics.mean(dt for dt, u in zip(times["rigl"], upd["rigl"]) if u)
        print(f"rigl update step: {1000 * mean_upd:.1f} ms vs {1000 * med:.1f} ms ordinary")
    print(
        f"rigl: {rigl_sched.num_updates} topology updates in {rigl_sched.step_count} steps, "
        f"density {rigl_sched.masks.density:.4f}, exploration {rigl_sched.masks.exploration_rate:.4f}"
    )

    # optimizer.step() alone, with vs without the mask hooks (same masked model and state).
    model, opt, _ = built["static"]
    plain = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    plain.load_state_dict(opt.state_dict())
    t_hooked = _time_optimizer_step(model, opt, x, y, 300)
    t_plain = _time_optimizer_step(model, plain, x, y, 300)
    print(
        f"optimizer.step(): {1e6 * t_plain:.0f} us plain, {1e6 * t_hooked:.0f} us with mask hooks "
        f"(+{1e6 * (t_hooked - t_plain):.0f} us = {100 * (t_hooked - t_plain) / dense:.2f}% of a "
        f"dense training step)"
    )


if __name__ == "__main__":
    main()
