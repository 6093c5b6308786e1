"""The attack behind each unit: PGD from the project's ``attacks`` package, AutoAttack's
components and the stand-alone Square stage from pyautoattack (:mod:`robust_agc.eval.autoattack`),
and the minimum-norm FMN stage from foolbox (:mod:`robust_agc.eval.fmn`).

:func:`build_attackers` builds them once for a plan; :meth:`Attackers.attack` runs one unit on one
chunk. A fresh PGD is built for every chunk, seeded with the plan's seed (AutoAttack style), so a
resumed run attacks every chunk exactly as an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .autoattack import AutoAttackRunner
from .fmn import fmn_attack, fmn_attack_class, fmn_config
from .plan import EvalPlan, ThreatModel

__all__ = ["Attackers", "build_attackers", "make_pgd"]


def make_pgd(
    model: nn.Module,
    *,
    threat: ThreatModel,
    eps: float,
    alpha: float,
    steps: int,
    restarts: int,
    seed: int,
) -> Any:
    """Build the ``attacks`` package's PGD (torchattacks call shape) for the threat model."""
    try:
        import attacks as _attacks
    except ImportError as e:
        raise RuntimeError(f"the 'pgd' stage needs the project's attacks package: {e}") from e
    name = "PGD" if threat is ThreatModel.Linf else "PGDL2"
    cls = getattr(_attacks, name, None)
    if cls is None:
        raise RuntimeError(f"the attacks package has no {name} (needed for {threat.value} PGD)")
    return cls(
        model,
        eps=eps,
        alpha=alpha,
        steps=steps,
        random_start=True,
        restarts=restarts,
        early_stop=True,
        seed=seed,
    )


@dataclass
class Attackers:
    """The attacks of one evaluation; the ones whose stage does not run are None."""

    model: nn.Module
    plan: EvalPlan
    autoattack: AutoAttackRunner | None
    square: AutoAttackRunner | None

    def pgd(self) -> Any:
        """A fresh ``pgd`` stage attack (built per chunk, seeded with the plan's seed)."""
        p = self.plan
        return make_pgd(
            self.model,
            threat=p.threat,
            eps=p.eps,
            alpha=p.pgd_step,
            steps=p.pgd_steps,
            restarts=p.pgd_restarts,
            seed=p.seed,
        )

    def pgd_few_steps(self, steps: int) -> Any:
        """The PGD convergence check's attack: ``steps`` steps, one restart, the default step size
        for ``steps`` unless the plan fixes it."""
        p = self.plan
        return make_pgd(
            self.model,
            threat=p.threat,
            eps=p.eps,
            alpha=p.pgd_step_size if p.pgd_step_size is not None else 2.5 * p.eps / steps,
            steps=steps,
            restarts=1,
            seed=p.seed,
        )

    def attack(self, unit: str, x: Tensor, y: Tensor) -> Tensor:
        """Run ``unit`` (``"pgd"``, ``"square"``, ``"fmn"`` or ``"autoattack/<name>"``) on one
        chunk (FMN re-seeded with the plan's seed per chunk, though it draws no random numbers)."""
        if unit == "fmn":
            p = self.plan
            torch.manual_seed(p.seed)
            return fmn_attack(self.model, x, y, threat=p.threat, steps=p.fmn_steps)
        if unit == "pgd":
            return self.pgd()(x, y)
        if unit == "square":
            assert self.square is not None
            return self.square("square", x, y)
        assert self.autoattack is not None
        return self.autoattack(unit.split("/", 1)[1], x, y)

    def config(self) -> dict[str, Any]:
        """The ``attack_config`` record: the plan's settings and every attack's own."""
        p = self.plan
        cfg: dict[str, Any] = {
            "threat_model": p.threat.value,
            "eps": p.eps,
            "seed": p.seed,
            "batch_size": p.batch_size,
            "stages": list(p.stages),
            "units": list(p.units),
        }
        if "pgd" in p.stages:
            cfg["pgd"] = {
                "implementation": "attacks.PGD"
                if p.threat is ThreatModel.Linf
                else "attacks.PGDL2",
                "steps": p.pgd_steps,
                "restarts": p.pgd_restarts,
                "step_size": p.pgd_step,
                "random_start": True,
            }
        if self.autoattack is not None:
            cfg["autoattack"] = self.autoattack.config()
        if self.square is not None:
            cfg["square"] = self.square.config()["square"]
        if "fmn" in p.stages:
            cfg["fmn"] = fmn_config(p.threat, p.fmn_steps)
            if p.fmn_slice is not None:
                cfg["fmn"]["slice"] = list(p.fmn_slice)
        return cfg


def build_attackers(
    model: nn.Module, plan: EvalPlan, device: torch.device, n_targets: int | None
) -> Attackers:
    """Build the attacks of ``plan``'s stages (``n_targets`` caps AutoAttack's target classes).

    Raises:
        RuntimeError: the ``pgd`` stage without the ``attacks`` package, the ``fmn`` stage
            without foolbox, or an unsupported pyautoattack version.
    """

    def runner(version: str, components: tuple[str, ...]) -> AutoAttackRunner:
        return AutoAttackRunner(
            model,
            version=version,
            components=components,
            threat=plan.threat,
            eps=plan.eps,
            seed=plan.seed,
            device=device,
            n_targets=n_targets,
        )

    attackers = Attackers(
        model=model,
        plan=plan,
        autoattack=runner(plan.aa_version, plan.components)
        if "autoattack" in plan.stages
        else None,
        square=runner("custom", ("square",)) if "square" in plan.stages else None,
    )
    if "pgd" in plan.stages:
        attackers.pgd()  # fail early when the attacks package is missing
    if "fmn" in plan.stages:
        fmn_attack_class(plan.threat)  # fail early when foolbox is missing
    return attackers
