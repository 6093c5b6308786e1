"""``robust-agc eval``: argument definitions and the command body (called by ``robust_agc.cli``).

Examples::

    robust-agc eval runs/agc/best.pt --n-examples 1000 --out eval.json
    robust-agc eval --state-dict w.pt --arch small-cnn --dataset fashion-mnist --eps 0.1
    robust-agc eval ckpt.pt --attacks clean,pgd,autoattack --version apgd-ce,apgd-t --state st.json
    robust-agc eval ckpt.pt --attacks clean,autoattack,fmn --eps-grid 0,0.05,0.1,0.2 --out e.json
    robust-agc eval --robustbench Ding2020MMA --dataset cifar10 --norm Linf --model-dir models \
        --data-dir data --eps 0.031 --n-examples 1000
    torchrun --nproc-per-node 2 -m robust_agc eval ckpt.pt --batch-size 32 --out eval.json

Under ``torchrun`` (WORLD_SIZE > 1) the processes share the chunks of every stage (gloo on CPU,
nccl with ``--device cuda``, one GPU per process); the result equals a single process's with the
same ``--batch-size``. Only rank 0 prints, writes ``--out`` and the ``--state`` file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["add_eval_arguments", "run_eval"]

logger = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` subcommand's arguments to ``parser``."""
    src = parser.add_argument_group("model")
    src.add_argument(
        "checkpoint", nargs="?", default=None, help="a robust_agc checkpoint (.pt) to evaluate"
    )
    src.add_argument(
        "--state-dict", default=None, help="a plain state dict (needs --arch, --dataset)"
    )
    src.add_argument("--arch", default=None, help="registered architecture of --state-dict")
    src.add_argument(
        "--robustbench",
        default=None,
        metavar="NAME",
        help="a RobustBench zoo model, read offline from --model-dir (needs robustbench importable)",
    )
    src.add_argument(
        "--model-dir", default=None, help="RobustBench's folder: DATASET/NORM/NAME.pt below it"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's)")
    data.add_argument("--data-dir", default=None, help="where to find the dataset")
    data.add_argument(
        "--n-examples", type=int, default=None, help="first N test points (default: all)"
    )
    data.add_argument(
        "--preset",
        default=None,
        help="a benchmark's settings for every option not given: apb (Adversarial Pruning "
        "Benchmark: AutoAttack Linf 0.031 on 10000 points, FMN 200 steps on 2048:2176)",
    )
    tm = parser.add_argument_group("threat model and attacks")
    tm.add_argument(
        "--eps",
        type=float,
        default=None,
        help="radius; defaults to the checkpoint config's eps only when recorded there",
    )
    tm.add_argument(
        "--norm",
        default=None,
        help="threat model (default Linf): Linf or L2; L1 or L0 with --attacks clean,fmn only",
    )
    tm.add_argument(
        "--attacks",
        default=None,
        help="stages in order: clean,pgd,autoattack,square,fmn (fmn: minimal radii, always last); "
        "default clean,autoattack",
    )
    tm.add_argument(
        "--version",
        default=None,
        help="AutoAttack version (standard, plus, rand) or components, e.g. apgd-ce,apgd-t",
    )
    tm.add_argument("--pgd-steps", type=int, default=50)
    tm.add_argument("--pgd-restarts", type=int, default=10)
    tm.add_argument("--pgd-step-size", type=float, default=None, help="default 2.5*eps/steps")
    tm.add_argument("--fmn-steps", type=int, default=None, help="steps of the fmn stage (1000)")
    tm.add_argument(
        "--fmn-slice",
        default=None,
        metavar="START:STOP",
        help="the fmn stage attacks only these of the evaluated points (default: all)",
    )
    tm.add_argument(
        "--eps-grid",
        default=None,
        help="security-curve radii, comma-separated, increasing (default 16 from 0 to 3*eps)",
    )
    tm.add_argument("--seed", type=int, default=0)
    tm.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=None, help="points per chunk (256)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--out", default=None, help="result JSON (stdout when not given)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    run.add_argument("--state", default=None, help="resumable per-point state (JSON)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from ..eval import load_model_and_info

    sources = [s for s in (args.checkpoint, args.state_dict, args.robustbench) if s is not None]
    if len(sources) != 1:
        raise UserError("give exactly one of CHECKPOINT, --state-dict or --robustbench")
    if args.checkpoint is not None:
        if args.arch is not None:
            raise UserError("--arch goes with --state-dict, not with a checkpoint")
        return load_model_and_info(args.checkpoint, source="checkpoint")
    if args.state_dict is not None:
        return load_model_and_info(
            args.state_dict, source="state_dict", arch=args.arch, dataset=args.dataset
        )
    return load_model_and_info(
        args.robustbench,
        source="robustbench",
        dataset=args.dataset,
        threat_model=args.norm,
        model_dir=args.model_dir,
    )


def run_eval(args: argparse.Namespace) -> int:
    """Run ``robust-agc eval``; returns the exit status (0). User errors raise UserError.

    Under ``torchrun`` (WORLD_SIZE > 1) it joins the process group for the evaluation and leaves it
    afterwards; only rank 0 writes files and prints.
    """
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    import torch.distributed as dist

    from ..utils import init_distributed

    joined = dist.is_available() and dist.is_initialized()  # a caller's group stays up
    rank, local_rank, world = init_distributed(args.device)
    try:
        if world > 1:
            if args.device.startswith("cuda"):
                import torch

                args.device = f"cuda:{local_rank}"
                torch.cuda.set_device(local_rank)  # the device nccl's object collectives use
            if rank > 0:
                logging.getLogger().setLevel(logging.WARNING)
                args.no_progress = True
        return _run_eval(args, out, rank=rank, world=world)
    finally:
        if world > 1 and not joined and dist.is_initialized():
            dist.destroy_process_group()


CLI_DEFAULTS: dict[str, Any] = {
    "attacks": "clean,autoattack",
    "version": "standard",
    "norm": "Linf",
    "batch_size": 256,
    "fmn_steps": 1000,
}
"""The defaults of the options a preset can set (their flags default to None, meaning "not
given")."""


def _parse_grid(text: str | list[float] | None) -> list[float] | None:
    """``--eps-grid``'s comma-separated numbers (checked later by make_plan), or None."""
    if text is None or isinstance(text, list):
        return text
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"Invalid eps_grid value: {text!r} (comma-separated numbers)") from None


def _parse_slice(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``--fmn-slice START:STOP`` (checked later by make_plan), or None."""
    if text is None or isinstance(text, tuple):
        return text
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise UserError(f"Invalid fmn_slice value: {text!r} (START:STOP, e.g. 2048:2176)") from None


def _apply_preset(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the options not given from ``--preset`` (or from :data:`CLI_DEFAULTS` without one);
    returns the options given explicitly that differ from the preset's values (the record's
    overrides).

    With a preset, an ``--eps`` given explicitly also moves the security curve's default grid,
    and ``--attacks`` without ``fmn`` drops the preset's ``fmn_slice``.
    """
    from ..eval.presets import PRESETS

    preset = None
    if args.preset is not None:
        preset = PRESETS.get(args.preset)
        if preset is None:
            raise UserError(
                f"Invalid preset value: {args.preset!r} (choose {', '.join(sorted(PRESETS))})"
            )
    settings = preset.settings if preset is not None else {}
    keys = sorted({*CLI_DEFAULTS, *settings})
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    overrides = {k: v for k, v in given.items() if k in settings and v != settings[k]}
    for key in keys:
        if key not in given:
            setattr(args, key, settings[key] if key in settings else CLI_DEFAULTS[key])
    if preset is None:
        return overrides
    if "eps" in settings and "eps" not in given:
        args.eps_source = f"preset {preset.name}"
    stages = [a.strip() for a in str(args.attacks).split(",")]
    if "fmn" not in stages and "fmn_slice" not in given:
        args.fmn_slice = None
    if "fmn" in stages and args.eps_grid is None and args.eps is not None:
        args.eps_grid = preset.eps_grid(args.eps)
    return overrides


def _check_early(args: argparse.Namespace) -> dict[str, Any]:
    """The checks that need no model, run before anything is loaded; fills the preset's
    settings and returns its overrides."""
    from ..eval import ThreatModel

    args.eps_grid = _parse_grid(args.eps_grid)
    args.fmn_slice = _parse_slice(args.fmn_slice)
    overrides = _apply_preset(args)
    try:
        ThreatModel.parse(args.norm)
    except ValueError as e:
        raise UserError(f"--norm: {e}") from None
    return overrides


def _resolve_eps(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[float, str, list[str]]:
    """``--eps``, else the checkpoint config's; returns ``(eps, source, notes)``."""
    from ..data import DATASET_INFO

    if args.eps is not None:
        return args.eps, getattr(args, "eps_source", None) or "--eps", []
    if "eps" in cfg and cfg["eps"] is None and cfg.get("dataset") in DATASET_INFO:
        # a training config's ``eps: null``: the run trained at its dataset's standard L-inf eps
        eps = DATASET_INFO[cfg["dataset"]].eps_linf
        notes = [f"eps={eps}: the training's eps ({cfg['dataset']}'s default; no --eps given)"]
    elif cfg.get("eps") is None:
        raise UserError("--eps is required (the checkpoint config records no eps)")
    else:
        eps = float(cfg["eps"])
        notes = [f"eps={eps} taken from the checkpoint config (no --eps given)"]
    if args.norm != "Linf":
        notes.append("the checkpoint's eps was recorded for its training threat model")
    return eps, "checkpoint config", notes


def _plan_kwargs(args: argparse.Namespace, eps: float) -> dict[str, Any]:
    """:func:`~robust_agc.eval.benchmark`'s attack settings from the flags, checked by
    :func:`~robust_agc.eval.make_plan` (a bad value is a UserError)."""
    from ..eval import make_plan

    version: Any = args.version
    if version not in ("standard", "plus", "rand"):
        version = [c.strip() for c in version.split(",") if c.strip()]
    kwargs: dict[str, Any] = {
        "eps": eps,
        "threat_model": args.norm,
        "n_examples": args.n_examples,
        "attacks": args.attacks,
        "version": version,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "pgd_steps": args.pgd_steps,
        "pgd_restarts": args.pgd_restarts,
        "pgd_step_size": args.pgd_step_size,
        "fmn_steps": args.fmn_steps,
        "eps_grid": args.eps_grid,
        "fmn_slice": args.fmn_slice,
    }
    try:
        make_plan(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None
    return kwargs


def _model_info(info: dict[str, Any], eps_source: str) -> dict[str, Any]:
    """The record's ``model_info``: the loader's description, the training config's key settings."""
    cfg = info.get("config") or {}
    model_info = {k: v for k, v in info.items() if k != "config"}
    if cfg:
        model_info["config"] = cfg
        for k in ("sparse_method", "sparsity", "optimizer", "objective"):
            if k in cfg:
                model_info[k] = cfg[k]
    model_info["eps_source"] = eps_source
    return model_info


def _run_eval(args: argparse.Namespace, out: Path | None, *, rank: int, world: int) -> int:
    from ..eval import benchmark

    overrides = _check_early(args)
    model, info = _load(args)
    dataset = args.dataset or info.get("dataset")
    if dataset is None:
        raise UserError("no dataset: pass --dataset")
    eps, eps_source, notes = _resolve_eps(args, info.get("config") or {})
    kwargs = _plan_kwargs(args, eps)
    result = benchmark(
        model,
        dataset=dataset,
        data_dir=args.data_dir,
        device=args.device,
        state_file=args.state,
        progress=not args.no_progress,
        run_checks=not args.no_checks,
        model_info=_model_info(info, eps_source),
        architecture=info.get("architecture"),
        notes=notes,
        compression=info.get("compression"),
        **kwargs,
    )
    result.attack_config["eps_source"] = eps_source
    if args.preset is not None:
        _record_preset(result, args.preset, info, dataset, overrides)
    if rank == 0:
        _write_result(result, out, overwrite=args.overwrite, world=world)
    return 0


def _record_preset(
    result: Any, name: str, info: dict[str, Any], dataset: str, overrides: dict[str, Any]
) -> None:
    """The preset's block in the record (APB: model key, FMN accuracy at 8/255, deviations)."""
    from ..eval.presets import apb_record

    cfg = info.get("config") or {}
    method = cfg.get("sparse_method") or info.get("sparse_method")
    if method and cfg.get("optimizer"):
        method = f"{method}-{cfg['optimizer']}"
    result.preset = name
    result.preset_record = apb_record(
        method=method,
        architecture=info.get("architecture"),
        dataset=dataset,
        structure=result.structure,
        sparsity=result.sparsity,
        radii=result.radii,
        overrides=overrides,
        threat_model=result.threat_model,
    )
    if overrides:
        given = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        result.notes.append(f"preset {name} with explicit overrides: {given}")


def _write_result(result: Any, out: Path | None, *, overwrite: bool, world: int) -> None:
    """The record to ``out`` (and a one-line summary on stdout), or the record to stdout."""
    if out is None:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    result.save(out, overwrite=overwrite)
    stages = ", ".join(f"{st['name']} {st['robust_acc']:.2%}" for st in result.to_dict()["stages"])
    fired = [k for k, v in result.flags.items() if v]
    procs = f" ({world} processes)" if world > 1 else ""
    print(
        f"first {result.n_examples} test points, {result.threat_model} eps {result.eps:g}: "
        f"{stages} (worst case over stages; gradient-masking flags: "
        f"{', '.join(fired) if fired else 'none'}); result in {out}{procs}"
    )
