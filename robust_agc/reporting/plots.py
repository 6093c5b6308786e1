"""PNG plots of run groups (matplotlib, Agg backend): accuracy vs epoch and vs time, the AGC
coefficient, the gradient-variance probe and the density. Each curve is the mean over a group's
seeds with a shaded ± std band. From evaluation records with the ``fmn`` stage, the security
curves (robust accuracy against the radius, ``docs/protocols.md`` section 1) of several models on
one figure (:func:`security_curve_plot`, data from :mod:`~robust_agc.reporting.curves`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .curves import SecurityCurve, security_curves
from .groups import facet_groups, group_labels
from .runs import Run
from .stats import as_percent

__all__ = ["band", "make_plots", "mean_curve", "probe_curve", "security_curve_plot"]

Curve = tuple[list[float], list[float], list[float]]
Facets = list[tuple[str, dict[str, list[Run]]]]


def mean_curve(runs: Sequence[Run], key: str, x_key: str | None = None) -> Curve:
    """Mean and std over runs of ``key`` per epoch; x is the epoch or the mean of ``x_key``
    (for a time or compute ``x_key``, a pipeline stage's x starts at what its sources cost:
    :meth:`~robust_agc.reporting.runs.Run.chain_offset`)."""
    by_epoch: dict[float, list[float]] = {}
    xs_by_epoch: dict[float, list[float]] = {}
    for r in runs:
        ex, ey = r.series(key)
        for e, v in zip(ex, ey):
            by_epoch.setdefault(e, []).append(v)
        if x_key is not None:
            tx, tv = r.series(x_key)
            offset = r.chain_offset(x_key)
            for e, v in zip(tx, tv):
                xs_by_epoch.setdefault(e, []).append(v + offset)
    xs, ms, ss = [], [], []
    for e in sorted(by_epoch):
        if x_key is not None and e not in xs_by_epoch:
            continue
        vals = by_epoch[e]
        xs.append(statistics.fmean(xs_by_epoch[e]) if x_key is not None else e)
        ms.append(statistics.fmean(vals))
        ss.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return xs, ms, ss


def probe_curve(runs: Sequence[Run], key: str) -> Curve:
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


def band(
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


def _TAB20(i: int) -> tuple[float, float, float, float]:
    """Colour ``i`` of matplotlib's ``tab20`` map (0-19)."""
    from matplotlib import colormaps

    return colormaps["tab20"](i)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _accuracy_key(runs: Sequence[Run], kind: str) -> str | None:
    """The accuracy field plotted for ``kind`` (clean or robust): test if recorded, else val."""
    for k in (f"test_{kind}_acc", f"val_{kind}_acc"):
        if _any_key(runs, k):
            return k
    return None


def _time_axis(runs: Sequence[Run]) -> tuple[str, str]:
    """The time axis: the training-only CPU time when every run records it (one thread: the
    wall-clock of an idle core, robust to other load on a shared machine), else the wall-clock."""
    if all(any("cpu_time_s" in row for row in r.metrics) for r in runs):
        return "cpu_time_s", "training CPU time (s)"
    return "wall_time_s", "wall-clock time (s)"


def _accuracy_panel(ax: Any, groups: dict[str, list[Run]], labels: dict[str, str], kind: str,
                    x_key: str | None) -> bool:  # fmt: skip
    """Draw one panel (clean or robust accuracy) of every group; True if a curve was drawn.
    Beyond matplotlib's 10 default colours, each group gets its own of ``tab20`` and every
    second one a dashed line, so no two curves of a panel look alike."""
    drawn = False
    many = len(groups) > 10
    for i, (key, runs) in enumerate(groups.items()):
        style = {"color": _TAB20(i % 20), "ls": "--" if i % 2 else "-"} if many else {}
        k = _accuracy_key(runs, kind)
        if k is None:
            continue
        xs, ms, ss = mean_curve(runs, k, x_key)
        if not xs:
            continue
        scale = 100.0 if all(abs(m) <= 1 for m in ms) else 1.0
        ms_p = [as_percent(m) for m in ms]
        band(ax, xs, ms_p, ss, scale=scale, marker="o", ms=3, label=f"{labels[key]} ({k})",
             **style)  # fmt: skip
        drawn = True
    return drawn


def _accuracy_plot(plt: Any, facets: Facets, labels: dict[str, str], x_key: str | None,
                   xlabel: str, path: Path) -> Path | None:  # fmt: skip
    """Clean and robust accuracy side by side, one row of panels per facet."""
    fig, axes = plt.subplots(len(facets), 2, figsize=(11, 4 * len(facets)), squeeze=False)
    drawn = False
    for row, (title, fgroups) in zip(axes, facets):
        for ax, kind in zip(row, ("clean", "robust")):
            drawn = _accuracy_panel(ax, fgroups, labels, kind, x_key) or drawn
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{kind} accuracy (%)")
            if title:
                ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    written = _save(fig, path) if drawn else None
    plt.close(fig)
    return written


def _coef_plot(plt: Any, facets: Facets, labels: dict[str, str], path: Path) -> Path:
    """The AGC coefficient per epoch of the groups that record it, one panel per facet."""
    coef_facets = [
        (t, {k: rs for k, rs in fg.items() if _any_key(rs, "agc_coef")}) for t, fg in facets
    ]
    coef_facets = [(t, fg) for t, fg in coef_facets if fg]
    fig, axes = plt.subplots(len(coef_facets), 1, figsize=(6, 4 * len(coef_facets)), squeeze=False)
    for (ax,), (title, fgroups) in zip(axes, coef_facets):
        for key, runs in fgroups.items():
            xs, ms, ss = mean_curve(runs, "agc_coef")
            if xs:
                band(ax, xs, ms, ss, marker="o", ms=3, label=labels[key])
        ax.set_xlabel("epoch")
        ax.set_ylabel("AGC coefficient c = gamma * tau")
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written = _save(fig, path)
    plt.close(fig)
    return written


def _variance_plot(plt: Any, groups: dict[str, list[Run]], labels: dict[str, str],
                   path: Path) -> Path:  # fmt: skip
    """The probe's plain and corrected gradient variance per step, and their ratio."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, runs in groups.items():
        color = None  # one color per group: plain dashed, corrected solid
        for name, style in (("var_plain", "--"), ("var_corrected", "-")):
            xs, ms, ss = probe_curve(runs, name)
            if xs:
                line = band(
                    axes[0], xs, ms, ss, style, floor=0.0, color=color,
                    label=f"{labels[key]}: {name}",
                )  # fmt: skip
                color = line.get_color()
        xs, ms, ss = probe_curve(runs, "ratio")
        if xs:
            band(axes[1], xs, ms, ss, marker="o", ms=3, label=labels[key])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("gradient variance over probe batches")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_ylabel("var(corrected) / var(plain)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    written = _save(fig, path)
    plt.close(fig)
    return written


def _density_plot(plt: Any, groups: dict[str, list[Run]], labels: dict[str, str],
                  path: Path) -> Path:  # fmt: skip
    """Per-layer density of the final epoch (when recorded per layer), else density per epoch."""
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
                statistics.fmean(float(d.get(layer, math.nan)) for d in last) for layer in layers
            ]
            ax.plot(range(len(layers)), means, marker="o", label=labels[key])
            ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=6)
        else:
            xs, ms, _ = mean_curve(runs, "density")
            if xs:
                ax.plot(xs, ms, marker="o", ms=3, label=labels[key])
    ax.set_xlabel("layer (final epoch)" if per_layer else "epoch")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written = _save(fig, path)
    plt.close(fig)
    return written


def make_plots(
    groups: dict[str, list[Run]], out_dir: str | Path, facet: Sequence[str] = ()
) -> list[Path]:
    """PNG plots (matplotlib Agg): accuracy vs epoch and vs time (training CPU time when recorded),
    AGC coefficient, gradient variance (runs with ``--probe-variance-every``), density.

    ``facet`` (config keys, e.g. ``("sparse_method", "sparsity")``) draws the accuracy and
    coefficient plots as one row of panels per value of those keys, so a large grid stays legible.
    Returns the files written, in that order.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = group_labels(groups)
    facets = facet_groups(groups, facet)
    all_runs = [r for rs in groups.values() for r in rs]
    time_key, time_label = _time_axis(all_runs)
    written: list[Path | None] = [
        _accuracy_plot(plt, facets, labels, None, "epoch", out_dir / "accuracy_vs_epoch.png")
    ]
    if _any_key(all_runs, time_key):
        path = out_dir / "accuracy_vs_time.png"
        written.append(_accuracy_plot(plt, facets, labels, time_key, time_label, path))
    if _any_key(all_runs, "agc_coef"):
        written.append(_coef_plot(plt, facets, labels, out_dir / "agc_coef.png"))
    if _any_key(all_runs, "grad_var"):
        written.append(_variance_plot(plt, groups, labels, out_dir / "grad_variance.png"))
    if _any_key(all_runs, "density"):
        written.append(_density_plot(plt, groups, labels, out_dir / "density.png"))
    return [p for p in written if p is not None]


_ATTACK_NAMES = {"autoattack": "AutoAttack", "pgd": "PGD", "square": "Square"}


def security_curve_plot(evals: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Draw :func:`security_curves` into ``path`` (PNG): robust accuracy (%) against the radius,
    one line per model (± std band over seeds), one panel per dataset and threat model, and the
    eps-attack's robust accuracy at eps marked on each curve (a star of the line's colour). Up to
    10 models per panel take matplotlib's default colours, more take ``tab20``'s paired shades
    (models 2k and 2k+1 share a hue: order the inputs pairwise to compare pairs); the legend lies
    beside the panel. Returns ``path``, or None (nothing written) when no record has a curve."""
    curves = security_curves(evals)
    if not curves:
        return None
    panels: dict[tuple[str | None, str | None], list[SecurityCurve]] = {}
    for c in curves:
        panels.setdefault((c.dataset, c.threat_model), []).append(c)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 4.5), squeeze=False)
    for ax, ((dataset, threat), cs) in zip(axes[0], panels.items()):
        colors = plt.get_cmap("tab20").colors if len(cs) > 10 else [None] * len(cs)
        stars = set()
        for c, color in zip(cs, colors):
            pct = [100.0 * a for a in c.robust_acc]
            line = band(ax, c.eps_grid, pct, c.std, scale=100.0, floor=0.0, marker=".",
                        label=c.label, color=color)  # fmt: skip
            if c.eps_attack_acc is not None and c.eps is not None:
                stars.add(_ATTACK_NAMES.get(c.eps_attack or "", c.eps_attack))
                ax.plot([c.eps], [100.0 * c.eps_attack_acc], "*", ms=12, mec="black",
                        color=line.get_color())  # fmt: skip
        ax.set_xlabel(f"perturbation radius ({threat} norm)")
        ax.set_ylabel("robust accuracy (%)")
        marks = f"; stars: {', '.join(sorted(stars))} at eps" if stars else ""
        ax.set_title(f"security curves, {dataset} {threat} (FMN radii{marks})", fontsize=9)
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    written = _save(fig, Path(path))
    plt.close(fig)
    return written
