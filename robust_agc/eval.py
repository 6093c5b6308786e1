"""Robustness evaluation: one typed entry point, per-point worst case, AutoAttack, resumable.

:func:`benchmark` follows RobustBench/AutoAttack conventions (``protocols.md`` section 1):

* the first ``n_examples`` test points, unshuffled, the model in eval mode, eps and seed explicit;
* stages run in the order given (``clean`` always first); each stage only attacks the points that
  are still robust, always starting from the clean image; a misclassified clean point is never
  attacked and a point broken once stays broken; the reported number is the final worst case;
* AutoAttack is the original implementation (:mod:`pyautoattack`, 100-iteration APGD, 9 targets,
  Square with 5000 queries). We drive the attack objects that ``pyautoattack.AutoAttack`` itself
  builds and configures for the requested version, with AutoAttack's own loop semantics (the robust
  points in order, cut into ``batch_size`` chunks, each attack re-seeded with ``seed`` per chunk,
  success judged by re-predicting the returned images). Points and seeds being the same, the
  per-point flags are identical to ``AutoAttack.run_standard_evaluation`` (tested, and checked by
  ``benchmarks/eval_speed.py``); driving the components ourselves gives per-component accuracies
  and timings, a resumable state after every chunk, and no repeated checks or clean passes;
* robust accuracy is counted twice (flags, and re-prediction on the adversarial images) and the
  gradient-masking checks of :mod:`robust_agc.checks` are recorded as flags in the result;
* with ``torch.distributed`` initialized (e.g. under ``torchrun``), the chunks are shared out
  round-robin over the processes (chunk ``b`` on rank ``b % world_size``) and the per-chunk outcomes
  are gathered on every rank after each round. A chunk is the same points with the same seed
  whichever rank runs it, so the per-point flags, accuracies and pass counts equal a single
  process's with the same ``batch_size``, for every stage, AutoAttack included (tested in
  ``tests/test_distributed_eval.py``); only timings differ. ``batch_size`` is the unit of work: a
  unit with fewer chunks than processes leaves some idle.

Accuracies are fractions in [0, 1] everywhere in this module and in the JSON record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checks as _checks
from .checkpoint import atomic_write_bytes
from .errors import CheckpointError, UserError

__all__ = [
    "ThreatModel",
    "EvalResult",
    "STAGES",
    "AUTOATTACK_COMPONENTS",
    "AUTOATTACK_VERSIONS",
    "benchmark",
    "load_model",
    "load_model_and_info",
]

logger = logging.getLogger(__name__)
_AA_LOGGER = logging.getLogger(__name__ + ".autoattack")

STAGES: tuple[str, ...] = ("clean", "pgd", "autoattack", "square")
AUTOATTACK_COMPONENTS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AUTOATTACK_VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
_GRADIENT_FREE = {"square", "autoattack/square"}
_STATE_FORMAT = "robust_agc.eval_state/1"
_RESULT_FORMAT = "robust_agc.eval_result/1"


class ThreatModel(str, Enum):
    """Perturbation sets: ``Linf`` and ``L2`` balls of radius ``eps`` (inputs in [0, 1])."""

    Linf = "Linf"
    L2 = "L2"

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
        flags, flag_details: gradient-masking flags (:mod:`robust_agc.checks`) and their details.
        n_examples, eps, threat_model, seed, dataset, architecture: the evaluation's identity.
        versions: versions of robust_agc, torch, pyautoattack and Python.
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

    @property
    def autoattack_acc(self) -> float | None:
        """Worst-case accuracy after the AutoAttack stage (None when it did not run)."""
        return self.stage_acc.get("autoattack")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record; RobustBench's field names where they exist.

        RobustBench fields: ``clean_acc``, ``autoattack_acc`` (only when AutoAttack ran; the worst
        case over the stages up to and including it), ``eps``, ``threat_model``, ``dataset``,
        ``architecture``, ``n_examples``, ``number_forward_passes`` (forward passes of the network
        per prediction, measured: 1 for a plain network), ``additional_data`` (False). Accuracies
        are fractions in [0, 1] (RobustBench's JSON files store percentages). Our fields:
        ``robust_acc``, ``stages``, ``per_point_robust``, ``per_point_broken_by``, ``flags``,
        ``flag_details``, ``seed``, ``timings``, ``passes``, ``world_size``, ``attack_config``,
        ``versions``, ``model_info``, ``notes``.
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
            "format": _RESULT_FORMAT,
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
                "stages": stages,
                "per_point_robust": [bool(v) for v in self.robust_flags.tolist()],
                "per_point_broken_by": list(self.broken_by),
                "flags": dict(self.flags),
                "flag_details": _jsonable(self.flag_details),
                "seed": self.seed,
                "timings": dict(self.timings),
                "passes": {k: dict(v) for k, v in self.passes.items()},
                "world_size": self.world_size,
                "attack_config": _jsonable(self.attack_config),
                "versions": dict(self.versions),
                "model_info": _jsonable(self.model_info),
                "notes": list(self.notes),
            }
        )
        return d

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write :meth:`to_dict` as JSON atomically; refuse to replace a file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        _atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


# --------------------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
    """Convert tensors, tuples, enums and paths inside ``obj`` to JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
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


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _sha256_tensors(tensors: Sequence[tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from . import __version__

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


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter, restoring each flag afterwards.

    The attacks need input gradients only: frozen weights spare the weight-gradient work of every
    backward pass (FAB calls ``backward()``, which would also leave ``.grad`` on the caller's
    parameters), and the input gradients are the same.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class _PassCounter:
    """Count the model's forward and backward passes in single examples (a forward hook).

    A forward pass on a batch of ``B`` adds ``B``; when the output requires grad, a hook on it adds
    ``B`` backward passes each time a gradient flows back through it (once per ``backward``/
    ``autograd.grad``, so FAB's per-class Jacobian rows count one pass each).
    """

    def __init__(self, model: nn.Module) -> None:
        self.forward = 0
        self.backward = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        b = int(output.shape[0]) if output.ndim > 0 else 1
        self.forward += b
        if output.requires_grad:
            output.register_hook(lambda grad, b=b: self._backward(b))

    def _backward(self, b: int) -> None:
        self.backward += b

    def take(self) -> list[int]:
        """``[forward, backward]`` counted since the last call, and reset."""
        out = [self.forward, self.backward]
        self.forward = self.backward = 0
        return out

    def remove(self) -> None:
        self._handle.remove()


def _predict_measuring_passes(model: nn.Module, x: Tensor) -> tuple[Tensor, int | float]:
    """``model(x)`` without grad, and the network passes per example it took.

    Every module holding parameters of its own counts the examples it processes (the leading
    dimension of its first input); the fewest, divided by ``len(x)``, is the number of times the
    whole network ran per example: 1 for a plain network (a module reused inside one pass does not
    raise the minimum), ``k`` for a wrapper that averages ``k`` passes of an inner network, whether
    it loops or stacks the copies into one batch.
    """
    seen: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: Any) -> None:
        first = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if isinstance(first, Tensor) and first.ndim > 0:
            seen[module] = seen.get(module, 0) + int(first.shape[0])

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(hook) for m in owners]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return out, 1
    ratio = min(seen.values()) / x.shape[0]
    return out, int(ratio) if float(ratio).is_integer() else round(ratio, 3)


class _Comm:
    """The ``torch.distributed`` process group of an evaluation, or one process on its own.

    Collectives carry picklable CPU objects (``all_gather_object``/``broadcast_object_list``), so the
    same code serves ``gloo`` and ``nccl`` (with ``nccl``, the caller sets the CUDA device).
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.world = self._dist.get_world_size() if self._dist is not None else 1
        self.rank = self._dist.get_rank() if self._dist is not None else 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self._dist is None or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self._dist is None or self.world == 1:
            return obj
        buf = [obj if self.rank == 0 else None]
        self._dist.broadcast_object_list(buf, src=0)
        return buf[0]

    def rounds(self, n_chunks: int, start: int, fn: Any) -> Iterator[tuple[int, list[Any]]]:
        """Run ``fn(b)`` for chunks ``b = start, start + 1, ...`` round-robin over the ranks.

        Round ``r`` gives chunk ``s + rank`` (``s = start + r * world``) to each rank; yields
        ``(s, results)`` with every rank's result of the round in chunk order, on every rank.
        """
        for s in range(start, n_chunks, self.world):
            b = s + self.rank
            local = fn(b) if b < n_chunks else None
            yield s, [r for r in self.all_gather(local) if r is not None]


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


def _validate(
    *,
    eps: float | None,
    threat_model: ThreatModel | str,
    n_examples: int | None,
    attacks: str | Sequence[str],
    version: str | Sequence[str],
    batch_size: int,
    seed: int,
    pgd_steps: int,
    pgd_restarts: int,
    pgd_step_size: float | None,
) -> tuple[float, ThreatModel, list[str], str, tuple[str, ...]]:
    """Check the scalar arguments of :func:`benchmark`; ValueError in torch's wording."""
    if eps is None or isinstance(eps, bool) or not isinstance(eps, int | float):
        raise ValueError(f"Invalid eps value: {eps!r} (eps must be given explicitly, a number > 0)")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps value: {eps}")
    tm = ThreatModel.parse(threat_model)
    if n_examples is not None and (
        isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1
    ):
        raise ValueError(f"Invalid n_examples value: {n_examples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size value: {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"Invalid pgd_steps value: {pgd_steps!r}")
    if isinstance(pgd_restarts, bool) or not isinstance(pgd_restarts, int) or pgd_restarts < 1:
        raise ValueError(f"Invalid pgd_restarts value: {pgd_restarts!r}")
    if pgd_step_size is not None and not (
        isinstance(pgd_step_size, int | float)
        and math.isfinite(pgd_step_size)
        and pgd_step_size > 0
    ):
        raise ValueError(f"Invalid pgd_step_size value: {pgd_step_size!r}")
    stages = _parse_attacks(attacks)
    aa_version, components = _parse_version(version)
    if tm is ThreatModel.Linf and eps >= 1.0:
        import warnings

        warnings.warn(
            f"eps={eps} for Linf on inputs in [0, 1] covers the whole input range "
            "(did you mean eps/255?)",
            UserWarning,
            stacklevel=3,
        )
    return eps, tm, stages, aa_version, components


# ------------------------------------------------------------------------------------- attacks


class _AutoAttackRunner:
    """pyautoattack's configured attack objects, run with AutoAttack's own per-chunk semantics."""

    def __init__(
        self,
        model: nn.Module,
        *,
        version: str,
        components: tuple[str, ...],
        threat: ThreatModel,
        eps: float,
        seed: int,
        device: torch.device,
        n_targets: int | None,
    ) -> None:
        from pyautoattack import AutoAttack

        if version == "custom":
            aa = AutoAttack(
                model,
                attacks=list(components),
                device=device,
                eps=eps,
                norm=threat.value,
                seed=seed,
                version="custom",
            )
        else:
            aa = AutoAttack(
                model, device=device, eps=eps, norm=threat.value, seed=seed, version=version
            )
        for attr in ("apgd", "apgd_targeted", "fab", "square"):
            if not hasattr(aa, attr):
                raise RuntimeError(
                    f"pyautoattack.AutoAttack has no attribute {attr!r}: this pyautoattack version "
                    "is not supported by robust_agc.eval"
                )
        # Route AutoAttack's log output (its checks warn there) under our logger hierarchy.
        aa.logger = _AA_LOGGER
        aa.apgd.logger = _AA_LOGGER
        aa.apgd_targeted.logger = _AA_LOGGER
        if n_targets is not None:
            aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_targets)
            aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_targets)
        self.aa = aa
        self.components = components

    def config(self) -> dict[str, Any]:
        aa = self.aa
        return {
            "implementation": "pyautoattack",
            "version": aa.version,
            "components": list(self.components),
            "apgd": {
                "n_iter": aa.apgd.n_iter,
                "n_restarts": aa.apgd.n_restarts,
                "eot_iter": aa.apgd.eot_iter,
                "rho": aa.apgd.thr_decr,
            },
            "apgd_t": {
                "n_iter": aa.apgd_targeted.n_iter,
                "n_restarts": aa.apgd_targeted.n_restarts,
                "n_target_classes": aa.apgd_targeted.n_target_classes,
            },
            "fab": {
                "n_iter": aa.fab.n_iter,
                "n_restarts": aa.fab.n_restarts,
                "n_target_classes": aa.fab.n_target_classes,
            },
            "square": {"n_queries": aa.square.n_queries, "p_init": aa.square.p_init},
        }

    def __call__(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """Exactly the dispatch of ``AutoAttack.run_standard_evaluation`` for one chunk."""
        aa = self.aa
        with torch.no_grad():
            if name == "apgd-ce":
                aa.apgd.loss = "ce"
                aa.apgd.seed = aa.get_seed()
                return aa.apgd.perturb(x, y)
            if name == "apgd-dlr":
                aa.apgd.loss = "dlr"
                aa.apgd.seed = aa.get_seed()
                return aa.apgd.perturb(x, y)
            if name == "fab":
                aa.fab.targeted = False
                aa.fab.seed = aa.get_seed()
                return aa.fab.perturb(x, y)
            if name == "square":
                aa.square.seed = aa.get_seed()
                return aa.square.perturb(x, y)
            if name == "apgd-t":
                aa.apgd_targeted.seed = aa.get_seed()
                return aa.apgd_targeted.perturb(x, y)
            if name == "fab-t":
                aa.fab.targeted = True
                aa.fab.n_restarts = 1
                aa.fab.seed = aa.get_seed()
                return aa.fab.perturb(x, y)
        raise ValueError(f"Invalid attack value: {name!r}")


def _make_pgd(
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


# --------------------------------------------------------------------------------------- state


class _State:
    """Per-point flags and progress, saved as JSON (atomic) after every chunk."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], n: int) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.robust = [True] * n
        self.broken_by: list[str | None] = [None] * n
        self.done: list[str] = []
        self.current: dict[str, Any] | None = None
        self.unit_acc: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.n_attacked: dict[str, int] = {}
        self.n_broken: dict[str, int] = {}
        self.passes: dict[str, list[int]] = {}
        self.resumed = False

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read evaluation state {self.path}: {e}") from None
        if not isinstance(d, dict) or d.get("format") != _STATE_FORMAT:
            raise UserError(f"{self.path} is not a robust_agc evaluation state file")
        if d.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            old, new = d.get("fingerprint") or {}, self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(
                f"state file {self.path} belongs to another evaluation (different "
                f"{', '.join(diff)}); delete it or choose another --state file"
            )
        self.restore(d)
        self.resumed = True
        logger.info("resuming evaluation from %s (done: %s)", self.path, ", ".join(self.done))

    def snapshot(self) -> dict[str, Any]:
        """The progress as a JSON-friendly dict (what :meth:`save` writes, less the header)."""
        return {
            "robust": self.robust,
            "broken_by": self.broken_by,
            "done": self.done,
            "current": self.current,
            "unit_acc": self.unit_acc,
            "timings": self.timings,
            "n_attacked": self.n_attacked,
            "n_broken": self.n_broken,
            "passes": self.passes,
        }

    def restore(self, d: dict[str, Any]) -> None:
        """Take the progress from a :meth:`snapshot` (or a saved file)."""
        self.robust = [bool(v) for v in d["robust"]]
        self.broken_by = list(d["broken_by"])
        self.done = list(d["done"])
        self.current = d.get("current")
        self.unit_acc = dict(d.get("unit_acc", {}))
        self.timings = dict(d.get("timings", {}))
        self.n_attacked = dict(d.get("n_attacked", {}))
        self.n_broken = dict(d.get("n_broken", {}))
        self.passes = {k: [int(v[0]), int(v[1])] for k, v in d.get("passes", {}).items()}

    def save(self) -> None:
        if self.path is None:
            return
        d = {"format": _STATE_FORMAT, "fingerprint": self.fingerprint, **self.snapshot()}
        _atomic_write_text(self.path, json.dumps(_jsonable(d)))


# ------------------------------------------------------------------------------------ benchmark


def benchmark(
    model: nn.Module,
    *,
    dataset: str | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    threat_model: ThreatModel | str = "Linf",
    eps: float,
    n_examples: int | None = None,
    attacks: str | Sequence[str] = ("clean", "autoattack"),
    version: str | Sequence[str] = "standard",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    pgd_steps: int = 50,
    pgd_restarts: int = 10,
    pgd_step_size: float | None = None,
    state_file: str | Path | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
    run_checks: bool = True,
    model_info: dict[str, Any] | None = None,
    architecture: str | None = None,
    notes: Sequence[str] = (),
) -> EvalResult:
    """Evaluate ``model`` under a threat model, per-point worst case over the given stages.

    Args:
        model: a classifier taking inputs in [0, 1] and returning logits ``(N, C)``. It is put in
            eval mode for the evaluation and its modes are restored afterwards.
        dataset: a dataset name (:func:`robust_agc.data.load_dataset`, test split); the first
            ``n_examples`` points, unshuffled. Exclusive with ``x``/``y``.
        x, y: explicit points (floats in [0, 1], NCHW) and labels.
        threat_model: ``"Linf"`` or ``"L2"`` (enum or string).
        eps: perturbation radius; required, never defaulted.
        n_examples: how many of the first points to use (all when None).
        attacks: stages in order, from ``clean``, ``pgd``, ``autoattack``, ``square`` (a list or a
            comma-separated string); ``clean`` always runs first.
        version: AutoAttack ``"standard"``, ``"plus"``, ``"rand"``, or a list of components
            (e.g. ``["apgd-ce", "apgd-t"]``), run as pyautoattack's ``version="custom"`` with its
            constructor settings (APGD-CE 5 restarts, 9 targets, Square 5000 queries).
        batch_size: points per attack chunk (also fixes AutoAttack's chunking, hence its
            randomness); in a distributed evaluation the unit of work shared out to processes.
        device: where to run; the model is moved there and back if needed.
        seed: the seed of every attack (each chunk is re-seeded, AutoAttack style).
        pgd_steps, pgd_restarts, pgd_step_size: the ``pgd`` stage (default PGD-50, 10 restarts,
            step ``2.5 * eps / steps``).
        state_file: JSON file holding per-point flags after every chunk (every round of chunks
            when distributed; only rank 0 reads and writes it); a rerun resumes from it, with any
            number of processes, and refuses (UserError) when the attack configuration, points or
            model differ.
        progress: tqdm bars (stderr) with the points remaining per stage (rank 0 only).
        data_dir: where to look for ``dataset``.
        run_checks: run the gradient-masking checks (:mod:`robust_agc.checks`); the count
            agreement and Square checks are always recorded.
        model_info: caller metadata stored in the record (sparsity, optimizer, config...).
        architecture: model name for the record.
        notes: remarks stored in the record.

    Returns:
        An :class:`EvalResult`. Distributed: every rank calls :func:`benchmark` with the same
        arguments and returns rank 0's result (identical per-point outcomes on every rank).

    Raises:
        ValueError: invalid arguments (torch wording: ``Invalid <name> value: ...``).
        UserError: a state file from another evaluation, or unavailable data.
        RuntimeError: distributed ranks called with different points, model or attacks.

    Example:
        >>> res = benchmark(model, dataset="fashion-mnist", eps=0.1, n_examples=1000)  # doctest: +SKIP
        >>> res.clean_acc, res.robust_acc, res.flags  # doctest: +SKIP
    """
    eps, threat, stages, aa_version, components = _validate(
        eps=eps,
        threat_model=threat_model,
        n_examples=n_examples,
        attacks=attacks,
        version=version,
        batch_size=batch_size,
        seed=seed,
        pgd_steps=pgd_steps,
        pgd_restarts=pgd_restarts,
        pgd_step_size=pgd_step_size,
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model value: expected an nn.Module, got {type(model).__name__}")
    x, y, dataset = _resolve_points(dataset, x, y, n_examples, data_dir)
    device = torch.device(device)
    t_start = time.perf_counter()

    params = list(model.parameters()) + list(model.buffers())
    orig_device = params[0].device if params else device
    if orig_device != device:
        model.to(device)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with (
            _eval_mode(model),
            _frozen_parameters(model),
            torch.random.fork_rng(devices=rng_devices),
        ):
            return _run(
                model,
                x=x.to(device),
                y=y.to(device),
                dataset=dataset,
                threat=threat,
                eps=eps,
                stages=stages,
                aa_version=aa_version,
                components=components,
                batch_size=batch_size,
                device=device,
                seed=seed,
                pgd_steps=pgd_steps,
                pgd_restarts=pgd_restarts,
                pgd_step_size=pgd_step_size,
                state_file=Path(state_file) if state_file is not None else None,
                progress=progress,
                run_checks=run_checks,
                model_info=dict(model_info or {}),
                architecture=architecture,
                notes=list(notes),
                t_start=t_start,
            )
    finally:
        if orig_device != device:
            model.to(orig_device)


def _resolve_points(
    dataset: str | None,
    x: Tensor | None,
    y: Tensor | None,
    n_examples: int | None,
    data_dir: str | Path | None,
) -> tuple[Tensor, Tensor, str | None]:
    if dataset is not None and (x is not None or y is not None):
        raise ValueError("Invalid dataset value: give either dataset or x and y, not both")
    if dataset is None:
        if x is None or y is None:
            raise ValueError("Invalid x value: give a dataset name or both x and y")
    else:
        from .data import load_dataset

        x, y = load_dataset(dataset, "test", data_dir=data_dir)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("Invalid x value: x and y must be tensors")
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Invalid y value: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same length"
        )
    if not x.is_floating_point():
        raise ValueError(f"Invalid x value: expected floats in [0, 1], got dtype {x.dtype}")
    if y.is_floating_point():
        raise ValueError(f"Invalid y value: expected integer labels, got dtype {y.dtype}")
    if n_examples is not None:
        if n_examples > x.shape[0]:
            raise ValueError(f"Invalid n_examples value: {n_examples} (only {x.shape[0]} points)")
        x, y = x[:n_examples], y[:n_examples]
    if x.shape[0] == 0:
        raise ValueError("Invalid x value: no points")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"Invalid x value: inputs must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); models "
            "normalize inside"
        )
    return x, y.long(), dataset


def _units(stages: list[str], components: tuple[str, ...]) -> list[str]:
    units: list[str] = []
    for s in stages:
        if s == "autoattack":
            units.extend(f"autoattack/{c}" for c in components)
        else:
            units.append(s)
    return units


def _model_sha256(model: nn.Module) -> str:
    return _sha256_tensors(list(model.state_dict().items()))


def _run(model: nn.Module, *, state_file: Path | None, progress: bool, **kwargs: Any) -> EvalResult:
    """:func:`_run_counted` with a pass counter on the model; under ``torch.distributed`` only
    rank 0 keeps the state file and the progress bar. ``kwargs``: the rest of its arguments."""
    comm = _Comm()
    main = comm.rank == 0
    counter = _PassCounter(model)
    try:
        result = _run_counted(
            model,
            comm=comm,
            counter=counter,
            state_file=state_file if main else None,
            progress=progress and main,
            **kwargs,
        )
    finally:
        counter.remove()
    # Every rank returns rank 0's record (identical per-point results; rank 0's checks and clock).
    return comm.broadcast(result if main else None)


def _run_counted(
    model: nn.Module,
    *,
    comm: _Comm,
    counter: _PassCounter,
    x: Tensor,
    y: Tensor,
    dataset: str | None,
    threat: ThreatModel,
    eps: float,
    stages: list[str],
    aa_version: str,
    components: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    seed: int,
    pgd_steps: int,
    pgd_restarts: int,
    pgd_step_size: float | None,
    state_file: Path | None,
    progress: bool,
    run_checks: bool,
    model_info: dict[str, Any],
    architecture: str | None,
    notes: list[str],
    t_start: float,
) -> EvalResult:
    n = x.shape[0]
    main = comm.rank == 0
    report = _checks.MaskingReport()
    # Chunks of ``batch_size`` over the points (clean stage, re-prediction) or over a unit's
    # targets; chunk b runs on rank b % world, so every chunk is exactly the one a single process
    # would run, with the same seed: the per-point results do not depend on the world size.
    point_chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    # Clean predictions (cheap; also recomputed on resume to check the state and run the checks).
    def clean_chunk(b: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        counter.take()
        xb = x[point_chunks[b][0] : point_chunks[b][-1] + 1]
        if b == 0:
            out, fwd = _predict_measuring_passes(model, xb)
        else:
            with torch.no_grad():
                out, fwd = model(xb), None
        if out.ndim != 2 or out.shape[1] < 2:
            raise ValueError(
                f"Invalid model value: expected logits (N, C>=2), got {tuple(out.shape)}"
            )
        return {
            "logits": out.detach().cpu(),
            "fwd": fwd,
            "time": time.perf_counter() - t0,
            "passes": counter.take(),
        }

    logit_parts: list[Tensor] = []
    t_clean, clean_passes, n_fwd_passes = 0.0, [0, 0], 1
    for s, results in comm.rounds(len(point_chunks), 0, clean_chunk):
        logit_parts.extend(r["logits"] for r in results)
        t_clean += max(r["time"] for r in results)
        clean_passes = _add_passes(clean_passes, *(r["passes"] for r in results))
        if s == 0:
            n_fwd_passes = results[0]["fwd"]
    logits = torch.cat(logit_parts).to(device)
    pred = logits.argmax(1)
    clean_ok = (pred == y).cpu()
    n_classes = int(logits.shape[1])

    n_targets: int | None = 9
    t0 = time.perf_counter()
    counter.take()
    if run_checks:
        if main:
            ok = clean_ok.nonzero().flatten().to(device)
            xs, ys = (x[ok], y[ok]) if ok.numel() > 0 else (x, y)
            _, n_targets = _checks.run_model_checks(
                model, xs, ys, logits=logits[ok] if ok.numel() > 0 else logits, report=report
            )
        n_targets = comm.broadcast(n_targets)
    else:
        res, n_targets = _checks.check_n_classes(n_classes, 9)
        report.add(res)
    t_checks = time.perf_counter() - t0
    checks_passes = counter.take()

    aa_runner = None
    if "autoattack" in stages:
        aa_runner = _AutoAttackRunner(
            model,
            version=aa_version,
            components=components,
            threat=threat,
            eps=eps,
            seed=seed,
            device=device,
            n_targets=n_targets,
        )
    sq_runner = None
    if "square" in stages:
        sq_runner = _AutoAttackRunner(
            model,
            version="custom",
            components=("square",),
            threat=threat,
            eps=eps,
            seed=seed,
            device=device,
            n_targets=n_targets,
        )
    step = pgd_step_size if pgd_step_size is not None else 2.5 * eps / pgd_steps
    units = _units(stages, components)
    attack_config: dict[str, Any] = {
        "threat_model": threat.value,
        "eps": eps,
        "seed": seed,
        "batch_size": batch_size,
        "stages": stages,
        "units": units,
    }
    if "pgd" in stages:
        attack_config["pgd"] = {
            "implementation": "attacks.PGD" if threat is ThreatModel.Linf else "attacks.PGDL2",
            "steps": pgd_steps,
            "restarts": pgd_restarts,
            "step_size": step,
            "random_start": True,
        }
    if aa_runner is not None:
        attack_config["autoattack"] = aa_runner.config()
    if sq_runner is not None:
        attack_config["square"] = sq_runner.config()["square"]

    fingerprint = {
        "attack_config": _jsonable(attack_config),
        "n_examples": n,
        "points_sha256": _sha256_tensors([("x", x), ("y", y)]),
        "model_sha256": _model_sha256(model),
    }
    if comm.world > 1:
        prints = comm.all_gather(json.dumps(fingerprint, sort_keys=True))
        if any(p != prints[0] for p in prints):
            raise RuntimeError(
                "distributed evaluation: the ranks differ in their points, model or attack "
                "configuration (every rank must call benchmark with the same arguments)"
            )
    state = _State(state_file, fingerprint, n)
    error = None
    if main:
        try:
            state.load()
        except UserError as e:
            error = str(e)
    error, snap, resumed = comm.broadcast((error, state.snapshot(), state.resumed))
    if error is not None:
        raise UserError(error)
    if not main:
        state.restore(snap)
        state.resumed = resumed
    if state.resumed:
        stored_clean = [b != "clean" for b in state.broken_by]
        if "clean" in state.done and stored_clean != clean_ok.tolist():
            raise UserError(
                f"state file {state_file}: stored clean predictions differ from this model's; "
                "refusing to resume"
            )
    if "clean" not in state.done:
        state.robust = clean_ok.tolist()
        state.broken_by = [None if ok else "clean" for ok in state.robust]
        state.unit_acc["clean"] = sum(state.robust) / n
        state.timings["clean"] = t_clean
        state.n_attacked["clean"] = n
        state.n_broken["clean"] = n - sum(state.robust)
        state.passes["clean"] = clean_passes
        state.done.append("clean")
        state.save()

    x_adv = x.clone()
    have_adv = torch.ones(n, dtype=torch.bool)  # adversarial image known (not from a past session)
    have_adv[[i for i, b in enumerate(state.broken_by) if b not in (None, "clean")]] = False

    pgd = None
    if "pgd" in stages:
        # A fresh attack per chunk, seeded with ``seed`` (AutoAttack style): a resumed run attacks
        # every chunk exactly as an uninterrupted one would.
        def pgd() -> Any:
            return _make_pgd(
                model,
                threat=threat,
                eps=eps,
                alpha=step,
                steps=pgd_steps,
                restarts=pgd_restarts,
                seed=seed,
            )

        pgd()  # fail early when the attacks package is missing

    for unit in units:
        if unit in state.done:
            continue
        if state.current is not None and state.current.get("unit") == unit:
            targets = list(state.current["targets"])
            done_batches = int(state.current["batches_done"])
        else:
            targets = [i for i, r in enumerate(state.robust) if r]
            done_batches = 0
            state.current = {"unit": unit, "targets": targets, "batches_done": 0}
            state.n_attacked[unit] = len(targets)
            state.n_broken[unit] = 0
            state.timings.setdefault(unit, 0.0)
            state.passes.setdefault(unit, [0, 0])
        chunks = [targets[i : i + batch_size] for i in range(0, len(targets), batch_size)]
        if main and comm.world > 1 and len(chunks) - done_batches < comm.world:
            logger.warning(
                "%s: %d chunk(s) of up to %d points for %d processes; some processes idle "
                "(a smaller batch_size spreads the work, at the same per-chunk semantics)",
                unit,
                len(chunks) - done_batches,
                batch_size,
                comm.world,
            )
        bar = _progress_bar(unit, len(targets), done_batches, chunks, progress)

        def attack_chunk(b: int, unit: str = unit, chunks: list[list[int]] = chunks) -> Any:
            t0 = time.perf_counter()
            counter.take()
            idx = torch.tensor(chunks[b], dtype=torch.long, device=device)
            xb, yb = x[idx], y[idx]
            if unit == "pgd":
                assert pgd is not None
                adv = pgd()(xb, yb)
            elif unit == "square":
                assert sq_runner is not None
                adv = sq_runner("square", xb, yb)
            else:
                assert aa_runner is not None
                adv = aa_runner(unit.split("/", 1)[1], xb, yb)
            with torch.no_grad():
                out = model(adv).argmax(1)
            broken = (out != yb).cpu()
            return {
                "broken": broken.tolist(),
                "adv": adv.detach()[broken.to(adv.device)].cpu(),
                "time": time.perf_counter() - t0,
                "passes": counter.take(),
            }

        for s, results in comm.rounds(len(chunks), done_batches, attack_chunk):
            for b, r in enumerate(results, start=s):
                hit = [i for i, br in zip(chunks[b], r["broken"], strict=True) if br]
                for i in hit:
                    state.robust[i] = False
                    state.broken_by[i] = unit
                if hit:
                    x_adv[torch.tensor(hit, device=device)] = r["adv"].to(device, x_adv.dtype)
                state.n_broken[unit] = state.n_broken.get(unit, 0) + len(hit)
                state.passes[unit] = _add_passes(state.passes.get(unit, [0, 0]), r["passes"])
            state.current["batches_done"] = s + len(results)
            state.timings[unit] = state.timings.get(unit, 0.0) + max(r["time"] for r in results)
            state.save()
            if bar is not None:
                bar.update(sum(len(chunks[b]) for b in range(s, s + len(results))))
                bar.set_postfix(robust=sum(state.robust))
        if bar is not None:
            bar.close()
        state.unit_acc[unit] = sum(state.robust) / n
        state.done.append(unit)
        state.current = None
        state.save()
        if main:
            logger.info(
                "%s: robust accuracy %.2f%% (%d attacked, %d broken, %.1f s)",
                unit,
                100 * state.unit_acc[unit],
                state.n_attacked.get(unit, 0),
                state.n_broken.get(unit, 0),
                state.timings.get(unit, 0.0),
            )

    # PGD convergence check: fewer steps on a subset must not break *more* points (rank 0 only).
    # The subset: the first 64 of PGD's targets, i.e. of the points no unit before it broke (derived
    # from the verdicts, so a session resumed after the PGD stage checks the same points).
    pgd_subset: list[int] = []
    if "pgd" in units:
        from_pgd = set(units[units.index("pgd") :])
        pgd_subset = [i for i, b in enumerate(state.broken_by) if b is None or b in from_pgd][:64]
    counter.take()
    if main and run_checks and pgd is not None and pgd_subset:
        t0 = time.perf_counter()
        few = max(1, pgd_steps // 5)
        if few < pgd_steps:
            short = _make_pgd(
                model,
                threat=threat,
                eps=eps,
                alpha=pgd_step_size if pgd_step_size is not None else 2.5 * eps / few,
                steps=few,
                restarts=1,
                seed=seed,
            )
            idx = torch.tensor(pgd_subset, dtype=torch.long, device=device)
            with torch.no_grad():
                robust_few = (model(short(x[idx], y[idx])).argmax(1) == y[idx]).cpu()
            robust_many = torch.tensor([state.broken_by[i] != "pgd" for i in pgd_subset])
            tol = max(1, round(0.02 * len(pgd_subset)))
            report.add(
                _checks.check_pgd_steps(
                    robust_few, robust_many, steps=(few, pgd_steps), tolerance=tol
                )
            )
        t_checks += time.perf_counter() - t0
    checks_passes = _add_passes(checks_passes, counter.take())

    robust = torch.tensor(state.robust, dtype=torch.bool)

    # Count twice: re-predict every point on its adversarial (or clean) image.
    def repredict_chunk(b: int) -> dict[str, Any]:
        counter.take()
        with torch.no_grad():
            out = model(x_adv[point_chunks[b][0] : point_chunks[b][-1] + 1]).argmax(1)
        return {"pred": out.cpu(), "passes": counter.take()}

    pred_parts: list[Tensor] = []
    recount_passes = [0, 0]
    for _, results in comm.rounds(len(point_chunks), 0, repredict_chunk):
        pred_parts.extend(r["pred"] for r in results)
        recount_passes = _add_passes(recount_passes, *(r["passes"] for r in results))
    repred = torch.cat(pred_parts) == y.cpu()
    known = have_adv
    report.add(_checks.check_count_agreement(robust[known], repred[known]))
    if not bool(known.all()):
        report.results["count_disagreement"].details["n_not_repredicted"] = int((~known).sum())
    n_robust_repred = int(repred[known].sum()) + int(robust[~known].sum())
    if any(u in _GRADIENT_FREE for u in units):
        report.add(_checks.check_square_beats_gradient(state.broken_by))

    if main:
        for r in report.results.values():
            if r.fired:
                logger.warning("gradient-masking check %s: %s", r.name, r.message)
        report.warn(stacklevel=4)

    stage_acc: dict[str, float] = {}
    for s in stages:
        last = [u for u in units if u == s or u.startswith(s + "/")][-1]
        stage_acc[s] = state.unit_acc[last]
    timings = dict(state.timings)
    passes = {k: list(v) for k, v in state.passes.items()}
    if "autoattack" in stages:
        aa_units = [u for u in units if u.startswith("autoattack/")]
        timings["autoattack"] = sum(state.timings.get(u, 0.0) for u in aa_units)
        passes["autoattack"] = _add_passes([0, 0], *(state.passes.get(u, [0, 0]) for u in aa_units))
    timings["checks"] = t_checks
    timings["total"] = time.perf_counter() - t_start
    passes["checks"] = checks_passes
    passes["recount"] = recount_passes
    passes["total"] = _add_passes(
        [0, 0],
        *(v for k, v in passes.items() if k != "autoattack"),
    )
    n_attacked = dict(state.n_attacked)
    n_broken = dict(state.n_broken)
    if "autoattack" in stages:
        aa_units = [u for u in units if u.startswith("autoattack/")]
        n_attacked["autoattack"] = n_attacked.get(aa_units[0], 0)
        n_broken["autoattack"] = sum(n_broken.get(u, 0) for u in aa_units)
    if state.resumed:
        notes = [*notes, f"resumed from state file {state_file}"]
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
        flags=report.flags,
        flag_details=report.details,
        n_examples=n,
        eps=eps,
        threat_model=threat.value,
        seed=seed,
        dataset=dataset,
        architecture=architecture,
        versions=_versions(),
        model_info=model_info,
        robust_acc_repredicted=n_robust_repred / n,
        notes=notes,
        passes={k: {"forward": v[0], "backward": v[1]} for k, v in passes.items()},
        number_forward_passes=n_fwd_passes,
        world_size=comm.world,
    )


def _add_passes(*counts: Sequence[int]) -> list[int]:
    """Element-wise sum of ``[forward, backward]`` pairs."""
    return [sum(c[0] for c in counts), sum(c[1] for c in counts)]


def _progress_bar(
    unit: str, total: int, done_batches: int, chunks: list[list[int]], enabled: bool
) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=unit, unit="pt", leave=False)
    bar.update(sum(len(c) for c in chunks[:done_batches]))
    return bar


# ----------------------------------------------------------------------------------- loading


def load_model_and_info(
    path: str | Path,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    source: str | None = None,
    threat_model: ThreatModel | str = "Linf",
    model_dir: str | Path | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load an eval-ready model and describe it; see :func:`load_model`.

    Returns:
        ``(model, info)``: ``info`` holds ``source``, ``architecture``, ``dataset`` and, for our
        checkpoints, ``config`` (the training config, including ``eps`` when recorded) and ``epoch``.
    """
    if source is None:
        source = "state_dict" if arch is not None else "checkpoint"
    if source not in ("checkpoint", "state_dict", "robustbench"):
        raise UserError(
            f"Invalid source value: {source!r} (choose checkpoint, state_dict, robustbench)"
        )
    if source == "checkpoint":
        from .checkpoint import build_model_from_checkpoint, load_checkpoint

        ckpt = load_checkpoint(path, map_location=map_location)
        model = build_model_from_checkpoint(ckpt)
        cfg = dict(ckpt.get("config") or {})
        info = {
            "source": "checkpoint",
            "path": str(path),
            "architecture": cfg.get("model"),
            "dataset": cfg.get("dataset"),
            "config": cfg,
            "epoch": ckpt.get("epoch"),
            "checkpoint_version": ckpt.get("version"),
        }
        return model.eval(), info
    if source == "state_dict":
        return _load_state_dict_model(path, arch=arch, dataset=dataset, map_location=map_location)
    return _load_robustbench(
        str(path), dataset=dataset, threat_model=threat_model, model_dir=model_dir
    )


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    source: str | None = None,
    threat_model: ThreatModel | str = "Linf",
    model_dir: str | Path | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an eval-ready model (eval mode, sparsity masks folded into the weights).

    Three sources:

    * ``load_model("run/best.pt")``: one of our checkpoints (``robust_agc.checkpoint``, safe loading);
    * ``load_model("weights.pt", arch="small-cnn", dataset="fashion-mnist")``: a plain state dict of a
      registered architecture (``module.``/``model.`` prefixes stripped, ``weights_only`` loading,
      ``*.weight_mask`` buffers folded in; ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers
      accepted);
    * ``load_model("Carmon2019Unlabeled", source="robustbench", dataset="cifar10")``: RobustBench's
      model zoo (optional dependency, needs the internet the first time).

    Raises:
        CheckpointError: a missing, corrupt or unsafe file, or weights that do not fit ``arch``.
        UserError: unknown architecture or dataset, or ``robustbench`` not importable.
    """
    return load_model_and_info(
        path,
        arch=arch,
        dataset=dataset,
        source=source,
        threat_model=threat_model,
        model_dir=model_dir,
        map_location=map_location,
    )[0]


def _load_state_dict_model(
    path: str | Path,
    *,
    arch: str | None,
    dataset: str | None,
    map_location: str | torch.device,
) -> tuple[nn.Module, dict[str, Any]]:
    from .checkpoint import load_checkpoint, strip_prefixes
    from .data import DATASET_INFO
    from .models import create_model

    if arch is None:
        raise UserError("a plain state dict needs --arch (a registered architecture)")
    if dataset is None:
        raise UserError("a plain state dict needs --dataset (it fixes classes, channels and size)")
    if dataset not in DATASET_INFO:
        raise UserError(f"Invalid dataset value: {dataset!r} (choose {', '.join(DATASET_INFO)})")
    info = DATASET_INFO[dataset]
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state dict not found: {path}")
    obj = load_checkpoint(path, map_location=map_location)  # weights_only, CheckpointError
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    state = strip_prefixes(obj)
    model = create_model(
        arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=info.input_size,
        mean=info.mean,
        std=info.std,
    )
    masks = {k: v for k, v in state.items() if k.endswith("weight_mask")}
    own = set(model.state_dict())
    fold = {k: v for k, v in masks.items() if k not in own}
    weights = {k: v for k, v in state.items() if k not in fold}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit architecture {arch!r}: {first}") from None
    if fold:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, m in fold.items():
                w = params.get(k[: -len("_mask")])
                if w is None or w.shape != m.shape:
                    raise CheckpointError(f"mask {k} in {path} matches no weight of {arch!r}")
                w.copy_(torch.where(m.bool(), w, torch.zeros_like(w)))
    return model.eval(), {
        "source": "state_dict",
        "path": str(path),
        "architecture": arch,
        "dataset": dataset,
        "masks_folded": len(fold),
    }


def _load_robustbench(
    name: str,
    *,
    dataset: str | None,
    threat_model: ThreatModel | str,
    model_dir: str | Path | None,
) -> tuple[nn.Module, dict[str, Any]]:
    try:
        from robustbench.utils import load_model as rb_load_model
    except ImportError as e:
        raise UserError(
            f"RobustBench models need the optional 'robustbench' package, which cannot be imported "
            f"here ({e}); install it (pip install robustbench) or load a checkpoint/state dict"
        ) from None
    if dataset is None:
        raise UserError("a RobustBench model needs --dataset (cifar10, cifar100 or imagenet)")
    tm = ThreatModel.parse(threat_model).value
    kwargs: dict[str, Any] = {"model_name": name, "dataset": dataset, "threat_model": tm}
    if model_dir is not None:
        kwargs["model_dir"] = str(model_dir)
    model = rb_load_model(**kwargs)
    return model.eval(), {
        "source": "robustbench",
        "architecture": name,
        "dataset": dataset,
        "threat_model": tm,
    }
