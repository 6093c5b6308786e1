"""``report.md`` and its plots from run folders and evaluation results (``robust-agc report``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .curves import security_curves, security_table
from .groups import group_runs
from .plots import make_plots, security_curve_plot
from .runs import collect
from .tables import eval_table, run_table

__all__ = ["build_report"]

logger = logging.getLogger(__name__)


def build_report(
    paths: Sequence[str | Path], out_dir: str | Path, facet: Sequence[str] = ()
) -> Path:
    """Write ``report.md`` and the plots into ``out_dir``; return the markdown file's path.

    Evaluation records with an ``fmn`` security curve (standalone or attached to a run folder)
    give ``security_curve.png``, one line per model
    (:func:`~robust_agc.reporting.plots.security_curve_plot`).

    ``facet``: config keys whose values split the accuracy and coefficient plots into rows of
    panels (see :func:`~robust_agc.reporting.plots.make_plots`)."""
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
    all_evals = [*evals, *(d for r in runs for d in r.evals)]
    curve = security_curve_plot(all_evals, out_dir / "security_curve.png")
    if curve is not None:
        parts.append(
            "\n## Security curves\n\nRobust accuracy against the perturbation radius, from the "
            "FMN radii of the evaluations with the `fmn` stage (mean over seeds; a star marks the "
            "eps-attack's robust accuracy at eps).\n\n"
            f"![{curve.stem}]({curve.name})\n\n"
        )
        parts.append(security_table(security_curves(all_evals)))
    if plots:
        parts.append("\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    md = out_dir / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    logger.info("wrote %s and %d plots", md, len(plots))
    return md
