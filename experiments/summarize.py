"""Tables of a study from its committed results (``experiments/results/<study>``), mean ± std.

Per cell (mean ± std over seeds, sample std): final and best-validation clean/robust accuracy,
the final evaluation (``eval.json``) when present, and, when the study names a ``baseline``
(e.g. ``{axis: optimizer, value: sgd}``), the to-target columns against the baseline cell that
agrees on every other axis:

* target = mean over the baseline's seeds of its final validation robust accuracy;
* epochs / training time / gradient evaluations until the validation robust accuracy first
  reaches the target (mean over the seeds that reach it; ``k/n`` says how many did);
* validation and test robust accuracy at the baseline's final training time (mean over its seeds):
  the last epoch that ended by then (equal-time comparison; equal epochs = the final columns, since
  every cell has the same epoch budget).

Time is the training-only clock chosen with ``--clock``: ``cpu`` (default: ``cpu_time_s``, the
process's CPU time while training, attacks and AGC refresh included, per-epoch evaluation excluded;
with one thread it is the wall-clock of an idle core, and it stays honest on a shared, loaded
machine), ``train`` (``train_time_s``, the same span in wall-clock, inflated by other load) or
``wall`` (``wall_time_s``, wall-clock including the per-epoch evaluation). Gradient evaluations are
exact. Extra evaluations of the study (e.g. AutoAttack on seed 2) get their own columns;
``--extra NAME`` prints instead one row per run holding it, next to the final evaluation's robust
accuracy on the same first test points (its per-point flags), with the points each attack broke
and the gradient-masking flags that fired.

Paired by seed: runs of one seed share the data order, the initial weights and the initial mask
whatever the optimizer (``tests/test_pairing.py``), so a third table gives per-seed differences
against the baseline cell (final evaluation clean/robust, final validation robust, time ratio);
``--paired VALUE`` adds the same against another value of the baseline's axis (e.g. ``agc``).

Catastrophic overfitting: when a run of the study was watched by the collapse guard (its
per-epoch records carry ``collapse``), the first table gets a ``collapse`` column: how many runs
had an epoch flagged, the flagged epochs, and how many runs the guard stopped or rolled back
(:func:`collapse_info`). An epoch undone by a rollback is left out of every accuracy and time
column (its compute stays in the run's ``summary.json``).

Pipeline cells (a ``pipeline`` in the study: a pruning chain started from another cell's run,
``robust_agc.prune``): their results are the last stage's, and their per-epoch ``grad_evals``,
``cpu_time_s`` and ``train_time_s`` are shifted by the compute of the chain before that stage
(the source run's whole run and every earlier stage: the last stage's ``summary.json``
``source.*_total``), so every to-target, equal-time and compute column compares whole chains
with the from-scratch runs (``--clock wall`` counts the last stage only). A compute table follows
the first: each cell's total gradient evaluations (a pipeline's ``pipeline.json``
``grad_evals_total``) and its ratio to its baseline cell's (:func:`compute_rows`).

Speed (a study with a ``speed`` entry: run_study.py writes each matching run's ``speed.json``, its
evaluated checkpoint exported to the physically smaller network and timed against the full-width
architecture in one process): a table of accuracy against cost (:func:`speed_rows`): the final
and extra evaluations' accuracy, the training time and its ratio to the baseline cell, the exported
network's inference images/s, its ratio to the baseline cell's images/s and to the full-width
network timed in the same process, and the exported over full-width FLOPs and parameters.

    .venv/bin/python experiments/summarize.py experiments/configs/main_adversarial.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robust_agc.errors import UserError
from robust_agc.reporting import Run, load_run, mean_ci, mean_std
from robust_agc.reporting.studies import RunSpec, Study, expand, extra_eval_file, load_study

EXPERIMENTS = Path(__file__).resolve().parent
RESULTS_ROOT = EXPERIMENTS / "results"  # committed results (what run_study.py stores)
RUNS_ROOT = EXPERIMENTS / "runs"  # not read here: the run folders of the expanded specs

__all__ = [
    "CellRuns",
    "collect_cells",
    "first_reaching",
    "at_time",
    "to_target_rows",
    "paired_rows",
    "format_table",
    "format_paired",
    "mean_ci",
    "headline",
    "machine",
    "extra_rows",
    "flagged_runs",
    "format_extra",
    "collapse_info",
    "compute_rows",
    "format_compute",
    "speed_rows",
    "format_speed",
    "main",
]

ACC_DIGITS = 2  # accuracies in percent
CLOCKS = {"cpu": "cpu_time_s", "train": "train_time_s", "wall": "wall_time_s"}
CLOCK_WORDS = {
    "cpu_time_s": "training CPU time",
    "train_time_s": "training wall-clock",
    "wall_time_s": "wall-clock",
}
FINAL_KEYS = ("val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc")
TARGET_KINDS = {"val_robust_acc": "robust", "val_clean_acc": "clean"}  # baseline metric -> kind


@dataclass
class CellRuns:
    """The stored runs of one cell."""

    cell: str
    labels: dict[str, str]
    runs: list[Run]


CHAIN_KEYS = ("grad_evals", "train_time_s", "cpu_time_s")  # shifted by a pipeline's earlier cost


def collect_cells(study: Study, results_root: Path = RESULTS_ROOT) -> list[CellRuns]:
    """Stored runs per cell, in the study's cell order (cells without results are kept, empty).

    Epochs undone by a rollback are dropped from a run's metrics; a pipeline cell's metrics count
    the chain's earlier compute (module docstring)."""
    cells: dict[str, CellRuns] = {}
    specs: list[RunSpec] = expand(study, runs_root=RUNS_ROOT, results_root=results_root)
    for spec in specs:
        c = cells.setdefault(spec.cell, CellRuns(spec.cell, spec.labels, []))
        if (spec.result_dir / "metrics.jsonl").is_file():
            run = load_run(spec.result_dir)
            run.metrics = [r for r in run.metrics if not r.get("rolled_back")]
            if (spec.result_dir / "pipeline.json").is_file():
                before = run.summary.get("source") or {}
                for row in run.metrics:
                    for k in CHAIN_KEYS:
                        if isinstance(row.get(k), int | float):
                            row[k] += before.get(f"{k}_total", 0)
            c.runs.append(run)
    return list(cells.values())


def collapse_info(run: Run) -> dict[str, Any] | None:
    """What the catastrophic-overfitting guard recorded for a run (None: not watched, no epoch
    record carries ``collapse``): ``epochs`` (the flagged epochs, rolled back ones included,
    from the run's ``metrics.jsonl``), ``stopped`` (``--on-collapse stop`` ended the run) and
    ``rolled_back`` (``rollback`` restored an earlier epoch and ended it)."""
    path = Path(run.path) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not any("collapse" in r for r in rows):
        return None
    guard = run.summary.get("collapse_guard") or {}
    rolled = guard.get("rolled_back_to") is not None or any(r.get("rolled_back") for r in rows)
    return {
        "epochs": [int(r["epoch"]) for r in rows if r.get("collapse") is True],
        "stopped": bool(guard.get("stopped")) and not rolled,
        "rolled_back": rolled,
    }


def _collapse_cell(runs: Sequence[Run]) -> str:
    """The ``collapse`` column: ``k/n`` watched runs with a flagged epoch, the flagged epochs
    per run, and the runs stopped or rolled back (``-``: no run watched)."""
    infos = [i for i in (collapse_info(r) for r in runs) if i is not None]
    if not infos:
        return "-"
    flagged = [i for i in infos if i["epochs"]]
    text = f"{len(flagged)}/{len(infos)}"
    if flagged:
        text += " (epochs " + "; ".join(",".join(map(str, i["epochs"])) for i in flagged) + ")"
    for key, word in (("stopped", "stopped"), ("rolled_back", "rolled back")):
        k = sum(i[key] for i in infos)
        if k:
            text += f", {k} {word}"
    return text


def _chain_grad_evals(run: Run) -> float | None:
    """A run's total gradient evaluations: a pipeline's whole chain (``pipeline.json``), else
    its summary's (else its last epoch's)."""
    rec = Path(run.path) / "pipeline.json"
    if rec.is_file():
        return float(json.loads(rec.read_text(encoding="utf-8"))["grad_evals_total"])
    v = run.summary.get("grad_evals", _final(run, "grad_evals"))
    return float(v) if isinstance(v, int | float) else None


def compute_rows(cells: list[CellRuns], baseline: dict[str, str] | None) -> list[dict[str, Any]]:
    """Per cell: ``grad_evals`` (mean over its runs of :func:`_chain_grad_evals`), ``pipeline``
    (whether its runs are pruning chains) and ``ratio``: that mean over its baseline cell's
    (None without a baseline or results)."""
    rows = []
    for c in cells:
        vals = [v for v in map(_chain_grad_evals, c.runs) if v is not None]
        mean = statistics.fmean(vals) if vals else None
        ratio = None
        if baseline is not None and mean is not None:
            base = _partner_cell(c, cells, baseline["axis"], baseline["value"])
            ref = [v for v in map(_chain_grad_evals, base.runs) if v is not None]
            ratio = _ratio(mean, statistics.fmean(ref) if ref else None)
        rows.append(
            {
                "cell": c.cell,
                "n": len(vals),
                "pipeline": any((Path(r.path) / "pipeline.json").is_file() for r in c.runs),
                "grad_evals": mean,
                "ratio": ratio,
            }
        )
    return rows


def format_compute(rows: list[dict[str, Any]], baseline: dict[str, str] | None) -> str:
    """Markdown table of :func:`compute_rows`."""
    ref = f"its {baseline['axis']}={baseline['value']} cell's" if baseline else "a baseline's"
    head = (
        "\nTraining compute (gradient evaluations: forward+backward passes over single examples; "
        "a pipeline cell counts its whole chain: the source run, every stage), mean over the "
        f"stored runs, and its ratio to {ref}.\n\n"
        "| cell | runs | pipeline | grad evals | ratio |\n" + "| --- " * 5 + "|\n"
    )
    lines = [
        f"| {r['cell']} | {r['n']} | {'yes' if r['pipeline'] else 'no'} | "
        + ("-" if r["grad_evals"] is None else f"{r['grad_evals']:.0f}")
        + " | "
        + ("-" if r["ratio"] is None else f"{r['ratio']:.2f}")
        + " |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


SPEED_FILE = "speed.json"  # run_study.py's speed record of a run


def _speed(run: Run) -> dict[str, Any] | None:
    path = Path(run.path) / SPEED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _speed_value(run: Run, *keys: str) -> float | None:
    rec: Any = _speed(run)
    for k in keys:
        rec = rec.get(k) if isinstance(rec, dict) else None
    return float(rec) if isinstance(rec, int | float) else None


def speed_rows(
    cells: list[CellRuns],
    baseline: dict[str, str] | None,
    clock: str = "cpu_time_s",
    extra_evals: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per cell, accuracy against measured cost (lists hold one value per run, None where
    missing): ``eval_clean``/``eval_robust`` (``eval.json``), ``extra`` (name -> robust accuracy
    of each extra evaluation), ``train_time`` (final ``clock``), ``time_ratio`` (mean train time
    over the baseline cell's), ``images_per_s`` (the exported network's, ``speed.json``),
    ``vs_baseline`` (mean images/s over the baseline cell's mean), ``speedup`` (each record's
    exported over full-width images/s, timed in one process), ``flops_ratio`` and
    ``params_ratio`` (exported over full width), ``threads`` (of the records)."""
    rows = []
    for c in cells:
        rs = c.runs
        base = _partner_cell(c, cells, baseline["axis"], baseline["value"]) if baseline else None
        times = [_final(r, clock) for r in rs]
        ips = [_speed_value(r, "exported", "images_per_s") for r in rs]
        row: dict[str, Any] = {
            "cell": c.cell,
            "n": len(rs),
            "eval_clean": [_eval_acc(r, "clean_acc") for r in rs],
            "eval_robust": [_eval_acc(r, "robust_acc") for r in rs],
            "extra": {
                n: [_eval_acc(r, "robust_acc", extra_eval_file({"name": n})) for r in rs]
                for n in extra_evals
            },
            "train_time": times,
            "images_per_s": ips,
            "speedup": [_speed_value(r, "speedup") for r in rs],
            "flops_ratio": [_speed_value(r, "flops_ratio") for r in rs],
            "params_ratio": [_speed_value(r, "params_ratio") for r in rs],
            "threads": sorted(
                {int(t) for t in (_speed_value(r, "settings", "threads") for r in rs) if t}
            ),
        }
        ref_t = _mean([_final(r, clock) for r in base.runs]) if base else None
        ref_i = (
            _mean([_speed_value(r, "exported", "images_per_s") for r in base.runs])
            if base
            else None
        )
        row["time_ratio"] = _ratio(_mean(times), ref_t)
        row["vs_baseline"] = _ratio(_mean(ips), ref_i)
        rows.append(row)
    return rows


def format_speed(
    rows: list[dict[str, Any]], baseline: dict[str, str] | None, clock: str = "cpu_time_s"
) -> str:
    """Markdown table of :func:`speed_rows` (accuracies in %, mean ± std over the runs)."""
    names = list(rows[0]["extra"]) if rows else []
    ref = f"the {baseline['axis']}={baseline['value']} cell" if baseline else "a baseline cell"
    threads = sorted({t for r in rows for t in r["threads"]})
    head = (
        f"\nAccuracy against measured cost. Training {CLOCK_WORDS.get(clock, clock)} and its "
        f"ratio to {ref}'s; inference (speed.json, threads {threads or '-'}): the exported "
        "(physically shrunk) network's images/s, its ratio to "
        f"{ref}'s images/s, and to the full-width network timed in the same process "
        "(interleaved); FLOPs and parameters of the exported over the full-width network. "
        "`-`: no record (a cell without a speed entry).\n\n"
        "| cell | runs | eval clean | eval robust | "
        + "".join(f"{n} robust (runs) | " for n in names)
        + f"train {clock} | × {ref} | img/s | img/s × {ref} | img/s × full width "
        "(same process) | FLOPs ratio | params ratio |\n" + "| --- " * (12 + len(names)) + "|\n"
    )
    lines = []
    for r in rows:
        extra = "".join(
            f" {mean_std(v, pct=True)} ({sum(x is not None for x in v)}) |"
            for v in r["extra"].values()
        )
        lines.append(
            f"| {r['cell']} | {r['n']} | {mean_std(r['eval_clean'], pct=True)} | "
            f"{mean_std(r['eval_robust'], pct=True)} |{extra} "
            f"{mean_std(r['train_time'], digits=0)} | "
            + ("-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}")
            + f" | {mean_std(r['images_per_s'], digits=0)} | "
            + ("-" if r["vs_baseline"] is None else f"{r['vs_baseline']:.2f}")
            + f" | {mean_std(r['speedup'], digits=2)} | {mean_std(r['flops_ratio'], digits=3)} | "
            f"{mean_std(r['params_ratio'], digits=3)} |"
        )
    return head + "\n".join(lines) + "\n"


def first_reaching(run: Run, key: str, target: float) -> dict[str, float] | None:
    """The first epoch's record whose ``key`` is >= ``target`` (None when never reached)."""
    for row in run.metrics:
        v = row.get(key)
        if isinstance(v, int | float) and v >= target:
            return row
    return None


def at_time(run: Run, seconds: float, clock: str = "wall_time_s") -> dict[str, Any] | None:
    """The last epoch's record that ended by ``seconds`` of the ``clock`` field (None if none)."""
    found = None
    for row in run.metrics:
        t = row.get(clock)
        if isinstance(t, int | float) and t <= seconds:
            found = row
    return found


def _best_val(run: Run) -> dict[str, Any]:
    """The record with the best validation robust accuracy (first one on ties), as best.pt."""
    best: dict[str, Any] = {}
    for row in run.metrics:
        if not best or row.get("val_robust_acc", -math.inf) > best.get("val_robust_acc", -math.inf):
            best = row
    return best


def _final(run: Run, key: str) -> float | None:
    return run.metrics[-1].get(key) if run.metrics else None


def _eval_file(run: Run, file: str) -> dict[str, Any] | None:
    for ev in run.evals:
        if Path(str(ev.get("_path", ""))).name == file:
            return ev
    return None


def _eval_acc(run: Run, key: str, file: str = "eval.json") -> float | None:
    ev = _eval_file(run, file)
    v = ev.get(key) if ev is not None else None
    return float(v) if isinstance(v, int | float) else None


def extra_rows(cells: list[CellRuns], name: str) -> list[dict[str, Any]]:
    """One row per run that holds the extra evaluation ``name`` (``eval_<name>.json``): its clean
    and robust accuracy on its first ``n`` test points, the final evaluation's (``eval.json``)
    robust accuracy on the same ``n`` points (from its per-point flags; None when it covers fewer
    points or stores none), the difference, and the gradient-masking flags that fired."""
    rows = []
    file = extra_eval_file({"name": name})
    for c in cells:
        for r in c.runs:
            ex = _eval_file(r, file)
            if ex is None:
                continue
            n = ex.get("n_examples")
            final = _eval_file(r, "eval.json") or {}
            flags_pp = final.get("per_point_robust")
            same = (
                sum(bool(v) for v in flags_pp[:n]) / n
                if isinstance(n, int)
                and n > 0
                and isinstance(flags_pp, list)
                and len(flags_pp) >= n
                else None
            )
            robust = _eval_acc(r, "robust_acc", file)
            rows.append(
                {
                    "cell": c.cell,
                    "seed": r.seed,
                    "n_examples": n,
                    "clean": _eval_acc(r, "clean_acc", file),
                    "robust": robust,
                    "final_same_points": same,
                    "gap": _diff(robust, same),
                    "flags": _fired(ex),
                    "broken_by": _broken_by(ex),
                }
            )
    return rows


def _fired(ev: dict[str, Any]) -> list[str]:
    """The gradient-masking flags an evaluation record raised, sorted."""
    return sorted(k for k, v in (ev.get("flags") or {}).items() if v)


def _broken_by(ev: dict[str, Any]) -> dict[str, int]:
    """Points each attack stage (or AutoAttack component) broke, the clean stage left out."""
    out: dict[str, int] = {}
    for st in ev.get("stages") or []:
        for part in st.get("components") or [st]:
            name = str(part.get("name", "")).split("/")[-1]
            if name != "clean" and isinstance(part.get("n_broken"), int):
                out[name] = part["n_broken"]
    return out


def _pct1(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_extra(rows: list[dict[str, Any]], name: str, final_what: str = "final eval") -> str:
    """Markdown table of :func:`extra_rows` and one summary line (range and mean of the
    differences, flags fired)."""
    if not rows:
        return f"No run holds the `{name}` evaluation yet.\n"
    lines = [
        f"| cell | seed | points | {name} clean | {name} robust | {final_what} robust, same "
        "points | difference (points) | points broken per attack | flags fired |",
        "| --- " * 9 + "|",
    ]
    for r in rows:
        gap = "-" if r["gap"] is None else f"{100 * r['gap']:+.1f}"
        lines.append(
            f"| {r['cell']} | {r['seed']} | {r['n_examples'] or '-'} | {_pct1(r['clean'])} | "
            f"{_pct1(r['robust'])} | {_pct1(r['final_same_points'])} | {gap} | "
            f"{', '.join(f'{k} {v}' for k, v in r['broken_by'].items()) or '-'} | "
            f"{', '.join(r['flags']) or 'none'} |"
        )
    gaps = [r["gap"] for r in rows if r["gap"] is not None]
    flagged = [r for r in rows if r["flags"]]
    cells = {r["cell"] for r in rows}
    summary = f"\n{len(rows)} run{'s' * (len(rows) != 1)} in {len(cells)} cells"
    if gaps:
        summary += (
            f": `{name}` robust accuracy minus the {final_what}'s on the same points "
            f"{100 * min(gaps):+.1f} to {100 * max(gaps):+.1f} points (mean "
            f"{100 * statistics.fmean(gaps):+.2f})"
        )
    stages: dict[str, int] = {}
    for r in rows:
        for k, v in r["broken_by"].items():
            stages[k] = stages.get(k, 0) + v
    if stages:
        summary += "; points broken over all runs: " + ", ".join(
            f"{k} {v}" for k, v in stages.items()
        )
    summary += f"; gradient-masking flags fired in {len(flagged)} run{'s' * (len(flagged) != 1)}.\n"
    return "\n".join(lines) + "\n" + summary


def _partner_cell(cell: CellRuns, cells: list[CellRuns], axis: str, value: str) -> CellRuns:
    """The cell that agrees with ``cell`` on every axis but has ``value`` on ``axis``."""
    want = {**cell.labels, axis: value}
    for c in cells:
        if c.labels == want:
            return c
    raise UserError(f"no cell with {axis}={value} to pair with {cell.cell}")


def to_target_rows(
    cells: list[CellRuns], baseline: dict[str, str], clock: str = "wall_time_s"
) -> list[dict[str, Any]]:
    """Per cell: target, the to-target lists (per seed) and accuracies at the baseline's time
    (``clock``: the metrics field that measures time; ``val_at_time`` / ``test_at_time``: the
    accuracy of the target metric's ``kind``, robust or clean), and the other way round the
    baseline's validation accuracy at the cell's own mean final time (``cell_time_s``,
    ``baseline_val_at_cell_time``, per baseline seed; ``None`` where the baseline had not
    finished an epoch by then)."""
    rows = []
    for cell in cells:
        base = _partner_cell(cell, cells, baseline["axis"], baseline["value"])
        metric = baseline.get("metric", "val_robust_acc")
        finals = [_final(r, metric) for r in base.runs]
        times = [_final(r, clock) for r in base.runs]
        finals = [v for v in finals if v is not None]
        times = [t for t in times if t is not None]
        row: dict[str, Any] = {
            "cell": cell.cell,
            "baseline": base.cell,
            "metric": metric,
            "clock": clock,
            "n": len(cell.runs),
        }
        row["target"] = statistics.fmean(finals) if finals else None
        row["baseline_time_s"] = statistics.fmean(times) if times else None
        hits = [first_reaching(r, metric, row["target"]) if finals else None for r in cell.runs]
        reached = [h for h in hits if h is not None]
        row["reached"] = len(reached)
        row["epochs_to_target"] = [float(h["epoch"]) for h in reached]
        row["time_to_target_s"] = [float(h[clock]) for h in reached if clock in h]
        row["grad_evals_to_target"] = [float(h["grad_evals"]) for h in reached]
        at = [
            at_time(r, row["baseline_time_s"], clock)
            if row["baseline_time_s"] is not None
            else None
            for r in cell.runs
        ]
        kind = _kind(baseline)
        row["kind"] = kind
        row["val_at_time"] = [a.get(f"val_{kind}_acc") if a else None for a in at]
        row["test_at_time"] = [a.get(f"test_{kind}_acc") if a else None for a in at]
        row["epoch_at_time"] = [float(a["epoch"]) if a else None for a in at]
        # the other way round: the baseline at this cell's budget (its mean final time)
        own = [t for t in (_final(r, clock) for r in cell.runs) if t is not None]
        row["cell_time_s"] = statistics.fmean(own) if own else None
        back = [
            at_time(r, row["cell_time_s"], clock) if row["cell_time_s"] is not None else None
            for r in base.runs
        ]
        row["baseline_val_at_cell_time"] = [a.get(f"val_{kind}_acc") if a else None for a in back]
        rows.append(row)
    return rows


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _at_time_diff(run: Run, ref: Run, clock: str, key: str = "test_robust_acc") -> float | None:
    """``run``'s per-epoch ``key`` (a test accuracy) at the last epoch it finished by ``ref``'s
    final ``clock``, minus ``ref``'s final one (None where either is missing)."""
    t = _final(ref, clock)
    row = at_time(run, t, clock) if t is not None else None
    return _diff(row.get(key) if row else None, _final(ref, key))


def machine(run: Run) -> str | None:
    """The CPU model the run was recorded on (``summary.json``: machine.cpu), None if unknown."""
    cpu = (run.summary.get("machine") or {}).get("cpu")
    return str(cpu) if cpu else None


def _same_machine(run: Run, ref: Run) -> bool:
    """Timings of two runs compare only when both ran on one CPU model (else: different speed)."""
    return machine(run) == machine(ref)


def _kind(baseline: dict[str, str]) -> str:
    """``robust`` or ``clean``: which accuracy the study's target metric measures."""
    metric = baseline.get("metric", "val_robust_acc")
    if metric not in TARGET_KINDS:
        raise UserError(f"baseline metric {metric!r} is not one of {sorted(TARGET_KINDS)}")
    return TARGET_KINDS[metric]


def paired_rows(
    cells: list[CellRuns],
    baseline: dict[str, str],
    clock: str = "wall_time_s",
    reference: str | None = None,
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per cell, the per-seed differences against the reference cell on the same seed.

    The reference cell agrees with the cell on every other axis and has ``reference`` (default:
    the baseline's value) on the baseline's axis. Runs with the same seed share the data order,
    the initial weights and the initial mask, so a paired difference removes most of the seed's
    own variation. The accuracy compared during training is the one of the baseline's metric
    (``kind``: robust for ``val_robust_acc``, clean for ``val_clean_acc``). Per cell: ``seeds``
    (the paired seeds), ``d_eval_robust`` / ``d_eval_clean`` (final evaluation, ``eval.json``),
    ``d_val`` (final epoch's validation accuracy of that kind), ``d_test_at_time`` (the cell's
    per-epoch test accuracy of that kind at the last epoch it finished by the reference run's
    final ``clock``, minus the reference's final one: equal training time) and ``time_ratio``
    (the cell's final ``clock`` over the reference's), each a list with one entry per paired seed
    (None where a value is missing). The two time-based entries are None for a pair whose runs
    were recorded on different CPU models (``cross_machine``: True), whose speeds differ. For each
    name in ``extra``, ``d_<name>_robust`` holds the differences in that extra evaluation's robust
    accuracy (``eval_<name>.json``; None where either run lacks it). The reference cell itself is
    left out. After the cells come
    pooled rows ``all <value>`` for values shared by several cells: every paired seed of those
    cells.
    """
    ref_value = baseline["value"] if reference is None else reference
    axis = baseline["axis"]
    kind = _kind(baseline)
    extra_files = {name: extra_eval_file({"name": name}) for name in extra}
    rows = []
    for cell in cells:
        ref = _partner_cell(cell, cells, axis, ref_value)
        if ref is cell:
            continue
        by_seed = {r.seed: r for r in ref.runs}
        pairs = [(r, by_seed[r.seed]) for r in cell.runs if r.seed in by_seed]
        rows.append(
            {
                "cell": cell.cell,
                "value": cell.labels.get(axis),
                "reference": ref.cell,
                "kind": kind,
                "seeds": [r.seed for r, _ in pairs],
                "d_eval_robust": [
                    _diff(_eval_acc(r, "robust_acc"), _eval_acc(q, "robust_acc")) for r, q in pairs
                ],
                "d_eval_clean": [
                    _diff(_eval_acc(r, "clean_acc"), _eval_acc(q, "clean_acc")) for r, q in pairs
                ],
                "d_val": [
                    _diff(_final(r, f"val_{kind}_acc"), _final(q, f"val_{kind}_acc"))
                    for r, q in pairs
                ],
                "d_test_at_time": [
                    _at_time_diff(r, q, clock, f"test_{kind}_acc") if _same_machine(r, q) else None
                    for r, q in pairs
                ],
                "time_ratio": [
                    _ratio(_final(r, clock), _final(q, clock)) if _same_machine(r, q) else None
                    for r, q in pairs
                ],
                "cross_machine": [not _same_machine(r, q) for r, q in pairs],
                **{
                    f"d_{name}_robust": [
                        _diff(_eval_acc(r, "robust_acc", file), _eval_acc(q, "robust_acc", file))
                        for r, q in pairs
                    ]
                    for name, file in extra_files.items()
                },
            }
        )
    pooled: list[dict[str, Any]] = []
    for value in dict.fromkeys(r["value"] for r in rows):
        members = [r for r in rows if r["value"] == value]
        if len(members) < 2:  # one cell: its own row says it all
            continue
        agg: dict[str, Any] = {
            "cell": f"all {value}",
            "value": value,
            "reference": f"all {ref_value}",
            "kind": kind,
        }
        for k in ("seeds", "cross_machine", *_PAIRED_KEYS, *(f"d_{n}_robust" for n in extra)):
            agg[k] = [v for r in members for v in r[k]]
        pooled.append(agg)
    return rows + pooled


_PAIRED_KEYS = (
    "d_eval_robust",
    "d_eval_clean",
    "d_val",
    "d_test_at_time",
    "time_ratio",
)


def _pair_count(row: dict[str, Any]) -> str:
    """``n`` pairs, or ``same+cross`` when some pairs span two CPU models."""
    cross = sum(row["cross_machine"])
    n = len(row["seeds"])
    return f"{n - cross}+{cross}" if cross else str(n)


def format_paired(rows: list[dict[str, Any]], clock: str) -> str:
    """Markdown table of :func:`paired_rows` (differences in percentage points, mean ± std)."""
    if not rows:
        return ""
    kind = rows[0]["kind"]
    head = (
        "\nPaired by seed against the reference cell (same seed = same data order, "
        "initial weights and mask): differences in percentage points (cell minus reference), "
        f"mean ± std over the paired seeds; 'at equal time' = the cell's per-epoch test {kind} "
        f"accuracy at the last epoch it finished by the reference run's final {clock}, minus the "
        f"reference's final one; time ratio = the cell's final {clock} over the reference's "
        "(both time columns leave out pairs recorded on different CPU models: 'pairs' counts "
        "them after a +); 'all X' rows pool every paired seed of the cells with X.\n\n"
        f"| cell | reference | pairs | Δ eval robust | Δ eval clean | Δ final val {kind} | "
        f"Δ test {kind} at equal time | {clock} ratio |\n" + "| --- " * 8 + "|\n"
    )
    lines = [
        f"| {r['cell']} | {r['reference']} | {_pair_count(r)} | "
        f"{mean_std(r['d_eval_robust'], pct=True)} | {mean_std(r['d_eval_clean'], pct=True)} | "
        f"{mean_std(r['d_val'], pct=True)} | {mean_std(r['d_test_at_time'], pct=True)} | "
        f"{mean_std(r['time_ratio'], digits=2)} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _verdict(lo: float, hi: float) -> str:
    """What a confidence interval of a difference says: zero inside it is no measurable effect."""
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "no measurable difference"


PER_PAIR_MAX = 6  # up to this many pairs, the headline also lists each pair's difference


def _points(values: Sequence[float | None]) -> str:
    """``+mean ± std points (95% CI lo to hi: verdict)`` of accuracy differences (fractions);
    with few pairs, each pair's difference follows."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "- (no pair with this value)"
    m, lo, hi = mean_ci(vals)
    each = ", ".join(f"{100 * v:+.1f}" for v in vals)
    if math.isinf(lo):
        return f"{100 * m:+.2f} points (one pair: no interval)"
    sd = statistics.stdev(vals)
    per_pair = f"; pairs {each}" if len(vals) <= PER_PAIR_MAX else ""
    return (
        f"{100 * m:+.2f} ± {100 * sd:.2f} points (95% CI {100 * lo:+.2f} to {100 * hi:+.2f}: "
        f"{_verdict(lo, hi)}{per_pair})"
    )


def headline(
    rows: list[dict[str, Any]],
    values: Sequence[str],
    clock: str,
    eval_spec: dict[str, Any] | None = None,
    extra_specs: Sequence[dict[str, Any]] = (),
) -> str:
    """One markdown bullet per value of the baseline's axis, from :func:`paired_rows`: the pooled
    paired difference in final-evaluation accuracy (robust for a robust target, clean for a clean
    one), the time ratio, and the difference at equal training time, each with its mean ± std over
    the paired seeds and a 95% Student-t interval whose position against zero gives the verdict.
    A value held by one cell uses that cell's row. For a robust target, each extra evaluation in
    ``extra_specs`` (the study's entries, e.g. AutoAttack on one seed; ``rows`` from
    :func:`paired_rows` with their names) whose runs are paired adds its pooled difference.
    Every number is computed from the rows."""
    if not rows:
        return ""
    kind = rows[0]["kind"]
    key = f"d_eval_{kind}"
    what = "final evaluation"
    if eval_spec:
        attack = f"PGD-{eval_spec.get('pgd_steps')}, " if kind == "robust" else ""
        what += (
            f" ({eval_spec.get('checkpoint')}, {attack}first {eval_spec.get('n_examples')} "
            "test points)"
        )
    when = CLOCK_WORDS.get(clock, clock)
    lines = []
    for value in values:
        pick = [r for r in rows if r["cell"] == f"all {value}"] or [
            r for r in rows if r["value"] == value
        ]
        if not pick:
            raise UserError(f"no paired row for {value!r}")
        r = pick[0]
        n_cells = sum(1 for x in rows if x["value"] == value and not x["cell"].startswith("all "))
        n = sum(v is not None for v in r[key])
        if n == 0:
            lines.append(f"- `{value}`: no paired {what} result yet.")
            continue
        ref = r["reference"].removeprefix("all ")
        ratio = mean_std(r["time_ratio"], digits=2)
        cross = sum(r["cross_machine"])
        left_out = (
            f" ({cross} pair{'s' * (cross != 1)} recorded on two CPU models left out of the time "
            "figures)"
            if cross
            else ""
        )
        extras = ""
        for spec in extra_specs if kind == "robust" else ():
            vals = [v for v in r.get(f"d_{spec['name']}_robust", []) if v is not None]
            if vals:
                seeds = spec.get("seeds")
                on = f"seed {', '.join(map(str, seeds))}, " if seeds else ""
                extras += (
                    f"; under `{spec['name']}` ({on}first {spec.get('n_examples')} test points), "
                    f"{len(vals)} pair{'s' * (len(vals) != 1)}: {_points(vals)}"
                )
        lines.append(
            f"- `{value}` vs `{ref}`, {n} seed pair{'s' * (n != 1)} in {n_cells} "
            f"cell{'s' * (n_cells != 1)}: {kind} accuracy of the {what} {_points(r[key])} at "
            f"{ratio}x the {when}; at equal {when} (per-epoch test {kind} accuracy where `{ref}` "
            f"finished) {_points(r['d_test_at_time'])}{left_out}{extras}."
        )
    return "\n".join(lines) + "\n"


def format_table(
    cells: list[CellRuns],
    baseline: dict[str, str] | None,
    *,
    clock: str = "wall_time_s",
    extra_evals: Sequence[str] = (),
) -> str:
    """Markdown tables: final/best-val accuracy and, with a baseline, the to-target columns.

    ``clock`` is the metrics field that measures time; ``extra_evals`` names extra evaluations
    (``eval_<name>.json``) whose clean and robust accuracy get columns (mean over the seeds that
    have them, ``k`` given)."""
    extra_head = "".join(f"{n} clean | {n} robust (seeds) | " for n in extra_evals)
    watched = any(collapse_info(r) is not None for c in cells for r in c.runs)
    head = (
        "| cell | seeds | epochs | val clean | val robust | test clean | test robust | "
        "best-val epoch | best-val: test clean | best-val: test robust | eval clean | "
        f"eval robust | {extra_head}train {clock} | grad evals |{' collapse |' * watched}\n"
        + "| --- " * (14 + 2 * len(extra_evals) + watched)
        + "|\n"
    )
    lines = []
    for c in cells:
        rs = c.runs
        best = [_best_val(r) for r in rs]
        lines.append(
            f"| {c.cell} | {len(rs)} | {mean_std([_final(r, 'epoch') for r in rs], digits=0)} | "
            + " | ".join(mean_std([_final(r, k) for r in rs], pct=True) for k in FINAL_KEYS)
            + f" | {mean_std([b.get('epoch') for b in best], digits=1)}"
            + f" | {mean_std([b.get('test_clean_acc') for b in best], pct=True)}"
            + f" | {mean_std([b.get('test_robust_acc') for b in best], pct=True)}"
            + f" | {mean_std([_eval_acc(r, 'clean_acc') for r in rs], pct=True)}"
            + f" | {mean_std([_eval_acc(r, 'robust_acc') for r in rs], pct=True)}"
            + "".join(_extra_cells(rs, name) for name in extra_evals)
            + f" | {mean_std([_final(r, clock) for r in rs], digits=0)}"
            + f" | {mean_std([_final(r, 'grad_evals') for r in rs], digits=0)} |"
            + (f" {_collapse_cell(rs)} |" if watched else "")
        )
    out = (
        "Accuracies in %, mean ± std over seeds (sample std); val/test = per-epoch evaluation "
        "of the final epoch (PGD from the run's eval_steps); eval = final evaluation of best.pt "
        "(eval.json).\n\n" + head + "\n".join(lines) + "\n"
    )
    if baseline is None:
        return out
    rows = to_target_rows(cells, baseline, clock)
    kind = _kind(baseline)
    head2 = (
        f"\nTarget = final {baseline.get('metric', 'val_robust_acc')} of the cell's "
        f"{baseline['axis']}={baseline['value']} baseline (mean over its seeds); to-target "
        "columns average the seeds that reach it "
        f"(k/n); 'at baseline time' = last epoch finished by the baseline's final {clock}; "
        "'baseline at cell time' = the baseline's validation accuracy at the last epoch it had "
        "finished by the cell's own mean final time (- when none), i.e. both at the cell's "
        "budget.\n\n"
        f"| cell | target (%) | reached | epochs to target | {clock} to target | "
        "grad evals to target | baseline time (s) | epoch at baseline time | "
        f"val {kind} at baseline time | test {kind} at baseline time | cell time (s) | "
        f"baseline val {kind} at cell time |\n" + "| --- " * 12 + "|\n"
    )
    lines2 = []
    for r in rows:
        tgt = "-" if r["target"] is None else f"{100 * r['target']:.{ACC_DIGITS}f}"
        bt = "-" if r["baseline_time_s"] is None else f"{r['baseline_time_s']:.0f}"
        ct = "-" if r["cell_time_s"] is None else f"{r['cell_time_s']:.0f}"
        lines2.append(
            f"| {r['cell']} | {tgt} | {r['reached']}/{r['n']} | "
            f"{mean_std(r['epochs_to_target'], digits=1)} | {mean_std(r['time_to_target_s'], digits=0)} | "
            f"{mean_std(r['grad_evals_to_target'], digits=0)} | {bt} | "
            f"{mean_std(r['epoch_at_time'], digits=1)} | "
            f"{mean_std(r['val_at_time'], pct=True)} | "
            f"{mean_std(r['test_at_time'], pct=True)} | {ct} | "
            f"{mean_std(r['baseline_val_at_cell_time'], pct=True)} |"
        )
    return out + head2 + "\n".join(lines2) + "\n"


def _extra_cells(runs: Sequence[Run], name: str) -> str:
    file = extra_eval_file({"name": name})
    clean = [_eval_acc(r, "clean_acc", file) for r in runs]
    robust = [_eval_acc(r, "robust_acc", file) for r in runs]
    k = sum(v is not None for v in robust)
    return f" | {mean_std(clean, pct=True)} | {mean_std(robust, pct=True)} ({k})"


def flagged_runs(cells: list[CellRuns], file: str = "eval.json") -> list[str]:
    """``cell/s<seed> (flag, ...)`` for every run whose evaluation ``file`` raised a
    gradient-masking flag (in the study's cell order)."""
    out = []
    for c in cells:
        for r in c.runs:
            ev = _eval_file(r, file)
            fired = _fired(ev or {})
            if fired:
                out.append(f"{c.cell}/s{r.seed} ({', '.join(fired)})")
    return out


def _hardware(cells: list[CellRuns]) -> str:
    seen = set()
    for c in cells:
        for r in c.runs:
            v, m = r.summary.get("versions", {}), r.summary.get("machine", {})
            seen.add(
                f"torch {v.get('torch')}, threads {m.get('threads')}, cpu field {m.get('cpu')!r}"
            )
    return "; ".join(sorted(seen)) or "no runs"


def main(argv: list[str] | None = None) -> int:
    """Print the study's tables (markdown); ``--json`` also writes the computed rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="study YAML file")
    p.add_argument("--results", default=str(RESULTS_ROOT), help="results root folder")
    p.add_argument("--json", default=None, help="also write the to-target rows to this file")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="time field: cpu (training CPU time, default), train (training wall), wall (all)",
    )
    p.add_argument(
        "--paired",
        action="append",
        default=[],
        metavar="VALUE",
        help="also pair every cell with the cell having VALUE on the baseline's axis (e.g. agc); "
        "the pairing with the baseline itself is always printed",
    )
    p.add_argument(
        "--headline",
        default=None,
        metavar="VALUES",
        help="print only one line per comma-separated value of the baseline's axis (e.g. "
        "agc-online-frac,agc): its pooled paired differences against the baseline (or the one "
        "--paired value) with 95%% intervals",
    )
    p.add_argument(
        "--extra",
        default=None,
        metavar="NAME",
        help="print only the runs holding the study's extra evaluation NAME (e.g. autoattack) "
        "next to the final evaluation on the same test points",
    )
    args = p.parse_args(argv)
    try:
        study = load_study(args.study, runs_root=RUNS_ROOT, results_root=Path(args.results))
        cells = collect_cells(study, Path(args.results))
        if args.extra is not None:
            names = [e["name"] for e in study.extra_evals]
            if args.extra not in names:
                raise UserError(f"{study.name} has no extra evaluation {args.extra!r} ({names})")
            ev = study.eval or {}
            what = f"PGD-{ev['pgd_steps']}" if ev.get("pgd_steps") else "final eval"
            print(format_extra(extra_rows(cells, args.extra), args.extra, what), end="")
            return 0
        if args.headline is not None:
            if study.baseline is None:
                raise UserError(f"{study.name} has no baseline to pair with")
            if len(args.paired) > 1:
                raise UserError("--headline pairs with one reference: give --paired once")
            ref = args.paired[0] if args.paired else None
            names = [e["name"] for e in study.extra_evals]
            rows = paired_rows(cells, study.baseline, CLOCKS[args.clock], ref, names)
            values = [v for v in args.headline.split(",") if v]
            text = headline(rows, values, CLOCKS[args.clock], study.eval, study.extra_evals)
            print(text, end="")
            return 0
        n = sum(len(c.runs) for c in cells)
        print(f"## {study.name}: {n} stored runs in {sum(bool(c.runs) for c in cells)} cells\n")
        print(f"Runs recorded: {_hardware(cells)}\n")
        clock = CLOCKS[args.clock]
        names = [e["name"] for e in study.extra_evals]
        print(format_table(cells, study.baseline, clock=clock, extra_evals=names), end="")
        if any(
            s.pipeline is not None
            for s in expand(study, runs_root=RUNS_ROOT, results_root=Path(args.results))
        ):
            print(format_compute(compute_rows(cells, study.baseline), study.baseline), end="")
        if study.speed is not None:
            rows = speed_rows(cells, study.baseline, clock, names)
            print(format_speed(rows, study.baseline, clock), end="")
        flagged = flagged_runs(cells)
        if any(r.evals for c in cells for r in c.runs):
            print(
                "\nGradient-masking flags of the final evaluation (`eval.json`): "
                + (", ".join(flagged) if flagged else "none fired")
                + ".\n"
            )
        if study.baseline is not None:
            for ref in [None, *args.paired]:
                print(format_paired(paired_rows(cells, study.baseline, clock, ref), clock), end="")
        if args.json and study.baseline is not None:
            Path(args.json).write_text(
                json.dumps(to_target_rows(cells, study.baseline, clock), indent=2) + "\n"
            )
    except UserError as e:
        print(f"summarize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
