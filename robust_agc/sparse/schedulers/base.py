"""The topology scheduler interface, its shared drop-and-grow mechanics, and the method registry.

A scheduler is a small object with ``step()``, ``state_dict()`` and ``load_state_dict()``. The
trainer calls ``scheduler.step()`` right after ``optimizer.step()`` on every training step; the
optimizer step itself is never skipped. On an update step ``t`` (every ``update_interval`` steps,
``0 < t < update_end * total_steps``) each masked layer:

1. drops ``k = floor(f_t * n_active)`` active weights of smallest ``|w|``, with the cosine-decayed
   fraction ``f_t = drop_fraction / 2 * (1 + cos(pi * t / (update_end * total_steps)))``;
2. regrows ``k`` positions among those inactive after the drop (just-dropped ones included), where
   the subclass's ``_grow_scores`` are largest (:mod:`~robust_agc.sparse.schedulers.dst`);
3. sets the weights and every same-shaped optimizer-state tensor to zero at all positions
   inactive after the drop, so regrown weights start at zero with zero state.

Layers that are fully dense (density 1, e.g. ERK's small layers) are left alone.

Methods register a builder with :func:`register_sparse_method`; :func:`create_scheduler` builds
any registered method by name (``static``, ``set``, ``rigl``, ``itop-set``, ``itop-rigl``,
``bsr``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...utils.validation import check_int
from ...utils.warn import warn_at_caller
from ..masks import SparseMasks, check_generator, fill_state

_SPARSE_DIR = str(Path(__file__).resolve().parents[1])  # robust_agc/sparse: warnings point past it

__all__ = [
    "SPARSE_METHOD_DEFAULTS",
    "SchedulerBuilder",
    "TopologyScheduler",
    "create_scheduler",
    "list_sparse_methods",
    "register_sparse_method",
    "structured_methods",
]

logger = logging.getLogger(__name__)

_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_SALT = 0x5E75E7

#: Default hyperparameters per method; explicit arguments to :func:`create_scheduler` win.
#: ITOP (Liu et al. 2021): ERK, long intervals (1500 for SET, 4000 for RigL at batch 128),
#: drop 0.5 with cosine decay, updates until the end of training.
SPARSE_METHOD_DEFAULTS: dict[str, dict[str, float | int]] = {
    "static": {"update_interval": 100, "drop_fraction": 0.3, "update_end": 0.75},
    "set": {"update_interval": 100, "drop_fraction": 0.3, "update_end": 0.75},
    "rigl": {"update_interval": 100, "drop_fraction": 0.3, "update_end": 0.75},
    "itop-set": {"update_interval": 1500, "drop_fraction": 0.5, "update_end": 1.0},
    "itop-rigl": {"update_interval": 4000, "drop_fraction": 0.5, "update_end": 1.0},
}


class TopologyScheduler:
    """Base class: step counting, cosine drop fraction, drop-and-grow mechanics, state_dict.

    Subclasses define :meth:`_grow_scores`. ``method`` is the registry name it was built for.
    """

    dynamic: bool = True
    needs_dense_grad: bool = False
    uses_random: bool = False

    def __init__(
        self,
        masks: SparseMasks,
        *,
        method: str,
        total_steps: int,
        update_interval: int,
        drop_fraction: float,
        update_end: float,
        generator: torch.Generator | int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(masks, SparseMasks):
            raise TypeError(f"Invalid masks value: {type(masks).__name__} (expected SparseMasks)")
        check_int("total_steps", total_steps, minimum=1, type_error=True)
        check_int("update_interval", update_interval, minimum=1, type_error=True)
        if isinstance(drop_fraction, bool) or not 0.0 < float(drop_fraction) <= 1.0:
            raise ValueError(f"Invalid drop_fraction value: {drop_fraction}")
        if isinstance(update_end, bool) or not 0.0 < float(update_end) <= 1.0:
            raise ValueError(f"Invalid update_end value: {update_end}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer value: {type(optimizer).__name__}")
        self.masks = masks
        self.method = method
        self.total_steps = int(total_steps)
        self.update_interval = int(update_interval)
        self.drop_fraction = float(drop_fraction)
        self.update_end = float(update_end)
        self.optimizer = optimizer
        # Only SET draws random numbers; the others never touch torch's global RNG for a seed.
        if generator is None and not self.uses_random:
            generator = 0
        if isinstance(generator, int) and not isinstance(generator, bool):
            # Salt int seeds: the same seed given to apply_masks would otherwise replay the very
            # scores that chose the initial masks, and SET would regrow exactly what it dropped.
            generator = (generator * _SEED_MIX + _SEED_SALT) % 2**63
        self.generator = check_generator(generator)
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        if self.dynamic and self.update_interval >= self.update_end * self.total_steps:
            warn_at_caller(
                f"{method}: update_interval {self.update_interval} >= update_end * total_steps "
                f"({self.update_end * self.total_steps:g}): the topology never changes",
                inside=_SPARSE_DIR,
            )
        masks.request_dense_grads(
            (lambda: self.is_update_step(self.step_count + 1)) if self.needs_dense_grad else None
        )

    # ------------------------------------------------------------------ schedule
    @property
    def end_step(self) -> float:
        """Topology updates happen strictly before this step."""
        return self.update_end * self.total_steps

    def is_update_step(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the last one counted) changes the topology."""
        t = self.step_count if step is None else int(step)
        return self.dynamic and t > 0 and t % self.update_interval == 0 and t < self.end_step

    def drop_fraction_at(self, step: int) -> float:
        """Cosine-decayed drop fraction at step ``step``."""
        return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * step / self.end_step))

    @property
    def last_update(self) -> dict[str, Any] | None:
        """Summary of the last topology update (``None`` before the first)."""
        return self.history[-1] if self.history else None

    @property
    def num_updates(self) -> int:
        """Number of topology updates done so far."""
        return len(self.history)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        opts = list(self.masks.optimizers)
        if self.optimizer is not None and all(o is not self.optimizer for o in opts):
            opts.append(self.optimizer)
        return opts

    # ------------------------------------------------------------------ update
    def step(self) -> dict[str, Any] | None:
        """Count one training step; on update steps drop and regrow, returning the summary."""
        self.step_count += 1
        if not self.is_update_step():
            return None
        return self._update(self.step_count)

    def _prepare_scores(self) -> list[Tensor | None] | None:
        """Per-layer data needed by :meth:`_grow_scores` (called once per update)."""
        return None

    def _grow_scores(self, index: int, weight: Tensor, data: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def _update(self, t: int) -> dict[str, Any]:
        frac = self.drop_fraction_at(t)
        data = self._prepare_scores()
        optimizers = self._optimizers()
        per_layer: dict[str, dict[str, int]] = {}
        total_changed = 0
        total_moved = 0
        for i, (name, w, mask) in enumerate(self.masks):
            n = mask.numel()
            flat = mask.reshape(-1)
            n_active = int(flat.sum())
            k = int(frac * n_active)
            if k == 0 or n_active == n:
                per_layer[name] = {"dropped": 0, "grown": 0, "changed": 0}
                continue
            inf = torch.tensor(float("inf"), device=w.device, dtype=w.dtype)
            drop_scores = torch.where(flat, w.detach().reshape(-1).abs(), inf)
            drop_idx = torch.topk(drop_scores, k, largest=False, sorted=False).indices
            remaining = flat.clone()
            remaining[drop_idx] = False
            scores = self._grow_scores(i, w, data).reshape(-1).to(w.device, torch.float32)
            scores = torch.nan_to_num(scores, nan=-math.inf).masked_fill(remaining, -math.inf)
            grow_idx = torch.topk(scores, k, sorted=False).indices
            new = remaining.clone()
            new[grow_idx] = True
            zero_at = torch.logical_not(remaining).view(mask.shape)
            w.masked_fill_(zero_at, 0)
            if w.grad is not None:
                w.grad.masked_fill_(zero_at, 0)
            for opt in optimizers:
                state = opt.state.get(w)
                if state:
                    fill_state(state, w.shape, zero_at)
            changed = int((new & ~flat).sum())
            mask.copy_(new.view(mask.shape))
            ever = self.masks.modules[i].weight_mask_ever
            ever |= mask
            per_layer[name] = {"dropped": k, "grown": k, "changed": changed}
            total_changed += changed
            total_moved += k
        summary = {
            "step": t,
            "drop_fraction": frac,
            "dropped": total_moved,
            "grown": total_moved,
            "changed": total_changed,
            "changed_fraction": total_changed / max(1, self.masks.num_active),
            "exploration_rate": self.masks.exploration_rate,
            "per_layer": per_layer,
        }
        self.history.append(summary)
        logger.debug(
            "%s update at step %d: drop %.3f, %d moved, %d changed, exploration %.4f",
            self.method,
            t,
            frac,
            total_moved,
            total_changed,
            summary["exploration_rate"],
        )
        return summary

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (the masks themselves are in the model)."""
        return {
            "method": self.method,
            "step_count": self.step_count,
            "total_steps": self.total_steps,
            "update_interval": self.update_interval,
            "drop_fraction": self.drop_fraction,
            "update_end": self.update_end,
            "generator_state": self.generator.get_state(),
            "ever": [e.detach().cpu().clone() for e in self.masks.ever_masks()],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (after the model's masks were loaded and synced)."""
        if state_dict.get("method") != self.method:
            raise ValueError(
                f"Invalid state_dict value: method {state_dict.get('method')!r} != {self.method!r}"
            )
        ever = state_dict["ever"]
        if len(ever) != len(self.masks):
            raise ValueError(
                f"Invalid state_dict value: {len(ever)} ever-active masks for {len(self.masks)} layers"
            )
        for e, cur in zip(ever, self.masks.ever_masks()):
            if tuple(e.shape) != tuple(cur.shape):
                raise ValueError(
                    f"Invalid state_dict value: ever mask shape {tuple(e.shape)} != {tuple(cur.shape)}"
                )
        self.step_count = int(state_dict["step_count"])
        self.total_steps = int(state_dict["total_steps"])
        self.update_interval = int(state_dict["update_interval"])
        self.drop_fraction = float(state_dict["drop_fraction"])
        self.update_end = float(state_dict["update_end"])
        self.generator.set_state(state_dict["generator_state"].cpu())  # loaded onto a GPU too
        with torch.no_grad():
            for e, cur, mask in zip(ever, self.masks.ever_masks(), self.masks.masks()):
                cur.copy_(e.to(cur.device) | mask)
        self.history = [dict(h) for h in state_dict["history"]]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, total_steps={self.total_steps}, "
            f"update_interval={self.update_interval}, drop_fraction={self.drop_fraction}, "
            f"update_end={self.update_end}, step_count={self.step_count})"
        )


SchedulerBuilder = Callable[..., TopologyScheduler]
"""``builder(masks, *, method, total_steps, generator, optimizer, **options)`` -> scheduler."""

_REGISTRY: dict[str, SchedulerBuilder] = {}
_STRUCTURED: dict[tuple[str, str], SchedulerBuilder] = {}


def register_sparse_method(
    name: str, builder: SchedulerBuilder, *, structure: str = "unstructured"
) -> None:
    """Make ``name`` a sparse method of :func:`create_scheduler`, built by ``builder``.

    ``structure`` (``"filter"``, ``"channel"``) registers the builder :func:`create_scheduler`
    uses for masks of that structure (:class:`~robust_agc.sparse.StructuredMasks`) under an
    existing method name, e.g. ``rigl`` at filter granularity.
    """
    if structure != "unstructured":
        if (name, structure) in _STRUCTURED:
            raise ValueError(f"Invalid name value: {name!r} ({structure}) is already registered")
        _STRUCTURED[(name, structure)] = builder
        return
    if name in _REGISTRY:
        raise ValueError(f"Invalid name value: sparse method {name!r} is already registered")
    _REGISTRY[name] = builder


def structured_methods(structure: str) -> list[str]:
    """The sparse methods that support masks of ``structure`` (all of them for unstructured)."""
    if structure == "unstructured":
        return list_sparse_methods()
    return [n for n, s in _STRUCTURED if s == structure]


def list_sparse_methods() -> list[str]:
    """Names accepted by :func:`create_scheduler`, in registration order."""
    return list(_REGISTRY)


def create_scheduler(
    method: str,
    masks: SparseMasks,
    *,
    total_steps: int,
    generator: torch.Generator | int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> TopologyScheduler:
    """Build the topology scheduler ``method`` for ``masks``.

    Args:
        method: one of :func:`list_sparse_methods`: ``static``, ``set``, ``rigl``, ``itop-set``,
            ``itop-rigl``, ``bsr``.
        masks: from :func:`~robust_agc.sparse.apply_masks` (attach it to the optimizer first);
            structured masks (:func:`~robust_agc.sparse.apply_structured_masks`) take the
            method's structured builder (``static``, ``rigl``; :func:`structured_methods`).
        total_steps: the number of training (optimizer) steps of the run.
        generator: CPU generator or int seed for the method's random draws (its state is
            checkpointed); an int seed is salted, so reusing apply_masks' seed is safe; ``None``
            draws a seed from torch's global RNG.
        optimizer: whose same-shaped state is zeroed at dropped/regrown positions (the masks'
            attached optimizers are always included); required by ``bsr``.
        **options: the method's own options. Drop-and-grow methods: ``update_interval``,
            ``drop_fraction``, ``update_end`` (``None`` or absent takes the method's default from
            :data:`SPARSE_METHOD_DEFAULTS`: 100 / 0.3 / 0.75 for SET and RigL; ITOP 1500 or 4000
            / 0.5 / 1.0). ``bsr``: ``n_train`` (required), ``noise``, ``noise_form``,
            ``noise_milestone``, ``noise_factor``, ``weight_decay``, ``init_theta``,
            ``history_interval`` (see :class:`~robust_agc.sparse.BSRScheduler`).
    """
    if method not in _REGISTRY:
        raise ValueError(
            f"Invalid method value: {method!r} (choose from {', '.join(list_sparse_methods())})"
        )
    builder = _REGISTRY[method]
    structure = getattr(masks, "structure", "unstructured")
    if structure != "unstructured":
        if (method, structure) not in _STRUCTURED:
            raise ValueError(
                f"Invalid method value: {method!r} with {structure} masks (choose from "
                f"{', '.join(structured_methods(structure))})"
            )
        builder = _STRUCTURED[(method, structure)]
    return builder(
        masks,
        method=method,
        total_steps=total_steps,
        generator=generator,
        optimizer=optimizer,
        **options,
    )
