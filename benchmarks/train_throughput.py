"""Throughput of a PGD-10 adversarial-training epoch: robust_agc's trainer vs a plain PyTorch loop.

Both run the same model, data, batch size and PGD settings, in the same process, interleaved (plain,
ours, plain, ours, ...) so that machine noise hits both; the median images/s of each is reported with
the ratio ours/plain (target: >= 0.95, i.e. at most 5% overhead). The plain loop uses SGD; with
``--optimizers sgd,agc`` our trainer runs each optimizer against that same baseline, so the AGC row's
ratio is its whole cost (correction, snapshot gradient, epoch refresh) on top of the trainer's.

Data: real Fashion-MNIST for 1x28x28 models (small-cnn, mnist-cnn); 3x32x32 models (preact-resnet18,
vgg16, ...) get uniform random images with random labels and CIFAR-10's normalisation (no CIFAR-10
is stored here; speed does not depend on the pixels). ``--device cuda`` times on a GPU (each timed
epoch ends with ``torch.cuda.synchronize()``); ``--amp bf16`` runs both loops under bfloat16
autocast (``off,bf16`` gives both rows).

    python benchmarks/train_throughput.py [--images 2048] [--repeats 3] [--threads 2]
    python benchmarks/train_throughput.py --device cuda --amp off,bf16 --optimizers sgd,agc \
        --models small-cnn,preact-resnet18 --images 8192
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from robust_agc.config import TrainConfig
from robust_agc.data import DATASET_INFO, DataSplits, make_splits
from robust_agc.models import create_model
from robust_agc.train import Trainer
from robust_agc.utils import cpu_model

SMALL_INPUT = ("small-cnn", "mnist-cnn")  # 1x28x28, real Fashion-MNIST; the rest 3x32x32 random


def plain_epoch(model, opt, x, y, *, batch_size, eps, alpha, steps, seed, amp="off"):
    """The hand-written PGD-AT loop a researcher would write (Madry et al.), one epoch; ``x`` and
    ``y`` live on the model's device; ``amp="bf16"``: forward passes under bfloat16 autocast."""
    device = x.device
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g).to(device)

    def autocast():
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    for i in range(0, x.shape[0], batch_size):
        idx = perm[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        model.eval()
        delta = torch.empty_like(xb).uniform_(-eps, eps)
        x_adv = (xb + delta).clamp(0, 1).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model(x_adv), yb)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, xb - eps), xb + eps).clamp(0, 1)
        model.train()
        with autocast():
            loss = F.cross_entropy(model(x_adv), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def random_splits(n: int, seed: int = 0) -> DataSplits:
    """``n`` uniform random 3x32x32 images with random labels, CIFAR-10's statistics."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    info = dataclasses.replace(DATASET_INFO["cifar10"], augment="none")
    empty = x[:0]
    return DataSplits(x, y, empty, y[:0], x[:1], y[:1], info)


def _timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()``, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_model(name: str, amp: str, args: argparse.Namespace, fmnist: DataSplits) -> None:
    """One row per optimizer of ``args.optimizers`` for model ``name`` in precision ``amp``."""
    device = torch.device(args.device)
    splits = fmnist if name in SMALL_INPUT else random_splits(args.images)
    info = splits.info
    eps = info.eps_linf
    alpha = eps / 4
    cfgs = {
        opt: TrainConfig(
            model=name,
            dataset=info.name,
            epochs=1,
            batch_size=args.batch_size,
            lr=0.05,
            objective="pgd-at",
            eps=eps,
            attack_steps=10,
            attack_step_size=alpha,
            val_size=0,
            eval_subset=0,
            progress=False,
            device=args.device,
            amp=amp,
            optimizer=opt,
            augment="none",
        )  # fmt: skip
        for opt in args.optimizers.split(",")
    }
    trainers = {opt: Trainer(cfg, splits=splits) for opt, cfg in cfgs.items()}
    torch.manual_seed(0)
    plain_model = create_model(
        name, num_classes=10, in_channels=info.in_channels, input_size=info.input_size,
        mean=info.mean, std=info.std,
    ).to(device)  # fmt: skip
    plain_opt = torch.optim.SGD(
        plain_model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    x, y = splits.x_train.to(device), splits.y_train.to(device)
    n = x.shape[0]
    plain: list[float] = []
    ours: dict[str, list[float]] = {opt: [] for opt in trainers}
    for r in range(args.repeats + args.warmup):
        t = _timed(
            lambda r=r: plain_epoch(
                plain_model, plain_opt, x, y, batch_size=args.batch_size, eps=eps, alpha=alpha,
                steps=10, seed=r, amp=amp,
            ),
            device,
        )  # fmt: skip
        if r >= args.warmup:
            plain.append(n / t)
        for opt, trainer in trainers.items():
            t = _timed(trainer.train_epoch, device)
            trainer.state.epoch += 1
            if r >= args.warmup:
                ours[opt].append(n / t)
    mp = statistics.median(plain)
    for opt, times in ours.items():
        mo = statistics.median(times)
        print(f"{name:<16} {amp:<5} {opt:<6} {mp:>11.1f} {mo:>12.1f} {mo / mp:>18.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="untimed epochs first (1 on a GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="small-cnn,mnist-cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="off", help="off, bf16 or off,bf16")
    p.add_argument("--optimizers", default="sgd", help="our trainer's optimizers, e.g. sgd,agc")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    fmnist = None
    if any(n in SMALL_INPUT for n in names):
        fmnist = make_splits("fashion-mnist", train_subset=args.images, val_size=0, test_size=1)
    where = cpu_model()
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda}"
    print(f"# torch {torch.__version__}, {where}, threads {args.threads}, batch {args.batch_size}")
    print("model            amp   optim  plain img/s   ours img/s   ratio ours/plain")
    for name in names:
        for amp in args.amp.split(","):
            run_model(name, amp, args, fmnist)


if __name__ == "__main__":
    main()
