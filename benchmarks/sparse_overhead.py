"""Training-throughput overhead of the sparse layer: masks (static) and RigL vs the same dense model.

Natural (non-adversarial) training steps -- the worst case for the relative overhead, since a
PGD-10 step costs ~11x more compute while the mask work stays the same. Model: ``small-cnn`` on
1x28x28 random inputs (batch 128), SGD with Nesterov momentum, 90% ERK sparsity, RigL with its
default update interval (100 steps). The three variants start from the same weights and run
interleaved in rounds of ``--round-steps`` steps (rotating the order, first round discarded as
warm-up), so machine load hits all of them alike; the median per-step time over rounds is reported.

A second, less noisy measure times ``optimizer.step()`` alone with and without the mask hooks.

Usage::

    .venv/bin/python benchmarks/sparse_overhead.py            # ~2-3 min on 2 shared cores
    .venv/bin/python benchmarks/sparse_overhead.py --rounds 5 --round-steps 100 --threads 2
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


def _run(model, opt, sched, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return (time.perf_counter() - t0) / steps


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
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (plus one warm-up)")
    ap.add_argument("--round-steps", type=int, default=100, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = create_model(args.model, num_classes=10, in_channels=1, input_size=28)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    total = (args.rounds + 1) * args.round_steps * 100  # updates never stop during the run
    modes = ["dense", "static", "rigl"]
    built = {m: _build(m, base, args.sparsity, total) for m in modes}

    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{args.model} batch {args.batch}, natural training, sparsity {args.sparsity} ERK, "
        f"RigL interval {built['rigl'][2].update_interval}"
    )
    per_mode: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):
        order = modes[r % 3 :] + modes[: r % 3]
        for m in order:
            t = _run(*built[m], x, y, args.round_steps)
            if r > 0:
                per_mode[m].append(t)
    rigl_sched = built["rigl"][2]
    dense = statistics.median(per_mode["dense"])
    print(
        f"{'variant':<8} {'ms/step (median)':>17} {'img/s':>8} {'ratio vs dense':>15}  rounds (ms)"
    )
    for m in modes:
        med = statistics.median(per_mode[m])
        rounds = " ".join(f"{1000 * t:.1f}" for t in per_mode[m])
        print(f"{m:<8} {1000 * med:>17.2f} {args.batch / med:>8.0f} {med / dense:>15.3f}  {rounds}")
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
