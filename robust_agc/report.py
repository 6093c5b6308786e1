"""``robust-agc report``: markdown tables and plots from run folders and evaluation results.

Inputs (any mix, each a path):

* a run folder with ``config.yaml``, ``metrics.jsonl`` (one JSON object per epoch: ``epoch``,
  ``train_loss``, ``train_acc``, ``val_clean_acc``, ``val_robust_acc``, ``test_clean_acc``,
  ``test_robust_acc``, ``lr``, ``epoch_time_s``, ``wall_time_s``, ``images_per_s``, ``grad_evals``,
  ``agc_tau``, ``agc_coef``, ``density`` (a number or ``{layer: density}``), ``exploration_rate``,
  ``flops_ratio``; any may be absent) and ``summary.json``; evaluation JSONs found in the folder
  (``eval*.json`` written by ``robust-agc eval``) are attached to the run;
* a folder holding run folders (searched one and two levels deep);
* an evaluation result JSON (:meth:`robust_agc.eval.EvalResult.to_dict`).

Runs are grouped by their config without the seed (and without output paths, run names, device),
and each group is reported as mean ± std over its seeds (sample std, ddof = 1). Accuracies are shown
in percent; values <= 1 are taken as fractions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "IGNORED_CONFIG_KEYS",
    "Run",
    "load_run",
    "load_eval_result",
    "collect",
    "group_runs",
    "run_table",
    "eval_table",
    "mean_std",
    "make_plots",
    "build_report",
    "add_report_arguments",
    "run_report",
]

logger = logging.getLogger(__name__)

IGNORED_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "seed",
        "out",
        "out_dir",
        "output_dir",
        "run_dir",
        "run_name",
        "name",
        "device",
        "data_dir",
        "resume",
        "config",
        "progress",
    }
)


@dataclass
class Run:
    """One training run: flattened config, per-epoch metrics, summary and attached evaluations."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        """The run's seed (None when not recorded)."""
        return self.config.get("seed")

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` for a numeric per-epoch field (epochs default to 1, 2, ...)."""
        xs, ys = [], []
        for i, row in enumerate(self.metrics):
            v = row.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(float(row.get("epoch", i + 1)))
                ys.append(float(v))
        return xs, ys

    def final(self, key: str) -> float | None:
        """Last recorded numeric value of ``key`` in the metrics, else in the summary."""
        _, ys = self.series(key)
        if ys:
            return ys[-1]
        v = self.summary.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_eval_result(path: str | Path) -> dict[str, Any]:
    """Read an evaluation result JSON (must hold ``clean_acc``); ``_path`` is added."""
    path = Path(path)
    d = _read_json(path)
    if not isinstance(d, dict) or "clean_acc" not in d:
        raise UserError(f"{path} is not an evaluation result (no clean_acc)")
    d["_path"] = str(path)
    return d


def load_run(path: str | Path) -> Run:
    """Read a run folder (``config.yaml``, ``metrics.jsonl``, optional ``summary.json``, ``eval*.json``)."""
    import yaml

    path = Path(path)
    cfg_path, met_path = path / "config.yaml", path / "metrics.jsonl"
    if not met_path.is_file():
        raise UserError(f"{path} is not a run folder (no metrics.jsonl)")
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"cannot parse {cfg_path}: {e}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{cfg_path} does not hold a mapping")
        config = _flatten(raw)
    else:
        logger.warning("%s has no config.yaml: it forms its own group", path)
        config = {"run": str(path)}
    metrics = []
    for n, line in enumerate(met_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{met_path}:{n}: invalid JSON ({e})") from None
        if isinstance(row, dict):
            metrics.append(row)
    summary = {}
    if (path / "summary.json").is_file():
        s = _read_json(path / "summary.json")
        summary = s if isinstance(s, dict) else {}
    evals = []
    for p in sorted(path.glob("eval*.json")):
        try:
            evals.append(load_eval_result(p))
        except UserError as e:
            logger.warning("skipping %s: %s", p, e)
    return Run(path=path, config=config, metrics=metrics, summary=summary, evals=evals)


def collect(paths: Iterable[str | Path]) -> tuple[list[Run], list[dict[str, Any]]]:
    """Sort inputs into runs and standalone evaluation results (folders searched 2 levels deep)."""
    runs: list[Run] = []
    evals: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if p.is_file():
            evals.append(load_eval_result(p))
        elif p.is_dir():
            if (p / "metrics.jsonl").is_file():
                runs.append(load_run(p))
                continue
            found = sorted(
                {m.parent for m in (*p.glob("*/metrics.jsonl"), *p.glob("*/*/metrics.jsonl"))}
            )
            if not found:
                raise UserError(f"{p} holds no run folder (metrics.jsonl) and is not a result file")
            runs.extend(load_run(f) for f in found)
        else:
            raise UserError(f"no such file or folder: {p}")
    return runs, evals


def _group_key(config: dict[str, Any], ignore: frozenset[str]) -> str:
    kept = {
        k: v for k, v in config.items() if k not in ignore and k.rsplit(".", 1)[-1] not in ignore
    }
    return json.dumps(kept, sort_keys=True, default=str)


def group_runs(
    runs: Sequence[Run], ignore: frozenset[str] = IGNORED_CONFIG_KEYS
) -> dict[str, list[Run]]:
    """Group runs whose configs agree on everything but ``ignore`` keys (the seed...)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_group_key(r.config, ignore), []).append(r)
    return groups


_SEED_DIR = re.compile(r"s\d+")


def _cell_names(groups: dict[str, list[Run]]) -> dict[str, str] | None:
    """The study cell of each group when runs are stored as ``<cell>/s<seed>`` (run_study's
    layout) and every group is exactly one cell; else None."""
    names = {}
    for k, runs in groups.items():
        cells = {r.path.parent.name for r in runs}
        if len(cells) != 1 or not all(_SEED_DIR.fullmatch(r.path.name) for r in runs):
            return None
        names[k] = cells.pop()
    return names if len(set(names.values())) == len(names) else None


def _labels(groups: dict[str, list[Run]]) -> dict[str, str]:
    """Short label per group: its study cell name (``<cell>/s<seed>`` layout), else the config
    keys that differ between groups."""
    cells = _cell_names(groups)
    if cells is not None:
        return cells
    cfgs = {k: json.loads(k) for k in groups}
    keys = sorted({kk for c in cfgs.values() for kk in c})
    differing = [
        k for k in keys if len({json.dumps(c.get(k), default=str) for c in cfgs.values()}) > 1
    ]
    if not differing:
        differing = [k for k in ("model", "sparse_method", "sparsity", "optimizer") if k in keys]
    out = {}
    for k, c in cfgs.items():
        label = ", ".join(f"{d}={c.get(d)}" for d in differing if d in c)
        out[k] = label or groups[k][0].path.name
    return out


def _facets(
    groups: dict[str, list[Run]], facet: Sequence[str]
) -> list[tuple[str, dict[str, list[Run]]]]:
    """Split ``groups`` by the values of the ``facet`` config keys (order of first appearance);
    one facet titled ``""`` when ``facet`` is empty."""
    if not facet:
        return [("", groups)]
    out: dict[str, dict[str, list[Run]]] = {}
    for key, runs in groups.items():
        cfg = json.loads(key)
        for k in facet:
            if k not in cfg:
                raise UserError(f"--facet: no config key {k!r} in the runs (e.g. sparse_method)")
        title = ", ".join(f"{k}={cfg[k]}" for k in facet)
        out.setdefault(title, {})[key] = runs
    return list(out.items())


def _pct(v: float) -> float:
    return 100.0 * v if abs(v) <= 1.0 else v


def mean_std(values: Sequence[float | None], *, pct: bool = False, digits: int = 2) -> str:
    """``"mean ± std"`` over the values that are not None (sample std; the mean alone for one value).

    Args:
        values: one number per seed; None entries (a missing metric) are skipped.
        pct: values are fractions in [0, 1]: print them in percent.
        digits: decimals of both numbers.

    Returns:
        The formatted pair, or ``"-"`` when no value is present.
    """
    vals = [(_pct(v) if pct else v) for v in values if v is not None]
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _eval_robust(d: dict[str, Any]) -> float | None:
    v = d.get("autoattack_acc", d.get("robust_acc"))
    return float(v) if isinstance(v, int | float) else None


def run_table(groups: dict[str, list[Run]]) -> str:
    """Markdown table, one row per group, mean ± std over seeds of the final-epoch metrics."""
    labels = _labels(groups)
    head = (
        "| config | seeds | epochs | test clean acc (%) | test robust acc (%) | "
        "best val robust acc (%) | wall time (s) | grad evals | eval robust acc (%) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for key, runs in groups.items():
        best_val = []
        for r in runs:
            _, ys = r.series("val_robust_acc")
            best_val.append(max(ys) if ys else None)
        ev = [_eval_robust(r.evals[-1]) if r.evals else None for r in runs]
        rows.append(
            f"| {labels[key]} | {len(runs)} | "
            f"{mean_std([r.final('epoch') for r in runs], digits=0)} | "
            f"{mean_std([r.final('test_clean_acc') for r in runs], pct=True)} | "
            f"{mean_std([r.final('test_robust_acc') for r in runs], pct=True)} | "
            f"{mean_std(best_val, pct=True)} | "
            f"{mean_std([r.final('wall_time_s') for r in runs], digits=1)} | "
            f"{mean_std([r.final('grad_evals') for r in runs], digits=0)} | "
            f"{mean_std(ev, pct=True)} |"
        )
    return head + "\n".join(rows) + "\n"


def eval_table(evals: Sequence[dict[str, Any]]) -> str:
    """Markdown table of evaluation results, grouped by model config without seed, mean ± std."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in evals:
        cfg = (d.get("model_info") or {}).get("config")
        base = _flatten(cfg) if isinstance(cfg, dict) else {"file": d["_path"]}
        base.update(
            {
                "architecture": d.get("architecture"),
                "dataset": d.get("dataset"),
                "threat_model": d.get("threat_model"),
                "eps": d.get("eps"),
                "n_examples": d.get("n_examples"),
                "attacks": (d.get("attack_config") or {}).get("units"),
            }
        )
        groups.setdefault(_group_key(base, IGNORED_CONFIG_KEYS), []).append(d)
    head = (
        "| model | dataset | threat | eps | n | seeds | clean acc (%) | robust acc (%) | "
        "attacks | flags fired |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for ds in groups.values():
        d0 = ds[0]
        fired = sorted({k for d in ds for k, v in (d.get("flags") or {}).items() if v})
        units = (d0.get("attack_config") or {}).get("units") or []
        rows.append(
            f"| {d0.get('architecture') or Path(d0['_path']).stem} | {d0.get('dataset')} | "
            f"{d0.get('threat_model')} | {d0.get('eps')} | {d0.get('n_examples')} | {len(ds)} | "
            f"{mean_std([d.get('clean_acc') for d in ds], pct=True)} | "
            f"{mean_std([_eval_robust(d) for d in ds], pct=True)} | "
            f"{', '.join(units) or '-'} | {', '.join(fired) or 'none'} |"
        )
    return head + "\n".join(rows) + "\n"


def _mean_curve(
    runs: Sequence[Run], key: str, x_key: str | None = None
) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over runs of ``key`` per epoch; x is the epoch or the mean of ``x_key``."""
    by_epoch: dict[float, list[float]] = {}
    xs_by_epoch: dict[float, list[float]] = {}
    for r in runs:
        ex, ey = r.series(key)
        for e, v in zip(ex, ey):
            by_epoch.setdefault(e, []).append(v)
        if x_key is not None:
            tx, tv = r.series(x_key)
            for e, v in zip(tx, tv):
                xs_by_epoch.setdefault(e, []).append(v)
    xs, ms, ss = [], [], []
    for e in sorted(by_epoch):
        if x_key is not None and e not in xs_by_epoch:
            continue
        vals = by_epoch[e]
        xs.append(statistics.fmean(xs_by_epoch[e]) if x_key is not None else e)
        ms.append(statistics.fmean(vals))
        ss.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return xs, ms, ss


def _probe_curve(runs: Sequence[Run], key: str) -> tuple[list[float], list[float], list[float]]:
    """Mean and std over runs of a gradient-variance probe field (``grad_var`` rows) per step."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for row in r.metrics:
            for probe in row.get("grad_var") or []:
                if key in probe and math.isfinite(float(probe[key])):
                    by_step.setdefault(int(probe["step"]), []).append(float(probe[key]))
    xs = sorted(by_step)
    ms = [statistics.fmean(by_step[x]) for x in xs]
    ss = [statistics.stdev(by_step[x]) if len(by_step[x]) > 1 else 0.0 for x in xs]
    return [float(x) for x in xs], ms, ss


def _any_key(runs: Iterable[Run], key: str) -> bool:
    return any(key in row for r in runs for row in r.metrics)


def _band(
    ax: Any,
    xs: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    /,
    *args: Any,
    scale: float = 1.0,
    floor: float | None = None,
    **plot_kw: Any,
) -> Any:
    """Plot the ``mean`` curve and a shaded ± ``scale * std`` band (clipped below at ``floor``)
    in the line's color; returns the line."""
    (line,) = ax.plot(xs, mean, *args, **plot_kw)
    lo = [m - scale * s for m, s in zip(mean, std)]
    if floor is not None:
        lo = [max(v, floor) for v in lo]
    hi = [m + scale * s for m, s in zip(mean, std)]
    ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    return line


def make_plots(
    groups: dict[str, list[Run]], out_dir: str | Path, facet: Sequence[str] = ()
) -> list[Path]:
    """PNG plots (matplotlib Agg): accuracy vs epoch and vs time (training CPU time when recorded),
    AGC coefficient, gradient variance (runs with ``--probe-variance-every``), density.

    ``facet`` (config keys, e.g. ``("sparse_method", "sparsity")``) draws the accuracy and
    coefficient plots as one row of panels per value of those keys, so a large grid stays legible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(groups)
    facets = _facets(groups, facet)
    all_runs = [r for rs in groups.values() for r in rs]
    written: list[Path] = []

    def acc_key(runs: Sequence[Run], kind: str) -> str | None:
        for k in (f"test_{kind}_acc", f"val_{kind}_acc"):
            if _any_key(runs, k):
                return k
        return None

    # Time axis: the training-only CPU time when every run records it (one thread: the wall-clock
    # of an idle core, robust to other load on a shared machine), else the wall-clock.
    every = all(any("cpu_time_s" in row for row in r.metrics) for r in all_runs)
    time_axis = (
        ("cpu_time_s", "training CPU time (s)") if every else ("wall_time_s", "wall-clock time (s)")
    )
    for x_key, fname, xlabel in (
        (None, "accuracy_vs_epoch.png", "epoch"),
        (time_axis[0], "accuracy_vs_time.png", time_axis[1]),
    ):
        if x_key is not None and not _any_key(all_runs, x_key):
            continue
        fig, axes = plt.subplots(len(facets), 2, figsize=(11, 4 * len(facets)), squeeze=False)
        drawn = False
        for row, (title, fgroups) in zip(axes, facets):
            for ax, kind in zip(row, ("clean", "robust")):
                for key, runs in fgroups.items():
                    k = acc_key(runs, kind)
                    if k is None:
                        continue
                    xs, ms, ss = _mean_curve(runs, k, x_key)
                    if not xs:
                        continue
                    scale = 100.0 if all(abs(m) <= 1 for m in ms) else 1.0
                    ms_p = [_pct(m) for m in ms]
                    _band(
                        ax,
                        xs,
                        ms_p,
                        ss,
                        scale=scale,
                        marker="o",
                        ms=3,
                        label=f"{labels[key]} ({k})",
                    )
                    drawn = True
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{kind} accuracy (%)")
                if title:
                    ax.set_title(title, fontsize=9)
                ax.grid(alpha=0.3)
                if ax.has_data():
                    ax.legend(fontsize=7)
        if drawn:
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=100)
            written.append(out_dir / fname)
        plt.close(fig)

    if _any_key(all_runs, "agc_coef"):
        coef_facets = [
            (t, {k: rs for k, rs in fg.items() if _any_key(rs, "agc_coef")}) for t, fg in facets
        ]
        coef_facets = [(t, fg) for t, fg in coef_facets if fg]
        fig, axes = plt.subplots(
            len(coef_facets), 1, figsize=(6, 4 * len(coef_facets)), squeeze=False
        )
        for (ax,), (title, fgroups) in zip(axes, coef_facets):
            for key, runs in fgroups.items():
                xs, ms, ss = _mean_curve(runs, "agc_coef")
                if xs:
                    _band(ax, xs, ms, ss, marker="o", ms=3, label=labels[key])
            ax.set_xlabel("epoch")
            ax.set_ylabel("AGC coefficient c = gamma * tau")
            if title:
                ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "agc_coef.png", dpi=100)
        written.append(out_dir / "agc_coef.png")
        plt.close(fig)

    if _any_key(all_runs, "grad_var"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, runs in groups.items():
            color = None  # one color per group: plain dashed, corrected solid
            for name, style in (("var_plain", "--"), ("var_corrected", "-")):
                xs, ms, ss = _probe_curve(runs, name)
                if xs:
                    line = _band(
                        axes[0], xs, ms, ss, style, floor=0.0, color=color,
                        label=f"{labels[key]}: {name}",
                    )  # fmt: skip
                    color = line.get_color()
            xs, ms, ss = _probe_curve(runs, "ratio")
            if xs:
                _band(axes[1], xs, ms, ss, marker="o", ms=3, label=labels[key])
        axes[0].set_yscale("log")
        axes[0].set_ylabel("gradient variance over probe batches")
        axes[1].axhline(1.0, color="grey", lw=0.8)
        axes[1].set_ylabel("var(corrected) / var(plain)")
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "grad_variance.png", dpi=100)
        written.append(out_dir / "grad_variance.png")
        plt.close(fig)

    if _any_key(all_runs, "density"):
        fig, ax = plt.subplots(figsize=(7, 4))
        per_layer = False
        for key, runs in groups.items():
            last = [
                row["density"]
                for r in runs
                for row in r.metrics[-1:]
                if isinstance(row.get("density"), dict)
            ]
            if last:
                per_layer = True
                layers = list(last[0])
                means = [
                    statistics.fmean(float(d.get(layer, math.nan)) for d in last)
                    for layer in layers
                ]
                ax.plot(range(len(layers)), means, marker="o", label=labels[key])
                ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=6)
            else:
                xs, ms, _ = _mean_curve(runs, "density")
                if xs:
                    ax.plot(xs, ms, marker="o", ms=3, label=labels[key])
        ax.set_xlabel("layer (final epoch)" if per_layer else "epoch")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "density.png", dpi=100)
        written.append(out_dir / "density.png")
        plt.close(fig)
    return written


def build_report(
    paths: Sequence[str | Path], out_dir: str | Path, facet: Sequence[str] = ()
) -> Path:
    """Write ``report.md`` and the plots into ``out_dir``; return the markdown file's path.

    ``facet``: config keys whose values split the accuracy and coefficient plots into rows of
    panels (see :func:`make_plots`)."""
    runs, evals = collect(paths)
    if not runs and not evals:
        raise UserError("nothing to report: give run folders or evaluation result files")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# robust_agc report\n"]
    plots: list[Path] = []
    if runs:
        groups = group_runs(runs)
        parts.append(
            f"## Training runs\n\n{len(runs)} runs in {len(groups)} groups (config without seed); "
            "mean ± std over seeds, final epoch.\n\n"
        )
        parts.append(run_table(groups))
        plots = make_plots(groups, out_dir, facet)
    if evals:
        parts.append(f"\n## Evaluations\n\n{len(evals)} result files; mean ± std over seeds.\n\n")
        parts.append(eval_table(evals))
    if plots:
        parts.append("\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    md = out_dir / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    logger.info("wrote %s and %d plots", md, len(plots))
    return md


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` subcommand's arguments to ``parser``."""
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_RESULT",
        help="run folders, folders of runs, result JSONs",
    )
    parser.add_argument("--out", required=True, help="output folder for report.md and the plots")
    parser.add_argument(
        "--facet",
        default=None,
        metavar="KEYS",
        help="comma-separated config keys (e.g. sparse_method,sparsity): one row of accuracy and "
        "coefficient panels per value",
    )


def run_report(args: argparse.Namespace) -> int:
    """Run ``robust-agc report``; returns the exit status (0). User errors raise UserError."""
    facet = [k.strip() for k in (getattr(args, "facet", None) or "").split(",") if k.strip()]
    md = build_report(args.paths, args.out, facet)
    logger.info("report: %s", md)
    return 0
