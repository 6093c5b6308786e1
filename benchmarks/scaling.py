"""Data-parallel scaling: measured throughput with 1 and 2 processes, and AGC's communication volume.

**Measured.** The same short training run (PGD-10 adversarial training, ``small-cnn`` on real
Fashion-MNIST, RigL at 90% sparsity, ERK) with ``sgd`` and with ``agc``, launched as the README's
commands launch it: ``robust-agc train`` for one process and ``torchrun --nproc-per-node 2 -m
robust_agc train`` for two (gloo on CPU, one thread per process, nccl with one GPU per process on
CUDA). The global batch is the same (``--batch-size`` is global, each rank takes half), so the two
runs do the same work; images/s is the trainer's own ``images_per_s`` (training images over the
epoch's training time, AGC's refresh included), the median over the epochs after the first (and over
``--repeats`` interleaved rounds).
Scaling efficiency = ``throughput_2 / (2 * throughput_1)``.

**Computed.** The bytes each collective of the training step and of AGC's refresh carries, counted
from the model's tensors the way the code sends them (``robust_agc.train``, ``robust_agc.optim.agc``,
``torch.nn.parallel.DistributedDataParallel``), for ``small-cnn`` (1x28x28), ``preact-resnet18`` and
``wrn-28-4`` (3x32x32) with RigL masks at 90% (ERK), and the per-rank traffic of a ring all-reduce,
``2 (N - 1) / N * bytes``, for N ranks. See :func:`comm_bytes` for what is counted.

Usage::

    .venv/bin/python benchmarks/scaling.py                          # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/scaling.py --projection-only        # the computed table only
    .venv/bin/python benchmarks/scaling.py --device cuda --nprocs 1 # on one GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robust_agc.models import create_model  # noqa: E402
from robust_agc.sparse import apply_masks  # noqa: E402
from robust_agc.train import mask_buffer_names  # noqa: E402
from robust_agc.utils import cpu_model  # noqa: E402

#: (name, in_channels, input_size, training set size) of the projected models.
PROJECTED = (
    ("small-cnn", 1, 28, 60_000),
    ("preact-resnet18", 3, 32, 50_000),
    ("wrn-28-4", 3, 32, 50_000),
)
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel's default bucket_cap_mb


# ------------------------------------------------------------------------------------ computed part
def comm_bytes(
    model: nn.Module,
    *,
    optimizer: str = "sgd",
    estimator: str = "loss-slope",
    forwards_per_step: int = 1,
    refresh_batches_per_rank: int = 1,
) -> dict[str, int]:
    """Payload bytes of every collective a data-parallel training step and an AGC refresh send.

    Counted from the model's tensors, as the code sends them (payload per rank, before the
    collective's algorithm multiplies it):

    - ``grad_allreduce``: DDP all-reduces every trainable parameter's gradient each step, dense
      (masked weights too: the masks zero the gradient after the all-reduce), in the parameter's
      dtype (float32: 4 bytes per element); ``grad_allreduce_calls``: DDP's buckets (25 MiB).
    - ``buffer_broadcast``: DDP broadcasts the module buffers from rank 0 before each training
      forward (``broadcast_buffers=True``): BatchNorm statistics, the normalization constants, not
      the masks (the trainer excludes ``weight_mask``/``weight_mask_ever``, see
      ``robust_agc.train.mask_buffer_names``); times ``forwards_per_step`` (2 for TRADES and MART).
    - ``snapshot_allreduce`` (AGC, per step): ``AGC.snapshot_backward`` all-reduces ``g_B(ws)``
      for every parameter that has a snapshot, flattened into one buffer per (device, dtype)
      (``snapshot_allreduce_calls``: 1 for a float32 model).
    - ``refresh_allreduce`` (AGC, per refresh): the full gradient's example-weighted sum (one
      flat buffer), the example count (float64), the online sums (two float64,
      ``grad-online`` only) and the online step count (int64) in ``_dist_reduce``.
    - ``refresh_gather`` (AGC, per refresh, per rank): ``all_gather_object`` of the rank's
      per-batch losses ``(a, b)`` (pickled lists of floats; ``b`` is empty for ``grad-online``).

    Args:
        model: the module as trained (masks applied, if any).
        optimizer: ``"sgd"`` or ``"agc"`` (``"svrg"`` communicates as ``"agc"``).
        estimator: AGC's estimator, ``"loss-slope"`` or ``"grad-online"``.
        forwards_per_step: training forwards per step (1 natural / PGD-AT, 2 TRADES / MART).
        refresh_batches_per_rank: batches of one refresh on one rank.

    Returns:
        A dict of byte counts and call counts (keys above); AGC's keys are 0 for SGD.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grad = sum(p.numel() * p.element_size() for p in params)
    skip = set(mask_buffer_names(model))
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in skip)
    agc = optimizer in ("agc", "svrg")
    # distinct float objects, as ``Tensor.tolist()`` gives (pickle would share equal objects)
    a = [1.0 + i / 1024 for i in range(refresh_batches_per_rank)]
    b = [2.0 + i / 1024 for i in range(refresh_batches_per_rank)]
    gathered = (a, b if estimator == "loss-slope" else [])
    stats = 8 + 8 + (16 if estimator == "grad-online" else 0)
    return {
        "grad_allreduce": grad,
        "grad_allreduce_calls": max(1, math.ceil(grad / DDP_BUCKET_BYTES)),
        "buffer_broadcast": buffers * forwards_per_step,
        "snapshot_allreduce": grad if agc else 0,
        "snapshot_allreduce_calls": len({(p.device, p.dtype) for p in params}) if agc else 0,
        "refresh_allreduce": grad + stats if agc else 0,
        "refresh_gather": len(pickle.dumps(gathered)) if agc else 0,
    }


def ring_allreduce_per_rank(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 2.0 * (ranks - 1) / ranks * nbytes


def _projected_model(name: str, in_channels: int, size: int, sparsity: float) -> nn.Module:
    model = create_model(name, num_classes=10, in_channels=in_channels, input_size=size)
    if sparsity > 0:
        apply_masks(model, sparsity=sparsity, distribution="erk", generator=0)
    return model


def projection(
    *, sparsity: float, batch_size: int, ranks: tuple[int, ...], refresh_fraction: float = 1.0
) -> str:
    """The computed table (text) for the models of :data:`PROJECTED`."""
    mb = 1e6
    lines = [
        f"# payload per rank; RigL {sparsity:.0%} ERK masks, global batch {batch_size}, "
        f"PGD-AT (1 training forward per step), loss-slope refresh of {refresh_fraction:g} epoch",
        "model            params  grad/step MB  calls  buffers/fwd MB  AGC snap/step MB  calls  "
        "refresh MB  steps/ep  SGD MB/ep  AGC MB/ep  AGC/SGD",
    ]
    per_rank_rows = []
    for name, cin, size, n_train in PROJECTED:
        model = _projected_model(name, cin, size, sparsity)
        steps = math.ceil(n_train / batch_size)
        refresh_batches = max(1, round(refresh_fraction * steps))
        c = comm_bytes(model, optimizer="agc", refresh_batches_per_rank=refresh_batches)
        n_params = sum(p.numel() for p in model.parameters())
        # all-reduced bytes per epoch (buffers are a broadcast: listed apart)
        sgd_ep = steps * c["grad_allreduce"]
        agc_ep = steps * (c["grad_allreduce"] + c["snapshot_allreduce"]) + c["refresh_allreduce"]
        lines.append(
            f"{name:<15} {n_params / 1e6:6.2f}M {c['grad_allreduce'] / mb:13.2f} "
            f"{c['grad_allreduce_calls']:6d} {c['buffer_broadcast'] / mb:15.3f} "
            f"{c['snapshot_allreduce'] / mb:17.2f} {c['snapshot_allreduce_calls']:6d} "
            f"{c['refresh_allreduce'] / mb:11.2f} {steps:9d} {sgd_ep / mb:10.0f} "
            f"{agc_ep / mb:10.0f} {agc_ep / sgd_ep:8.3f}"
        )
        for n in ranks:
            sgd = ring_allreduce_per_rank(c["grad_allreduce"], n)
            agc_step = ring_allreduce_per_rank(c["grad_allreduce"] + c["snapshot_allreduce"], n)
            refresh = ring_allreduce_per_rank(c["refresh_allreduce"], n)
            # all_gather_object: each rank receives the other ranks' lists (1/N of the batches each)
            gather = (n - 1) * c["refresh_gather"] // n
            per_rank_rows.append(
                f"{name:<15} {n:5d} {sgd / mb:13.2f} {agc_step / mb:13.2f} "
                f"{refresh / mb:12.2f} {gather / 1e3:13.1f} "
                f"{c['buffer_broadcast'] / mb:14.3f}"
            )
    lines += [
        "",
        "# ring all-reduce traffic per rank, 2(N-1)/N * payload (MB); gather = refresh losses",
        "model              N  SGD MB/step  AGC MB/step  refresh MB  gather kB/rf  bcast MB/fwd",
        *per_rank_rows,
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ measured part
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def train_command(nprocs: int, train_argv: list[str]) -> list[str]:
    """The README's launch commands: one process, or ``torchrun --nproc-per-node N``."""
    if nprocs == 1:
        return [sys.executable, "-m", "robust_agc", "train", *train_argv]
    return [
        *_torchrun(),
        "--nproc-per-node", str(nprocs), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "robust_agc", "train", *train_argv,
    ]  # fmt: skip


def train_argv(optimizer: str, args: argparse.Namespace, out: str) -> list[str]:
    """The ``robust-agc train`` flags of one measured run."""
    return [
        "--model", args.model, "--objective", "pgd-at", "--attack-steps", str(args.attack_steps),
        "--sparse-method", "rigl", "--sparsity", str(args.sparsity), "--optimizer", optimizer,
        "--train-subset", str(args.images), "--val-size", "0", "--eval-subset", "0",
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", "0",
        "--threads", str(args.threads), "--device", args.device, "--no-progress",
        "--amp", args.amp, "--out", out, "--overwrite",
    ]  # fmt: skip


def measure(nprocs: int, optimizer: str, args: argparse.Namespace, out: Path) -> float:
    """Images/s of one run (median over the epochs after the first)."""
    argv = train_argv(optimizer, args, str(out))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    cmd = train_command(nprocs, argv)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="training images (default 1024)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--model", default="small-cnn", help="measured model (default small-cnn)")
    p.add_argument("--sparsity", type=float, default=0.9, help="RigL sparsity (default 0.9)")
    p.add_argument("--optimizers", default="sgd,agc", help="comma-separated (default sgd,agc)")
    p.add_argument("--nprocs", default="1,2", help="process counts (default 1,2)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds, median (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="--amp of runs")
    p.add_argument("--ranks", default="2,8,64", help="N of the projection (default 2,8,64)")
    p.add_argument("--projection-batch-size", type=int, default=128, help="(default 128)")
    p.add_argument("--projection-only", action="store_true", help="skip the measured runs")
    args = p.parse_args()
    ranks = tuple(int(n) for n in args.ranks.split(","))
    t_start = time.perf_counter()
    print(
        f"# scaling: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average {_loadavg()}"
    )
    if not args.projection_only:
        nprocs = [int(n) for n in args.nprocs.split(",")]
        if args.device.startswith("cuda"):
            gpus = torch.cuda.device_count()
            nprocs = [n for n in nprocs if n <= gpus]
            print(f"# {gpus} CUDA device(s): {torch.cuda.get_device_name(0) if gpus else '-'}")
        print(
            f"# measured: {args.model}, PGD-{args.attack_steps} AT, RigL {args.sparsity:g}, "
            f"{args.images} images, global batch {args.batch_size}, {args.epochs} epochs, "
            f"{args.threads} thread(s) per process, device {args.device}, amp {args.amp}"
        )
        print("# 2 processes: " + " ".join(train_command(2, train_argv("OPT", args, "OUT"))))
        optimizers = args.optimizers.split(",")
        rates: dict[tuple[str, int], list[float]] = {(o, n): [] for o in optimizers for n in nprocs}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):  # interleaved, so load changes hit every variant
                for opt in optimizers:
                    for n in nprocs:
                        rate = measure(n, opt, args, Path(tmp) / f"{opt}-{n}")
                        rates[opt, n].append(rate)
                        print(f"# round {r + 1}: {opt} x{n}: {rate:.1f} images/s", flush=True)
        print("optimizer  procs   images/s  efficiency")
        for opt in optimizers:
            base = statistics.median(rates[opt, 1]) if (opt, 1) in rates else None
            for n in nprocs:
                rate = statistics.median(rates[opt, n])
                eff = f"{rate / (n * base):10.3f}" if base else f"{'-':>10}"
                print(f"{opt:<10} {n:5d} {rate:10.1f}  {eff}")
        print(f"# load average at the end {_loadavg()}")
    print()
    print(projection(sparsity=args.sparsity, batch_size=args.projection_batch_size, ranks=ranks))
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
