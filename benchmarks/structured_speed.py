"""Measured speed of filter-pruned networks shrunk by ``export_structured`` vs the dense network.

For each model (default: small-cnn 1x28x28, preact-resnet18 and vgg16 3x32x32) and filter sparsity
(default 0.5, 0.75, 0.9; uniform per group, random filters chosen by
``apply_structured_masks(..., structure="filter")``), the masked model is exported into a
physically smaller network (``robust_agc.sparse.export_structured``) and timed against the dense
one in the same process, on the same inputs:

- ``infer/s``: eval-mode forward images per second (median over repeats of one batch);
- ``pgd-at/s``: PGD-10 adversarial-training images per second (our ``attacks.PGD``, eps as below,
  step 2.5 eps / 10, then a cross-entropy forward/backward and an SGD step; median step time);
- ``aa s``: seconds of an AutoAttack evaluation (pyautoattack, ``version="custom"`` with the
  ``apgd-ce`` component only, one restart, ``--aa-iters`` iterations) of the same ``--aa-points``
  random points. The labels are each network's own predictions, so every variant attacks all
  points (with true labels an untrained network's misclassified points would be skipped and the
  times would measure accuracy, not speed).

Each row reports the speed-up over dense (``x``: dense time / variant time) next to the FLOPs ratio
(dense / variant, conv and linear multiply-adds of one image). Weights are untrained (speed does not
depend on them). Inference and PGD-AT interleave the variants batch by batch (so machine load
hits them alike); the AutoAttack runs go one after another (dense first).

``--device cuda`` times on a GPU (every timed pass synchronised); GPU batches should be larger
than the CPU defaults for the card to be busy (the GPU rows of ``benchmarks/RESULTS.md`` give theirs).

Usage::

    .venv/bin/python benchmarks/structured_speed.py                      # full table (1 thread)
    .venv/bin/python benchmarks/structured_speed.py --quick             # a smoke run
    python benchmarks/structured_speed.py --device cuda --batch 1024 --big-batch 512 \
        --train-batch 512 --big-train-batch 256 --aa-points 1024 --aa-points-big 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyautoattack import AutoAttack  # noqa: E402

from attacks import PGD  # noqa: E402
from robust_agc.models import create_model  # noqa: E402
from robust_agc.sparse import apply_structured_masks, export_structured  # noqa: E402
from robust_agc.utils.machine import cpu_capability, cpu_model  # noqa: E402
from robust_agc.utils.speed import count_flops, synchronize, time_inference  # noqa: E402

SHAPES = {"small-cnn": (1, 28), "mnist-cnn": (1, 28)}  # others: (3, 32)


def time_pgd_at(
    models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, eps: float, steps: int
) -> list[float]:
    """PGD-10 adversarial-training images/s of each model, interleaved step by step."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    attacks = [
        PGD(m, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True, seed=0) for m in models
    ]
    times: list[list[float]] = [[] for _ in models]
    for r in range(steps + 1):
        for i, (model, opt, attack) in enumerate(zip(models, opts, attacks)):
            model.train()
            synchronize(x.device)
            t0 = time.perf_counter()
            x_adv = attack(x, y)
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(x.device)
            if r:  # the first round warms up
                times[i].append(time.perf_counter() - t0)
    return [x.shape[0] / statistics.median(t) for t in times]


def time_autoattack(model: nn.Module, x: torch.Tensor, eps: float, iters: int) -> float:
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    aa = AutoAttack(
        model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce"], seed=0, device=x.device
    )
    aa.apgd.n_restarts = 1
    aa.apgd.n_iter = iters
    synchronize(x.device)
    t0 = time.perf_counter()
    aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    synchronize(x.device)
    return time.perf_counter() - t0


def variants(
    name: str, sparsities: list[float], device: str = "cpu"
) -> list[tuple[str, nn.Module]]:
    c, s = SHAPES.get(name, (3, 32))
    torch.manual_seed(0)
    dense = create_model(name, in_channels=c, input_size=s)
    out = [("dense", dense)]
    for sp in sparsities:
        masked = create_model(name, in_channels=c, input_size=s)
        masked.load_state_dict(dense.state_dict())
        apply_structured_masks(
            masked, sparsity=sp, structure="filter", input_shape=(c, s, s), generator=0
        )
        small, _ = export_structured(masked, (c, s, s))
        out.append((f"filter {sp:g}", small))
    return [(label, model.to(device)) for label, model in out]


def run_model(name: str, args: argparse.Namespace) -> None:
    c, s = SHAPES.get(name, (3, 32))
    eps = 0.1 if c == 1 else 8 / 255
    big = c == 3
    g = torch.Generator().manual_seed(0)
    bi, bt, na = (args.big_batch, args.big_train_batch, args.aa_points_big) if big else (
        args.batch, args.train_batch, args.aa_points)  # fmt: skip
    x = torch.rand(bi, c, s, s, generator=g).to(args.device)
    xt, yt = torch.rand(bt, c, s, s, generator=g), torch.randint(0, 10, (bt,), generator=g)
    xt, yt = xt.to(args.device), yt.to(args.device)
    xa = torch.rand(na, c, s, s, generator=g).to(args.device)
    named = variants(name, args.sparsities, args.device)
    models = [m for _, m in named]
    infs = time_inference(models, x, args.repeats)
    ats = time_pgd_at(models, xt, yt, eps, args.train_steps)
    base: dict[str, float] = {}
    for (label, model), inf, at in zip(named, infs, ats):
        params = sum(p.numel() for p in model.parameters())
        f = count_flops(model, (c, s, s))
        aa = time_autoattack(model, xa, eps, args.aa_iters)
        if label == "dense":
            base = {"f": f, "inf": inf, "at": at, "aa": aa}
        print(
            f"{name:16s} {label:12s} {params:>10d} {base['f'] / f:6.2f} "
            f"{inf:9.1f} {inf / base['inf']:5.2f}x {at:9.2f} {at / base['at']:5.2f}x "
            f"{aa:8.2f} {base['aa'] / aa:5.2f}x",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small-cnn", "preact-resnet18", "vgg16"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="inference batch, 28x28 models")
    p.add_argument("--big-batch", type=int, default=32, help="inference batch, 32x32 models")
    p.add_argument("--train-batch", type=int, default=64, help="PGD-AT batch, 28x28 models")
    p.add_argument("--big-train-batch", type=int, default=16, help="PGD-AT batch, 32x32 models")
    p.add_argument("--repeats", type=int, default=5, help="inference repeats (median)")
    p.add_argument(
        "--train-steps", type=int, default=3, help="timed PGD-AT steps per variant (median)"
    )
    p.add_argument("--aa-points", type=int, default=32, help="AutoAttack points, 28x28 models")
    p.add_argument("--aa-points-big", type=int, default=8, help="AutoAttack points, 32x32")
    p.add_argument("--aa-iters", type=int, default=100, help="APGD-CE iterations")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    if args.quick:
        args.models, args.sparsities = ["small-cnn"], [0.5]
        args.repeats, args.train_steps, args.aa_iters = 2, 1, 5
        args.batch, args.train_batch, args.aa_points = 16, 8, 4
    torch.set_num_threads(args.threads)
    where = f"{cpu_model()} ({cpu_capability()})"
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda}"
    print(
        f"# structured_speed: {where}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"# batches: infer {args.batch}/{args.big_batch}, pgd-at {args.train_batch}/"
        f"{args.big_train_batch} (28x28/32x32), AA apgd-ce {args.aa_iters} iters on "
        f"{args.aa_points}/{args.aa_points_big} points"
    )
    print(
        f"{'model':16s} {'variant':12s} {'params':>10s} {'flops':>6s} {'infer/s':>9s} "
        f"{'':6s} {'pgd-at/s':>9s} {'':6s} {'aa s':>8s} {'':6s}"
    )
    t0 = time.perf_counter()
    for name in args.models:
        run_model(name, args)
    print(f"# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
