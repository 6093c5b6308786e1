"""Run a study: expand ``experiments/configs/<study>.yaml`` into runs, train and evaluate them.

A study file holds ``base`` (TrainConfig settings shared by every run), ``grid`` (axes; the cells
are their cartesian product), ``seeds``, an optional final ``eval`` of each run's checkpoint
(``robust-agc eval`` options) and an optional ``baseline`` (the axis value whose final validation
robust accuracy is the target of the other cells, used by ``summarize.py``). An axis value is a
scalar (sets the setting named like the axis; label ``<axis><value>``) or a mapping of settings with
a ``name`` (the label). Optional keys: ``exclude`` (rules ``{axis: label or [labels], ...}``; a cell
matching every axis of a rule is dropped), ``extra_evals`` (further evaluations of the same checkpoint
on some seeds, e.g. AutoAttack on seed 0, each written to ``eval_<name>.json``) and ``reuse`` (names
of other studies whose stored runs with the identical configuration and final evaluation are copied
instead of retrained). Example::

    base: {model: small-cnn, epochs: 8, ...}
    grid:
      sparse: [{name: rigl90, sparse_method: rigl, sparsity: 0.9}, ...]
      optimizer: [sgd, agc, {name: svrg-ramp, optimizer: svrg, svrg_schedule: ramp}]
    seeds: [0, 1, 2]
    exclude: [{sparse: bsr90, optimizer: svrg-ramp}]
    eval: {checkpoint: best.pt, attacks: clean,pgd, n_examples: 500, pgd_steps: 50}
    extra_evals: [{name: autoattack, seeds: [0], attacks: clean,autoattack, n_examples: 500}]
    baseline: {axis: optimizer, value: sgd}

Runs go to ``experiments/runs/<study>/<cell>/s<seed>`` (git-ignored); a finished run's small files
(config.yaml, metrics.jsonl, summary.json, eval.json) are copied to
``experiments/results/<study>/<cell>/s<seed>`` (committed). Finished runs are skipped, interrupted
ones resumed (``--resume``; the evaluation resumes from its state file), and ``--dry-run`` lists what
remains. One run at a time, in-process, through the library's ``train`` and ``robust-agc eval``.

An extra evaluation needs the checkpoint, which lives in the git-ignored run folder and is gone on
a fresh machine. A stored run whose extra evaluation is missing and whose checkpoint is gone is
``rebuild``: it is trained again from its seed (a CPU run is bit-for-bit reproducible on the CPU
model that recorded it; on another model the driver refuses before training), the rebuilt
run's metrics must equal the stored ones in every field but the timings (else the driver stops
with an error and the stored results are kept), and only the missing extra evaluation files are
added to the stored results: their config, metrics, summary and final evaluation stay as they were.

    .venv/bin/python experiments/run_study.py experiments/configs/lr_sweep.yaml --dry-run
    .venv/bin/python experiments/run_study.py experiments/configs/lr_sweep.yaml --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from robust_agc.config import TrainConfig
from robust_agc.errors import UserError
from robust_agc.train import TIMING_FIELDS, cpu_model

# ------------------------------------------------------------------------------ hyperparameters
EXPERIMENTS = Path(__file__).resolve().parent
RUNS_ROOT = EXPERIMENTS / "runs"  # git-ignored: checkpoints and everything else
RESULTS_ROOT = EXPERIMENTS / "results"  # committed: the small JSON/YAML files below
RESULT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval.json")
EVAL_FILE = "eval.json"  # robust-agc report attaches eval*.json found in a run folder
EVAL_STATE_FILE = "state_final_eval.json"  # must not match eval*.json
CONFIGS_ROOT = EXPERIMENTS / "configs"  # where ``reuse`` finds the other studies' files
DEFAULT_THREADS = 1
# keys that may differ between a stored result and the study file without making it stale
UNCOMPARED_KEYS = frozenset(
    {"out", "threads", "progress", "resume", "overwrite", "device", "data_dir"}
)
TARGET_METRICS = ("val_robust_acc", "val_clean_acc")  # what the baseline's target is set on
EVAL_DEFAULTS: dict[str, Any] = {
    "checkpoint": "best.pt",
    "attacks": "clean,pgd",
    "n_examples": 500,
    "eps": None,  # None: the checkpoint's training eps
    "pgd_steps": 50,
    "pgd_restarts": 1,
    "batch_size": 250,
    "seed": 0,
    "version": "standard",  # AutoAttack version, used when attacks has autoattack
}
STUDY_KEYS = frozenset(
    {"study", "description", "base", "grid", "seeds", "eval", "baseline", "exclude"}
    | {"extra_evals", "reuse"}
)

logger = logging.getLogger("run_study")

__all__ = [
    "Study",
    "RunSpec",
    "load_study",
    "expand",
    "run_status",
    "check_reproduced",
    "execute",
    "eval_argv",
    "main",
]

_TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    name: str
    base: dict[str, Any]
    axes: dict[str, list[tuple[str, dict[str, Any]]]]  # axis -> [(label, settings)]
    seeds: list[int]
    eval: dict[str, Any] | None
    baseline: dict[str, str] | None  # {"axis": ..., "value": label, "metric": ...}
    description: str = ""
    exclude: tuple[dict[str, frozenset[str]], ...] = ()
    extra_evals: tuple[dict[str, Any], ...] = ()  # each: name, seeds (None: all), eval options
    reuse: tuple[str, ...] = ()

    def extra_evals_for(self, seed: int) -> list[dict[str, Any]]:
        """The extra evaluations that apply to runs of this seed."""
        return [e for e in self.extra_evals if e["seeds"] is None or seed in e["seeds"]]


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its cell, seed, full settings and folders."""

    study: str
    cell: str
    labels: dict[str, str]  # axis -> label of this cell
    seed: int
    settings: dict[str, Any]  # TrainConfig keyword arguments (without out/threads/...)
    run_dir: Path
    result_dir: Path

    def config(self, threads: int | None = DEFAULT_THREADS, **extra: Any) -> TrainConfig:
        """The validated TrainConfig of this run (``out`` = the run folder)."""
        cfg = TrainConfig(
            **{**self.settings, "out": str(self.run_dir), "threads": threads, **extra}
        )
        cfg.validate()
        return cfg


def _check_keys(settings: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for k, v in settings.items():
        key = str(k).replace("-", "_")
        if key not in _TRAIN_KEYS:
            raise UserError(f"unknown setting {k!r} in {where}")
        if key in UNCOMPARED_KEYS or key == "seed":
            raise UserError(f"setting {k!r} in {where} is chosen by the driver, not the study")
        out[key] = v
    return out


def load_study(
    path: str | Path, *, runs_root: Path = RUNS_ROOT, results_root: Path = RESULTS_ROOT
) -> Study:
    """Parse and validate a study YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping")
    unknown = set(data) - STUDY_KEYS
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in {path}")
    name = str(data.get("study") or path.stem)
    base = _check_keys(data.get("base") or {}, f"{path}: base")
    axes: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise UserError(f"Invalid grid value: {grid!r} (a mapping axis -> list of values)")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"Invalid grid value: axis {axis!r} needs a non-empty list")
        entries: list[tuple[str, dict[str, Any]]] = []
        for v in values:
            if isinstance(v, dict):
                if "name" not in v:
                    raise UserError(f"Invalid grid value: {v!r} in axis {axis!r} has no name")
                label = str(v["name"])
                settings = _check_keys(
                    {k: x for k, x in v.items() if k != "name"}, f"{path}: grid.{axis}"
                )
            else:
                label = f"{axis}{v}"
                settings = _check_keys({axis: v}, f"{path}: grid.{axis}")
            if any(c in label for c in "/\\ ") or label in ("", ".", ".."):
                raise UserError(f"Invalid grid value: label {label!r} is not a folder name")
            entries.append((label, settings))
        labels = [lab for lab, _ in entries]
        if len(set(labels)) != len(labels):
            raise UserError(f"Invalid grid value: duplicate labels in axis {axis!r}: {labels}")
        axes[str(axis)] = entries
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise UserError(f"Invalid seeds value: {seeds!r} (a list of distinct integers)")
    ev = data.get("eval")
    if ev is not None:
        if not isinstance(ev, dict) or set(ev) - set(EVAL_DEFAULTS):
            raise UserError(f"Invalid eval value: {ev!r} (keys: {', '.join(EVAL_DEFAULTS)})")
        ev = {**EVAL_DEFAULTS, **ev}
    bl = data.get("baseline")
    if bl is not None:
        if (
            not isinstance(bl, dict)
            or not {"axis", "value"} <= set(bl) <= {"axis", "value", "metric"}
            or bl.get("metric", "val_robust_acc") not in TARGET_METRICS
            or bl["axis"] not in axes
            or str(bl["value"]) not in [lab for lab, _ in axes[bl["axis"]]]
            and f"{bl['axis']}{bl['value']}" not in [lab for lab, _ in axes[bl["axis"]]]
        ):
            raise UserError(
                f"Invalid baseline value: {bl!r} (axis: a grid axis, value: one of its labels, "
                f"optional metric: {', '.join(TARGET_METRICS)})"
            )
        value = str(bl["value"])
        if value not in [lab for lab, _ in axes[bl["axis"]]]:
            value = f"{bl['axis']}{bl['value']}"
        bl = {
            "axis": str(bl["axis"]),
            "value": value,
            "metric": str(bl.get("metric", "val_robust_acc")),
        }
    exclude = _parse_exclude(data.get("exclude"), axes)
    extra = _parse_extra_evals(data.get("extra_evals"), ev)
    reuse = data.get("reuse") or []
    if not isinstance(reuse, list) or not all(isinstance(r, str) and r for r in reuse):
        raise UserError(f"Invalid reuse value: {reuse!r} (a list of study names)")
    if reuse and extra:
        raise UserError(
            "a study with reuse cannot have extra_evals (reused runs have no checkpoint)"
        )
    study = Study(
        name=name,
        base=base,
        axes=axes,
        seeds=list(seeds),
        eval=ev,
        baseline=bl,
        description=str(data.get("description") or ""),
        exclude=exclude,
        extra_evals=extra,
        reuse=tuple(reuse),
    )
    # validate every cell's configuration now, not hours later
    for spec in expand(study, runs_root=runs_root, results_root=results_root):
        spec.config()
    return study


def _parse_exclude(
    rules: Any, axes: dict[str, list[tuple[str, dict[str, Any]]]]
) -> tuple[dict[str, frozenset[str]], ...]:
    if rules is None:
        return ()
    if not isinstance(rules, list):
        raise UserError(f"Invalid exclude value: {rules!r} (a list of {{axis: labels}} rules)")
    out = []
    for rule in rules:
        if not isinstance(rule, dict) or not rule:
            raise UserError(f"Invalid exclude value: {rule!r} (a mapping axis -> labels)")
        parsed: dict[str, frozenset[str]] = {}
        for axis, labels in rule.items():
            labels = labels if isinstance(labels, list) else [labels]
            known = [lab for lab, _ in axes.get(str(axis), [])]
            bad = [str(x) for x in labels if str(x) not in known]
            if str(axis) not in axes or bad or not labels:
                raise UserError(
                    f"Invalid exclude value: {rule!r} (axis {axis!r} has labels {known})"
                )
            parsed[str(axis)] = frozenset(str(x) for x in labels)
        out.append(parsed)
    return tuple(out)


def _parse_extra_evals(entries: Any, ev: dict[str, Any] | None) -> tuple[dict[str, Any], ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list) or ev is None:
        raise UserError(
            f"Invalid extra_evals value: {entries!r} (a list of evaluations; needs an eval)"
        )
    out, names = [], set()
    for e in entries:
        allowed = set(EVAL_DEFAULTS) | {"name", "seeds"}
        if not isinstance(e, dict) or set(e) - allowed or "name" not in e:
            raise UserError(
                f"Invalid extra_evals value: {e!r} (keys: name, seeds, {', '.join(EVAL_DEFAULTS)})"
            )
        name = str(e["name"])
        if not name.replace("-", "").replace("_", "").isalnum() or name in names:
            raise UserError(f"Invalid extra_evals value: name {name!r} (unique, [A-Za-z0-9_-])")
        names.add(name)
        seeds = e.get("seeds")
        if seeds is not None and (
            not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds)
        ):
            raise UserError(f"Invalid extra_evals value: seeds {seeds!r} (a list of integers)")
        out.append({**ev, **{k: v for k, v in e.items() if k != "name"}, "name": name})
    return tuple(out)


def extra_eval_file(extra: dict[str, Any]) -> str:
    """The file name of an extra evaluation's result (``eval_<name>.json``)."""
    return f"eval_{extra['name']}.json"


def _excluded(study: Study, labels: dict[str, str]) -> bool:
    return any(all(labels[a] in labs for a, labs in rule.items()) for rule in study.exclude)


def expand(
    study: Study, *, runs_root: Path = RUNS_ROOT, results_root: Path = RESULTS_ROOT
) -> list[RunSpec]:
    """All runs of the study, seed-major (every cell's seed 0 first, then seed 1, ...)."""
    axis_names = list(study.axes)
    cells: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    for combo in itertools.product(*(study.axes[a] for a in axis_names)):
        settings = dict(study.base)
        labels: dict[str, str] = {}
        for axis, (label, s) in zip(axis_names, combo):
            settings.update(s)
            labels[axis] = label
        if _excluded(study, labels):
            continue
        cell = "_".join(labels.values()) or "base"
        cells.append((cell, labels, settings))
    specs = []
    for seed in study.seeds:
        for cell, labels, settings in cells:
            specs.append(
                RunSpec(
                    study=study.name,
                    cell=cell,
                    labels=labels,
                    seed=seed,
                    settings={**settings, "seed": seed},
                    run_dir=runs_root / study.name / cell / f"s{seed}",
                    result_dir=results_root / study.name / cell / f"s{seed}",
                )
            )
    return specs


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def _n_epochs_done(folder: Path) -> int:
    met = folder / "metrics.jsonl"
    if not met.is_file():
        return 0
    return sum(1 for line in met.read_text(encoding="utf-8").splitlines() if line.strip())


def _stale_keys(spec: RunSpec, folder: Path) -> list[str]:
    """Settings whose stored value (``folder/config.yaml``) differs from the study's."""
    stored = _read_yaml(folder / "config.yaml")
    want = spec.config().to_dict()
    return sorted(
        k for k in want if k not in UNCOMPARED_KEYS and k in stored and stored[k] != want[k]
    )


def _result_names(spec: RunSpec, study: Study, *, extra: bool = True) -> list[str]:
    names = list(RESULT_FILES)
    if extra:
        names += [extra_eval_file(e) for e in study.extra_evals_for(spec.seed)]
    return names


def _evals_done(folder: Path, spec: RunSpec, study: Study, *, extra: bool) -> bool:
    if study.eval is not None and not (folder / EVAL_FILE).is_file():
        return False
    return not extra or all(
        (folder / extra_eval_file(e)).is_file() for e in study.extra_evals_for(spec.seed)
    )


def reusable_source(spec: RunSpec, study: Study) -> Path | None:
    """A stored result of a ``reuse`` study with this run's configuration and final evaluation."""
    want = {k: v for k, v in spec.config().to_dict().items() if k not in UNCOMPARED_KEYS}
    results_root = spec.result_dir.parents[2]
    for other in study.reuse:
        path = CONFIGS_ROOT / f"{other}.yaml"
        if not path.is_file():
            raise UserError(f"reuse: no study file {path}")
        other_eval = load_study(path, results_root=results_root).eval
        if other_eval != study.eval:
            continue
        for cfg_file in sorted((results_root / other).glob(f"*/s{spec.seed}/config.yaml")):
            folder = cfg_file.parent
            stored = _read_yaml(cfg_file)
            if not all(k in stored and stored[k] == v for k, v in want.items()):
                continue
            epochs = spec.config().epochs
            if not (folder / "summary.json").is_file() or _n_epochs_done(folder) < epochs:
                continue
            if study.eval is None:
                return folder
            if (folder / EVAL_FILE).is_file():
                stored_ev = json.loads((folder / EVAL_FILE).read_text(encoding="utf-8"))
                if stored_ev.get("n_examples") == study.eval["n_examples"]:
                    return folder
    return None


def _training_stored(spec: RunSpec, study: Study) -> bool:
    """The stored results hold the whole training and the final evaluation (extras aside)."""
    res = spec.result_dir
    return (
        (res / "summary.json").is_file()
        and _n_epochs_done(res) >= spec.config().epochs
        and _evals_done(res, spec, study, extra=False)
    )


def run_status(spec: RunSpec, study: Study, *, extra: bool = True) -> str:
    """``done`` (results stored), ``stale`` (stored results from another configuration),
    ``eval`` (trained, an evaluation or the copy missing), ``resume``, ``restart`` (a folder
    without a checkpoint: killed during its first epoch), ``reuse`` (an identical run of a
    ``reuse`` study is stored), ``rebuild`` (stored, but an extra evaluation is missing and the
    checkpoint it needs is gone: the run is trained again) or ``new``. ``extra=False`` ignores the
    extra evaluations."""
    epochs = spec.config().epochs
    res, run = spec.result_dir, spec.run_dir
    if (res / "config.yaml").is_file() and _stale_keys(spec, res):
        return "stale"
    if (run / "config.yaml").is_file() and _stale_keys(spec, run):
        return "stale"
    res_done = (res / "summary.json").is_file() and _n_epochs_done(res) >= epochs
    if res_done and _evals_done(res, spec, study, extra=extra):
        return "done"
    if (run / "summary.json").is_file() and _n_epochs_done(run) >= epochs:
        return "eval"
    if (run / "last.pt").is_file():
        return "resume"
    if run.exists() and any(run.iterdir()):
        return "restart"
    if _training_stored(spec, study):
        return "rebuild"
    if study.reuse and reusable_source(spec, study) is not None:
        return "reuse"
    return "new"


def _comparable(folder: Path) -> list[str]:
    """The per-epoch records of ``folder/metrics.jsonl`` without their timing fields, as JSON
    text per record (so that NaN equals NaN)."""
    rows = []
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append(
                json.dumps({k: v for k, v in row.items() if k not in TIMING_FIELDS}, sort_keys=True)
            )
    return rows


def check_reproduced(spec: RunSpec) -> None:
    """Raise UserError unless the rebuilt run's metrics equal the stored ones (timings aside)."""
    stored, rebuilt = _comparable(spec.result_dir), _comparable(spec.run_dir)
    if stored == rebuilt:
        return
    bad = next(
        (i + 1 for i, (a, b) in enumerate(zip(stored, rebuilt)) if a != b),
        min(len(stored), len(rebuilt)) + 1,
    )
    raise UserError(
        f"{spec.study}/{spec.cell}/s{spec.seed}: the rebuilt run differs from the stored one from "
        f"epoch {bad} on (another code version or machine?); stored results kept, rebuilt run in "
        f"{spec.run_dir}"
    )


def eval_argv(
    spec: RunSpec, ev: dict[str, Any], out: str = EVAL_FILE, state: str = EVAL_STATE_FILE
) -> list[str]:
    """The ``robust-agc eval`` arguments of one evaluation of the run (resumable state file)."""
    argv = [
        "eval",
        str(spec.run_dir / ev["checkpoint"]),
        "--attacks",
        str(ev["attacks"]),
        "--n-examples",
        str(ev["n_examples"]),
        "--pgd-steps",
        str(ev["pgd_steps"]),
        "--pgd-restarts",
        str(ev["pgd_restarts"]),
        "--batch-size",
        str(ev["batch_size"]),
        "--seed",
        str(ev["seed"]),
        "--state",
        str(spec.run_dir / state),
        "--out",
        str(spec.run_dir / out),
        "--overwrite",
        "--no-progress",
    ]
    if ev.get("eps") is not None:
        argv += ["--eps", str(ev["eps"])]
    if "autoattack" in str(ev["attacks"]).split(","):
        argv += ["--version", str(ev["version"])]
    return argv


def _copy_results(
    spec: RunSpec, study: Study, src_dir: Path | None = None, *, missing_only: bool = False
) -> None:
    spec.result_dir.mkdir(parents=True, exist_ok=True)
    for name in _result_names(spec, study):
        src = (src_dir or spec.run_dir) / name
        if missing_only and (spec.result_dir / name).is_file():
            continue
        if src.is_file():
            tmp = spec.result_dir / (name + ".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(spec.result_dir / name)


def _evaluate(spec: RunSpec, ev: dict[str, Any], out: str, state: str, threads: int) -> None:
    import torch

    from robust_agc.cli import main as cli_main

    torch.set_num_threads(threads)
    argv = eval_argv(spec, ev, out, state)
    logger.info("robust-agc %s", " ".join(argv))
    rc = cli_main(argv)
    if rc != 0:
        raise RuntimeError(f"robust-agc eval exited with status {rc} for {spec.run_dir}")


def execute(
    spec: RunSpec, study: Study, *, threads: int = DEFAULT_THREADS, extra: bool = True
) -> str:
    """Bring one run to ``done``: train (new, restarted or resumed) or copy an identical run of a
    ``reuse`` study, evaluate (final and, with ``extra``, the extra evaluations), copy the results.

    Returns the status the run had before. A ``stale`` run raises UserError (delete its folders or
    change the study's name to rerun it). A run whose training and final evaluation are stored
    (``rebuild``, or a rebuild that was interrupted) is trained again only for the checkpoint of
    its missing extra evaluations: the rebuilt metrics must match the stored ones
    (:func:`check_reproduced`), and only the missing files are added to the stored results.
    """
    from robust_agc.train import train

    status = run_status(spec, study, extra=extra)
    if status == "done":
        return status
    if status == "stale":
        raise UserError(
            f"{spec.study}/{spec.cell}/s{spec.seed}: stored results differ from the study file "
            f"({', '.join(_stale_keys(spec, spec.result_dir) or _stale_keys(spec, spec.run_dir))})"
        )
    if status == "reuse":
        src = reusable_source(spec, study)
        assert src is not None
        logger.info("reuse %s for %s/%s/s%d", src, spec.study, spec.cell, spec.seed)
        _copy_results(spec, study, src)
        return status
    stored = _training_stored(spec, study)
    if status == "rebuild":
        summary = json.loads((spec.result_dir / "summary.json").read_text(encoding="utf-8"))
        recorded = (summary.get("machine") or {}).get("cpu")
        if recorded and recorded != cpu_model():
            raise UserError(
                f"{spec.study}/{spec.cell}/s{spec.seed}: stored on a {recorded!r} CPU, this is a "
                f"{cpu_model()!r}: a rebuild would not reproduce it bit for bit (its extra "
                "evaluation needs a machine of the stored kind, or a seed trained on this one)"
            )
    if status in ("new", "restart", "resume", "rebuild"):
        cfg = spec.config(
            threads,
            progress=False,
            resume=status == "resume",
            overwrite=status == "restart",
        )
        spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
        logger.info("%s %s/%s/s%d", status, spec.study, spec.cell, spec.seed)
        train(cfg)
    if stored:
        check_reproduced(spec)
    elif study.eval is not None and not (spec.run_dir / EVAL_FILE).is_file():
        _evaluate(spec, study.eval, EVAL_FILE, EVAL_STATE_FILE, threads)
    for e in study.extra_evals_for(spec.seed) if extra else []:
        out = extra_eval_file(e)
        if not (spec.run_dir / out).is_file() and not (spec.result_dir / out).is_file():
            _evaluate(spec, e, out, f"state_final_{e['name']}.json", threads)
    _copy_results(spec, study, missing_only=stored)
    return status


def _projection(specs: list[RunSpec], statuses: list[str], study: Study) -> str:
    """Mean measured time of the stored runs (training + final evaluation) x the runs that still
    need training; runs missing only an extra evaluation are counted and named apart (their time
    is not projected: an extra evaluation, e.g. AutoAttack, costs differently)."""
    times = []
    for spec, st in zip(specs, statuses):
        if st != "done":
            continue
        s = json.loads((spec.result_dir / "summary.json").read_text(encoding="utf-8"))
        t = float(s.get("wall_time_s", 0.0))
        if (spec.result_dir / EVAL_FILE).is_file():
            e = json.loads((spec.result_dir / EVAL_FILE).read_text(encoding="utf-8"))
            t += float((e.get("timings") or {}).get("total", 0.0))
        times.append(t)
    left = sum(st != "done" for st in statuses)
    extra_runs = [
        f"{spec.cell}/s{spec.seed}"
        for spec, st in zip(specs, statuses)
        if st != "done" and _training_stored(spec, study)
    ]
    apart = (
        f" ({len(extra_runs)} of them only for an extra evaluation, not in the projection: "
        f"{', '.join(extra_runs)})"
        if extra_runs
        else ""
    )
    if not times:
        return f"{left} runs remain{apart} (no stored run to project their time from)"
    mean = statistics.fmean(times)
    return (
        f"{left} runs remain{apart}; stored runs took {mean:.0f} s on average (training + final "
        f"eval), so about {mean * (left - len(extra_runs)) / 3600:.2f} CPU-hours remain at that rate"
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of this script."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="study YAML file (experiments/configs/<study>.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list every run and its status")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads")
    p.add_argument("--runs-root", default=str(RUNS_ROOT), help="folder of the run folders")
    p.add_argument("--results-root", default=str(RESULTS_ROOT), help="folder of the results")
    p.add_argument("--only", default="*", help="run only cells matching this glob")
    p.add_argument(
        "--seeds",
        default=None,
        help="run only these seeds (comma-separated), e.g. 0 for the extra evaluations of seed 0",
    )
    p.add_argument(
        "--no-extra",
        action="store_true",
        help="train and run the final evaluation only; leave the extra evaluations for later",
    )
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new run after this many minutes (a started run finishes)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on user errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.threads < 1:
            raise UserError(f"Invalid threads value: {args.threads}")
        roots = {"runs_root": Path(args.runs_root), "results_root": Path(args.results_root)}
        study = load_study(args.study, **roots)
        specs = [s for s in expand(study, **roots) if fnmatch.fnmatchcase(s.cell, args.only)]
        if args.seeds is not None:
            try:
                keep = {int(x) for x in args.seeds.split(",")}
            except ValueError:
                raise UserError(f"Invalid seeds value: {args.seeds!r} (e.g. 0,1)") from None
            specs = [s for s in specs if s.seed in keep]
        if not specs:
            raise UserError(f"no run of {study.name} matches {args.only!r} and seeds {args.seeds}")
        extra = not args.no_extra
        statuses = [run_status(s, study, extra=extra) for s in specs]
        if args.dry_run:
            for s, st in zip(specs, statuses):
                print(f"{st:8s} {s.study}/{s.cell}/s{s.seed}")
            print(_projection(specs, statuses, study))
            return 0
        t0, n = time.monotonic(), 0
        for s, st in zip(specs, statuses):
            if st == "done":
                continue
            if args.max_runs is not None and n >= args.max_runs:
                break
            if args.max_minutes is not None and time.monotonic() - t0 > 60 * args.max_minutes:
                logger.info("time budget of %.0f min spent: stopping", args.max_minutes)
                break
            execute(s, study, threads=args.threads, extra=extra)
            n += 1
        statuses = [run_status(s, study, extra=extra) for s in specs]
        print(_projection(specs, statuses, study))
    except UserError as e:
        print(f"run_study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
