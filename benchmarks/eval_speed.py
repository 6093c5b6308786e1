"""Our AutoAttack evaluation (robust_agc.eval.benchmark) against pyautoattack called directly,
or (``--attack fmn``) our ``fmn`` stage against foolbox's FMN attack called directly.

Same model, same first-N Fashion-MNIST test points, same seed, eps and batch size, in one process.
Prints both wall-clock times, the ratio ours/direct (target <= 1.0) and whether the per-point robust
flags (FMN: the per-point radii) are identical (target: identical).

    .venv/bin/python benchmarks/eval_speed.py --n 50 --version standard --model mlp
    .venv/bin/python benchmarks/eval_speed.py --attack fmn --n 200 --fmn-steps 100 --model mlp
    .venv/bin/python benchmarks/eval_speed.py --attack fmn --norm L1 --n 200 --fmn-steps 100
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from torch import nn

from robust_agc.data import load_dataset
from robust_agc.eval import benchmark
from robust_agc.models import create_model


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="first N test points")
    p.add_argument("--version", default="standard", help="standard, plus, rand or apgd-ce,apgd-t")
    p.add_argument("--model", default="mlp", choices=["mlp", "small-cnn"])
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="runs of each, ABBA order")
    p.add_argument("--attack", default="autoattack", choices=["autoattack", "fmn"])
    p.add_argument("--fmn-steps", type=int, default=100, help="FMN steps (--attack fmn)")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2", "L1", "L0"], help="FMN's norm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    x, y = load_dataset("fashion-mnist", "train")
    xt, yt = load_dataset("fashion-mnist", "test")
    torch.manual_seed(0)
    if args.model == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
        model = _train(model, x[:10000], y[:10000], epochs=3)
    else:
        model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
        model = _train(model, x[:5000], y[:5000], epochs=2)
    xs, ys = xt[: args.n], yt[: args.n]
    if args.attack == "fmn":
        _fmn_speed(args, model, xs, ys)
        return
    version = args.version
    components = None
    if version not in ("standard", "plus", "rand"):
        components = [c.strip() for c in version.split(",")]

    def ours() -> tuple[float, list[bool], object]:
        t0 = time.perf_counter()
        res = benchmark(
            model,
            x=xs,
            y=ys,
            eps=args.eps,
            version=components or version,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
        )
        return time.perf_counter() - t0, res.robust_flags.tolist(), res

    def direct() -> tuple[float, list[bool], object]:
        t0 = time.perf_counter()
        if components is None:
            aa = AutoAttack(model, norm="Linf", eps=args.eps, version=version, seed=args.seed)
        else:
            aa = AutoAttack(
                model,
                norm="Linf",
                eps=args.eps,
                version="custom",
                attacks=components,
                seed=args.seed,
            )
        _, y_adv = aa.run_standard_evaluation(xs, ys, batch_size=args.batch_size)
        return time.perf_counter() - t0, (y_adv == ys).tolist(), None

    # warm-up (kernels, allocator) on a few points, then alternate the order: ABBA
    with torch.no_grad():
        model(xs[:8])
    times: dict[str, list[float]] = {"ours": [], "direct": []}
    flags: dict[str, list[list[bool]]] = {"ours": [], "direct": []}
    order = ["ours", "direct", "direct", "ours"][: 2 * args.repeat] if args.repeat <= 2 else None
    if order is None:
        order = ["ours", "direct", "direct", "ours"] * ((args.repeat + 1) // 2)
    res = None
    for name in order:
        t, f, r = (ours if name == "ours" else direct)()
        times[name].append(t)
        flags[name].append(f)
        res = r if r is not None else res
    assert res is not None
    t_ours, t_direct = sum(times["ours"]), sum(times["direct"])
    direct_flags = flags["direct"][0]
    same = all(f == direct_flags for fl in flags.values() for f in fl)
    print(
        f"model={args.model} n={args.n} version={version} eps={args.eps} seed={args.seed} "
        f"batch={args.batch_size} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"cpu={platform.processor() or platform.machine()}"
    )
    print(
        f"clean acc {res.clean_acc:.3f}  robust acc ours {res.robust_acc:.3f} "
        f"direct {sum(direct_flags) / len(direct_flags):.3f}"
    )
    print("per component (s): " + ", ".join(f"{k}={v:.1f}" for k, v in res.timings.items()))
    runs = "  ".join(f"{k}=[{', '.join(f'{t:.1f}' for t in v)}]" for k, v in times.items())
    print(f"runs (s): {runs}")
    print(
        f"ours {t_ours:.1f} s  direct pyautoattack {t_direct:.1f} s  (sums over runs)  "
        f"ratio {t_ours / t_direct:.3f}"
    )
    print(f"per-point flags identical: {same}")
    if not same:
        raise SystemExit(1)


def _abba(funcs: dict[str, object], repeat: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Run ``ours`` and ``direct`` alternately (ours, direct, direct, ours, ...)."""
    order = (["ours", "direct", "direct", "ours"] * repeat)[: 2 * repeat]
    times: dict[str, list[float]] = {"ours": [], "direct": []}
    outs: dict[str, list] = {"ours": [], "direct": []}
    for name in order:
        t, out = funcs[name]()
        times[name].append(t)
        outs[name].append(out)
    return times, outs


def _fmn_speed(args: argparse.Namespace, model: nn.Module, xs, ys) -> None:
    """Our ``fmn`` stage (``benchmark(attacks="clean,fmn")``) against foolbox's FMN attack called
    through its public ``attack(fmodel, x, y, epsilons=None)`` on the same clean-correct points in
    the same ``--batch-size`` chunks (L2 and L0: the class with our corrected projection, which is
    what the stage runs; L-inf and L1: foolbox's own class)."""
    import foolbox as fb

    from robust_agc.eval import ThreatModel
    from robust_agc.eval.fmn import fmn_attack_class

    threat = ThreatModel.parse(args.norm)
    attack_cls = fmn_attack_class(threat)
    p = {"Linf": math.inf, "L2": 2.0, "L1": 1.0, "L0": 0.0}[args.norm]
    model.requires_grad_(False)  # both sides: no weight gradients

    def ours():
        t0 = time.perf_counter()
        res = benchmark(
            model, x=xs, y=ys, eps=args.eps, threat_model=args.norm, attacks="clean,fmn",
            fmn_steps=args.fmn_steps, batch_size=args.batch_size, seed=args.seed, progress=False,
        )  # fmt: skip
        return time.perf_counter() - t0, res.radii

    def direct():
        t0 = time.perf_counter()
        with torch.no_grad():
            ok = model(xs).argmax(1) == ys
        radii = [0.0 if not o else math.inf for o in ok.tolist()]
        idx = ok.nonzero().flatten().tolist()
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=xs.device)
        attack = attack_cls(steps=args.fmn_steps)
        for i in range(0, len(idx), args.batch_size):
            chunk = torch.tensor(idx[i : i + args.batch_size])
            adv, _, success = attack(fmodel, xs[chunk], ys[chunk], epsilons=None)
            norms = (adv.double() - xs[chunk].double()).flatten(1).norm(p=p, dim=1)
            for j, b, r in zip(chunk.tolist(), success.tolist(), norms.tolist(), strict=True):
                radii[j] = r if b else math.inf
        return time.perf_counter() - t0, radii

    with torch.no_grad():
        model(xs[:8])  # warm-up
    times, radii = _abba({"ours": ours, "direct": direct}, args.repeat)
    same = all(r == radii["direct"][0] for rs in radii.values() for r in rs)
    t_ours, t_direct = sum(times["ours"]), sum(times["direct"])
    print(
        f"model={args.model} n={args.n} attack=fmn norm={args.norm} steps={args.fmn_steps} "
        f"eps={args.eps} batch={args.batch_size} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} foolbox={fb.__version__} "
        f"cpu={platform.processor() or platform.machine()}"
    )
    runs = "  ".join(f"{k}=[{', '.join(f'{t:.2f}' for t in v)}]" for k, v in times.items())
    print(f"runs (s): {runs}")
    print(
        f"ours {t_ours:.2f} s  direct foolbox {attack_cls.__name__} {t_direct:.2f} s  "
        f"(sums over runs)  ratio {t_ours / t_direct:.3f}"
    )
    print(f"per-point radii identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
