"""The outcome of an evaluation: :class:`EvalResult` and its JSON record.

The record uses RobustBench's field names where they exist; accuracies are fractions in [0, 1].
:func:`versions` and :func:`robust_agc.utils.machine_info` give its provenance: the software
versions and the machine block (CPU model, torch's CPU capability and kernel flags, threads, world
size), which decide the CPU kernels and so whether two records can agree bit for bit.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import atomic_write_bytes
from ..errors import UserError

__all__ = ["RESULT_FORMAT", "EvalResult", "jsonable", "versions"]

RESULT_FORMAT = "robust_agc.eval_result/1"
"""The ``format`` field of the JSON record."""


@dataclass
class EvalResult:
    """Outcome of :func:`benchmark`. Accuracies are fractions in [0, 1].

    Attributes:
        clean_acc: accuracy on the clean points.
        robust_acc: final worst-case robust accuracy over every stage that ran.
        stage_acc: cumulative robust accuracy after each stage, in order (``"clean"`` first).
        component_acc: cumulative robust accuracy after each attack unit (AutoAttack components
            appear as ``"autoattack/<name>"``).
        robust_flags: per-point bool tensor, True where the point survived every stage.
        broken_by: per point, the unit that broke it (``"clean"`` = misclassified) or None.
        timings: seconds per unit and stage (summed over resumed sessions), plus ``"checks"`` and
            ``"total"``.
        n_attacked, n_broken: per unit, the points it attacked and broke.
        attack_config: the exact attack configuration (also the resume fingerprint).
        flags, flag_details: gradient-masking flags (:mod:`robust_agc.eval.checks`) and their details.
        n_examples, eps, threat_model, seed, dataset, architecture: the evaluation's identity.
        versions: versions of robust_agc, torch, pyautoattack and Python.
        machine: what decides the CPU kernels (:func:`robust_agc.utils.machine_info`: CPU model,
            torch's CPU capability, kernel flags, threads, world size).
        model_info: metadata passed by the caller (sparsity, optimizer, checkpoint config...).
        robust_acc_repredicted: robust accuracy recounted by re-predicting the adversarial images.
        notes: free-text remarks recorded for the reader (e.g. where eps came from).
        passes: per unit and stage (plus ``"checks"``, ``"recount"`` and ``"total"``), the model
            passes the evaluation spent, counted in single examples by a hook on the model:
            ``{"forward": n, "backward": n}``. A backward pass is one gradient computation through
            the model's output (FAB's untargeted version takes one per class). Summed over
            resumed sessions; a resumed session's recomputed clean predictions are not counted.
        number_forward_passes: RobustBench's field: forward passes of the network per prediction
            at test time (more than 1 for defenses that average several passes, e.g. randomized
            ones). Measured on the first clean chunk: the fewest examples any module holding
            parameters processed, per example given to the model (1 for a plain network).
        world_size: processes that shared the evaluation (``torch.distributed``); the per-point
            results do not depend on it.
        radii: with the ``fmn`` stage, per point the smallest adversarial perturbation's norm
            FMN found (0: misclassified clean; ``inf``: none found; None: outside ``fmn_slice``),
            else None. ``fmn_slice``: ``[start, stop]`` when FMN attacked only those points.
        eps_grid, security_curve: the grid and ``[(eps, robust_acc), ...]`` over it, from the
            radii and (for grid radii ``>= eps``) the eps-attacks' verdicts
            (:func:`robust_agc.eval.fmn.security_curve`), over the points FMN attacked.
        fmn_disagree: per point, ``"eps_attack_only"``, ``"fmn_only"`` or None
            (:func:`robust_agc.eval.fmn.disagreement`); None when no eps-attack ran.
        sparsity, structure, footnote: how pruned the evaluated model is
            (:func:`robust_agc.eval.loading.compression_info`: the zero fraction of its conv and
            linear weights; ``"dense"``, ``"unstructured"`` or ``"structured"``; RobustBench's
            ``"Compressed model"`` for a pruned model, else None).
        preset, preset_record: the preset the evaluation followed (``"apb"``,
            :mod:`robust_agc.eval.presets`) and its record block (model key, deviations,
            overrides), else None.
    """

    clean_acc: float
    robust_acc: float
    stage_acc: dict[str, float]
    component_acc: dict[str, float]
    robust_flags: Tensor
    broken_by: list[str | None]
    timings: dict[str, float]
    n_attacked: dict[str, int]
    n_broken: dict[str, int]
    attack_config: dict[str, Any]
    flags: dict[str, bool]
    flag_details: dict[str, Any]
    n_examples: int
    eps: float
    threat_model: str
    seed: int
    dataset: str | None = None
    architecture: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    robust_acc_repredicted: float | None = None
    notes: list[str] = field(default_factory=list)
    passes: dict[str, dict[str, int]] = field(default_factory=dict)
    number_forward_passes: int | float = 1
    world_size: int = 1
    machine: dict[str, Any] = field(default_factory=dict)
    radii: list[float | None] | None = None
    eps_grid: list[float] | None = None
    security_curve: list[tuple[float, float]] | None = None
    fmn_disagree: list[str | None] | None = None
    sparsity: float | None = None
    structure: str | None = None
    footnote: str | None = None
    fmn_slice: list[int] | None = None
    preset: str | None = None
    preset_record: dict[str, Any] | None = None

    @property
    def autoattack_acc(self) -> float | None:
        """Worst-case accuracy after the AutoAttack stage (None when it did not run)."""
        return self.stage_acc.get("autoattack")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record; RobustBench's field names where they exist.

        RobustBench fields: ``clean_acc``, ``autoattack_acc`` (only when AutoAttack ran; the worst
        case over the stages up to and including it), ``eps``, ``threat_model``, ``dataset``,
        ``architecture``, ``n_examples``, ``number_forward_passes`` (forward passes of the network
        per prediction, measured: 1 for a plain network), ``additional_data`` (False), ``footnote``
        (``"Compressed model"`` for a pruned model, else None). Accuracies are fractions in
        [0, 1] (RobustBench's JSON files store percentages). Our fields: ``robust_acc``,
        ``stages``, ``per_point_robust``, ``per_point_broken_by``, ``flags``, ``flag_details``,
        ``seed``, ``timings``, ``passes``, ``world_size``, ``attack_config``, ``versions``,
        ``machine``, ``model_info``, ``notes``, ``sparsity``, ``structure``; with the ``fmn``
        stage, ``fmn``: ``radii`` (per point, ``"inf"`` where none was found, null outside
        ``slice``), ``slice`` and ``n_points`` (with ``fmn_slice``),
        ``security_curve`` (``[[eps, acc], ...]``) and, where an eps-attack ran, ``disagree``
        (per point, null where FMN did not run) and ``n_disagree`` (per kind); with a preset,
        ``preset`` (its name) and a block under that name.
        """
        stages = []
        for name, acc in self.stage_acc.items():
            comps = [
                {
                    "name": u,
                    "robust_acc": a,
                    "n_attacked": self.n_attacked.get(u, 0),
                    "n_broken": self.n_broken.get(u, 0),
                    "time_s": self.timings.get(u, 0.0),
                }
                for u, a in self.component_acc.items()
                if u.startswith(name + "/")
            ]
            entry: dict[str, Any] = {
                "name": name,
                "robust_acc": acc,
                "n_attacked": self.n_attacked.get(name, 0),
                "n_broken": self.n_broken.get(name, 0),
                "time_s": self.timings.get(name, 0.0),
            }
            if comps:
                entry["components"] = comps
            stages.append(entry)
        d: dict[str, Any] = {
            "format": RESULT_FORMAT,
            "dataset": self.dataset,
            "threat_model": self.threat_model,
            "eps": self.eps,
            "n_examples": self.n_examples,
            "architecture": self.architecture,
            "clean_acc": self.clean_acc,
        }
        if self.autoattack_acc is not None:
            d["autoattack_acc"] = self.autoattack_acc
        d.update(
            {
                "robust_acc": self.robust_acc,
                "robust_acc_repredicted": self.robust_acc_repredicted,
                "acc_unit": "fraction",
                "additional_data": False,
                "number_forward_passes": self.number_forward_passes,
                "footnote": self.footnote,
                "sparsity": self.sparsity,
                "structure": self.structure,
                "stages": stages,
                "per_point_robust": [bool(v) for v in self.robust_flags.tolist()],
                "per_point_broken_by": list(self.broken_by),
                "flags": dict(self.flags),
                "flag_details": jsonable(self.flag_details),
                "seed": self.seed,
                "timings": dict(self.timings),
                "passes": {k: dict(v) for k, v in self.passes.items()},
                "world_size": self.world_size,
                "attack_config": jsonable(self.attack_config),
                "versions": dict(self.versions),
                "machine": jsonable(self.machine),
                "model_info": jsonable(self.model_info),
                "notes": list(self.notes),
            }
        )
        d.update(self._optional_blocks())
        return d

    def _optional_blocks(self) -> dict[str, Any]:
        """The record's ``fmn`` block (with the fmn stage) and the preset's (with a preset)."""
        out: dict[str, Any] = {}
        if self.radii is not None:
            out["fmn"] = self._fmn_record()
        if self.preset is not None:
            out["preset"] = self.preset
            out[self.preset] = jsonable(self.preset_record or {})
        return out

    def _fmn_record(self) -> dict[str, Any]:
        """The record's ``fmn`` block (see :meth:`to_dict`)."""
        rec: dict[str, Any] = {
            "radii": jsonable(list(self.radii or [])),
            "security_curve": [[e, a] for e, a in (self.security_curve or [])],
        }
        if self.fmn_slice is not None:
            rec["slice"] = list(self.fmn_slice)
            rec["n_points"] = sum(1 for r in self.radii or [] if r is not None)
        if self.fmn_disagree is not None:
            rec["disagree"] = list(self.fmn_disagree)
            rec["n_disagree"] = {
                k: sum(1 for v in self.fmn_disagree if v == k)
                for k in ("eps_attack_only", "fmn_only")
            }
        return rec

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write :meth:`to_dict` as JSON atomically; refuse to replace a file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"))


def versions() -> dict[str, str]:
    """The versions of robust_agc, torch, Python and pyautoattack ("not installed" if absent)."""
    from .. import __version__

    out = {
        "robust_agc": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import pyautoattack

        out["pyautoattack"] = getattr(pyautoattack, "__version__", "unknown")
    except ImportError:
        out["pyautoattack"] = "not installed"
    return out


def jsonable(obj: Any) -> Any:
    """Convert tensors, tuples, enums and paths inside ``obj`` to JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)
