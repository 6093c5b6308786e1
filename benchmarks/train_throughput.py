"""Throughput of a PGD-10 adversarial-training epoch: robust_agc's trainer vs a plain PyTorch loop.

Both run the same model, data (real Fashion-MNIST), batch size, optimizer and PGD settings, in the same
process, interleaved (plain, ours, plain, ours, ...) so that machine noise hits both; the median
images/s of each is reported with the ratio ours/plain (target: >= 0.95, i.e. at most 5% overhead).

    python benchmarks/train_throughput.py [--images 2048] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robust_agc.config import TrainConfig
from robust_agc.data import make_splits
from robust_agc.models import create_model
from robust_agc.train import Trainer
from robust_agc.utils import cpu_model


def plain_epoch(model, opt, x, y, *, batch_size, eps, alpha, steps, seed):
    """The hand-written PGD-AT loop a researcher would write (Madry et al.), one epoch."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    for i in range(0, x.shape[0], batch_size):
        idx = perm[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        model.eval()
        delta = torch.empty_like(xb).uniform_(-eps, eps)
        x_adv = (xb + delta).clamp(0, 1).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), yb)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, xb - eps), xb + eps).clamp(0, 1)
        model.train()
        loss = F.cross_entropy(model(x_adv), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="small-cnn,mnist-cnn")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits = make_splits("fashion-mnist", train_subset=args.images, val_size=0, test_size=1)
    info = splits.info
    print(f"# torch {torch.__version__}, {cpu_model()}, threads {args.threads}")
    print("model       plain img/s   ours img/s   ratio ours/plain")
    for name in args.models.split(","):
        cfg = TrainConfig(
            model=name, epochs=1, batch_size=128, lr=0.05, objective="pgd-at", eps=0.1, attack_steps=10,
            attack_step_size=0.025, val_size=0, eval_subset=0, progress=False,
        )  # fmt: skip
        trainer = Trainer(cfg, splits=splits)
        torch.manual_seed(0)
        plain_model = create_model(
            name, num_classes=10, in_channels=1, input_size=28, mean=info.mean, std=info.std
        )
        plain_opt = torch.optim.SGD(
            plain_model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        plain, ours = [], []
        n = splits.x_train.shape[0]
        for r in range(args.repeats):
            t0 = time.perf_counter()
            plain_epoch(
                plain_model, plain_opt, splits.x_train, splits.y_train,
                batch_size=128, eps=0.1, alpha=0.025, steps=10, seed=r,
            )  # fmt: skip
            plain.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            trainer.train_epoch()
            trainer.state.epoch += 1
            ours.append(n / (time.perf_counter() - t0))
        mp, mo = statistics.median(plain), statistics.median(ours)
        print(f"{name:<11} {mp:>11.1f} {mo:>12.1f} {mo / mp:>18.3f}")


if __name__ == "__main__":
    main()
