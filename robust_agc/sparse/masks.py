"""Sparsity masks as bool buffers on the modules that own the weights, and their enforcement.

Conventions (``docs/protocols.md``, section 3):

- Masked weights: the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (subclasses
  included); never biases or normalization layers. Each owner module gets a persistent bool buffer
  ``weight_mask`` (so ``state_dict()``, ``.to()`` and DDP carry it) and a non-persistent bool
  buffer ``weight_mask_ever`` (positions that were ever active, for the exploration rate; its
  checkpointed copy lives in the topology scheduler's ``state_dict``).
- :class:`SparseMasks` keeps the owner modules and reads ``module.weight`` /
  ``module.weight_mask`` on every use, so ``.to()``, ``load_state_dict`` and buffer replacement
  cannot leave it with stale masks.
- Enforcement through optimizer hooks (never by replacing ``optimizer.step``): the pre-hook zeroes
  ``p.grad`` and every tensor in ``optimizer.state[p]`` shaped like ``p`` at pruned positions; the
  post-hook zeroes the weights and those state tensors again. Zeroing has ``torch.where``
  semantics (assignment, not multiplication), so NaN/inf at pruned positions cannot leak. The hot
  path does it as a bitwise AND of the tensor's bits (an integer view) with a cached all-ones /
  all-zeros integer mask: exact, NaN-safe, and ~6x faster than ``masked_fill_`` with a bool mask
  on CPU. The cache is keyed on the mask tensor's identity and in-place version counter, so
  ``load_state_dict``, scheduler updates, ``.to()`` and buffer replacement all invalidate it.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .distributions import DISTRIBUTIONS, layer_counts

__all__ = [
    "MASK_BUFFER",
    "EVER_BUFFER",
    "MASKABLE_TYPES",
    "check_mask_args",
    "SchedulerView",
    "SparseMasks",
    "apply_masks",
    "check_generator",
    "fill_state",
    "maskable_modules",
    "training_flops_ratio",
]

logger = logging.getLogger(__name__)

#: Name of the persistent bool buffer holding a layer's mask.
MASK_BUFFER = "weight_mask"
#: Name of the non-persistent bool buffer of positions that were ever active.
EVER_BUFFER = "weight_mask_ever"
_INT_OF_SIZE: dict[int, torch.dtype] = {
    1: torch.int8,
    2: torch.int16,
    4: torch.int32,
    8: torch.int64,
}

#: Module types whose ``weight`` is masked.
MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def maskable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every conv/linear layer with a weight, in registration order."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MASKABLE_TYPES) and isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"Invalid model value: lazy module {name!r} is not initialised "
                    "(run one forward pass before masking)"
                )
            out.append((name, module))
    return out


def training_flops_ratio(
    method: str, sparse_flops: float, dense_flops: float, interval: int
) -> float:
    """Training FLOPs of a sparse method relative to dense training (RigL, Evci et al. 2020, App. H).

    ``f_S``/``f_D`` are the sparse/dense inference FLOPs. Dense training costs ``3 f_D`` per step
    (forward + two backward products). Static and SET cost ``3 f_S``. RigL adds a dense gradient
    every ``interval`` steps: ``(3 f_S dT + 2 f_S + f_D) / (dT + 1)``.
    """
    if dense_flops <= 0:
        raise ValueError(f"Invalid dense_flops value: {dense_flops}")
    base = method.removeprefix("itop-")
    if base == "rigl":
        dt = float(interval)
        cost = (3.0 * sparse_flops * dt + 2.0 * sparse_flops + dense_flops) / (dt + 1.0)
    elif base in ("static", "set", "bsr"):
        cost = 3.0 * sparse_flops
    else:
        raise ValueError(f"Invalid method value: {method!r}")
    return cost / (3.0 * dense_flops)


class SchedulerView(Protocol):
    """What :meth:`SparseMasks.report` reads of a topology scheduler."""

    method: str
    update_interval: int

    @property
    def last_update(self) -> dict[str, Any] | None: ...

    @property
    def num_updates(self) -> int: ...


def check_generator(generator: object) -> torch.Generator:
    """A CPU generator from ``generator``: itself (CPU only), seeded from an int, or (``None``)
    seeded from torch's global RNG; ``TypeError``/``ValueError`` otherwise."""
    if generator is None:
        # Seed from torch's global RNG, so torch.manual_seed governs it (never the clock).
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator().manual_seed(seed)
    if isinstance(generator, bool):
        raise TypeError(f"Invalid generator value: {generator!r}")
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"Invalid generator value: a {generator.device} generator (need cpu)")
        return generator
    raise TypeError(f"Invalid generator value: {generator!r} (expected torch.Generator or int)")


class SparseMasks:
    """The masks of a model: views on ``weight_mask`` buffers, hooks, statistics and export helpers.

    Build with :func:`apply_masks` (new masks) or :meth:`from_model` (existing buffers, e.g. after
    ``load_state_dict``). Masks and weights are read from the modules on every use; the only
    cache (integer masks for the hooks) is checked against each mask's identity and in-place
    version counter, so the object stays valid across ``model.to(device)``, ``load_state_dict``
    and buffer replacement. (Edits through ``mask.data`` bypass the version counter: call
    :meth:`sync_from_buffers` after those.)

    Example::

        masks = apply_masks(model, sparsity=0.9, distribution="erk")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        masks.attach(opt)
        sched = create_scheduler("rigl", masks, total_steps=10_000, optimizer=opt)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[tuple[str, nn.Module]],
        *,
        distribution: str | None = None,
        target_density: float | None = None,
    ) -> None:
        if len(layers) == 0:
            raise ValueError("Invalid layers value: [] (no masked layers)")
        for name, module in layers:
            mask = getattr(module, MASK_BUFFER, None)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"Invalid layer value: {name!r} has no bool {MASK_BUFFER} buffer")
            if mask.shape != module.weight.shape:
                raise ValueError(
                    f"Invalid layer value: {name!r} mask shape {tuple(mask.shape)} != weight "
                    f"shape {tuple(module.weight.shape)}"
                )
        self.model = model
        self.names: list[str] = [n for n, _ in layers]
        self.modules: list[nn.Module] = [m for _, m in layers]
        self.distribution = distribution
        self.target_density = target_density
        self._dense_grad_request: Callable[[], bool] | None = None
        self._dense_grads: list[Tensor | None] | None = None
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._handles: dict[int, list[RemovableHandle]] = {}
        self._int_masks: dict[tuple[int, int], tuple[Tensor, int, Tensor]] = {}
        for m in self.modules:
            if getattr(m, EVER_BUFFER, None) is None:
                m.register_buffer(EVER_BUFFER, m.weight_mask.clone(), persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module) -> SparseMasks:
        """Rebuild from the ``weight_mask`` buffers already on ``model`` (e.g. a loaded checkpoint)."""
        layers = [(n, m) for n, m in model.named_modules() if hasattr(m, MASK_BUFFER)]
        if not layers:
            raise ValueError(f"Invalid model value: no module has a {MASK_BUFFER!r} buffer")
        obj = cls(model, layers)
        obj.sync_from_buffers()
        return obj

    def sync_from_buffers(self) -> None:
        """Re-validate after the buffers were overwritten (``load_state_dict``) and re-apply them.

        Zeroes weights at pruned positions and resets the ever-active record to the current masks
        (restore it with the scheduler's ``load_state_dict`` afterwards).
        """
        for name, m in zip(self.names, self.modules):
            mask = getattr(m, MASK_BUFFER, None)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"Invalid mask value: {name!r} has no bool {MASK_BUFFER} buffer")
            if mask.shape != m.weight.shape:
                raise ValueError(
                    f"Invalid mask value: {name!r} shape {tuple(mask.shape)} != "
                    f"{tuple(m.weight.shape)}"
                )
            if mask.device != m.weight.device:
                setattr(m, MASK_BUFFER, mask.to(m.weight.device))
            m.register_buffer(EVER_BUFFER, m.weight_mask.clone(), persistent=False)
        self._int_masks.clear()
        self.apply_()

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """Yield ``(name, weight, mask)`` per masked layer."""
        for name, m in zip(self.names, self.modules):
            yield name, m.weight, getattr(m, MASK_BUFFER)

    def weights(self) -> list[nn.Parameter]:
        """The masked weight parameters, in layer order."""
        return [m.weight for m in self.modules]

    def masks(self) -> list[Tensor]:
        """The current mask tensors (the live buffers), in layer order."""
        return [getattr(m, MASK_BUFFER) for m in self.modules]

    def ever_masks(self) -> list[Tensor]:
        """Bool tensors of positions that were ever active, in layer order."""
        return [getattr(m, EVER_BUFFER) for m in self.modules]

    @property
    def num_maskable(self) -> int:
        """Number of weights in the masked layers."""
        return sum(m.weight.numel() for m in self.modules)

    @property
    def num_active(self) -> int:
        """Number of active (unpruned) weights."""
        return int(sum(int(mask.sum()) for mask in self.masks()))

    @property
    def density(self) -> float:
        """Global density over the masked layers' weights."""
        return self.num_active / self.num_maskable

    @property
    def exploration_rate(self) -> float:
        """Fraction of the masked layers' weights that were ever active (ITOP)."""
        return sum(int(e.sum()) for e in self.ever_masks()) / self.num_maskable

    def layer_densities(self) -> dict[str, float]:
        """Density of each masked layer by qualified module name."""
        return {n: float(mask.float().mean()) for n, _, mask in self}

    # ------------------------------------------------------------------ enforcement
    def apply_(self) -> None:
        """Zero the weights at pruned positions (in place)."""
        with torch.no_grad():
            for m in self.modules:
                m.weight.masked_fill_(torch.logical_not(getattr(m, MASK_BUFFER)), 0)

    def zero_optimizer_state_(
        self, optimizer: torch.optim.Optimizer, where: Sequence[Tensor] | None = None
    ) -> None:
        """Zero every tensor in ``optimizer.state[p]`` shaped like ``p`` where ``where`` is True.

        ``where`` defaults to the pruned positions (``~mask``) of each layer.
        """
        with torch.no_grad():
            for i, m in enumerate(self.modules):
                state = optimizer.state.get(m.weight)
                if not state:
                    continue
                zero_at = torch.logical_not(getattr(m, MASK_BUFFER)) if where is None else where[i]
                fill_state(state, m.weight.shape, zero_at)

    def attach(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Enforce the masks on ``optimizer`` with step pre/post hooks; returns the two handles.

        Pre-hook: stash the dense gradients when a topology scheduler asks for them (RigL, on its
        update steps, before any masking), then zero ``p.grad`` and every same-shaped state tensor
        at pruned positions. Post-hook: zero the weights and same-shaped state at pruned positions.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer value: {type(optimizer).__name__}")
        key = id(optimizer)
        if key in self._handles and any(r() is optimizer for r in self._optimizers):
            warnings.warn("masks are already attached to this optimizer", stacklevel=2)
            return self._handles[key]
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(w) in owned for w in self.weights()):
            warnings.warn(
                "the optimizer holds none of the masked weights; attaching anyway", stacklevel=2
            )
        handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._optimizers.append(weakref.ref(optimizer))
        self._handles[key] = handles
        return handles

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the hooks that :meth:`attach` put on ``optimizer``."""
        for h in self._handles.pop(id(optimizer), []):
            h.remove()
        self._optimizers = [r for r in self._optimizers if r() not in (None, optimizer)]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers the masks are attached to (still alive)."""
        return [o for o in (r() for r in self._optimizers) if o is not None]

    def _int_mask(self, index: int, mask: Tensor, itemsize: int) -> Tensor:
        """Cached ``-mask`` as an integer tensor of ``itemsize`` bytes (all bits set where True)."""
        key = (index, itemsize)
        hit = self._int_masks.get(key)
        if hit is not None and hit[0] is mask and hit[1] == mask._version:
            return hit[2]
        imask = mask.to(_INT_OF_SIZE[itemsize]).neg_()
        self._int_masks[key] = (mask, mask._version, imask)
        return imask

    def _zero_pruned_(self, index: int, mask: Tensor, t: Tensor) -> None:
        """``t[~mask] = 0`` in place, NaN-safe (``where`` semantics); call under no_grad."""
        size = t.element_size()
        if (
            (t.is_floating_point() or t.is_complex())
            and size in _INT_OF_SIZE
            and t.device == mask.device
            and t.layout == torch.strided
        ):
            t.view(_INT_OF_SIZE[size]).bitwise_and_(self._int_mask(index, mask, size))
            return
        t.masked_fill_(torch.logical_not(mask.to(t.device)), 0)

    def _enforce(self, optimizer: torch.optim.Optimizer, *, weights: bool, grads: bool) -> None:
        with torch.no_grad():
            for i, m in enumerate(self.modules):
                p = m.weight
                mask = getattr(m, MASK_BUFFER)
                if weights:
                    self._zero_pruned_(i, mask, p)
                if grads and p.grad is not None:
                    self._zero_pruned_(i, mask, p.grad)
                state = optimizer.state.get(p)
                if state:
                    for v in state.values():
                        if isinstance(v, Tensor) and v.shape == p.shape:
                            self._zero_pruned_(i, mask, v)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._dense_grad_request is not None and self._dense_grad_request():
            self._dense_grads = [
                None if w.grad is None else w.grad.detach().clone() for w in self.weights()
            ]
        self._enforce(optimizer, weights=False, grads=True)

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._enforce(optimizer, weights=True, grads=False)

    def request_dense_grads(self, request: Callable[[], bool] | None) -> None:
        """Set the predicate the pre-hook asks before stashing dense gradients (``None``: never)."""
        self._dense_grad_request = request
        self._dense_grads = None

    def pop_dense_grads(self) -> list[Tensor | None] | None:
        """Return and forget the dense gradients stashed by the last pre-hook that stashed."""
        out, self._dense_grads = self._dense_grads, None
        return out

    # ------------------------------------------------------------------ FLOPs and report
    def flops(self, input_shape: Sequence[int]) -> dict[str, Any]:
        """Inference FLOPs of the model's conv/linear layers, dense and with the masks.

        A multiply-add counts as 2 FLOPs; biases, normalization and activations are not counted.
        Computed with forward hooks on one sample of shape ``input_shape`` (no batch dimension),
        in eval mode (the model's mode is restored).

        Returns:
            ``{"dense": f_D, "sparse": f_S, "ratio": f_S / f_D, "per_layer": {name: (f_D, f_S)}}``
        """
        with torch.no_grad():
            shape = tuple(input_shape)
            if len(shape) == 0 or any(not isinstance(s, int) or s <= 0 for s in shape):
                raise ValueError(f"Invalid input_shape value: {input_shape}")
            per_layer: dict[str, tuple[float, float]] = {}
            hooks = []

            def make_hook(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
                def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
                    w = module.weight
                    n_out = w.shape[0]
                    # Linear (..., out) and conv (N, out, *spatial): output elements per weight row.
                    positions = output.numel() / n_out
                    mask = getattr(module, MASK_BUFFER, None)
                    active = w.numel() if mask is None else int(mask.sum())
                    dense = 2.0 * positions * w.numel()
                    sparse = 2.0 * positions * active
                    old = per_layer.get(name, (0.0, 0.0))
                    per_layer[name] = (old[0] + dense, old[1] + sparse)

                return hook

            for name, module in maskable_modules(self.model):
                hooks.append(module.register_forward_hook(make_hook(name)))
            was_training = self.model.training
            try:
                ref = self.weights()[0]
                x = torch.zeros((1, *shape), device=ref.device, dtype=ref.dtype)
                self.model.eval()
                self.model(x)
            finally:
                self.model.train(was_training)
                for h in hooks:
                    h.remove()
            f_d = sum(v[0] for v in per_layer.values())
            f_s = sum(v[1] for v in per_layer.values())
            if f_d == 0:
                raise ValueError(
                    "Invalid model value: no conv/linear layer ran in the forward pass"
                )
            return {"dense": f_d, "sparse": f_s, "ratio": f_s / f_d, "per_layer": per_layer}

    def report(
        self,
        input_shape: Sequence[int] | None = None,
        *,
        scheduler: SchedulerView | None = None,
    ) -> dict[str, Any]:
        """Summary statistics of the masks (and of their topology ``scheduler``, if given).

        Keys: ``density`` (global over masked weights), ``num_active``, ``num_maskable``,
        ``layer_densities``, ``exploration_rate``, ``method``, ``last_update`` (the scheduler's last
        topology update: step, drop fraction, changed positions, or ``None``), ``num_updates``; with
        ``input_shape`` also ``flops_dense``, ``flops_sparse``, ``flops_ratio`` (inference) and
        ``train_flops_ratio`` (RigL's formulas, relative to dense training).
        """
        sched = scheduler
        out: dict[str, Any] = {
            "density": self.density,
            "num_active": self.num_active,
            "num_maskable": self.num_maskable,
            "layer_densities": self.layer_densities(),
            "exploration_rate": self.exploration_rate,
            "method": None if sched is None else sched.method,
            "last_update": None if sched is None else sched.last_update,
            "num_updates": 0 if sched is None else sched.num_updates,
        }
        if input_shape is not None:
            f = self.flops(input_shape)
            out["flops_dense"] = f["dense"]
            out["flops_sparse"] = f["sparse"]
            out["flops_ratio"] = f["ratio"]
            method = "static" if sched is None else sched.method
            interval = 1 if sched is None else sched.update_interval
            out["train_flops_ratio"] = training_flops_ratio(
                method, f["sparse"], f["dense"], interval
            )
        return out

    # ------------------------------------------------------------------ distributed
    def broadcast_(self, src: int = 0) -> None:
        """Broadcast the masks from rank ``src`` and re-apply them (no-op without torch.distributed)."""
        with torch.no_grad():
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return
            for m in self.modules:
                mask = getattr(m, MASK_BUFFER)
                buf = mask.to(torch.uint8)
                torch.distributed.broadcast(buf, src=src)
                mask.copy_(buf.bool())
            self.apply_()

    def masks_equal_across_ranks(self) -> bool:
        """True when every rank holds the same masks (always True without torch.distributed)."""
        with torch.no_grad():
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return True
            flat = torch.cat([mask.reshape(-1).to(torch.int32) for mask in self.masks()])
            hi, lo = flat.clone(), flat.clone()
            torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
            return bool(torch.equal(hi, lo))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self)}, density={self.density:.4f}, "
            f"distribution={self.distribution!r})"
        )


def fill_state(state: dict[str, Any], shape: torch.Size, zero_at: Tensor) -> None:
    """Zero every tensor of one parameter's optimizer ``state`` shaped ``shape`` where ``zero_at``
    is True (any optimizer: momentum, AGC's snapshot and full gradient, Adam's moments...)."""
    for v in state.values():
        if isinstance(v, Tensor) and v.shape == shape:
            v.masked_fill_(zero_at, 0)


def check_mask_args(model: nn.Module, sparsity: float, distribution: str) -> None:
    """The checks every mask builder makes of its model, sparsity and layer distribution.

    Raises:
        TypeError: ``model`` is not a module, or ``sparsity`` not a number.
        ValueError: ``sparsity`` outside ``[0, 1)``, or an unknown ``distribution``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model value: {type(model).__name__} (expected nn.Module)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"Invalid sparsity value: {sparsity!r} (expected a float)")
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise ValueError(f"Invalid sparsity value: {sparsity}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"Invalid distribution value: {distribution!r} (choose from {', '.join(DISTRIBUTIONS)})"
        )


def apply_masks(
    model: nn.Module,
    *,
    sparsity: float,
    distribution: str = "erk",
    dense_first_layer: bool = False,
    skip_last: bool = False,
    rescale_init: bool = True,
    generator: torch.Generator | int | None = None,
) -> SparseMasks:
    """Register random masks with exact per-layer counts on ``model`` and zero pruned weights.

    Args:
        model: the network; every ``nn.Conv1d/2d/3d`` / ``nn.Linear`` weight is masked.
        sparsity: fraction of the masked weights that are pruned, in ``[0, 1)``.
        distribution: per-layer allocation: ``"uniform"``, ``"er"`` or ``"erk"`` (see
            :mod:`robust_agc.sparse.distributions`).
        dense_first_layer: leave the first conv/linear layer (registration order) unmasked.
        skip_last: leave the last conv/linear layer (registration order) unmasked.
            Unmasked layers are excluded from the budget: ``sparsity`` applies to the masked ones.
        rescale_init: multiply surviving weights by ``1 / sqrt(layer density)`` (the sparse layer's
            effective fan-in, ``docs/protocols.md`` section 3); the base init (He-normal) is the model's.
        generator: CPU ``torch.Generator`` or int seed for the random scores; ``None`` draws a seed
            from torch's global RNG.

    Returns:
        The :class:`SparseMasks` view of the registered ``weight_mask`` buffers. Each layer's mask
        is the top-``k`` of uniform random scores (``k`` from
        :func:`~robust_agc.sparse.distributions.layer_counts`), never Bernoulli.
    """
    check_mask_args(model, sparsity, distribution)
    gen = check_generator(generator)
    layers = maskable_modules(model)
    for name, m in layers:
        if hasattr(m, MASK_BUFFER):
            raise ValueError(
                f"Invalid model value: {name!r} already has a {MASK_BUFFER!r} buffer "
                "(use SparseMasks.from_model)"
            )
    if dense_first_layer and layers:
        layers = layers[1:]
    if skip_last and layers:
        layers = layers[:-1]
    if not layers:
        raise ValueError("Invalid model value: no conv/linear weight left to mask")
    if sparsity > 0.99:
        warnings.warn(f"sparsity {sparsity} leaves under 1% of the weights", stacklevel=2)
    density = 1.0 - float(sparsity)
    shapes = [tuple(m.weight.shape) for _, m in layers]
    counts = layer_counts(shapes, density, distribution)
    with torch.no_grad():
        _register(layers, counts, gen, rescale_init, sparsity)
    masks = SparseMasks(model, layers, distribution=distribution, target_density=density)
    masks.apply_()
    logger.info(
        "applied %s masks to %d layers: density %.4f (%d/%d)",
        distribution,
        len(masks),
        masks.density,
        masks.num_active,
        masks.num_maskable,
    )
    return masks


def _register(
    layers: Sequence[tuple[str, nn.Module]],
    counts: Sequence[int],
    gen: torch.Generator,
    rescale_init: bool,
    sparsity: float,
) -> None:
    for (name, m), k in zip(layers, counts):
        w = m.weight
        n = w.numel()
        if k == 0:
            warnings.warn(
                f"layer {name!r} gets no active weight at sparsity {sparsity}", stacklevel=3
            )
        scores = torch.rand(n, generator=gen)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.topk(scores, k, sorted=False).indices] = True
        mask = flat.view(w.shape).to(w.device)
        m.register_buffer(MASK_BUFFER, mask, persistent=True)
        m.register_buffer(EVER_BUFFER, mask.clone(), persistent=False)
        d = k / n
        if rescale_init and 0 < d < 1:
            w.mul_(1.0 / math.sqrt(d))
        logger.debug("masked %s: %d/%d active (%.4f)", name, k, n, d)
