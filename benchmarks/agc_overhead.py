"""Wall-clock overhead of AGC over SGD in PGD-10 adversarial training (``docs/agc.md``, "Costs").

One PGD-AT epoch = per batch a PGD-10 attack (10 F+B), the training F+B, and for AGC the snapshot
F+B (``snapshot_backward``); plus, for AGC, one refresh per epoch (at the epoch's start, as
``robust_agc.train`` does). Variants, each its own copy of the same initial ``small-cnn`` (1x28x28),
same real Fashion-MNIST subset, same batch order and seed:

- ``sgd``: torch.optim.SGD, Nesterov 0.9 (baseline)
- ``agc``: loss-slope estimator, refresh on all clean batches (the public release's choice)
- ``agc-online``: grad-online estimator, refresh on all clean batches (no snapshot forward pass)
- ``agc-frac``: loss-slope, refresh on a seeded random fraction (``--fraction``) of the batches
- ``agc-online-frac``: grad-online + fractional refresh (the cheapest; the toolkit's default
  since the ablations of ``experiments/``, with fraction 0.25)

The variants run in lockstep: every batch is stepped by all variants in a rotated order (and all
refreshes run back to back), so load changes on a shared machine hit all of them alike. Epoch time
= refresh + sum of step times. Round 0 is warm-up (its refresh has no previous snapshot) and is
discarded; the median epoch time over the other rounds is reported with its ratio to ``sgd``, next
to the F+B-count ratio predicted by the cost model (B = 2F).

Usage::

    .venv/bin/python benchmarks/agc_overhead.py                    # ~3 min on 2 shared cores
    .venv/bin/python benchmarks/agc_overhead.py --n-train 2048 --rounds 4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import PGD  # noqa: E402
from robust_agc.data import load_dataset  # noqa: E402
from robust_agc.models import create_model  # noqa: E402
from robust_agc.optim import create_optimizer  # noqa: E402

VARIANTS: dict[str, dict] = {
    "sgd": {"name": "sgd"},
    "agc": {"name": "agc", "estimator": "loss-slope", "fraction": 1.0},
    "agc-online": {"name": "agc", "estimator": "grad-online", "fraction": 1.0},
    "agc-frac": {"name": "agc", "estimator": "loss-slope", "fraction": None},
    "agc-online-frac": {"name": "agc", "estimator": "grad-online", "fraction": None},
}


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def _predicted_ratio(spec: dict, fraction: float, steps: int) -> float:
    """F+B-count ratio (F = 1, B = 2) of one epoch vs SGD: PGD-steps F+B + 1 F+B per batch."""
    base = (steps + 1) * 3.0
    if spec["name"] == "sgd":
        return 1.0
    frac = spec["fraction"] if spec["fraction"] is not None else fraction
    refresh = frac * (3.0 + (1.0 if spec["estimator"] == "loss-slope" else 0.0))
    return (base + 3.0 + refresh) / base


class _Run:
    def __init__(self, key: str, spec: dict, base: nn.Module, args: argparse.Namespace) -> None:
        self.key, self.spec = key, spec
        self.model = copy.deepcopy(base).train()
        kw = {"estimator": spec["estimator"]} if spec["name"] == "agc" else {}
        self.opt = create_optimizer(
            spec["name"], self.model.parameters(), lr=args.lr, weight_decay=5e-4, **kw
        )
        self.attack = PGD(self.model, eps=args.eps, steps=args.steps, seed=0)
        self.fraction = spec.get("fraction") or args.fraction
        self.gen = torch.Generator().manual_seed(1)
        self.times: list[float] = []
        self.refresh_times: list[float] = []

    def refresh(self, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
        """The epoch-start refresh on a seeded fraction of the (clean) batches; returns seconds."""
        if self.spec["name"] == "sgd":
            return 0.0
        n_batches = len(x) // bs
        keep = max(2, round(self.fraction * n_batches))
        chosen = sorted(torch.randperm(n_batches, generator=self.gen)[:keep].tolist())
        batches = ((x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]) for i in chosen)
        t0 = time.perf_counter()
        self.opt.refresh(self.model, batches, _ce)
        return time.perf_counter() - t0

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        """One PGD-AT step (attack, training F+B, snapshot F+B for AGC, update); returns seconds."""
        t0 = time.perf_counter()
        x_adv = self.attack(xb, yb)
        self.model.train()
        loss = _ce(self.model, x_adv, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.spec["name"] != "sgd":
            self.opt.snapshot_backward(self.model, lambda m: _ce(m, x_adv, yb))
        self.opt.step()
        return time.perf_counter() - t0


def _epoch(runs: list[_Run], x: torch.Tensor, y: torch.Tensor, epoch: int, bs: int) -> None:
    """One epoch of every variant in lockstep: each batch is stepped by all variants in a rotated
    order, so load changes on a shared machine hit all variants alike."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    n_batches = len(x) // bs
    for run in runs:
        run.refresh_times.append(run.refresh(x, y, bs))
        run.times.append(run.refresh_times[-1])
    for i in range(n_batches):
        idx = perm[i * bs : (i + 1) * bs]
        k = (i + epoch) % len(runs)
        for run in runs[k:] + runs[:k]:
            run.times[-1] += run.step(x[idx], y[idx])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=512, help="real Fashion-MNIST training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="epochs per variant (round 0 = warm-up)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--fraction", type=float, default=0.25, help="refresh fraction of *-frac")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (round 0 is warm-up)")

    torch.set_num_threads(args.threads)
    # small-cnn's final layer starts at zero, so every loss at the initial snapshot is log(10) and
    # the second refresh cannot estimate tau (AGC warns once and keeps tau); irrelevant for timing
    warnings.filterwarnings("ignore", message="AGC refresh: var", category=RuntimeWarning)
    torch.manual_seed(0)
    x, y = load_dataset("fashion-mnist", "train")
    x, y = x[: args.n_train].contiguous(), y[: args.n_train].contiguous()
    base = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    keys = [k.strip() for k in args.variants.split(",")]
    if "sgd" not in keys:
        keys.insert(0, "sgd")
    runs = [_Run(k, VARIANTS[k], base, args) for k in keys]

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    print(f"# agc_overhead: {cpu}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"# small-cnn, {args.n_train} Fashion-MNIST images, batch {args.batch_size}, "
        f"PGD-{args.steps} eps {args.eps}, {args.rounds} rounds (first discarded)"
    )
    t_all = time.perf_counter()
    for r in range(args.rounds):
        _epoch(runs, x, y, r, args.batch_size)
    sgd_med = statistics.median(runs[0].times[1:])
    print(f"{'variant':<16} {'epoch_s':>8} {'refresh_s':>9} {'ratio':>6} {'predicted':>9}")
    for run in runs:
        med = statistics.median(run.times[1:])
        ref = statistics.median(run.refresh_times[1:])
        pred = _predicted_ratio(run.spec, args.fraction, args.steps)
        print(f"{run.key:<16} {med:8.2f} {ref:9.2f} {med / sgd_med:6.3f} {pred:9.3f}")
    print(f"# total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
