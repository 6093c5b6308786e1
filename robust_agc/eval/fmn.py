"""The minimum-norm stage ``fmn`` and the security curve (``docs/protocols.md`` section 1).

FMN (fast minimum-norm attack, Pintor et al., NeurIPS 2021) looks for the *smallest* adversarial
perturbation of each point, in L-inf or L2, instead of any perturbation within ``eps``. Its
outcome is a per-point radius: 0 for a point misclassified clean, the norm of the smallest
adversarial perturbation found, ``inf`` where it found none. A radius is an upper bound on the true
minimal one: an attack can only overstate robustness.

We call adv-lib's implementation (``adv_lib.attacks.fmn``): it is maintained by Jérôme Rony, a
co-author of FMN, written in pure PyTorch (no framework conversion, so it runs on our models and
devices as they are), and covers L-inf, L2, L1 and L0 (only L-inf and L2 are wired here, the
threat models of the harness). FMN itself is deterministic (it starts from the clean image); each
chunk is still seeded with the plan's seed like every other stage.

Checked against foolbox 3.3.4's FMN (``tests/test_fmn_foolbox.py``, a paired sign test on a
trained MLP): the L-inf radii agree with foolbox's (ours never significantly larger). In L2,
adv-lib 0.2.8's FMN finds no adversarial example for most points of that model where foolbox's
finds one for each (an ``xfail`` there records it): L2 radii from this stage can be overstated.

From the radii, :func:`security_curve` gives the robust accuracy over a grid of radii, and
:func:`disagreement` compares FMN with the eps-attacks (PGD, AutoAttack, Square) where they ran:

* a point counts as broken at eps by FMN when its radius is ``<= eps`` (the eps-robust accuracy is
  the per-point worst case over every stage, FMN included);
* a point broken at the evaluation's ``eps`` by an eps-attack is broken at every grid radius
  ``>= eps`` too, so the curve never claims more robustness than those attacks found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .plan import ThreatModel

__all__ = [
    "EPS_ATTACK_UNITS",
    "disagreement",
    "fmn_attack",
    "fmn_config",
    "has_eps_attacks",
    "perturbation_radii",
    "security_curve",
]

EPS_ATTACK_UNITS: tuple[str, ...] = ("pgd", "square", "autoattack/")
"""The units that attack at the evaluation's eps (a name, or a prefix ending in ``/``)."""


def _is_eps_unit(unit: str | None) -> bool:
    if unit is None:
        return False
    return any(unit == u or (u.endswith("/") and unit.startswith(u)) for u in EPS_ATTACK_UNITS)


def _p(threat: ThreatModel) -> float:
    return math.inf if threat is ThreatModel.Linf else 2.0


def fmn_attack(
    model: nn.Module, x: Tensor, y: Tensor, *, threat: ThreatModel, steps: int
) -> Tensor:
    """adv-lib's FMN (untargeted, its default step sizes) on one chunk; returns the best
    adversarial images found (the clean image where none was found).

    Raises:
        RuntimeError: adv-lib is not installed.
    """
    try:
        from adv_lib.attacks import fmn
    except ImportError as e:
        raise RuntimeError(f"the 'fmn' stage needs adv-lib (pip install adv-lib): {e}") from e
    return fmn(model, x, y, norm=_p(threat), steps=steps).detach()


def fmn_config(threat: ThreatModel, steps: int) -> dict[str, Any]:
    """The ``attack_config["fmn"]`` record: implementation, version, norm and steps."""
    try:
        import adv_lib

        version = getattr(adv_lib, "__version__", "unknown")
    except ImportError:
        version = "not installed"
    return {
        "implementation": "adv_lib.attacks.fmn",
        "adv_lib": version,
        "norm": threat.value,
        "steps": steps,
        "targeted": False,
    }


def perturbation_radii(
    x: Tensor, adv: Tensor, misclassified: Tensor, threat: ThreatModel
) -> list[float]:
    """Per point, the norm of ``adv - x`` (float64) where ``adv`` is misclassified, else ``inf``."""
    delta = (adv.detach().double() - x.detach().double()).flatten(1)
    norms = delta.norm(p=_p(threat), dim=1).cpu()
    mis = misclassified.cpu()
    return [float(r) if m else math.inf for r, m in zip(norms.tolist(), mis.tolist(), strict=True)]


def security_curve(
    radii: Sequence[float],
    eps_grid: Sequence[float],
    *,
    eps: float,
    broken_by: Sequence[str | None] = (),
) -> list[tuple[float, float]]:
    """Robust accuracy at each grid radius ``e``: the fraction of points with radius ``> e``
    (a radius ``<= e`` is a perturbation within the ball), and, for ``e >= eps``, not broken by an
    eps-attack (``broken_by`` names the unit that broke each point; empty: FMN only).

    Returns ``[(e, acc), ...]``, non-increasing in ``e``; at ``e = 0`` the clean accuracy (radius 0
    marks a misclassified point).
    """
    n = len(radii)
    if n == 0:
        return [(float(e), 0.0) for e in eps_grid]
    r = torch.tensor([float(v) for v in radii], dtype=torch.float64)
    eps_broken = torch.tensor([_is_eps_unit(b) for b in broken_by] or [False] * n)
    curve = []
    for e in eps_grid:
        robust = r > e
        if e >= eps:
            robust &= ~eps_broken
        curve.append((float(e), int(robust.sum()) / n))
    return curve


def disagreement(
    radii: Sequence[float], broken_by: Sequence[str | None], *, eps: float
) -> list[str | None]:
    """Per point, how FMN and the eps-attacks disagree at ``eps``: ``"eps_attack_only"`` (an
    eps-attack broke it, FMN's radius is ``> eps``), ``"fmn_only"`` (radius ``<= eps``, no
    eps-attack broke it) or None (they agree, or the point is misclassified clean)."""
    out: list[str | None] = []
    for r, b in zip(radii, broken_by, strict=True):
        if b == "clean":
            out.append(None)
        elif _is_eps_unit(b) and r > eps:
            out.append("eps_attack_only")
        elif r <= eps and not _is_eps_unit(b):
            out.append("fmn_only")
        else:
            out.append(None)
    return out


def has_eps_attacks(units: Sequence[str]) -> bool:
    """Whether any of ``units`` attacks at the evaluation's eps (PGD, AutoAttack, Square)."""
    return any(_is_eps_unit(u) for u in units)
