"""The evaluation itself, one function per phase, in the order :func:`run_evaluation` runs them.

1. :func:`clean_phase`: predict every point (chunk by chunk, round-robin over the ranks) and
   measure RobustBench's ``number_forward_passes`` on the first chunk;
2. :func:`model_checks_phase`: the gradient-masking checks on the clean points (rank 0), which also
   fix how many target classes AutoAttack's targeted attacks use;
3. :func:`state_phase`: build the attacks and the ``attack_config`` record, check that every rank
   evaluates the same thing, open (or resume) the state file and record the clean verdicts;
4. :func:`unit_phase`, once per unit: attack the points still robust, chunk by chunk from the
   clean image, and keep each breaking adversarial image. The minimum-norm unit ``fmn`` (always
   last) attacks every clean-correct point instead and records its radius
   (:mod:`robust_agc.eval.fmn`); it breaks a point at eps when the radius is ``<= eps``, so the
   robust accuracy stays the per-point worst case over every stage;
5. :func:`pgd_check_phase`: the PGD convergence check (fewer steps must not break more points);
6. :func:`recount_phase`: re-predict every point on its adversarial image (the second count), then
   the count-agreement and Square checks, and the warnings of every fired check;
7. :func:`assemble_result`: the :class:`~robust_agc.eval.EvalResult`.

Chunks of ``batch_size`` over the points (clean stage, re-prediction) or over a unit's targets;
chunk ``b`` runs on rank ``b % world``, so every chunk is exactly the one a single process would
run, with the same seed: the per-point results do not depend on the world size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..utils import machine_info
from . import checks
from .attackers import Attackers, build_attackers
from .comm import Comm
from .fmn import disagreement, has_eps_attacks, perturbation_radii, security_curve
from .passes import PassCounter, add_passes, predict_measuring_passes
from .plan import GRADIENT_FREE_UNITS, EvalPlan
from .result import EvalResult, versions
from .state import EvalState, fingerprint, open_state

__all__ = [
    "Clean",
    "RecordInfo",
    "Session",
    "assemble_result",
    "clean_phase",
    "model_checks_phase",
    "pgd_check_phase",
    "recount_phase",
    "run_evaluation",
    "state_phase",
    "unit_phase",
]

logger = logging.getLogger(__name__)

PGD_CHECK_POINTS = 64
"""How many of PGD's targets the PGD convergence check re-attacks with fewer steps."""


@dataclass(frozen=True)
class RecordInfo:
    """What the record says about the evaluation beyond its results (the caller's metadata), where
    rank 0 keeps the state and whether it shows progress bars; ``t_start``: when it began;
    ``compression``: :func:`~robust_agc.eval.loading.compression_info` of the model."""

    dataset: str | None
    architecture: str | None
    model_info: dict[str, Any]
    notes: tuple[str, ...]
    state_file: Path | None
    progress: bool
    t_start: float = field(default_factory=time.perf_counter)
    compression: dict[str, Any] = field(default_factory=dict)


@dataclass
class Session:
    """One process's view of a running evaluation: what every phase reads, and the check tally.

    ``points_chunks`` cuts the points into ``batch_size`` chunks; ``checks_time`` and
    ``checks_passes`` add up the gradient-masking checks' cost over the phases that run them.
    """

    model: nn.Module
    plan: EvalPlan
    x: Tensor
    y: Tensor
    device: torch.device
    comm: Comm
    counter: PassCounter
    report: checks.MaskingReport = field(default_factory=checks.MaskingReport)
    checks_time: float = 0.0
    checks_passes: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def n(self) -> int:
        """The number of points."""
        return int(self.x.shape[0])

    @property
    def point_chunks(self) -> list[list[int]]:
        """The points' indices in ``batch_size`` chunks, in order."""
        n, bs = self.n, self.plan.batch_size
        return [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]


@dataclass
class Clean:
    """The clean phase's outcome: logits, per-point correctness (CPU), its time and passes."""

    logits: Tensor
    ok: Tensor
    time: float
    passes: list[int]
    forward_passes: int | float


def run_evaluation(
    model: nn.Module, plan: EvalPlan, x: Tensor, y: Tensor, device: torch.device, info: RecordInfo
) -> EvalResult:
    """Evaluate ``model`` on ``x``, ``y`` (on ``device``) as ``plan`` says; see
    :func:`robust_agc.eval.benchmark`, which prepares the model (device, eval mode, frozen
    parameters, forked RNG). Under ``torch.distributed`` only rank 0 keeps the state file and the
    progress bar, and every rank returns rank 0's result."""
    comm = Comm()
    if not comm.main:
        info = replace(info, state_file=None, progress=False)
    counter = PassCounter(model)
    try:
        result = _evaluate(Session(model, plan, x, y, device, comm, counter), info)
    finally:
        counter.remove()
    # Every rank returns rank 0's record (identical per-point results; rank 0's checks and clock).
    return comm.broadcast(result if comm.main else None)


def _evaluate(s: Session, info: RecordInfo) -> EvalResult:
    """The phases in order (the warnings of the checks point at :func:`benchmark`'s caller)."""
    clean = clean_phase(s)
    n_targets = model_checks_phase(s, clean)
    attackers = build_attackers(s.model, s.plan, s.device, n_targets)
    attack_config = attackers.config()
    state = state_phase(s, attack_config, clean, info.state_file)
    x_adv = s.x.clone()
    # adversarial image known (not from a past session)
    have_adv = torch.ones(s.n, dtype=torch.bool)
    have_adv[[i for i, b in enumerate(state.broken_by) if b not in (None, "clean")]] = False
    for unit in s.plan.units:
        if unit not in state.done:
            unit_phase(s, unit, state, attackers, x_adv, info.progress)
    pgd_check_phase(s, state, attackers)
    n_robust_repred, recount_passes = recount_phase(s, state, x_adv, have_adv)
    if s.comm.main:
        for r in s.report.results.values():
            if r.fired:
                logger.warning("gradient-masking check %s: %s", r.name, r.message)
        # attributed to benchmark's caller: _evaluate <- run_evaluation <- entry._on_device <-
        # benchmark <- the caller (test_check_warnings_point_at_the_caller)
        s.report.warn(stacklevel=5)
    tallies = {"checks": s.checks_passes, "recount": recount_passes}
    return assemble_result(s, state, clean, attack_config, n_robust_repred, tallies, info)


def clean_phase(s: Session) -> Clean:
    """Clean predictions of every point (also recomputed on resume, to check the state and run
    the checks); the first chunk measures the network passes per prediction."""
    chunks = s.point_chunks

    def clean_chunk(b: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        s.counter.take()
        xb = s.x[chunks[b][0] : chunks[b][-1] + 1]
        if b == 0:
            out, fwd = predict_measuring_passes(s.model, xb)
        else:
            with torch.no_grad():
                out, fwd = s.model(xb), None
        if out.ndim != 2 or out.shape[1] < 2:
            raise ValueError(
                f"Invalid model value: expected logits (N, C>=2), got {tuple(out.shape)}"
            )
        return {
            "logits": out.detach().cpu(),
            "fwd": fwd,
            "time": time.perf_counter() - t0,
            "passes": s.counter.take(),
        }

    parts: list[Tensor] = []
    t_clean, passes, n_fwd_passes = 0.0, [0, 0], 1
    for start, results in s.comm.rounds(len(chunks), 0, clean_chunk):
        parts.extend(r["logits"] for r in results)
        t_clean += max(r["time"] for r in results)
        passes = add_passes(passes, *(r["passes"] for r in results))
        if start == 0:
            n_fwd_passes = results[0]["fwd"]
    logits = torch.cat(parts).to(s.device)
    ok = (logits.argmax(1) == s.y).cpu()
    return Clean(logits, ok, t_clean, passes, n_fwd_passes)


def model_checks_phase(s: Session, clean: Clean) -> int | None:
    """The checks that need the model (rank 0, on the correctly classified points), or only the
    class-count check without ``run_checks``; returns AutoAttack's target-class cap."""
    n_targets: int | None = 9
    t0 = time.perf_counter()
    s.counter.take()
    if s.plan.run_checks:
        if s.comm.main:
            ok = clean.ok.nonzero().flatten().to(s.device)
            xs, ys = (s.x[ok], s.y[ok]) if ok.numel() > 0 else (s.x, s.y)
            logits = clean.logits[ok] if ok.numel() > 0 else clean.logits
            _, n_targets = checks.run_model_checks(s.model, xs, ys, logits=logits, report=s.report)
        n_targets = s.comm.broadcast(n_targets)
    else:
        res, n_targets = checks.check_n_classes(int(clean.logits.shape[1]), 9)
        s.report.add(res)
    s.checks_time += time.perf_counter() - t0
    s.checks_passes = add_passes(s.checks_passes, s.counter.take())
    return n_targets


def state_phase(
    s: Session, attack_config: dict[str, Any], clean: Clean, state_file: Path | None
) -> EvalState:
    """Check that every rank evaluates the same thing, open the state (resuming when the file
    belongs to this evaluation) and record the clean verdicts in it.

    Raises:
        RuntimeError: the ranks differ in their points, model or attack configuration.
        UserError: the state file belongs to another evaluation or to other clean predictions.
    """
    key = fingerprint(attack_config, s.x, s.y, s.model)
    if s.comm.world > 1:
        prints = s.comm.all_gather(json.dumps(key, sort_keys=True))
        if any(p != prints[0] for p in prints):
            raise RuntimeError(
                "distributed evaluation: the ranks differ in their points, model or attack "
                "configuration (every rank must call benchmark with the same arguments)"
            )
    state = open_state(state_file, key, s.n, s.comm)
    if state.resumed:
        stored_clean = [b != "clean" for b in state.broken_by]
        if "clean" in state.done and stored_clean != clean.ok.tolist():
            raise UserError(
                f"state file {state_file}: stored clean predictions differ from this model's; "
                "refusing to resume"
            )
    if "clean" not in state.done:
        state.robust = clean.ok.tolist()
        state.broken_by = [None if ok else "clean" for ok in state.robust]
        state.unit_acc["clean"] = sum(state.robust) / s.n
        state.timings["clean"] = clean.time
        state.n_attacked["clean"] = s.n
        state.n_broken["clean"] = s.n - sum(state.robust)
        state.passes["clean"] = clean.passes
        state.done.append("clean")
        state.save()
    return state


def unit_phase(
    s: Session,
    unit: str,
    state: EvalState,
    attackers: Attackers,
    x_adv: Tensor,
    progress: bool,
) -> None:
    """Attack the points still robust with ``unit``, chunk by chunk (resuming inside the unit
    where the state stopped), store each breaking image in ``x_adv`` and save the state after
    every round of chunks."""
    chunks, done_batches = _unit_chunks(s, unit, state)
    bar = _progress_bar(unit, sum(len(c) for c in chunks), done_batches, chunks, progress)

    def attack_chunk(b: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        s.counter.take()
        idx = torch.tensor(chunks[b], dtype=torch.long, device=s.device)
        xb, yb = s.x[idx], s.y[idx]
        adv = attackers.attack(unit, xb, yb)
        with torch.no_grad():
            out = s.model(adv).argmax(1)
        broken = (out != yb).cpu()
        radii = None
        if unit == "fmn":  # broken at eps: misclassified within the ball, not broken before
            radii = perturbation_radii(xb, adv, broken, s.plan.threat)
            broken = torch.tensor(
                [
                    r <= s.plan.eps and state.robust[i]
                    for i, r in zip(chunks[b], radii, strict=True)
                ],
                dtype=torch.bool,
            )
        return {
            "broken": broken.tolist(),
            "radii": radii,
            "adv": adv.detach()[broken.to(adv.device)].cpu(),
            "time": time.perf_counter() - t0,
            "passes": s.counter.take(),
        }

    for start, results in s.comm.rounds(len(chunks), done_batches, attack_chunk):
        _record_round(s, unit, state, chunks, start, results, x_adv)
        if bar is not None:
            bar.update(sum(len(chunks[b]) for b in range(start, start + len(results))))
            bar.set_postfix(robust=sum(state.robust))
    if bar is not None:
        bar.close()
    state.unit_acc[unit] = sum(state.robust) / s.n
    state.done.append(unit)
    state.current = None
    state.save()
    if s.comm.main:
        logger.info(
            "%s: robust accuracy %.2f%% (%d attacked, %d broken, %.1f s)",
            unit,
            100 * state.unit_acc[unit],
            state.n_attacked[unit],
            state.n_broken[unit],
            state.timings[unit],
        )


def _unit_chunks(s: Session, unit: str, state: EvalState) -> tuple[list[list[int]], int]:
    """The unit's target chunks and how many are done: the saved ones when resuming inside the
    unit, else the points still robust, or every clean-correct point for ``fmn`` (and the unit's
    tallies start)."""
    if state.current is not None and state.current.get("unit") == unit:
        targets = list(state.current["targets"])
        done_batches = int(state.current["batches_done"])
    elif unit == "fmn":  # every clean-correct point: the radius does not depend on eps
        fmn_pts = [s.plan.in_fmn_slice(i) for i in range(s.n)]  # None outside the slice
        targets = [i for i, b in enumerate(state.broken_by) if b != "clean" and fmn_pts[i]]
        state.radii = [
            (0.0 if b == "clean" else float("inf")) if f else None
            for b, f in zip(state.broken_by, fmn_pts, strict=True)
        ]
    else:
        targets = [i for i, r in enumerate(state.robust) if r]
    if state.current is None or state.current.get("unit") != unit:
        done_batches = 0
        state.current = {"unit": unit, "targets": targets, "batches_done": 0}
        state.n_attacked[unit] = len(targets)
        state.n_broken[unit] = 0
        state.timings.setdefault(unit, 0.0)
        state.passes.setdefault(unit, [0, 0])
    bs = s.plan.batch_size
    chunks = [targets[i : i + bs] for i in range(0, len(targets), bs)]
    if s.comm.main and s.comm.world > 1 and len(chunks) - done_batches < s.comm.world:
        logger.warning(
            "%s: %d chunk(s) of up to %d points for %d processes; some processes idle "
            "(a smaller batch_size spreads the work, at the same per-chunk semantics)",
            unit,
            len(chunks) - done_batches,
            bs,
            s.comm.world,
        )
    return chunks, done_batches


def _record_round(
    s: Session,
    unit: str,
    state: EvalState,
    chunks: list[list[int]],
    start: int,
    results: list[dict[str, Any]],
    x_adv: Tensor,
) -> None:
    """Take one round's verdicts (chunks ``start, start + 1, ...``) into the state and save it."""
    assert state.current is not None
    for b, r in enumerate(results, start=start):
        hit = [i for i, br in zip(chunks[b], r["broken"], strict=True) if br]
        if r.get("radii") is not None and state.radii is not None:
            for i, radius in zip(chunks[b], r["radii"], strict=True):
                state.radii[i] = radius
        for i in hit:
            state.robust[i] = False
            state.broken_by[i] = unit
        if hit:
            x_adv[torch.tensor(hit, device=s.device)] = r["adv"].to(s.device, x_adv.dtype)
        state.n_broken[unit] += len(hit)
        # a state file written before the pass counts (2026-11-28) has none for its unit
        state.passes[unit] = add_passes(state.passes.get(unit, [0, 0]), r["passes"])
    state.current["batches_done"] = start + len(results)
    state.timings[unit] += max(r["time"] for r in results)
    state.save()


def pgd_check_phase(s: Session, state: EvalState, attackers: Attackers) -> None:
    """PGD convergence check: fewer steps on a subset must not break *more* points (rank 0 only).

    The subset: the first :data:`PGD_CHECK_POINTS` of PGD's targets, i.e. of the points no unit
    before it broke (derived from the verdicts, so a session resumed after the PGD stage checks
    the same points).
    """
    plan, units = s.plan, s.plan.units
    subset: list[int] = []
    if "pgd" in units:
        from_pgd = set(units[units.index("pgd") :])
        subset = [i for i, b in enumerate(state.broken_by) if b is None or b in from_pgd]
        subset = subset[:PGD_CHECK_POINTS]
    s.counter.take()
    if s.comm.main and plan.run_checks and "pgd" in plan.stages and subset:
        t0 = time.perf_counter()
        few = max(1, plan.pgd_steps // 5)
        if few < plan.pgd_steps:
            short = attackers.pgd_few_steps(few)
            idx = torch.tensor(subset, dtype=torch.long, device=s.device)
            with torch.no_grad():
                robust_few = (s.model(short(s.x[idx], s.y[idx])).argmax(1) == s.y[idx]).cpu()
            robust_many = torch.tensor([state.broken_by[i] != "pgd" for i in subset])
            tol = max(1, round(0.02 * len(subset)))
            s.report.add(
                checks.check_pgd_steps(
                    robust_few, robust_many, steps=(few, plan.pgd_steps), tolerance=tol
                )
            )
        s.checks_time += time.perf_counter() - t0
    s.checks_passes = add_passes(s.checks_passes, s.counter.take())


def recount_phase(
    s: Session, state: EvalState, x_adv: Tensor, have_adv: Tensor
) -> tuple[int, list[int]]:
    """Count twice: re-predict every point on its adversarial (or clean) image, compare with the
    verdicts (points broken in a past session keep their verdict) and run the Square check.
    Returns the recounted number of robust points and the passes the re-prediction took."""
    chunks = s.point_chunks

    def repredict_chunk(b: int) -> dict[str, Any]:
        s.counter.take()
        with torch.no_grad():
            out = s.model(x_adv[chunks[b][0] : chunks[b][-1] + 1]).argmax(1)
        return {"pred": out.cpu(), "passes": s.counter.take()}

    parts: list[Tensor] = []
    passes = [0, 0]
    for _, results in s.comm.rounds(len(chunks), 0, repredict_chunk):
        parts.extend(r["pred"] for r in results)
        passes = add_passes(passes, *(r["passes"] for r in results))
    robust = torch.tensor(state.robust, dtype=torch.bool)
    repred = torch.cat(parts) == s.y.cpu()
    known = have_adv
    s.report.add(checks.check_count_agreement(robust[known], repred[known]))
    if not bool(known.all()):
        s.report.results["count_disagreement"].details["n_not_repredicted"] = int((~known).sum())
    if any(u in GRADIENT_FREE_UNITS for u in s.plan.units):
        s.report.add(checks.check_square_beats_gradient(state.broken_by))
    return int(repred[known].sum()) + int(robust[~known].sum()), passes


def assemble_result(
    s: Session,
    state: EvalState,
    clean: Clean,
    attack_config: dict[str, Any],
    n_robust_repred: int,
    tallies: dict[str, list[int]],
    info: RecordInfo,
) -> EvalResult:
    """The :class:`~robust_agc.eval.EvalResult`: the state's per-unit numbers, AutoAttack's units
    summed into its stage, ``tallies`` (the ``"checks"`` and ``"recount"`` passes), the checks'
    flags and the record's provenance (versions, machine)."""
    plan, n = s.plan, s.n
    units, aa_units = plan.units, plan.aa_units
    robust = torch.tensor(state.robust, dtype=torch.bool)
    stage_acc: dict[str, float] = {}
    for stage in plan.stages:
        last = [u for u in units if u == stage or u.startswith(stage + "/")][-1]
        stage_acc[stage] = state.unit_acc[last]
    timings = dict(state.timings)
    passes = {k: list(v) for k, v in state.passes.items()}
    n_attacked = dict(state.n_attacked)
    n_broken = dict(state.n_broken)
    if aa_units:
        timings["autoattack"] = sum(state.timings[u] for u in aa_units)
        passes["autoattack"] = add_passes([0, 0], *(state.passes.get(u, [0, 0]) for u in aa_units))
        n_attacked["autoattack"] = n_attacked[aa_units[0]]
        n_broken["autoattack"] = sum(n_broken[u] for u in aa_units)
    timings["checks"] = s.checks_time
    timings["total"] = time.perf_counter() - info.t_start
    passes.update(tallies)
    passes["total"] = add_passes([0, 0], *(v for k, v in passes.items() if k != "autoattack"))
    notes = list(info.notes)
    if state.resumed:
        notes.append(f"resumed from state file {info.state_file}")
    return EvalResult(
        clean_acc=state.unit_acc["clean"],
        robust_acc=int(robust.sum()) / n,
        stage_acc=stage_acc,
        component_acc={u: state.unit_acc[u] for u in units},
        robust_flags=robust,
        broken_by=list(state.broken_by),
        timings=timings,
        n_attacked=n_attacked,
        n_broken=n_broken,
        attack_config=attack_config,
        flags=s.report.flags,
        flag_details=s.report.details,
        n_examples=n,
        eps=plan.eps,
        threat_model=plan.threat.value,
        seed=plan.seed,
        dataset=info.dataset,
        architecture=info.architecture,
        versions=versions(),
        model_info=info.model_info,
        robust_acc_repredicted=n_robust_repred / n,
        notes=notes,
        passes={k: {"forward": v[0], "backward": v[1]} for k, v in passes.items()},
        number_forward_passes=clean.forward_passes,
        world_size=s.comm.world,
        machine=machine_info(world_size=s.comm.world),
        **info.compression,
        **_fmn_fields(plan, state),
    )


def _fmn_fields(plan: EvalPlan, state: EvalState) -> dict[str, Any]:
    """The ``fmn`` stage's result fields: radii (None outside ``fmn_slice``), the security curve
    over the points FMN attacked (with their eps-attack verdicts where those ran) and the
    per-point disagreement on those points; empty when the stage did not run."""
    if "fmn" not in plan.stages or state.radii is None:
        return {}
    radii = list(state.radii)
    on = [i for i, r in enumerate(radii) if r is not None]
    eps_units = has_eps_attacks(plan.units)
    broken = [state.broken_by[i] for i in on]
    curve = security_curve(
        [radii[i] for i in on], plan.eps_grid, eps=plan.eps, broken_by=broken if eps_units else ()
    )
    disagree: list[str | None] | None = None
    if eps_units:
        disagree = [None] * len(radii)
        for i, d in zip(
            on, disagreement([radii[i] for i in on], broken, eps=plan.eps), strict=True
        ):
            disagree[i] = d
    return {
        "radii": radii,
        "eps_grid": list(plan.eps_grid),
        "security_curve": curve,
        "fmn_disagree": disagree,
        "fmn_slice": list(plan.fmn_slice) if plan.fmn_slice is not None else None,
    }


def _progress_bar(
    unit: str, total: int, done_batches: int, chunks: list[list[int]], enabled: bool
) -> Any:
    """A tqdm bar of the unit's points (the done chunks counted), or None."""
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=unit, unit="pt", leave=False)
    bar.update(sum(len(c) for c in chunks[:done_batches]))
    return bar
