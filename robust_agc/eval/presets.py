"""Evaluation presets: the settings of a published benchmark, and what we do differently.

``apb``: the Adversarial Pruning Benchmark (Piras et al., "Adversarial Pruning: A Survey and
Benchmark of Pruning Methods for Adversarial Robustness", arXiv 2409.01249), as its code runs it at
https://github.com/pralab/AdversarialPruningBenchmark commit
0ae46e7b0ed3ae41c1bd1dc439cc014bb5cd2826:

* ``utils/test.py`` ``test_model_aa``: AutoAttack ``standard``, L-inf, eps 0.031, the first
  10,000 test points (unshuffled), batch 500;
* ``utils/test.py`` ``test_model_hofmn``: HO-FMN (DLR loss, SGD, cosine-annealing schedule) tuned
  over 32 trials of 100-step attacks on batches of 64 test points, then 200 steps on test points
  2048..2175 (128 points, batch 128); FMN robust accuracy = the fraction of L-inf radii
  above 8/255;
* ``utils/utils.py`` ``model_key_maker``: model keys ``{ap}_{R18|V16}_{CIFAR10|SVHN}_{US|S}_{rate}``
  (``US`` for weight pruning, ``S`` for filter or channel pruning; rates 90/95/99 and 50/75/90).

:data:`PRESETS` maps a name to a :class:`Preset`; ``robust-agc eval --preset apb`` fills the
settings that are not given explicitly and records the preset, the overrides, the model key
(:func:`apb_model_key`) and :data:`APB_DEVIATIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plan import default_eps_grid

__all__ = [
    "APB_COMMIT",
    "APB_DEVIATIONS",
    "APB_FMN_THRESHOLD",
    "PRESETS",
    "Preset",
    "apb_model_key",
    "apb_record",
]

APB_COMMIT = "0ae46e7b0ed3ae41c1bd1dc439cc014bb5cd2826"
"""The commit of pralab/AdversarialPruningBenchmark the ``apb`` preset follows."""
APB_FMN_THRESHOLD = 8 / 255
"""APB's FMN robust accuracy counts radii above this (its AutoAttack eps is 0.031)."""
APB_EPS = 0.031

APB_DEVIATIONS: tuple[str, ...] = (
    "FMN, not HO-FMN: no hyperparameter tuning (APB tunes 32 trials of 100-step attacks on "
    "batches of 64 test points before attacking 2048..2175)",
    "FMN's loss, optimizer and schedule are foolbox 3.3.4's defaults (logit difference, "
    "normalized-gradient steps 1 -> 0.01 cosine-annealed, gamma 0.05), not APB's tuned DLR loss "
    "with SGD and cosine annealing",
    "a point FMN did not break has radius inf (robust); a radius <= eps 0.031 also breaks the "
    "point in robust_acc (per-point worst case); autoattack_acc is AutoAttack's alone",
    "AutoAttack seeded with --seed (0 by default) through robust_agc's driver of pyautoattack's "
    "attack objects (per-point results equal run_standard_evaluation's); APB calls AutoAttack "
    "without a seed",
)
"""What differs from APB's own evaluation (recorded under ``apb.deviations``)."""


@dataclass(frozen=True)
class Preset:
    """A named set of ``robust-agc eval`` settings (keys: the CLI's option names, ``dest``
    form) and the differences from the benchmark it follows."""

    name: str
    settings: dict[str, Any]
    deviations: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""
    curve_radii: tuple[float, ...] = ()
    """Radii added to the default security-curve grid (of the eps in use) when ``--eps-grid`` is
    not given."""

    def eps_grid(self, eps: float) -> list[float]:
        """The security curve's grid for ``eps``: :func:`default_eps_grid` plus
        :attr:`curve_radii`, sorted, without repeats."""
        return sorted({*default_eps_grid(eps), *self.curve_radii})


PRESETS: dict[str, Preset] = {
    "apb": Preset(
        name="apb",
        settings={
            "attacks": "clean,autoattack,fmn",
            "version": "standard",
            "norm": "Linf",
            "eps": APB_EPS,
            "n_examples": 10000,
            "batch_size": 500,
            "fmn_steps": 200,
            "fmn_slice": (2048, 2176),
        },
        deviations=APB_DEVIATIONS,
        source=f"https://github.com/pralab/AdversarialPruningBenchmark/tree/{APB_COMMIT}",
        curve_radii=(APB_FMN_THRESHOLD,),
    )
}
"""The presets by name."""

_APB_ARCHS = {"resnet18": "R18", "vgg16": "V16"}
_APB_DATASETS = {"cifar10": "CIFAR10", "svhn": "SVHN"}
_APB_RATES = {"US": ("90", "95", "99"), "S": ("50", "75", "90")}


def apb_model_key(
    method: str | None,
    architecture: str | None,
    dataset: str | None,
    structure: str | None,
    sparsity: float | None,
) -> tuple[str, list[str]]:
    """APB's model key ``{ap}_{R18|V16}_{CIFAR10|SVHN}_{US|S}_{rate}`` for a model, and where the
    model falls outside what APB has code for.

    Args:
        method: the pruning method (APB's ``ap`` slot; ours, e.g. ``"rigl-agc"``: a new entry).
        architecture: our registry name; ``resnet18`` -> ``R18``, ``vgg16`` -> ``V16``.
        dataset: ``cifar10`` -> ``CIFAR10``, ``svhn`` -> ``SVHN``.
        structure, sparsity: :func:`~robust_agc.eval.compression_info`'s ``unstructured`` ->
            ``US``, ``structured`` -> ``S``; the rate is ``round(100 * sparsity)``.

    Returns:
        ``(key, mismatches)``: for anything APB has no code for, the key keeps our name in that
        slot (``preact-resnet18``, ``fashion-mnist``, ``dense``) and ``mismatches`` says why; the
        key is then not one APB can load. Never raises.
    """
    mismatches: list[str] = []
    arch = _APB_ARCHS.get(architecture or "")
    if arch is None:
        arch = architecture or "unknown"
        mismatches.append(f"architecture {arch!r}: APB has resnet18 (R18) and vgg16 (V16)")
    ds = _APB_DATASETS.get(dataset or "")
    if ds is None:
        ds = dataset or "unknown"
        mismatches.append(f"dataset {ds!r}: APB has CIFAR10 and SVHN")
    st = {"unstructured": "US", "structured": "S"}.get(structure or "")
    if st is None:
        st = structure or "unknown"
        mismatches.append(f"structure {st!r}: APB keys name pruned models (US or S)")
    rate = str(round(100 * sparsity)) if sparsity is not None else "unknown"
    if st in _APB_RATES and rate not in _APB_RATES[st]:
        mismatches.append(f"sparsity {rate}%: APB's {st} rates are {', '.join(_APB_RATES[st])}")
    return f"{method or 'unknown'}_{arch}_{ds}_{st}_{rate}", mismatches


def apb_record(
    *,
    method: str | None,
    architecture: str | None,
    dataset: str | None,
    structure: str | None,
    sparsity: float | None,
    radii: list[float | None] | None,
    overrides: dict[str, Any],
    threat_model: str = "Linf",
) -> dict[str, Any]:
    """The record's ``apb`` block: source, model key and mismatches, APB's FMN robust accuracy
    (L-inf radii above 8/255 among the points FMN attacked; None without them or for another
    ``threat_model``), the flags that overrode the preset, and :data:`APB_DEVIATIONS`."""
    key, mismatches = apb_model_key(method, architecture, dataset, structure, sparsity)
    on = [r for r in radii or [] if r is not None] if threat_model == "Linf" else []
    return {
        "source": PRESETS["apb"].source,
        "model_key": key,
        "key_mismatches": mismatches,
        "fmn_robust_acc_8_255": sum(r > APB_FMN_THRESHOLD for r in on) / len(on) if on else None,
        "overrides": dict(overrides),
        "deviations": list(APB_DEVIATIONS),
    }
