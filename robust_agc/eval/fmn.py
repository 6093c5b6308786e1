"""The minimum-norm stage ``fmn`` and the security curve (``docs/protocols.md`` section 1).

FMN (fast minimum-norm attack, Pintor et al., NeurIPS 2021) looks for the *smallest* adversarial
perturbation of each point, in L-inf, L2, L1 or L0, instead of any perturbation within ``eps``.
Its outcome is a per-point radius: 0 for a point misclassified clean, the norm of the smallest
adversarial perturbation found, ``inf`` where it found none. A radius is an upper bound on the true
minimal one: an attack can only overstate robustness.

We call foolbox 3.3.4's implementation (``foolbox.attacks.LInfFMNAttack``, ``L2FMNAttack``,
``L1FMNAttack``, ``L0FMNAttack``; contributed by FMN's first author,
https://github.com/bethgelab/foolbox/pull/628), untargeted, with its default step sizes
(``max_stepsize`` 1, ``min_stepsize`` 0.01, ``gamma`` 0.05), no initial attack, through its
``run`` method: one forward and one backward pass per step and point, no extra check pass. Why
foolbox rather than adv-lib (``adv_lib.attacks.fmn``, the previous backend, now only in the
``dev`` extra for the cross-check ``tests/test_fmn_foolbox.py``): foolbox has all four norms,
and on L-inf both give identical radii there. That adv-lib's L2 FMN found fewer adversarial
examples than foolbox's, the first reason given for the move, was foolbox's L2 projection doing
nothing (below), not a weakness of adv-lib.

Two of foolbox 3.3.4's projections are replaced (its ``project`` method; the rest is foolbox's):

* L2: ``L2FMNAttack.project`` scales ``delta`` by ``norms / norms``, i.e. by 1, so the adaptive
  norm constraint never acts and the attack is an unconstrained normalized-gradient descent whose
  first step already has norm ``max_stepsize``: on a linear model its radii are several times the
  closed-form minimum (``tests/test_fmn.py``). We scale ``delta`` to norm ``<= epsilon`` as FMN's
  paper does (Algorithm 1). With it the L2 radii of the linear model match the closed form, like
  adv-lib's; on the Fashion-MNIST MLP of ``tests/test_fmn_foolbox.py`` both correct
  implementations find an L2 adversarial example for few points at 100-1000 steps (a cause not
  established yet), so an L2 ``inf`` radius there means "not found", not "robust".
* L0: ``L0FMNAttack.project`` keeps the ``epsilon + 1`` largest components (it indexes the sorted
  magnitudes at ``epsilon``), so no radius falls below 2, and it raises ``IndexError`` once
  ``epsilon`` reaches the number of input values (seen on 28x28 inputs that no step made
  adversarial, between 200 and 400 steps; the stage's default is 1000). We keep the ``epsilon`` largest, ``epsilon`` within ``[1, d]``.

FMN itself is deterministic (it starts from the clean image); each chunk is still seeded with the
plan's seed like every other stage.

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

from ..utils import frozen_parameters
from .plan import ThreatModel

__all__ = [
    "EPS_ATTACK_UNITS",
    "disagreement",
    "fmn_attack",
    "fmn_attack_class",
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


_NORM_P: dict[ThreatModel, float] = {
    ThreatModel.Linf: math.inf,
    ThreatModel.L2: 2.0,
    ThreatModel.L1: 1.0,
    ThreatModel.L0: 0.0,
}
_FOOLBOX_CLASSES: dict[ThreatModel, str] = {
    ThreatModel.Linf: "LInfFMNAttack",
    ThreatModel.L2: "L2FMNAttack",
    ThreatModel.L1: "L1FMNAttack",
    ThreatModel.L0: "L0FMNAttack",
}


def _p(threat: ThreatModel) -> float:
    return _NORM_P[threat]


def _foolbox() -> Any:
    try:
        import foolbox
    except ImportError as e:
        raise RuntimeError(
            f"the 'fmn' stage needs foolbox (pip install foolbox==3.3.4): {e}"
        ) from e
    return foolbox


def fmn_attack_class(threat: ThreatModel) -> Any:
    """foolbox's FMN class for ``threat``; for L2 and L0 a subclass whose ``project`` is corrected
    (see the module docstring).

    Raises:
        RuntimeError: foolbox is not installed.
    """
    fb = _foolbox()
    base = getattr(fb.attacks, _FOOLBOX_CLASSES[threat])
    if threat is ThreatModel.L2:
        return type("L2FMN", (base,), {"project": _project_l2})
    if threat is ThreatModel.L0:
        return type("L0FMN", (base,), {"project": _project_l0})
    return base


def _project_l2(self: Any, x: Any, x0: Any, epsilon: Any) -> Any:
    """FMN's L2 projection (Pintor et al. 2021, Algorithm 1): ``x0 + delta`` with ``delta``
    scaled to norm ``<= epsilon`` per point (eagerpy tensors in, eagerpy tensor out)."""
    import eagerpy as ep

    delta = (x - x0).raw
    norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    factor = torch.minimum(torch.ones_like(norms), epsilon.raw / norms)
    return x0 + ep.astensor(delta * factor.view(-1, *([1] * (delta.ndim - 1))))


def _project_l0(self: Any, x: Any, x0: Any, epsilon: Any) -> Any:
    """FMN's L0 projection: keep the ``epsilon`` largest-magnitude components of ``delta`` per
    point (``epsilon`` rounded down, within ``[1, d]``; ties at the threshold are kept)."""
    import eagerpy as ep

    delta = (x - x0).raw
    flat = delta.flatten(1)
    k = epsilon.raw.long().clamp(1, flat.shape[1])
    kth = flat.abs().sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
    kept = torch.where(flat.abs() >= kth, flat, torch.zeros_like(flat))
    return x0 + ep.astensor(kept.view_as(delta))


def fmn_attack(
    model: nn.Module, x: Tensor, y: Tensor, *, threat: ThreatModel, steps: int
) -> Tensor:
    """foolbox's FMN (untargeted, its default step sizes; L2 with the corrected projection) on one
    chunk; returns the best adversarial images found (the clean image where none was found).

    The model keeps its mode, device and parameters' ``requires_grad`` flags, and gets no ``.grad``
    (foolbox back-propagates with ``loss.backward()``: the parameters are frozen for the call).

    Raises:
        RuntimeError: foolbox is not installed.
    """
    fb = _foolbox()
    attack = fmn_attack_class(threat)(steps=steps)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)  # .to(x.device): a no-op
    with frozen_parameters(model), torch.enable_grad():
        adv = attack.run(fmodel, x.detach(), fb.criteria.Misclassification(y))
    return adv.detach()


def fmn_config(threat: ThreatModel, steps: int) -> dict[str, Any]:
    """The ``attack_config["fmn"]`` record: implementation, version, norm, steps and settings."""
    try:
        import foolbox

        version = getattr(foolbox, "__version__", "unknown")
    except ImportError:
        version = "not installed"
    cfg: dict[str, Any] = {
        "implementation": f"foolbox.attacks.{_FOOLBOX_CLASSES[threat]}",
        "foolbox": version,
        "norm": threat.value,
        "steps": steps,
        "targeted": False,
        "max_stepsize": 1.0,
        "min_stepsize": 0.01,
        "gamma": 0.05,
    }
    if threat in (ThreatModel.L2, ThreatModel.L0):
        cfg["projection"] = "corrected (robust_agc.eval.fmn): FMN paper's, not foolbox 3.3.4's"
    return cfg


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
