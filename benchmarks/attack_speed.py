"""Speed of our PGD-10 against torchattacks.PGD: same model, data, eps, alpha, steps, one run.

For each model the two attacks run alternately on the same batches (order swapped every repeat,
median time per batch over repeats), and the success rates are counted on the points the model
classifies correctly. The 1x28x28 models are trained for a few Adam steps on real Fashion-MNIST
(so success rates mean something); preact-resnet18 runs untrained on random 3x32x32 data with
its own clean predictions as labels.

    python benchmarks/attack_speed.py --threads 2 --batches 2 --batch-size 64 --repeats 3

Target: ours <= 0.9x torchattacks' time at an equal or higher success rate.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import PGD  # noqa: E402
from robust_agc.data import load_dataset  # noqa: E402
from robust_agc.models import create_model  # noqa: E402


def _train_briefly(model: torch.nn.Module, steps: int, batch_size: int) -> None:
    x, y = load_dataset("fashion-mnist", "train")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None


def _data(name: str, n: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "preact-resnet18":
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = model(x).argmax(1)
        return x, y
    x, y = load_dataset("fashion-mnist", "test")
    return x[:n].clone(), y[:n].clone()


def _timed(fn, x: torch.Tensor, y: torch.Tensor, clock=time.perf_counter):
    """(seconds on ``clock``, output); ``time.process_time`` counts this process's CPU time only."""
    if x.is_cuda:
        torch.cuda.synchronize()
    t = clock()
    out = fn(x, y)
    if x.is_cuda:
        torch.cuda.synchronize()
    return clock() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small-cnn", "mnist-cnn", "preact-resnet18"])
    p.add_argument("--batches", type=int, default=2, help="batches per model (28x28 models)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resnet-batch-size", type=int, default=16)
    p.add_argument("--resnet-batches", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per batch (median)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.1, help="L-inf eps (8/255 used for resnet)")
    p.add_argument("--train-steps", type=int, default=20, help="Adam steps for 28x28 models")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (this process's CPU time: with\n"
        "--threads 1 on a CPU it equals the wall time of an idle core and ignores other load)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="also time ours with channels_last (on a channels_last copy of the model) against\n"
        "torchattacks on the contiguous model and on the channels_last copy",
    )
    args = p.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures CPU time: use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"steps {args.steps}, repeats {args.repeats}, clock {args.clock}"
    )
    header = f"{'model':34s} {'points':>6s} {'ours s':>8s} {'ta s':>8s} {'ratio':>6s} "
    header += f"{'ours succ':>9s} {'ta succ':>8s} {'clean acc':>9s}"
    print(header)
    for name in args.models:
        resnet = name == "preact-resnet18"
        c, s = (3, 32) if resnet else (1, 28)
        model = create_model(name, num_classes=10, in_channels=c, input_size=s)
        if not resnet and args.train_steps > 0:
            _train_briefly(model, args.train_steps, 64)
        model.eval().to(args.device)
        bs = args.resnet_batch_size if resnet else args.batch_size
        nb = args.resnet_batches if resnet else args.batches
        eps = 8 / 255 if resnet else args.eps
        alpha = 2.5 * eps / args.steps
        x_all, y_all = _data(name, bs * nb, model.cpu())
        model.to(args.device)
        x_all, y_all = x_all.to(args.device), y_all.to(args.device)
        ours = PGD(model, eps, alpha, args.steps, seed=0)
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=args.steps)
        variants = {"ours": ours, "ta": theirs}
        if args.channels_last:
            model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            variants["ours-cl"] = PGD(model_cl, eps, alpha, args.steps, seed=0, channels_last=True)
            # the same memory format for torchattacks (its convolutions follow the weights' format)
            variants["ta-cl"] = torchattacks.PGD(model_cl, eps=eps, alpha=alpha, steps=args.steps)
        times: dict[str, list[float]] = {k: [] for k in variants}
        broken: dict[str, int] = {k: 0 for k in variants}
        correct_total = 0
        # warm-up (allocator, kernels)
        for fn in variants.values():
            fn(x_all[:4], y_all[:4])
        for b in range(nb):
            x, y = x_all[b * bs : (b + 1) * bs], y_all[b * bs : (b + 1) * bs]
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            correct_total += int(correct.sum())
            per: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(args.repeats):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for k in order:
                    t, out = _timed(variants[k], x, y, clock)
                    per[k].append(t)
                    if r == 0:
                        with torch.no_grad():
                            broken[k] += int(((model(out).argmax(1) != y) & correct).sum())
            for k in variants:
                times[k].append(statistics.median(per[k]))
        n = bs * nb
        tt = {k: sum(v) for k, v in times.items()}
        pairs = [("ours", "ta"), ("ours-cl", "ta"), ("ours-cl", "ta-cl")]
        for k, ref in [(k, r) for k, r in pairs if k in variants and r in variants]:
            label = name if k == "ours" else f"{name} ({k} vs {ref})"
            print(
                f"{label:34s} {n:6d} {tt[k]:8.2f} {tt[ref]:8.2f} {tt[k] / tt[ref]:6.3f} "
                f"{broken[k] / max(correct_total, 1):9.3f} "
                f"{broken[ref] / max(correct_total, 1):8.3f} {correct_total / n:9.3f}"
            )


if __name__ == "__main__":
    main()
