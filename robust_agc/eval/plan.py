"""What an evaluation will run: the threat model, the stages and their settings, checked once.

:func:`make_plan` validates :func:`robust_agc.eval.benchmark`'s scalar arguments (``ValueError`` in
torch's wording, ``Invalid <name> value: ...``) and returns an :class:`EvalPlan`, a frozen record
the later phases read instead of a long list of keyword arguments. The command line calls
:func:`make_plan` too, to turn a bad option into a user error before any model is loaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "AUTOATTACK_COMPONENTS",
    "AUTOATTACK_VERSIONS",
    "EPS_ATTACK_THREATS",
    "GRADIENT_FREE_UNITS",
    "STAGES",
    "EvalPlan",
    "FMN_STEPS",
    "ThreatModel",
    "default_eps_grid",
    "make_plan",
]

STAGES: tuple[str, ...] = ("clean", "pgd", "autoattack", "square", "fmn")
FMN_STEPS = 1000
"""FMN's default number of steps: the budget of FMN's paper (Pintor et al., 2021) for its reported
robustness curves; the radius found keeps shrinking slowly with more steps, so fewer steps can only
overstate the radii (and the curve)."""
AUTOATTACK_COMPONENTS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AUTOATTACK_VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
EPS_ATTACK_THREATS: frozenset[str] = frozenset({"Linf", "L2"})
"""The threat models of the eps-attacks (PGD, AutoAttack, Square); the ``fmn`` stage takes all."""
GRADIENT_FREE_UNITS: frozenset[str] = frozenset({"square", "autoattack/square"})
"""The units that use no gradient (the Square check compares them with the gradient attacks)."""


class ThreatModel(str, Enum):
    """Perturbation sets: ``Linf``, ``L2``, ``L1`` balls of radius ``eps`` and ``L0`` (at most
    ``eps`` changed input values), inputs in [0, 1]. The eps-attacks (PGD, AutoAttack, Square)
    take ``Linf`` and ``L2`` (:data:`EPS_ATTACK_THREATS`); ``L1`` and ``L0`` only the ``fmn``
    stage."""

    Linf = "Linf"
    L2 = "L2"
    L1 = "L1"
    L0 = "L0"

    @classmethod
    def parse(cls, value: ThreatModel | str) -> ThreatModel:
        """Accept the enum or a string, case-insensitively (``"linf"``, ``"L2"``...)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for m in cls:
                if value.lower() == m.value.lower():
                    return m
        raise ValueError(
            f"Invalid threat_model value: {value!r} (choose {', '.join(m.value for m in cls)})"
        )


@dataclass(frozen=True)
class EvalPlan:
    """The validated attack settings of one evaluation (built by :func:`make_plan`).

    Attributes:
        threat: the threat model; ``eps`` its radius.
        stages: the stages in order, ``"clean"`` first.
        aa_version: AutoAttack's version name (``"custom"`` for a component list);
            ``components`` the AutoAttack components it runs.
        n_examples: how many of the first points to use (all when None).
        batch_size: points per attack chunk; ``seed`` the seed of every attack.
        pgd_steps, pgd_restarts, pgd_step_size: the ``pgd`` stage (step size None: the default).
        run_checks: run the gradient-masking checks that cost model passes.
        fmn_steps: the ``fmn`` stage's steps; ``eps_grid`` the radii of the security curve
            (strictly increasing, from :func:`default_eps_grid` unless given).
        fmn_slice: ``(start, stop)``: the ``fmn`` stage attacks only points ``start..stop-1`` of
            the evaluated points (None: all of them).
    """

    threat: ThreatModel
    eps: float
    stages: tuple[str, ...]
    aa_version: str
    components: tuple[str, ...]
    n_examples: int | None
    batch_size: int
    seed: int
    pgd_steps: int
    pgd_restarts: int
    pgd_step_size: float | None
    run_checks: bool = True
    fmn_steps: int = FMN_STEPS
    eps_grid: tuple[float, ...] = ()
    fmn_slice: tuple[int, int] | None = None

    def in_fmn_slice(self, i: int) -> bool:
        """Whether the ``fmn`` stage attacks point ``i`` (:attr:`fmn_slice`)."""
        return self.fmn_slice is None or self.fmn_slice[0] <= i < self.fmn_slice[1]

    @property
    def units(self) -> tuple[str, ...]:
        """The attack units in order: the stages, AutoAttack split into ``autoattack/<name>``."""
        units: list[str] = []
        for s in self.stages:
            if s == "autoattack":
                units.extend(f"autoattack/{c}" for c in self.components)
            else:
                units.append(s)
        return tuple(units)

    @property
    def aa_units(self) -> tuple[str, ...]:
        """The AutoAttack units (``autoattack/<name>``), empty when AutoAttack does not run."""
        return tuple(u for u in self.units if u.startswith("autoattack/"))

    @property
    def pgd_step(self) -> float:
        """The ``pgd`` stage's step size: ``pgd_step_size``, else ``2.5 * eps / pgd_steps``."""
        return (
            self.pgd_step_size
            if self.pgd_step_size is not None
            else 2.5 * self.eps / self.pgd_steps
        )


def make_plan(
    *,
    eps: float | None,
    threat_model: ThreatModel | str = "Linf",
    n_examples: int | None = None,
    attacks: str | Sequence[str] = ("clean", "autoattack"),
    version: str | Sequence[str] = "standard",
    batch_size: int = 256,
    seed: int = 0,
    pgd_steps: int = 50,
    pgd_restarts: int = 10,
    pgd_step_size: float | None = None,
    run_checks: bool = True,
    fmn_steps: int = FMN_STEPS,
    eps_grid: Sequence[float] | None = None,
    fmn_slice: tuple[int, int] | None = None,
    stacklevel: int = 1,
) -> EvalPlan:
    """Check :func:`robust_agc.eval.benchmark`'s scalar arguments and return the plan.

    Args:
        eps: perturbation radius; required, never defaulted. A Linf ``eps >= 1`` warns
            (``UserWarning``: did you mean eps/255?), attributed to the caller of this function
            (``stacklevel=1``) or to a frame further up.
        threat_model: ``"Linf"``, ``"L2"``; ``"L1"``, ``"L0"`` with ``attacks="clean,fmn"`` only.
        n_examples: how many of the first points to use (all when None).
        attacks: stages in order, from ``clean``, ``pgd``, ``autoattack``, ``square``, ``fmn`` (a
            list or a comma-separated string); ``clean`` always runs first and ``fmn`` (the
            minimum-norm stage, which attacks every clean-correct point) always last, so that every
            point has the verdicts of both the eps-attacks and FMN.
        version: AutoAttack ``"standard"``, ``"plus"``, ``"rand"``, or a list of components
            (e.g. ``["apgd-ce", "apgd-t"]``), run as pyautoattack's ``version="custom"`` with its
            constructor settings (APGD-CE 5 restarts, 9 targets, Square 5000 queries).
        batch_size: points per attack chunk (also fixes AutoAttack's chunking, hence its
            randomness); in a distributed evaluation the unit of work shared out to processes.
        seed: the seed of every attack (each chunk is re-seeded, AutoAttack style).
        pgd_steps, pgd_restarts, pgd_step_size: the ``pgd`` stage (default PGD-50, 10 restarts,
            step ``2.5 * eps / steps``).
        run_checks: run the gradient-masking checks (:mod:`robust_agc.eval.checks`); the count
            agreement and Square checks are always recorded.
        fmn_steps, eps_grid, fmn_slice: the ``fmn`` stage: its steps (default :data:`FMN_STEPS`,
            FMN paper's budget); the security curve's radii (non-empty, strictly increasing,
            finite, ``>= 0``; default :func:`default_eps_grid`, 16 from 0 to ``3 * eps``); the
            points it attacks, ``(start, stop)``, ``0 <= start < stop <= n_examples`` (e.g. APB's
            2048:2176; None: every point).

    Raises:
        ValueError: an invalid argument (``Invalid <name> value: ...``).
    """
    eps = _check_eps(eps)
    tm = ThreatModel.parse(threat_model)
    _check_numbers(n_examples, batch_size, seed, pgd_steps, pgd_restarts, pgd_step_size)
    stages = _parse_attacks(attacks)
    _check_threat_for_stages(tm, stages)
    aa_version, components = _parse_version(version)
    grid, fmn_slice = _check_fmn(eps, fmn_steps, eps_grid, fmn_slice, stages, n_examples)
    if tm is ThreatModel.Linf and eps >= 1.0:
        warnings.warn(
            f"eps={eps} for Linf on inputs in [0, 1] covers the whole input range "
            "(did you mean eps/255?)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return EvalPlan(
        threat=tm,
        eps=eps,
        stages=tuple(stages),
        aa_version=aa_version,
        components=components,
        n_examples=n_examples,
        batch_size=batch_size,
        seed=seed,
        pgd_steps=pgd_steps,
        pgd_restarts=pgd_restarts,
        pgd_step_size=pgd_step_size,
        run_checks=bool(run_checks),
        fmn_steps=fmn_steps,
        eps_grid=grid,
        fmn_slice=fmn_slice,
    )


def default_eps_grid(eps: float) -> tuple[float, ...]:
    """The default security-curve grid: 16 radii ``eps * i / 5``, ``i = 0..15``, from 0 to
    ``3 * eps`` (``eps`` itself exactly included, at ``i = 5``)."""
    return tuple(eps * (i / 5) for i in range(16))


def _check_threat_for_stages(tm: ThreatModel, stages: Sequence[str]) -> None:
    eps_stages = [s for s in stages if s not in ("clean", "fmn")]
    if tm.value not in EPS_ATTACK_THREATS and eps_stages:
        raise ValueError(
            f"Invalid threat_model value: {tm.value!r} with {', '.join(eps_stages)} ({tm.value} "
            "is for the fmn stage alone, attacks 'clean,fmn'; PGD, AutoAttack and Square take "
            f"{' or '.join(sorted(EPS_ATTACK_THREATS))})"
        )


def _check_fmn(
    eps: float,
    fmn_steps: int,
    eps_grid: Sequence[float] | None,
    fmn_slice: tuple[int, int] | None,
    stages: Sequence[str],
    n_examples: int | None,
) -> tuple[tuple[float, ...], tuple[int, int] | None]:
    _check_fmn_steps(fmn_steps)
    grid = default_eps_grid(eps) if eps_grid is None else _check_eps_grid(eps_grid)
    return grid, _check_fmn_slice(fmn_slice, stages, n_examples)


def _check_fmn_slice(
    fmn_slice: tuple[int, int] | None, stages: Sequence[str], n_examples: int | None
) -> tuple[int, int] | None:
    if fmn_slice is None:
        return None
    ok = (
        isinstance(fmn_slice, tuple | list)
        and len(fmn_slice) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in fmn_slice)
    )
    if not ok or not 0 <= fmn_slice[0] < fmn_slice[1]:
        raise ValueError(f"Invalid fmn_slice value: {fmn_slice!r} (start:stop, 0 <= start < stop)")
    if "fmn" not in stages:
        raise ValueError(f"Invalid fmn_slice value: {fmn_slice!r} (without the fmn stage)")
    if n_examples is not None and fmn_slice[1] > n_examples:
        raise ValueError(
            f"Invalid fmn_slice value: {fmn_slice[0]}:{fmn_slice[1]} (must lie within the "
            f"n_examples={n_examples} points the other stages use)"
        )
    return (fmn_slice[0], fmn_slice[1])


def _check_fmn_steps(fmn_steps: int) -> None:
    if isinstance(fmn_steps, bool) or not isinstance(fmn_steps, int) or fmn_steps < 1:
        raise ValueError(f"Invalid fmn_steps value: {fmn_steps!r}")


def _check_eps_grid(eps_grid: Sequence[float]) -> tuple[float, ...]:
    if isinstance(eps_grid, str) or not isinstance(eps_grid, Sequence):
        raise ValueError(f"Invalid eps_grid value: {eps_grid!r} (a list of numbers)")
    grid = list(eps_grid)
    if not grid:
        raise ValueError("Invalid eps_grid value: [] (empty)")
    for e in grid:
        if isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e) or e < 0:
            raise ValueError(f"Invalid eps_grid value: {e!r} (finite numbers >= 0)")
    if any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
        raise ValueError(f"Invalid eps_grid value: {grid} (must be strictly increasing)")
    return tuple(float(e) for e in grid)


def _check_eps(eps: float | None) -> float:
    if eps is None or isinstance(eps, bool) or not isinstance(eps, int | float):
        raise ValueError(f"Invalid eps value: {eps!r} (eps must be given explicitly, a number > 0)")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps value: {eps}")
    return eps


def _check_numbers(
    n_examples: int | None,
    batch_size: int,
    seed: int,
    pgd_steps: int,
    pgd_restarts: int,
    pgd_step_size: float | None,
) -> None:
    if n_examples is not None and (
        isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1
    ):
        raise ValueError(f"Invalid n_examples value: {n_examples!r}")
    for name, value in (
        ("batch_size", batch_size),
        ("seed", seed),
        ("pgd_steps", pgd_steps),
        ("pgd_restarts", pgd_restarts),
    ):
        low = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Invalid {name} value: {value!r}")
    if pgd_step_size is not None and not (
        isinstance(pgd_step_size, int | float)
        and math.isfinite(pgd_step_size)
        and pgd_step_size > 0
    ):
        raise ValueError(f"Invalid pgd_step_size value: {pgd_step_size!r}")


def _parse_attacks(attacks: str | Sequence[str]) -> list[str]:
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    attacks = [str(a).lower() for a in attacks]
    if not attacks:
        raise ValueError(f"Invalid attacks value: {attacks!r} (empty)")
    for a in attacks:
        if a not in STAGES:
            raise ValueError(f"Invalid attacks value: {a!r} (choose from {', '.join(STAGES)})")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"Invalid attacks value: {attacks!r} (duplicates)")
    if "clean" in attacks:
        attacks.remove("clean")
    if "fmn" in attacks:  # last: it attacks every clean-correct point, after the eps-attacks
        attacks.remove("fmn")
        attacks.append("fmn")
    return ["clean", *attacks]


def _parse_version(version: str | Sequence[str]) -> tuple[str, tuple[str, ...]]:
    if isinstance(version, str):
        if version in AUTOATTACK_VERSIONS:
            return version, AUTOATTACK_VERSIONS[version]
        if version == "custom":
            raise ValueError(
                "Invalid version value: 'custom' (pass the list of components instead, "
                f"e.g. ['apgd-ce', 'apgd-t'], from {', '.join(AUTOATTACK_COMPONENTS)})"
            )
        comps = [c.strip() for c in version.split(",") if c.strip()]
        if not all(c in AUTOATTACK_COMPONENTS for c in comps) or not comps:
            raise ValueError(
                f"Invalid version value: {version!r} (choose standard, plus, rand or a list of "
                f"components from {', '.join(AUTOATTACK_COMPONENTS)})"
            )
        version = comps
    comps = [str(c).lower() for c in version]
    if not comps:
        raise ValueError(f"Invalid version value: {version!r} (empty component list)")
    for c in comps:
        if c not in AUTOATTACK_COMPONENTS:
            raise ValueError(
                f"Invalid version value: {c!r} (components: {', '.join(AUTOATTACK_COMPONENTS)})"
            )
    if len(set(comps)) != len(comps):
        raise ValueError(f"Invalid version value: {comps!r} (duplicates)")
    return "custom", tuple(comps)
