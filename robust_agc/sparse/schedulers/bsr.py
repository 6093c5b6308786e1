"""BSR-Net as a sparse method: Bayesian connectivity sampling with a fixed global connection budget.

Method: Ozdenizci & Legenstein, "Training Adversarially Robust Sparse Networks via Bayesian
Connectivity Sampling", ICML 2021 (public code: TensorFlow, ``IGITUGraz/SparseAdversarialTraining``),
itself built on DEEP R (Bellec et al. 2018). Each masked weight is ``w = sign * theta`` with a fixed
random ``sign``; the connection is active while ``theta > 0``. After every optimizer step, on the
active ``theta``:

1. decoupled weight decay (SGDW): ``theta *= 1 - lr * weight_decay``;
2. Langevin noise: ``theta += std * N(0, 1)`` with ``std = sqrt(2 * lr * T / N) * noise``
   (``noise_form="langevin"``, ``N`` = training-set size, ``T`` the temperature multiplier of the
   schedule) or ``std = lr * noise * sqrt(T)`` (``noise_form="release"``: what the public code does,
   with ``noise = 1e-6`` there);
3. every connection whose ``theta <= 0`` (NaN included) is removed: mask False, weight 0, optimizer
   state 0;
4. as many inactive positions as needed to restore the global budget are re-activated, drawn
   uniformly without replacement among *all* inactive positions of all masked layers, with
   ``theta = init_theta`` (default ``1e-12`` as in the public code) and zero optimizer state.

The model's weight tensor holds the effective weight ``w = sign * theta`` (``theta = sign * w > 0``
where active, ``w = 0`` elsewhere). Because ``sign`` is fixed per position,
``dL/dtheta = sign * dL/dw`` and any coordinate-wise optimizer (SGD, momentum, Nesterov, AGC's
control variate, Adam) applied to ``w`` performs exactly the same update on ``theta``: the existing
:class:`~robust_agc.sparse.SparseMasks` hooks and optimizers work unchanged. The signs are a
non-persistent ``int8`` buffer ``weight_sign`` (values +-1) on each masked module (so ``.to()``
carries them and ``model.state_dict()`` keeps the same keys as every other sparse method); the
checkpointed copy lives in :meth:`BSRScheduler.state_dict`.

Departures from the public code (deliberate, documented):

- the budget is restored exactly after every step (the public code distributes the re-activations
  over layers by a multinomial proportional to layer size and can fall short in a full layer);
  here the draw is uniform over all inactive positions, which is the same in expectation up to
  the layers' current densities;
- optimizer state is zero at inactive positions (project convention); in the public code the
  momentum of a disconnected ``theta`` keeps running;
- the weight decay is applied after the gradient step (``(w - lr v)(1 - lr wd)``) instead of before
  it (``w (1 - wd') - lr v``), an ``O(lr^2 wd)`` difference. tfa's SGDW decays by ``wd'`` per step
  *without* the learning rate, and the public code schedules ``wd'`` with the learning rate
  (``wd' = wd_0 * lr_t / lr_0``): its ``-wd 5e-4`` (``1e-3`` in its scripts) at ``lr_0 = 0.1`` is
  ``weight_decay = 5e-3`` (``1e-2``) here.

Noise schedule: the public code's noise std is ``lr_t * 1e-6`` (it shrinks with the step-decayed
learning rate; it is never raised). The option ``noise_milestone``/``noise_factor`` multiplies the
temperature by ``noise_factor`` once ``step > noise_milestone * total_steps`` (std by
``sqrt(noise_factor)``), for the "raise it later in training" variant.

With a corrected optimizer (AGC or SVRG, see ``docs/agc.md``), positions re-activated since the
optimizer's last refresh have no valid snapshot full gradient ``mu`` (it was zeroed while they were
inactive), so the scheduler's optimizer pre-hook drops the correction there
(:meth:`~robust_agc.optim.CorrectedOptimizer.drop_correction_`): the step uses the plain gradient
at those positions until the next refresh, instead of a biased ``-c * g_B(ws)``.

Registered as the sparse method ``bsr`` of :func:`~robust_agc.sparse.create_scheduler`.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ...optim import is_corrected
from ...utils.validation import check_int, check_real
from ..masks import EVER_BUFFER, MASK_BUFFER, SparseMasks, apply_masks
from .base import TopologyScheduler, register_sparse_method

__all__ = ["SIGN_BUFFER", "NOISE_FORMS", "BSRScheduler", "build_bsr", "create_bsr"]

logger = logging.getLogger(__name__)

#: Name of the non-persistent int8 buffer (+1/-1) of each masked module's fixed signs.
SIGN_BUFFER = "weight_sign"
#: Accepted ``noise_form`` values.
NOISE_FORMS: tuple[str, ...] = ("langevin", "release")


class BSRScheduler(TopologyScheduler):
    """BSR-Net connectivity sampling; call :meth:`step` right after every ``optimizer.step()``.

    Args:
        masks: from :func:`~robust_agc.sparse.apply_masks` (attached to ``optimizer``; the initial
            masks set the global budget ``masks.num_active``, which is kept exactly).
        optimizer: the optimizer of the masked weights; the learning rate of each weight's param
            group at the step is read by a step post-hook, and its same-shaped state is zeroed at
            removed and re-activated positions. Give it ``weight_decay=0`` for the masked weights
            (the decay is decoupled and done here; a non-zero value warns).
        total_steps: number of training steps (for the noise milestone).
        n_train: training-set size ``N`` of the Langevin scale ``sqrt(2 lr / N)``.
        noise: ``sigma``, the noise scale (``--bsr-noise``); 0 disables the noise.
        noise_form: ``"langevin"`` (``std = sqrt(2 lr T / N) * noise``) or ``"release"``
            (``std = lr * noise * sqrt(T)``, the public code with ``noise=1e-6``).
        noise_milestone: fraction of ``total_steps`` after which the temperature ``T`` is
            multiplied by ``noise_factor`` (``None``: constant ``T = 1``).
        noise_factor: temperature multiplier after the milestone.
        weight_decay: decoupled decay ``theta *= 1 - lr * weight_decay`` on active ``theta``.
        init_theta: ``theta`` of re-activated connections (small, positive).
        generator: CPU generator or int seed (salted) for signs, noise and re-activation; its
            state is in :meth:`state_dict`. ``None`` draws a seed from torch's global RNG.
        history_interval: one :attr:`history` entry summarises this many steps.

    ``method`` is ``"bsr"``; :attr:`last_update` is the last step's summary (removed /
    re-activated counts per layer, layer densities, noise std, temperature).
    """

    uses_random = True

    def __init__(
        self,
        masks: SparseMasks,
        *,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        n_train: int,
        noise: float = 1.0,
        noise_form: str = "langevin",
        noise_milestone: float | None = None,
        noise_factor: float = 1.0,
        weight_decay: float = 0.0,
        init_theta: float = 1e-12,
        generator: torch.Generator | int | None = None,
        history_interval: int = 100,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer value: {type(optimizer).__name__}")
        check_int("n_train", n_train, minimum=1, type_error=True)
        check_int("history_interval", history_interval, minimum=1, type_error=True)
        noise_v = check_real("noise", noise, type_error=True)
        if noise_form not in NOISE_FORMS:
            raise ValueError(f"Invalid noise_form value: {noise_form!r} (one of {NOISE_FORMS})")
        if noise_milestone is not None:
            ms = check_real("noise_milestone", noise_milestone, type_error=True)
            if ms > 1.0:
                raise ValueError(f"Invalid noise_milestone value: {noise_milestone}")
        factor = check_real("noise_factor", noise_factor, type_error=True)
        wd = check_real("weight_decay", weight_decay, type_error=True)
        theta0 = check_real("init_theta", init_theta, open_minimum=True, type_error=True)
        super().__init__(
            masks,
            method="bsr",
            total_steps=total_steps,
            update_interval=1,
            drop_fraction=1.0,
            update_end=1.0,
            generator=generator,
            optimizer=optimizer,
        )
        _check_optimizer_groups(masks, optimizer, wd)
        if noise_milestone is None and factor != 1.0:
            warnings.warn("bsr: noise_factor has no effect without noise_milestone", stacklevel=2)
        self.n_train = int(n_train)
        self.noise = noise_v
        self.noise_form = noise_form
        self.noise_milestone = None if noise_milestone is None else float(noise_milestone)
        self.noise_factor = factor
        self.weight_decay = wd
        self.init_theta = theta0
        self.history_interval = int(history_interval)
        self._init_counters(optimizer)
        with torch.no_grad():
            self._init_signs()
            self._fresh = [torch.zeros_like(mask) for mask in masks.masks()]
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    def _init_counters(self, optimizer: torch.optim.Optimizer) -> None:
        """The budget (the masks' current active count) and the rewiring counters."""
        self.budget = self.masks.num_active
        self.total_removed = 0
        self.total_reactivated = 0
        self._last_step: dict[str, Any] | None = None
        self._window = {"removed": 0, "reactivated": 0, "steps": 0}
        self._step_lrs: list[float] | None = None
        self._warned_lr = False
        # decided once: the step pre-hook runs every step (a Protocol isinstance costs ~25 us)
        self._corrected = is_corrected(optimizer)
        self._refreshes_seen = int(optimizer.num_refreshes) if self._corrected else None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ set-up
    def _init_signs(self) -> None:
        """Signs from the initial weights where active (random where 0), random elsewhere."""
        n_zero = 0
        for m in self.masks.modules:
            w, mask = m.weight, getattr(m, MASK_BUFFER)
            rand = torch.randint(0, 2, tuple(w.shape), generator=self.generator, dtype=torch.int8)
            rand = (rand * 2 - 1).to(w.device)
            sign = torch.where(w > 0, 1, torch.where(w < 0, -1, rand)).to(torch.int8)
            sign = torch.where(mask, sign, rand)
            m.register_buffer(SIGN_BUFFER, sign, persistent=False)
            # Zero-initialised (or exactly zero) active weights would have theta = 0, i.e. be
            # disconnected at the first step: start them at init_theta instead.
            zero_active = mask & (w == 0)
            n_zero += int(zero_active.sum())
            w.copy_(torch.where(zero_active, sign.to(w.dtype) * self.init_theta, w))
        if n_zero:
            logger.info("bsr: %d active weights were exactly 0; set to theta=init_theta", n_zero)

    def signs(self) -> list[Tensor]:
        """The fixed sign buffers (int8, +1/-1), in layer order."""
        return [getattr(m, SIGN_BUFFER) for m in self.masks.modules]

    def thetas(self) -> list[Tensor]:
        """``theta = sign * w`` per layer (a new tensor; 0 at inactive positions)."""
        return [
            m.weight.detach() * s.to(m.weight.dtype)
            for m, s in zip(self.masks.modules, self.signs())
        ]

    def remove_hooks(self) -> None:
        """Remove the optimizer hooks this scheduler registered."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """AGC/SVRG: no control variate at positions re-activated since the last refresh."""
        if not self._corrected:
            return
        n = int(optimizer.num_refreshes)  # type: ignore[attr-defined]
        if n != self._refreshes_seen:
            self._refreshes_seen = n
            for f in self._fresh:
                f.zero_()
            return
        for m, fresh in zip(self.masks.modules, self._fresh):
            optimizer.drop_correction_(m.weight, fresh)  # type: ignore[attr-defined]

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Record the learning rate each masked weight was just updated with."""
        self._step_lrs = self._current_lrs(optimizer)

    def _current_lrs(self, optimizer: torch.optim.Optimizer) -> list[float]:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        return [float(groups[id(w)]["lr"]) for w in self.masks.weights()]

    # ------------------------------------------------------------------ schedule
    def is_update_step(self, step: int | None = None) -> bool:
        """Every step rewires (BSR samples the connectivity after each update)."""
        t = self.step_count if step is None else int(step)
        return t > 0

    def temperature_at(self, step: int) -> float:
        """Temperature multiplier ``T`` at step ``step`` (1-based)."""
        if self.noise_milestone is not None and step > self.noise_milestone * self.total_steps:
            return self.noise_factor
        return 1.0

    def noise_std(self, lr: float, step: int) -> float:
        """Standard deviation of the noise added to each active ``theta`` at ``step``."""
        temp = self.temperature_at(step)
        if self.noise_form == "langevin":
            return math.sqrt(2.0 * lr * temp / self.n_train) * self.noise
        return lr * self.noise * math.sqrt(temp)

    @property
    def last_update(self) -> dict[str, Any] | None:
        """Summary of the last step (``None`` before the first)."""
        return self._last_step

    @property
    def num_updates(self) -> int:
        """Number of sampling steps done (every step is one)."""
        return self.step_count

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """Decay, noise, remove ``theta <= 0``, re-activate to the budget; returns the summary."""
        self.step_count += 1
        t = self.step_count
        if self._step_lrs is not None:
            lrs = self._step_lrs
        else:
            if not self._warned_lr:
                warnings.warn(
                    "bsr: step() without optimizer.step() since the last call; using the "
                    "optimizer's current learning rates",
                    stacklevel=2,
                )
                self._warned_lr = True
            lrs = self._current_lrs(self.optimizer)  # type: ignore[arg-type]
        self._step_lrs = None
        optimizers = self._optimizers()
        gen = self.generator
        removed: list[int] = []
        stds: list[float] = []
        counts: list[int] = []
        # Index-based (O(active) after one nonzero per layer), valid for any memory layout; the
        # noise is drawn in the logical (row-major) order of the active positions.
        for i, m in enumerate(self.masks.modules):
            w, mask = m.weight, getattr(m, MASK_BUFFER)
            lr = lrs[i]
            std = self.noise_std(lr, t)
            stds.append(std)
            flat = mask.reshape(-1).nonzero().squeeze(1)
            n_active = int(flat.numel())
            if n_active == 0:
                removed.append(0)
                counts.append(0)
                continue
            s_act = _get(getattr(m, SIGN_BUFFER), flat).to(w.dtype)
            vals = _get(w, flat)
            if self.weight_decay and lr:
                vals.mul_(1.0 - lr * self.weight_decay)
            if std > 0:
                z = torch.randn(n_active, generator=gen, dtype=torch.float32)
                vals.add_(z.to(w.device, w.dtype).mul_(std) * s_act)
            _put(w, flat, vals)
            dead_sel = torch.logical_not(vals * s_act > 0)  # theta <= 0 or NaN
            k = int(dead_sel.sum())
            removed.append(k)
            counts.append(n_active - k)
            if k:
                dead = flat[dead_sel]
                _put(mask, dead, False)
                self._zero_idx(w, dead, optimizers)
        deficit = self.budget - sum(counts)
        grown = self._reactivate(deficit, optimizers) if deficit > 0 else [0] * len(removed)
        counts = [c + g for c, g in zip(counts, grown)]
        if sum(counts) != self.budget:  # pragma: no cover - internal invariant
            raise RuntimeError(f"bsr: {sum(counts)} active != budget {self.budget}")
        return self._record(t, removed, grown, stds, lrs, counts)

    def _zero_idx(self, w: Tensor, flat: Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        """Set ``w``, ``w.grad`` and every same-shaped optimizer state to 0 at ``flat``."""
        _put(w, flat, 0)
        if w.grad is not None and w.grad.shape == w.shape:
            _put(w.grad, flat, 0)
        for opt in optimizers:
            state = opt.state.get(w)
            if state:
                for v in state.values():
                    if isinstance(v, Tensor) and v.shape == w.shape:
                        _put(v, flat, 0)

    def _reactivate(self, k: int, optimizers: list[torch.optim.Optimizer]) -> list[int]:
        """Activate ``k`` inactive positions drawn uniformly without replacement over all layers."""
        masks = self.masks.masks()
        counts = [int(mask.numel() - int(mask.sum())) for mask in masks]
        n_inactive = sum(counts)
        if k > n_inactive:  # pragma: no cover - the budget never exceeds the layer sizes
            raise RuntimeError(f"bsr: {k} re-activations requested, {n_inactive} inactive")
        picked: list[int] = []
        seen: set[int] = set()
        while len(picked) < k:
            draw = torch.randint(0, n_inactive, (k - len(picked),), generator=self.generator)
            for d in draw.tolist():
                if d not in seen:
                    seen.add(d)
                    picked.append(d)
        ordinals = torch.tensor(sorted(picked), dtype=torch.int64)
        ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        layer_of = torch.searchsorted(ends, ordinals, right=True)
        grown = [0] * len(masks)
        start = 0
        for i, (m, mask) in enumerate(zip(self.masks.modules, masks)):
            sel = ordinals[layer_of == i] - start
            start += counts[i]
            if sel.numel() == 0:
                continue
            grown[i] = int(sel.numel())
            flat = torch.logical_not(mask).reshape(-1).nonzero().squeeze(1)
            pos = flat[sel.to(flat.device)]
            w = m.weight
            self._zero_idx(w, pos, optimizers)
            _put(w, pos, _get(getattr(m, SIGN_BUFFER), pos).to(w.dtype) * self.init_theta)
            _put(mask, pos, True)
            _put(getattr(m, EVER_BUFFER), pos, True)
            _put(self._fresh[i], pos, True)
        return grown

    def _record(
        self,
        t: int,
        removed: list[int],
        grown: list[int],
        stds: list[float],
        lrs: list[float],
        counts: list[int],
    ) -> dict[str, Any]:
        n_rem, n_grow = sum(removed), sum(grown)
        self.total_removed += n_rem
        self.total_reactivated += n_grow
        per_layer = {
            name: {"removed": r, "reactivated": g, "density": c / m.weight.numel()}
            for name, m, r, g, c in zip(
                self.masks.names, self.masks.modules, removed, grown, counts
            )
        }
        summary: dict[str, Any] = {
            "step": t,
            "removed": n_rem,
            "reactivated": n_grow,
            "changed": n_grow,
            "changed_fraction": n_grow / max(1, self.budget),
            "num_active": self.budget,
            "temperature": self.temperature_at(t),
            "noise_std": max(stds) if stds else 0.0,
            "lr": max(lrs) if lrs else 0.0,
            "per_layer": per_layer,
        }
        self._last_step = summary
        win = self._window
        win["removed"] += n_rem
        win["reactivated"] += n_grow
        win["steps"] += 1
        if t % self.history_interval == 0:
            self.history.append(
                {
                    "step": t,
                    "steps": win["steps"],
                    "removed": win["removed"],
                    "reactivated": win["reactivated"],
                    "rewired_per_step": win["reactivated"] / max(1, win["steps"]),
                    "exploration_rate": self.masks.exploration_rate,
                    "layer_densities": {n: v["density"] for n, v in per_layer.items()},
                    "temperature": summary["temperature"],
                    "noise_std": summary["noise_std"],
                }
            )
            self._window = {"removed": 0, "reactivated": 0, "steps": 0}
        if n_grow:
            logger.debug("bsr step %d: %d removed, %d re-activated", t, n_rem, n_grow)
        return summary

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """BSR statistics: budget, density, per-layer densities, rewiring counts, noise."""
        steps = max(1, self.step_count)
        return {
            "method": self.method,
            "budget": self.budget,
            "density": self.masks.density,
            "layer_densities": self.masks.layer_densities(),
            "exploration_rate": self.masks.exploration_rate,
            "steps": self.step_count,
            "removed_total": self.total_removed,
            "reactivated_total": self.total_reactivated,
            "rewired_per_step": self.total_reactivated / steps,
            "last_update": self.last_update,
            "temperature": self.temperature_at(max(1, self.step_count)),
            "noise": self.noise,
            "noise_form": self.noise_form,
            "weight_decay": self.weight_decay,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base scheduler state plus signs, budget, re-activation record and counters."""
        sd = super().state_dict()
        sd["bsr"] = {
            "signs": [s.detach().cpu().clone() for s in self.signs()],
            "fresh": [f.detach().cpu().clone() for f in self._fresh],
            "refreshes_seen": self._refreshes_seen,
            "budget": self.budget,
            "n_train": self.n_train,
            "noise": self.noise,
            "noise_form": self.noise_form,
            "noise_milestone": self.noise_milestone,
            "noise_factor": self.noise_factor,
            "weight_decay": self.weight_decay,
            "init_theta": self.init_theta,
            "history_interval": self.history_interval,
            "total_removed": self.total_removed,
            "total_reactivated": self.total_reactivated,
            "window": dict(self._window),
            "last_step": self._last_step,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (after the model was loaded and the masks synced)."""
        bsr = state_dict.get("bsr")
        if not isinstance(bsr, dict):
            raise ValueError("Invalid state_dict value: no 'bsr' entry")
        signs, fresh = bsr["signs"], bsr["fresh"]
        if len(signs) != len(self.masks) or len(fresh) != len(self.masks):
            raise ValueError(
                f"Invalid state_dict value: {len(signs)} sign tensors for {len(self.masks)} layers"
            )
        for s, m in zip(signs, self.masks.modules):
            if tuple(s.shape) != tuple(m.weight.shape):
                raise ValueError(
                    f"Invalid state_dict value: sign shape {tuple(s.shape)} != "
                    f"{tuple(m.weight.shape)}"
                )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for s, f, m, cur in zip(signs, fresh, self.masks.modules, self._fresh):
                sign = s.to(device=m.weight.device, dtype=torch.int8)
                mask = getattr(m, MASK_BUFFER)
                if not bool((m.weight * sign.to(m.weight.dtype) > 0)[mask].all()):
                    raise ValueError(
                        "Invalid state_dict value: the signs disagree with the model's active "
                        "weights (load the model state first)"
                    )
                m.register_buffer(SIGN_BUFFER, sign.clone(), persistent=False)
                cur.copy_(f.to(cur.device))
        self._refreshes_seen = bsr["refreshes_seen"]
        self.budget = int(bsr["budget"])
        self.n_train = int(bsr["n_train"])
        self.noise = float(bsr["noise"])
        self.noise_form = str(bsr["noise_form"])
        ms = bsr["noise_milestone"]
        self.noise_milestone = None if ms is None else float(ms)
        self.noise_factor = float(bsr["noise_factor"])
        self.weight_decay = float(bsr["weight_decay"])
        self.init_theta = float(bsr["init_theta"])
        self.history_interval = int(bsr["history_interval"])
        self.total_removed = int(bsr["total_removed"])
        self.total_reactivated = int(bsr["total_reactivated"])
        self._window = dict(bsr["window"])
        self._last_step = bsr["last_step"]
        self._step_lrs = None
        if self.masks.num_active != self.budget:
            raise ValueError(
                f"Invalid state_dict value: budget {self.budget} != the model's "
                f"{self.masks.num_active} active weights"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(budget={self.budget}, n_train={self.n_train}, "
            f"noise={self.noise}, noise_form={self.noise_form!r}, "
            f"noise_milestone={self.noise_milestone}, noise_factor={self.noise_factor}, "
            f"weight_decay={self.weight_decay}, init_theta={self.init_theta}, "
            f"step_count={self.step_count})"
        )


def _get(t: Tensor, flat: Tensor) -> Tensor:
    """``t`` at logical (row-major) flat indices ``flat``, for any memory layout."""
    if t.is_contiguous():
        return t.view(-1)[flat]
    return t[torch.unravel_index(flat, tuple(t.shape))]


def _put(t: Tensor, flat: Tensor, value: Tensor | float | bool) -> None:
    """``t[flat] = value`` at logical (row-major) flat indices, in place, for any memory layout."""
    if t.is_contiguous():
        t.view(-1)[flat] = value
    else:
        t[torch.unravel_index(flat, tuple(t.shape))] = value


def _check_optimizer_groups(
    masks: SparseMasks, optimizer: torch.optim.Optimizer, weight_decay: float
) -> None:
    """The optimizer must hold every masked weight; warn where it decays one itself (BSR's decay
    is decoupled), refuse ``lr * weight_decay >= 1``."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, w, _ in masks:
        group = groups.get(id(w))
        if group is None:
            raise ValueError(
                f"Invalid optimizer value: it does not hold the masked weight {name!r}"
            )
        if float(group.get("weight_decay", 0.0)) != 0.0:
            warnings.warn(
                f"bsr: the optimizer applies weight_decay={group['weight_decay']} to the "
                f"masked weight {name!r} on top of BSR's decoupled decay; give the masked "
                "weights weight_decay=0",
                stacklevel=4,
            )
    if max(float(g["lr"]) * weight_decay for g in optimizer.param_groups) >= 1.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (lr * wd >= 1)")


def create_bsr(
    model_or_masks: nn.Module | SparseMasks,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    n_train: int,
    sparsity: float | None = None,
    distribution: str = "erk",
    mask_generator: torch.Generator | int | None = None,
    **kwargs: Any,
) -> BSRScheduler:
    """Build masks (for a model) if needed, attach them to ``optimizer`` and return the scheduler.

    Args:
        model_or_masks: a model (masked here with ``apply_masks(sparsity=..., distribution=...,
            generator=mask_generator)``) or existing :class:`SparseMasks`.
        optimizer: the optimizer of the model (masks are attached to it if not already).
        total_steps, n_train: see :class:`BSRScheduler`.
        sparsity: required with a model; must be ``None`` with masks.
        distribution: initial per-layer allocation (model only).
        mask_generator: seed/generator of the initial masks (model only).
        **kwargs: any other :class:`BSRScheduler` keyword (``noise``, ``weight_decay``, ...).
    """
    if isinstance(model_or_masks, SparseMasks):
        if sparsity is not None:
            raise ValueError(f"Invalid sparsity value: {sparsity} (masks already exist)")
        masks = model_or_masks
    elif isinstance(model_or_masks, nn.Module):
        if sparsity is None:
            raise ValueError("Invalid sparsity value: None (required to mask a model)")
        masks = apply_masks(
            model_or_masks, sparsity=sparsity, distribution=distribution, generator=mask_generator
        )
    else:
        raise TypeError(f"Invalid model_or_masks value: {type(model_or_masks).__name__}")
    if all(o is not optimizer for o in masks.optimizers):
        masks.attach(optimizer)
    return BSRScheduler(
        masks, optimizer=optimizer, total_steps=total_steps, n_train=n_train, **kwargs
    )


def build_bsr(
    masks: SparseMasks,
    *,
    method: str = "bsr",
    total_steps: int,
    generator: torch.Generator | int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> BSRScheduler:
    """The :func:`~robust_agc.sparse.create_scheduler` builder of ``bsr``: ``options`` are
    :class:`BSRScheduler`'s keywords (``n_train`` required)."""
    return BSRScheduler(
        masks,
        optimizer=optimizer,  # type: ignore[arg-type]
        total_steps=total_steps,
        generator=generator,
        **options,
    )


register_sparse_method("bsr", build_bsr)
