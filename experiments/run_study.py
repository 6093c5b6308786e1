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

from robust_agc.config import EXECUTION_KEYS
from robust_agc.errors import UserError
from robust_agc.reporting import studies
from robust_agc.reporting.studies import (
    DEFAULT_THREADS,
    EVAL_DEFAULTS,
    STUDY_KEYS,
    TARGET_METRICS,
    RunSpec,
    Study,
    extra_eval_file,
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
    "same_cpu_kind",
    "DEFAULT_THREADS",
    "EVAL_DEFAULTS",
    "STUDY_KEYS",
    "TARGET_METRICS",
    "extra_eval_file",
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
    if "fmn" in str(ev["attacks"]).split(","):
        argv += ["--fmn-steps", str(ev["fmn_steps"])]
        if ev.get("eps_grid") is not None:
            argv += ["--eps-grid", ",".join(str(e) for e in ev["eps_grid"])]
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
        same, was, now = same_cpu_kind(summary.get("machine") or {}, machine_info())
        if not same:
            raise UserError(
                f"{spec.study}/{spec.cell}/s{spec.seed}: stored on a {was} CPU, this is a "
                f"{now}: a rebuild would not reproduce it bit for bit (its extra "
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
