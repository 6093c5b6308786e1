"""Run a study: expand ``experiments/configs/<study>.yaml`` into runs, train and evaluate them.

A study file holds ``base`` (TrainConfig settings shared by every run), ``grid`` (axes; the cells
are their cartesian product), ``seeds``, an optional final ``eval`` of each run's checkpoint
(``robust-agc eval`` options) and an optional ``baseline`` (the axis value whose final validation
robust accuracy is the target of the other cells, used by ``summarize.py``). An axis value is a
scalar (sets the setting named like the axis; label ``<axis><value>``) or a mapping of settings with
a ``name`` (the label). Optional keys: ``exclude`` (rules ``{axis: label or [labels], ...}``; a cell
matching every axis of a rule is dropped), ``extra_evals`` (further evaluations of the same checkpoint
on some seeds, e.g. AutoAttack on seed 0, each written to ``eval_<name>.json``; ``cells: [glob, ...]``
restricts one to the matching cells) and ``reuse`` (names of other studies whose stored runs with the
identical configuration and final evaluation are copied instead of retrained, with their extra
evaluations where the other study made them with the same options; a setting that a stored
``config.yaml`` predates counts as its default, and ``eps: null`` in an evaluation as the run's
eps) and ``speed`` (``{cells: [glob, ...], batch_size, repeats, warmup}``: each matching run's
evaluated checkpoint is exported to a physically smaller network and its inference speed timed
against the full-width architecture, :func:`robust_agc.cli.export.measure_export_speed`, with the
driver's ``--threads``, into ``speed.json``; handled as an extra evaluation: after the extra
evaluations, skipped by ``--no-extra``, rebuilt when its checkpoint is gone). Example::

    base: {model: small-cnn, epochs: 8, ...}
    grid:
      sparse: [{name: rigl90, sparse_method: rigl, sparsity: 0.9}, ...]
      optimizer: [sgd, agc, {name: svrg-ramp, optimizer: svrg, svrg_schedule: ramp}]
    seeds: [0, 1, 2]
    exclude: [{sparse: bsr90, optimizer: svrg-ramp}]
    eval: {checkpoint: best.pt, attacks: clean,pgd, n_examples: 500, pgd_steps: 50}
    extra_evals: [{name: autoattack, seeds: [0], attacks: clean,autoattack, n_examples: 500}]
    baseline: {axis: optimizer, value: sgd}

A grid value may hold a ``pipeline`` mapping (``method``: lwm, hydra or imp; ``source_cell``: a cell
of the study; optional ``rounds``, ``score_epochs``, ``rewind_epoch``): its cells are pruning
pipelines. The run of such a cell first brings its source cell's run of the same seed to a
checkpoint (training it, finishing it, or rebuilding it when only its results are stored), then
calls :func:`robust_agc.prune.prune` on that run's ``best.pt`` with the cell's settings as the
stages' settings and ``sparsity`` as the target, into the cell's run folder (``pipeline.json``,
one folder per stage, ``model.pt``); ``--resume`` is automatic (``pipeline.json`` says running).
Its evaluations take the last stage's checkpoint, and its results hold the last stage's
``config.yaml metrics.jsonl summary.json``, the evaluations, ``pipeline.json`` (the chain's compute:
``grad_evals_total`` counts the source run and every stage) and each earlier stage's
``metrics.jsonl summary.json`` in ``<stage>/``::

    method:
      - {name: dense, sparse_method: dense, epochs: 4}
      - {name: lwm, sparse_method: static, epochs: 4, pipeline: {method: lwm, source_cell: dense}}

A run that the catastrophic-overfitting guard ended early (``--on-collapse stop`` or ``rollback``)
counts as finished.

Runs go to ``experiments/runs/<study>/<cell>/s<seed>`` (git-ignored); a finished run's small files
(config.yaml, metrics.jsonl, summary.json, eval.json) are copied to
``experiments/results/<study>/<cell>/s<seed>`` (committed). Finished runs are skipped, interrupted
ones resumed (``--resume``; the evaluation resumes from its state file), and ``--dry-run`` lists what
remains (a pipeline cell with its source) and projects the remaining CPU-hours from the stored runs'
time per training epoch. One run at a time, in-process, through the library's ``train``, ``prune``
and ``robust-agc eval``.

An extra evaluation needs the checkpoint, which lives in the git-ignored run folder and is gone on
a fresh machine. A stored run whose extra evaluation is missing and whose checkpoint is gone is
``rebuild``: it is trained again from its seed (a CPU run is bit-for-bit reproducible on a CPU
of the same capability as the one that recorded it, ``torch.backends.cpu.get_cpu_capability()``
and its kernel flags, see :func:`same_cpu_kind`; on another the driver refuses before training), the rebuilt
run's metrics must equal the stored ones in every field but the timings (else the driver stops
with an error and the stored results are kept), and only the missing extra evaluation files are
added to the stored results: their config, metrics, summary and final evaluation stay as they were.

    .venv/bin/python experiments/run_study.py experiments/configs/lr_sweep.yaml --dry-run
    .venv/bin/python experiments/run_study.py experiments/configs/lr_sweep.yaml --threads 1
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from robust_agc.config import EXECUTION_KEYS, TrainConfig
from robust_agc.errors import UserError
from robust_agc.reporting import studies
from robust_agc.reporting.studies import (
    DEFAULT_THREADS,
    EVAL_DEFAULTS,
    SPEED_FILE,
    STUDY_KEYS,
    TARGET_METRICS,
    RunSpec,
    Study,
    extra_eval_file,
    source_spec,
)
from robust_agc.train import TIMING_FIELDS
from robust_agc.utils.machine import machine_info

# ------------------------------------------------------------------------------ hyperparameters
EXPERIMENTS = Path(__file__).resolve().parent
RUNS_ROOT = EXPERIMENTS / "runs"  # git-ignored: checkpoints and everything else
RESULTS_ROOT = EXPERIMENTS / "results"  # committed: the small JSON/YAML files below
RESULT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval.json")
EVAL_FILE = "eval.json"  # robust-agc report attaches eval*.json found in a run folder
EVAL_STATE_FILE = "state_final_eval.json"  # must not match eval*.json
CONFIGS_ROOT = EXPERIMENTS / "configs"  # where ``reuse`` finds the other studies' files
# keys that may differ between a stored result and the study file without making it stale
UNCOMPARED_KEYS = EXECUTION_KEYS
PIPELINE_FILE = "pipeline.json"  # robust_agc.prune's record of a pipeline cell's chain
STAGE_FILES = ("metrics.jsonl", "summary.json")  # kept per earlier stage of a pipeline
logger = logging.getLogger("run_study")

__all__ = [
    "Study",
    "RunSpec",
    "load_study",
    "expand",
    "run_status",
    "reusable_source",
    "source_spec",
    "differing_keys",
    "check_reproduced",
    "execute",
    "eval_argv",
    "main",
    "same_cpu_kind",
    "DEFAULT_THREADS",
    "EVAL_DEFAULTS",
    "STUDY_KEYS",
    "TARGET_METRICS",
    "extra_eval_file",
    "measure_speed",
    "SPEED_FILE",
]


def load_study(
    path: str | Path, *, runs_root: Path = RUNS_ROOT, results_root: Path = RESULTS_ROOT
) -> Study:
    """Parse and validate a study YAML file (:func:`robust_agc.reporting.studies.load_study`,
    with this folder's roots as defaults)."""
    return studies.load_study(path, runs_root=runs_root, results_root=results_root)


def expand(
    study: Study, *, runs_root: Path = RUNS_ROOT, results_root: Path = RESULTS_ROOT
) -> list[RunSpec]:
    """All runs of the study, seed-major (:func:`robust_agc.reporting.studies.expand`, with this
    folder's roots as defaults)."""
    return studies.expand(study, runs_root=runs_root, results_root=results_root)


def same_cpu_kind(stored: dict[str, Any], here: dict[str, Any]) -> tuple[bool, str, str]:
    """Whether a run recorded on the machine ``stored`` (a summary's ``machine`` block) can be
    reproduced bit for bit on ``here`` (:func:`robust_agc.utils.machine_info`), and how each is
    described.

    torch picks its CPU kernels by capability (``AVX512``, ``AVX2``...), not by model name: two
    records agree when their ``cpu_capability`` is equal, and their ``cpu_flags`` too when both
    have them. Records written before those fields existed are compared by their model name
    (``cpu``). A record without any of them is taken as reproducible (nothing to compare)."""
    if stored.get("cpu_capability"):
        same = stored["cpu_capability"] == here.get("cpu_capability")
        if "cpu_flags" in stored and "cpu_flags" in here:
            same = same and sorted(stored["cpu_flags"]) == sorted(here["cpu_flags"])
            return same, _kind(stored), _kind(here)
        return same, repr(stored["cpu_capability"]), repr(here.get("cpu_capability"))
    if stored.get("cpu"):
        return stored["cpu"] == here.get("cpu"), repr(stored["cpu"]), repr(here.get("cpu"))
    return True, "an unrecorded CPU", _kind(here)


def _kind(machine: dict[str, Any]) -> str:
    flags = " ".join(machine.get("cpu_flags") or []) or "none"
    return f"{machine.get('cpu_capability')!r} (flags: {flags})"


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def _n_epochs_done(folder: Path) -> int:
    met = folder / "metrics.jsonl"
    if not met.is_file():
        return 0
    return sum(1 for line in met.read_text(encoding="utf-8").splitlines() if line.strip())


def differing_keys(stored: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The settings of ``want`` whose value in the stored configuration ``stored`` differs (the
    execution keys aside). A key the stored configuration lacks (it predates the setting) holds
    the setting's default: it differs only where ``want`` is not the default."""
    defaults = TrainConfig().to_dict()
    missing = object()
    return sorted(
        k
        for k, v in want.items()
        if k not in UNCOMPARED_KEYS and stored.get(k, defaults.get(k, missing)) != v
    )


def _stale_keys(spec: RunSpec, folder: Path) -> list[str]:
    """Settings whose stored value differs from the study's (``folder/config.yaml``; for a
    pipeline cell, its ``pipeline.json``: the last stage's settings and the pipeline's own)."""
    if spec.pipeline is not None:
        return _pipeline_stale_keys(spec, folder)
    if not (folder / "config.yaml").is_file():
        return []
    return differing_keys(_read_yaml(folder / "config.yaml"), spec.config().to_dict())


def _finished(folder: Path, epochs: int) -> bool:
    """A training run folder (or stored results) whose run ended: its summary is written and it
    trained every epoch, or the catastrophic-overfitting guard ended it (``--on-collapse stop``
    or ``rollback``: ``collapse_guard.stopped`` in the summary)."""
    path = folder / "summary.json"
    if not path.is_file():
        return False
    if _n_epochs_done(folder) >= epochs:
        return True
    summary = json.loads(path.read_text(encoding="utf-8"))
    return bool((summary.get("collapse_guard") or {}).get("stopped"))


def _extra_names(spec: RunSpec, study: Study) -> list[str]:
    """The files of the run's extra evaluations, its speed record (``speed.json``) included."""
    names = [extra_eval_file(e) for e in study.extra_evals_for(spec.seed, spec.cell)]
    return names + [SPEED_FILE] * study.measures_speed(spec.cell)


def _result_names(spec: RunSpec, study: Study, *, extra: bool = True) -> list[str]:
    return list(RESULT_FILES) + (_extra_names(spec, study) if extra else [])


def _evals_done(folder: Path, spec: RunSpec, study: Study, *, extra: bool) -> bool:
    if study.eval is not None and not (folder / EVAL_FILE).is_file():
        return False
    return not extra or all((folder / n).is_file() for n in _extra_names(spec, study))


def _resolved_eval(ev: dict[str, Any] | None, eps: float | None) -> dict[str, Any] | None:
    """Evaluation options as run: ``eps: None`` is the checkpoint's training eps; which seeds and
    cells an extra evaluation covers is not an option of the evaluation."""
    if ev is None:
        return None
    out = {k: v for k, v in ev.items() if k not in ("seeds", "cells")}
    return out | {"eps": eps if ev.get("eps") is None else ev["eps"]}


_REUSE_CACHE: dict[tuple[str, str, str], Study] = {}


def _reuse_study(name: str, results_root: Path) -> Study:
    """The study file of a ``reuse`` study, parsed once per content (it is read for every run)."""
    path = CONFIGS_ROOT / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"reuse: no study file {path}")
    key = (str(path), path.read_text(encoding="utf-8"), str(results_root))
    if key not in _REUSE_CACHE:
        _REUSE_CACHE[key] = load_study(path, results_root=results_root)
    return _REUSE_CACHE[key]


def reusable_source(spec: RunSpec, study: Study) -> Path | None:
    """A stored result of a ``reuse`` study with this run's configuration and final evaluation
    (``eps: None`` read as the run's eps; a setting the stored configuration predates counts as
    its default, :func:`differing_keys`). Pipeline cells are never reused."""
    if spec.pipeline is not None:
        return None
    cfg = spec.config()
    want = cfg.to_dict()
    results_root = spec.result_dir.parents[2]
    for other in study.reuse:
        other_eval = _reuse_study(other, results_root).eval
        if _resolved_eval(other_eval, cfg.eps) != _resolved_eval(study.eval, cfg.eps):
            continue
        for cfg_file in sorted((results_root / other).glob(f"*/s{spec.seed}/config.yaml")):
            folder = cfg_file.parent
            if differing_keys(_read_yaml(cfg_file), want) or not _finished(folder, cfg.epochs):
                continue
            if study.eval is None:
                return folder
            if (folder / EVAL_FILE).is_file():
                stored_ev = json.loads((folder / EVAL_FILE).read_text(encoding="utf-8"))
                if stored_ev.get("n_examples") == study.eval["n_examples"]:
                    return folder
    return None


def _reused_extras(spec: RunSpec, study: Study, src: Path) -> list[str]:
    """The extra evaluation files of this run that a reused folder ``src`` (of another study)
    holds with the same options: that study's extra evaluation of the same name matches."""
    other = _reuse_study(src.parents[1].name, spec.result_dir.parents[2])
    eps = spec.config().eps
    theirs = {e["name"]: _resolved_eval(e, eps) for e in other.extra_evals}
    return [
        extra_eval_file(e)
        for e in study.extra_evals_for(spec.seed, spec.cell)
        if theirs.get(e["name"]) == _resolved_eval(e, eps)
    ]


def _training_stored(spec: RunSpec, study: Study) -> bool:
    """The stored results hold the whole training and the final evaluation (extras aside)."""
    res = spec.result_dir
    if spec.pipeline is not None and not (res / PIPELINE_FILE).is_file():
        return False
    return _finished(res, spec.config().epochs) and _evals_done(res, spec, study, extra=False)


def run_status(spec: RunSpec, study: Study, *, extra: bool = True) -> str:
    """``done`` (results stored), ``stale`` (stored results from another configuration),
    ``eval`` (trained, an evaluation or the copy missing), ``resume``, ``restart`` (a folder
    without a checkpoint: killed during its first epoch), ``reuse`` (an identical run of a
    ``reuse`` study is stored), ``rebuild`` (stored, but an extra evaluation is missing and the
    checkpoint it needs is gone: the run is trained again) or ``new``. ``extra=False`` ignores the
    extra evaluations. A pipeline cell (``spec.pipeline``) is ``eval`` once its pipeline is
    complete, ``resume`` while its ``pipeline.json`` says running, and never ``reuse``."""
    if spec.pipeline is not None:
        return _pipeline_status(spec, study, extra=extra)
    epochs = spec.config().epochs
    res, run = spec.result_dir, spec.run_dir
    if _stale_keys(spec, res) or _stale_keys(spec, run):
        return "stale"
    if _finished(res, epochs) and _evals_done(res, spec, study, extra=extra):
        return "done"
    if _finished(run, epochs):
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
    """Raise UserError unless the rebuilt run's metrics equal the stored ones (timings aside);
    for a pipeline cell, every stored stage's."""
    for stored_dir, rebuilt_dir in _stored_pairs(spec):
        stored, rebuilt = _comparable(stored_dir), _comparable(rebuilt_dir)
        if stored == rebuilt:
            continue
        bad = next(
            (i + 1 for i, (a, b) in enumerate(zip(stored, rebuilt)) if a != b),
            min(len(stored), len(rebuilt)) + 1,
        )
        raise UserError(
            f"{spec.study}/{spec.cell}/s{spec.seed}: the rebuilt run differs from the stored one "
            f"from epoch {bad} on (another code version or machine?); stored results kept, "
            f"rebuilt run in {rebuilt_dir}"
        )


def eval_argv(
    spec: RunSpec, ev: dict[str, Any], out: str = EVAL_FILE, state: str = EVAL_STATE_FILE
) -> list[str]:
    """The ``robust-agc eval`` arguments of one evaluation of the run (resumable state file);
    a pipeline cell's checkpoint is its last stage's."""
    argv = [
        "eval",
        str(_checkpoint_dir(spec) / ev["checkpoint"]),
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
    if "fmn" in str(ev["attacks"]).split(","):
        argv += ["--fmn-steps", str(ev["fmn_steps"])]
        if ev.get("eps_grid") is not None:
            argv += ["--eps-grid", ",".join(str(e) for e in ev["eps_grid"])]
    return argv


def _copy_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)


def _copy_results(
    spec: RunSpec,
    study: Study,
    src_dir: Path | None = None,
    *,
    missing_only: bool = False,
    names: list[str] | None = None,
) -> None:
    for name in _result_names(spec, study) if names is None else names:
        src = (src_dir or spec.run_dir) / name
        if missing_only and (spec.result_dir / name).is_file():
            continue
        if src.is_file():
            _copy_file(src, spec.result_dir / name)


def _evaluate(spec: RunSpec, ev: dict[str, Any], out: str, state: str, threads: int) -> None:
    import torch

    from robust_agc.cli import main as cli_main

    torch.set_num_threads(threads)
    argv = eval_argv(spec, ev, out, state)
    logger.info("robust-agc %s", " ".join(argv))
    rc = cli_main(argv)
    if rc != 0:
        raise RuntimeError(f"robust-agc eval exited with status {rc} for {spec.run_dir}")


def measure_speed(spec: RunSpec, study: Study, threads: int) -> dict[str, Any]:
    """Export the run's evaluated checkpoint (the study's ``eval`` checkpoint, a pipeline's last
    stage's) to a physically smaller network and time its inference against the full-width
    architecture with ``threads`` torch threads (:func:`robust_agc.cli.export.measure_export_speed`,
    the study's ``speed`` options); the record, with the run it belongs to and the command that
    remakes it, is written to the run folder's ``speed.json`` and returned."""
    import torch

    from robust_agc.cli.export import measure_export_speed

    assert study.eval is not None and study.speed is not None
    ckpt = _checkpoint_dir(spec) / study.eval["checkpoint"]
    opts = {k: study.speed[k] for k in ("batch_size", "repeats", "warmup")}
    torch.set_num_threads(threads)
    logger.info("speed %s/%s/s%d (%s)", spec.study, spec.cell, spec.seed, ckpt)
    rec = measure_export_speed(ckpt, **opts)
    rec["checkpoint"] = study.eval["checkpoint"]
    rec["run"] = f"{spec.study}/{spec.cell}/s{spec.seed}"
    rec["command"] = (
        f"python experiments/run_study.py experiments/configs/{spec.study}.yaml --threads "
        f"{threads} --only {spec.cell} --seeds {spec.seed} (speed: "
        + ", ".join(f"{k} {v}" for k, v in opts.items())
        + "; robust_agc.cli.export.measure_export_speed)"
    )
    tmp = spec.run_dir / (SPEED_FILE + ".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    tmp.replace(spec.run_dir / SPEED_FILE)
    return rec


# ------------------------------------------------------------------------------ pipeline cells
def _pipeline_record(folder: Path) -> dict[str, Any] | None:
    path = folder / PIPELINE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _stage_names(folder: Path) -> list[str]:
    """The stage folders of the pipeline in ``folder`` (its ``pipeline.json`` plan), in order."""
    rec = _pipeline_record(folder)
    if rec is None:
        raise UserError(f"{folder} holds no {PIPELINE_FILE}")
    return [str(s["name"]) for s in rec["plan"]["stages"]]


def _checkpoint_dir(spec: RunSpec) -> Path:
    """Where the run's checkpoints are: its folder, or its pipeline's last stage folder."""
    if spec.pipeline is None:
        return spec.run_dir
    return spec.run_dir / _stage_names(spec.run_dir)[-1]


def _stored_pairs(spec: RunSpec) -> list[tuple[Path, Path]]:
    """(stored results folder, run folder) pairs whose metrics a rebuild must reproduce: the run;
    for a pipeline, the top (its last stage) and every earlier stage's folder."""
    if spec.pipeline is None:
        return [(spec.result_dir, spec.run_dir)]
    *earlier, last = _stage_names(spec.run_dir)
    return [(spec.result_dir, spec.run_dir / last)] + [
        (spec.result_dir / s, spec.run_dir / s) for s in earlier
    ]


def _pipeline_stale_keys(spec: RunSpec, folder: Path) -> list[str]:
    """The cell's settings that differ from the last stage's in ``folder/pipeline.json``, and the
    pipeline's own (``pipeline.method``...) that differ from its plan."""
    rec, p = _pipeline_record(folder), spec.pipeline
    if rec is None or p is None:
        return []
    plan = rec["plan"]
    last = plan["stages"][-1]["config"]
    keys = differing_keys(
        last, {k: v for k, v in spec.config().to_dict().items() if k in spec.settings}
    )
    want: dict[str, Any] = {"method": p["method"]}
    if p["method"] == "imp":  # what the other methods ignore does not make them stale
        want |= {"rounds": p["rounds"] or 3, "rewind_epoch": p["rewind_epoch"]}
    keys += [f"pipeline.{k}" for k, v in want.items() if plan.get(k) != v]
    if p["method"] == "hydra":
        score = p["score_epochs"] or spec.config().epochs
        if plan["stages"][0]["config"].get("epochs") != score:
            keys.append("pipeline.score_epochs")
    return keys


def _pipeline_status(spec: RunSpec, study: Study, *, extra: bool) -> str:
    """:func:`run_status` of a pipeline cell (its folders hold ``pipeline.json``)."""
    res, run = spec.result_dir, spec.run_dir
    if _stale_keys(spec, res) or _stale_keys(spec, run):
        return "stale"
    if _training_stored(spec, study) and _evals_done(res, spec, study, extra=extra):
        return "done"
    rec = _pipeline_record(run)
    if rec is not None:
        return "eval" if rec.get("status") == "complete" else "resume"
    if run.exists() and any(run.iterdir()):
        return "restart"
    return "rebuild" if _training_stored(spec, study) else "new"


def _check_machine(spec: RunSpec) -> None:
    """A rebuild must run on a CPU of the kind that recorded the stored run (UserError)."""
    summary = json.loads((spec.result_dir / "summary.json").read_text(encoding="utf-8"))
    same, was, now = same_cpu_kind(summary.get("machine") or {}, machine_info())
    if not same:
        raise UserError(
            f"{spec.study}/{spec.cell}/s{spec.seed}: stored on a {was} CPU, this is a "
            f"{now}: a rebuild would not reproduce it bit for bit (its extra "
            "evaluation needs a machine of the stored kind, or a seed trained on this one)"
        )


def _source_checkpoint(spec: RunSpec, study: Study, threads: int) -> Path:
    """The best checkpoint of the pipeline cell's source run: trained (or finished, or copied
    from a ``reuse`` study) first when needed, and rebuilt when only its results are stored."""
    from robust_agc.train import train

    src = source_spec(study, spec)
    epochs = src.config().epochs
    if not _finished(src.run_dir, epochs):
        execute(src, study, threads=threads, extra=False)
    if not _finished(src.run_dir, epochs):  # stored (or copied) results, no checkpoint
        _check_machine(src)
        last = (src.run_dir / "last.pt").is_file()
        busy = src.run_dir.exists() and any(src.run_dir.iterdir())
        logger.info(
            "rebuild %s/%s/s%d (the source of %s)", src.study, src.cell, src.seed, spec.cell
        )
        train(src.config(threads, progress=False, resume=last, overwrite=busy and not last))
        check_reproduced(src)
    return src.run_dir / "best.pt"


def _run_pipeline(spec: RunSpec, study: Study, status: str, threads: int) -> None:
    """Run (``new``, ``rebuild``), continue (``resume``) or replace (``restart``) the pipeline."""
    from robust_agc.prune import prune

    p = spec.pipeline
    assert p is not None
    source = _source_checkpoint(spec, study, threads)
    settings = {k: v for k, v in spec.settings.items() if k != "sparsity"}
    logger.info(
        "%s %s/%s/s%d (%s from %s)", status, spec.study, spec.cell, spec.seed, p["method"], source
    )
    prune(
        source,
        method=p["method"],
        sparsity=spec.config().sparsity,
        out=spec.run_dir,
        rounds=p["rounds"] or 3,
        rewind_epoch=p["rewind_epoch"],
        score_epochs=p["score_epochs"],
        resume=status == "resume",
        overwrite=status == "restart",
        **settings,
        threads=threads,
        progress=False,
    )


def _copy_pipeline_results(spec: RunSpec, study: Study, *, missing_only: bool) -> None:
    """Results of a pipeline cell: the last stage's ``config.yaml metrics.jsonl summary.json``
    and the evaluations at the top, each earlier stage's ``metrics.jsonl summary.json`` in
    ``<stage>/``, and ``pipeline.json`` (written last: it marks the copy complete)."""
    *earlier, last = _stage_names(spec.run_dir)
    names = [n for n in _result_names(spec, study) if n not in RESULT_FILES[:3]]
    if not missing_only:
        for stage in earlier:
            for name in STAGE_FILES:
                _copy_file(spec.run_dir / stage / name, spec.result_dir / stage / name)
        _copy_results(spec, study, spec.run_dir / last, names=list(RESULT_FILES[:3]))
    _copy_results(spec, study, missing_only=missing_only, names=names)
    if not missing_only:
        _copy_file(spec.run_dir / PIPELINE_FILE, spec.result_dir / PIPELINE_FILE)


# ------------------------------------------------------------------------------ one run
def _train_run(spec: RunSpec, study: Study, status: str, threads: int) -> None:
    """Train a plain cell's run (``new``, ``restart``, ``resume``, ``rebuild``)."""
    from robust_agc.train import train

    cfg = spec.config(
        threads,
        progress=False,
        resume=status == "resume",
        overwrite=status == "restart",
    )
    spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s %s/%s/s%d", status, spec.study, spec.cell, spec.seed)
    train(cfg)


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
    A pipeline cell first brings its source run to a checkpoint (:func:`_source_checkpoint`),
    then runs :func:`robust_agc.prune.prune` in its run folder.
    """
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
        _copy_results(spec, study, src, names=[*RESULT_FILES, *_reused_extras(spec, study, src)])
        return status
    stored = _training_stored(spec, study)
    if status == "rebuild":
        _check_machine(spec)
    if status in ("new", "restart", "resume", "rebuild"):
        if spec.pipeline is None:
            _train_run(spec, study, status, threads)
        else:
            _run_pipeline(spec, study, status, threads)
    if stored:
        check_reproduced(spec)
    elif study.eval is not None and not (spec.run_dir / EVAL_FILE).is_file():
        _evaluate(spec, study.eval, EVAL_FILE, EVAL_STATE_FILE, threads)
    for e in study.extra_evals_for(spec.seed, spec.cell) if extra else []:
        out = extra_eval_file(e)
        if not (spec.run_dir / out).is_file() and not (spec.result_dir / out).is_file():
            _evaluate(spec, e, out, f"state_final_{e['name']}.json", threads)
    timed = (spec.run_dir / SPEED_FILE).is_file() or (spec.result_dir / SPEED_FILE).is_file()
    if extra and study.measures_speed(spec.cell) and not timed:
        measure_speed(spec, study, threads)
    if spec.pipeline is None:
        _copy_results(spec, study, missing_only=stored)
    else:
        _copy_pipeline_results(spec, study, missing_only=stored)
    return status


def _train_epochs(spec: RunSpec) -> int:
    """Training epochs of a run: a pipeline's stages together (its source run apart)."""
    epochs = spec.config().epochs
    p = spec.pipeline
    if p is None or p["method"] == "lwm":
        return epochs
    if p["method"] == "hydra":
        return (p["score_epochs"] or epochs) + epochs
    return (p["rounds"] or 3) * epochs


def _stored_cost(folder: Path) -> tuple[float, int]:
    """(seconds, epochs) of a stored run: its training wall-clock (a pipeline's stages together)
    plus its final evaluation's time."""
    rec = _pipeline_record(folder)
    if rec is not None:
        t = sum(float(s.get("wall_time_s", 0.0)) for s in rec.get("stages", []))
        n = sum(int(s.get("epochs", 0)) for s in rec.get("stages", []))
    else:
        s = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        t, n = float(s.get("wall_time_s", 0.0)), int(s.get("epochs") or _n_epochs_done(folder))
    if (folder / EVAL_FILE).is_file():
        e = json.loads((folder / EVAL_FILE).read_text(encoding="utf-8"))
        t += float((e.get("timings") or {}).get("total", 0.0))
    return t, max(n, 1)


def _projection(specs: list[RunSpec], statuses: list[str], study: Study) -> str:
    """Measured time of the stored runs (training + final evaluation; for a ``reuse`` run, of the
    stored run it copies) per training epoch x the epochs of the runs that still need training
    (a pipeline's stages together); runs missing only an extra evaluation are counted and named
    apart (their time is not projected: an extra evaluation, e.g. AutoAttack, costs
    differently), and copies of a ``reuse`` study's runs cost nothing."""
    costs = []
    for spec, st in zip(specs, statuses):
        if st == "done":
            costs.append(_stored_cost(spec.result_dir))
        elif st == "reuse":
            src = reusable_source(spec, study)
            if src is not None:
                costs.append(_stored_cost(src))
    left = sum(st != "done" for st in statuses)
    extra_runs = [
        f"{spec.cell}/s{spec.seed}"
        for spec, st in zip(specs, statuses)
        if st not in ("done", "reuse") and _training_stored(spec, study)
    ]
    n_reuse = statuses.count("reuse")
    apart = (
        f" ({len(extra_runs)} of them only for an extra evaluation, not in the projection: "
        f"{', '.join(extra_runs)})"
        if extra_runs
        else ""
    )
    if n_reuse:
        apart += f" ({n_reuse} of them copies of identical runs stored by {', '.join(study.reuse)})"
    if not costs:
        return f"{left} runs remain{apart} (no stored run to project their time from)"
    mean = statistics.fmean(t for t, _ in costs)
    per_epoch = statistics.fmean(t / n for t, n in costs)
    todo = sum(
        _train_epochs(spec)
        for spec, st in zip(specs, statuses)
        if st not in ("done", "reuse") and f"{spec.cell}/s{spec.seed}" not in extra_runs
    )
    return (
        f"{left} runs remain{apart}; stored runs took {mean:.0f} s on average (training + final "
        f"eval), so about {per_epoch * todo / 3600:.2f} CPU-hours remain at that rate"
    )


def _pipeline_note(spec: RunSpec) -> str:
    """`` (lwm pipeline from <source cell>/s<seed>)`` for a pipeline cell, else nothing."""
    p = spec.pipeline
    return "" if p is None else f" ({p['method']} pipeline from {p['source_cell']}/s{spec.seed})"


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
                print(f"{st:8s} {s.study}/{s.cell}/s{s.seed}{_pipeline_note(s)}")
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
