"""Adaptive gradient correction (AGC): a ``torch.optim.Optimizer`` with an SVRG-style control variate.

Method: Lei, Xu, Zhang, He, Mallick, "Balance is Essence: Accelerating Sparse Training via Adaptive
Gradient Correction", arXiv 2301.03573 (called AGENT there). See ``docs/agc.md`` for the full
statement; in short, every step uses the corrected gradient

    v = g_B(w) + c * (mu - g_B(ws))

where ``ws`` is a snapshot of the weights, ``mu`` the mean gradient at the snapshot over the refresh
data and ``c = gamma * tau`` an adaptive, smoothed control-variate coefficient. ``v`` then goes
through plain SGD: L2 weight decay, (Nesterov) momentum, learning rate.

Typical use (one step and one refresh per epoch)::

    opt = AGC(model.parameters(), lr=0.05)
    for epoch in range(epochs):
        for x, y in loader:
            x_adv = attack(x, y)
            opt.zero_grad()
            loss = objective(model, x, x_adv, y)
            loss.backward()
            opt.snapshot_backward(model, lambda m: objective(m, x, x_adv, y))
            opt.step()
        opt.refresh(model, clean_batches, lambda m, x, y: F.cross_entropy(m(x), y))

The public release's defects (``docs/agc.md``, "Defects of the reference release we avoid") are
absent by construction: the refresh compares against the *previous* snapshot (it is replaced only
at the end of the refresh), it never reads or writes ``p.grad`` (fresh ``torch.autograd.grad``
accumulators), it never changes BatchNorm running statistics (every pass runs through
``torch.func.functional_call`` with cloned buffers), ``step()`` always updates, and the first
snapshot is the current model, never a random network.

This module holds the optimizer and its functional kernels; the extra passes it runs (the model
at the snapshot, the refresh's full gradient with loss scaling, the reductions over ranks) live in
:mod:`robust_agc.optim.passes`. How to choose the coefficient, the refresh data, sparse training,
distributed training, mixed precision and the costs: ``docs/agc.md``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach

from .passes import (
    FunctionalView,
    GradientPass,
    all_reduce_flat,
    cloned_buffers,
    dist_active,
    dist_reduce,
    full_gradient_pass,
)

__all__ = ["AGC", "agc", "corrected_gradient", "ESTIMATORS", "COEF_MODES"]

logger = logging.getLogger(__name__)

#: Estimators of ``tau_now`` accepted by :class:`AGC`.
ESTIMATORS: tuple[str, ...] = ("loss-slope", "grad-online")
#: Coefficient modes accepted by :class:`AGC`.
COEF_MODES: tuple[str, ...] = ("adaptive", "fixed", "ramp")

# Hyperparameters that describe the single, optimizer-wide tau estimate: every param group must
# share them (tau is one scalar for the whole model).
_GLOBAL_KEYS: tuple[str, ...] = ("alpha", "tau_init", "estimator")


def corrected_gradient(g: Tensor, g_snap: Tensor, mu: Tensor, coef: float) -> Tensor:
    """Return the AGC/SVRG corrected gradient ``g + coef * (mu - g_snap)`` (a new tensor).

    Args:
        g: minibatch gradient at the current weights, ``g_B(w)``.
        g_snap: the same minibatch's gradient at the snapshot, ``g_B(ws)``.
        mu: mean gradient at the snapshot over the refresh data.
        coef: control-variate coefficient ``c``.

    Returns:
        Tensor shaped like ``g``.
    """
    if not (g.shape == g_snap.shape == mu.shape):
        raise ValueError(
            f"Invalid shapes value: g {tuple(g.shape)}, g_snap {tuple(g_snap.shape)}, "
            f"mu {tuple(mu.shape)} must match"
        )
    return g.add(mu.sub(g_snap), alpha=coef)


# --------------------------------------------------------------------------------------------
# functional kernel
# --------------------------------------------------------------------------------------------


def agc(
    params: list[Tensor],
    grads: list[Tensor],
    snap_grads: list[Tensor | None],
    full_grads: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    *,
    coef: float,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    """Functional AGC update (in place on ``params`` and ``momentum_buffers``).

    For every parameter: ``v = g + coef * (mu - g_snap)`` when ``coef != 0`` and both ``g_snap``
    (``snap_grads[i]``) and ``mu`` (``full_grads[i]``) are given, else ``v = g``; then exactly the
    update of :func:`torch.optim.sgd`: ``v += weight_decay * p``; first step ``buf = v``, later
    ``buf = momentum * buf + (1 - dampening) * v``; Nesterov ``v = v + momentum * buf`` (else
    ``v = buf``); ``p -= lr * v``. With ``coef == 0`` the arithmetic is the same op sequence as
    ``torch.optim.SGD`` and the result is bitwise identical. ``grads`` are never modified.
    New momentum buffers are written into ``momentum_buffers`` (list slots replaced).

    Args:
        params: parameters to update.
        grads: their minibatch gradients ``g_B(w)``.
        snap_grads: the minibatch gradients at the snapshot ``g_B(ws)`` (``None``: no correction).
        full_grads: the snapshot mean gradients ``mu`` (``None``: no correction).
        momentum_buffers: momentum buffers (``None`` entries are created on this step).
        coef: control-variate coefficient ``c``.
        lr, weight_decay, momentum, dampening, nesterov, maximize: as in ``torch.optim.SGD``.
        foreach: use the ``torch._foreach_*`` implementation; ``None`` picks it on CUDA like torch.
    """
    n = len(params)
    if not (len(grads) == len(snap_grads) == len(full_grads) == len(momentum_buffers) == n):
        raise ValueError(
            "Invalid lists value: params, grads, snap_grads, full_grads and momentum_buffers "
            "must have the same length"
        )
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    func = _multi_tensor_agc if foreach else _single_tensor_agc
    func(
        params,
        grads,
        snap_grads,
        full_grads,
        momentum_buffers,
        coef=coef,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
    )


def _single_tensor_agc(
    params: list[Tensor],
    grads: list[Tensor],
    snap_grads: list[Tensor | None],
    full_grads: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    *,
    coef: float,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        g_snap, mu = snap_grads[i], full_grads[i]
        if coef != 0 and g_snap is not None and mu is not None:
            # maximize: v = -(g + c (mu - g_snap)) = -g + c (g_snap - mu)
            grad = grad.add(mu.sub(g_snap), alpha=-coef if maximize else coef)
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = grad.detach().clone()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _multi_tensor_agc(
    params: list[Tensor],
    grads: list[Tensor],
    snap_grads: list[Tensor | None],
    full_grads: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    *,
    coef: float,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    if len(params) == 0:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, snap_grads, full_grads, momentum_buffers],  # type: ignore[list-item]
        with_indices=True,
    )
    for (dev_params_, dev_grads_, dev_snaps, dev_fulls, dev_bufs), indices in grouped.values():
        dev_params = cast(list[Tensor], dev_params_)
        dev_grads = cast(list[Tensor], dev_grads_)
        owned = False  # whether dev_grads are our own temporaries (safe to modify in place)
        if maximize:
            dev_grads = list(torch._foreach_neg(dev_grads))
            owned = True
        if coef != 0:
            sel = [
                k
                for k in range(len(dev_params))
                if dev_snaps[k] is not None and dev_fulls[k] is not None
            ]
            if sel:
                diffs = torch._foreach_sub(
                    [cast(Tensor, dev_fulls[k]) for k in sel],
                    [cast(Tensor, dev_snaps[k]) for k in sel],
                )
                corrected = torch._foreach_add(
                    [dev_grads[k] for k in sel], diffs, alpha=-coef if maximize else coef
                )
                dev_grads = list(dev_grads)
                for k, v in zip(sel, corrected):
                    dev_grads[k] = v
        if weight_decay != 0:
            if owned:
                torch._foreach_add_(dev_grads, dev_params, alpha=weight_decay)
            else:
                dev_grads = list(torch._foreach_add(dev_grads, dev_params, alpha=weight_decay))
                owned = True
        if momentum != 0:
            if all(b is not None for b in dev_bufs):
                bufs = cast(list[Tensor], list(dev_bufs))
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, dev_grads, alpha=1 - dampening)
            else:
                bufs = []
                for k, buf in enumerate(dev_bufs):
                    if buf is None:
                        buf = dev_grads[k].detach().clone()
                        momentum_buffers[indices[k]] = buf
                    else:
                        buf.mul_(momentum).add_(dev_grads[k], alpha=1 - dampening)
                    bufs.append(buf)
            if nesterov:
                if owned:
                    torch._foreach_add_(dev_grads, bufs, alpha=momentum)
                else:  # never write into p.grad (torch's SGD does; the values are identical)
                    dev_grads = list(torch._foreach_add(dev_grads, bufs, alpha=momentum))
            else:
                dev_grads = bufs
        torch._foreach_add_(dev_params, dev_grads, alpha=-lr)


# --------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------


class AGC(Optimizer):
    r"""SGD with adaptive gradient correction (AGC / AGENT, arXiv 2301.03573).

    Each step uses ``v = g_B(w) + c * (mu - g_B(ws))`` (``v = g_B(w)`` until the first refresh),
    followed by the SGD update (L2 weight decay added to ``v``, momentum with dampening, Nesterov,
    learning rate; the first step sets ``buf = v`` as torch's SGD does). With ``c = 0`` the
    trajectory is bitwise that of ``torch.optim.SGD``.

    The coefficient ``c`` (per param group, from one optimizer-wide ``tau``):

    - ``coef="adaptive"`` (the method): ``c = gamma * tau``; at every :meth:`refresh`,
      ``tau = (1 - alpha) * tau + alpha * tau_now`` with ``tau_now`` from ``estimator``:

      * ``"loss-slope"`` (the public release): ``cov(a, b) / var(b)`` (sample statistics, ddof=1)
        over the refresh batches, ``a_i`` = batch loss at the current weights, ``b_i`` = batch
        loss at the *previous* snapshot (forward only).
      * ``"grad-online"`` (the paper's text, no extra pass): ratio of the means, over the steps
        since the last refresh (cumulative, each step weighted equally), of
        ``<g_B(w), g_B(ws) - mu>`` and ``||g_B(ws) - mu||^2`` summed over all parameters; an
        unbiased estimate of the variance-optimal ``Cov(g, g_snap) / Var(g_snap)`` since
        ``E[g_B(ws) - mu] = 0``. Kept as float64 tensors on the parameters' device (no host
        synchronisation per step).

      ``tau`` is kept when no update is possible (first refresh: no previous snapshot / no
      steps with a snapshot; fewer than 2 batches; zero variance: warned once).
    - ``coef="fixed"``: ``c = fixed_coef`` (SVRG-style ablation).
    - ``coef="ramp"``: ``c = gamma * (1 - (1 - alpha) ** e)`` with ``e`` the number of refreshes
      done, i.e. ``0.1 * (1 - 0.7 ** e)`` with the defaults. This is what the public release
      computes in its adversarial pipeline, where ``tau_now == 1`` every epoch (its defect 1).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate.
        momentum: momentum factor (default 0.9).
        dampening: momentum dampening (default 0).
        nesterov: Nesterov momentum (default True; requires momentum > 0 and zero dampening).
        weight_decay: L2 penalty added to ``v`` (default 0).
        gamma: damping, ``c = gamma * tau`` (default 0.1). May differ per param group.
        alpha: EMA factor of ``tau`` (default 0.3). Optimizer-wide.
        tau_init: initial ``tau`` (default 0.1). Optimizer-wide.
        estimator: ``"grad-online"`` (default since the ablations of ``experiments/``: as
            accurate there and cheaper) or ``"loss-slope"`` (the release's). Optimizer-wide.
        coef: ``"adaptive"``, ``"fixed"`` or ``"ramp"``. May differ per param group.
        fixed_coef: ``c`` for ``coef="fixed"`` (default 0.1).
        foreach: use the ``torch._foreach_*`` kernel (default: torch's choice, CUDA only).
        maximize: maximize the objective instead of minimizing.

    Per-parameter state (all shaped like the parameter, so masking hooks can zero them):
    ``momentum_buffer``, ``snapshot`` (``ws``), ``full_grad`` (``mu``), ``snap_grad``
    (``g_B(ws)`` of the current step, written by :meth:`snapshot_backward`). Optimizer-wide
    scalars (``tau``, ``tau_now``, refreshes, steps, the online sums) are tensors saved by
    :meth:`state_dict` under the extra key ``"agc"``.

    Example:
        >>> opt = AGC(model.parameters(), lr=0.05, weight_decay=5e-4)
        >>> opt.zero_grad(); objective(model, x, x_adv, y).backward()
        >>> opt.snapshot_backward(model, lambda m: objective(m, x, x_adv, y))
        >>> opt.step()
        >>> opt.refresh(model, batches, lambda m, x, y: F.cross_entropy(m(x), y))  # once per epoch
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        gamma: float = 0.1,
        alpha: float = 0.3,
        tau_init: float = 0.1,
        estimator: str = "grad-online",
        coef: str = "adaptive",
        fixed_coef: float = 0.1,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "alpha": alpha,
            "tau_init": tau_init,
            "estimator": estimator,
            "coef": coef,
            "fixed_coef": fixed_coef,
            "foreach": foreach,
            "maximize": maximize,
        }
        self._constructing = True  # add_param_group's warnings point past Optimizer.__init__
        super().__init__(params, defaults)  # validates every group in add_param_group
        self._constructing = False
        self._scalars: dict[str, Tensor] = {
            "tau": torch.tensor(float(tau_init), dtype=torch.float64),
            "tau_now": torch.tensor(math.nan, dtype=torch.float64),
            "refreshes": torch.tensor(0, dtype=torch.int64),
            "steps": torch.tensor(0, dtype=torch.int64),
            "online_count": torch.tensor(0, dtype=torch.int64),
        }
        # online sums live on the parameters' device (created lazily / on load)
        self._online: dict[str, Tensor] = {}
        self._snap_grad_fresh = False
        self._warned: set[str] = set()
        self._last_refresh: dict[str, float] = {}
        self._refresh_losses: tuple[Tensor, Tensor] | None = None

    # ---- param groups and validation ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated; ``alpha``, ``tau_init``, ``estimator`` must be shared).

        Raises:
            ValueError: an invalid hyperparameter, or a group of its own tau settings; the
                optimizer is then left as it was.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            # the warnings point at the user's line: AGC(...) or opt.add_param_group(...)
            _validate_group(group, stacklevel=5 if getattr(self, "_constructing", False) else 3)
            first = self.param_groups[0]
            for key in _GLOBAL_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"Invalid {key} value: {group[key]} (all param groups must share {key}, "
                        f"got {first[key]} in the first group; tau is one optimizer-wide estimate)"
                    )
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    # ---- scalar state -------------------------------------------------------------------------

    @property
    def tau(self) -> float:
        """Current smoothed estimate ``tau``."""
        return float(self._scalars["tau"])

    @property
    def tau_now(self) -> float:
        """Last raw estimate ``tau_now`` (NaN until one could be computed)."""
        return float(self._scalars["tau_now"])

    @property
    def num_refreshes(self) -> int:
        """Number of refreshes done."""
        return int(self._scalars["refreshes"])

    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot (and its ``mu``) exists, i.e. the correction is active."""
        return any(
            "snapshot" in self.state.get(p, ())
            for group in self.param_groups
            for p in group["params"]
        )

    # ---- what other parts of the library read and change (see CorrectedOptimizer) ----------

    def snapshot_of(self, p: Tensor) -> Tensor | None:
        """The snapshot point ``ws`` of parameter ``p`` (``None`` before the first refresh)."""
        return self.state.get(p, {}).get("snapshot")

    def full_gradient_of(self, p: Tensor) -> Tensor | None:
        """The full gradient ``mu`` at the snapshot for ``p`` (``None`` before the first refresh)."""
        return self.state.get(p, {}).get("full_grad")

    def stale_positions(self, p: Tensor) -> Tensor | None:
        """Where ``p``'s full gradient is stale: positions pruned at the last refresh (a sparse
        layer zeroed their snapshot and ``mu``) that may have regrown since. The correction is
        dropped there (``v = g``) until the next refresh (``docs/agc.md``, "Sparse training and
        regrown positions"). ``None`` before the first refresh."""
        st = self.state.get(p, {})
        return _stale(st) if "snapshot" in st and "full_grad" in st else None

    def snapshot_gradients(self) -> list[Tensor]:
        """The snapshot gradients ``g_B(ws)`` of the last :meth:`snapshot_backward`, one per
        parameter that has one (what a loss scaler's overflow check must see besides ``.grad``)."""
        return [
            self.state[p]["snap_grad"]
            for group in self.param_groups
            for p in group["params"]
            if "snap_grad" in self.state.get(p, {})
        ]

    def drop_correction_(self, p: Tensor, where: Tensor) -> None:
        """Zero ``p``'s snapshot gradient and full gradient where ``where`` is True, so the step
        there uses the plain gradient (``v = g``); for positions a sparse method has just
        re-activated (BSR-Net). ``where`` has ``p``'s shape."""
        st = self.state.get(p)
        if not st:
            return
        with torch.no_grad():
            for key in ("snap_grad", "full_grad"):
                v = st.get(key)
                if isinstance(v, Tensor) and v.shape == where.shape:
                    v.masked_fill_(where, 0)

    def group_coefficient(self, group: dict[str, Any]) -> float:
        """The coefficient ``c`` of one param group (see the class docstring)."""
        mode = group["coef"]
        if mode == "fixed":
            return float(group["fixed_coef"])
        if mode == "ramp":
            e = self.num_refreshes
            return float(group["gamma"]) * (1.0 - (1.0 - float(group["alpha"])) ** e)
        return float(group["gamma"]) * self.tau

    @property
    def coefficient(self) -> float:
        """The coefficient ``c`` of the first param group (the usual single-group case)."""
        return self.group_coefficient(self.param_groups[0])

    @property
    def refresh_losses(self) -> tuple[Tensor, Tensor] | None:
        """The last refresh's per-batch losses ``(a, b)`` (float64, CPU); ``b`` is empty when
        there was no previous snapshot or the estimator does not use it."""
        return self._refresh_losses

    def telemetry(self) -> dict[str, float]:
        """Scalars for logging: ``agc_tau``, ``agc_tau_now``, ``agc_coef``, ``agc_refreshes``,
        ``agc_steps``, ``agc_has_snapshot`` and, for ``grad-online``, the running estimate
        ``agc_online_estimate`` (this one synchronises with the device), plus the last refresh's
        telemetry (``refresh_*``)."""
        out: dict[str, float] = {
            "agc_tau": self.tau,
            "agc_tau_now": self.tau_now,
            "agc_coef": self.coefficient,
            "agc_refreshes": float(self.num_refreshes),
            "agc_steps": float(int(self._scalars["steps"])),
            "agc_has_snapshot": float(self.has_snapshot),
        }
        if self.param_groups[0]["estimator"] == "grad-online":
            count = int(self._scalars["online_count"])
            if count > 0 and self._online:
                sq = float(self._online["sq"])
                out["agc_online_estimate"] = float(self._online["dot"]) / sq if sq > 0 else math.nan
            else:
                out["agc_online_estimate"] = math.nan
        out.update(self._last_refresh)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict()`` plus an ``"agc"`` entry with the optimizer-wide scalars."""
        sd = super().state_dict()
        scalars = {k: v.clone() for k, v in self._scalars.items()}
        for k, v in self._online.items():
            scalars[f"online_{k}"] = v.detach().clone()
        sd["agc"] = scalars
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict` (resumes bit for bit)."""
        state_dict = dict(state_dict)
        scalars = state_dict.pop("agc", None)
        if scalars is None:
            raise ValueError(
                "Invalid state_dict value: no 'agc' entry (not a state dict of robust_agc.optim.AGC)"
            )
        super().load_state_dict(state_dict)
        for k in self._scalars:
            self._scalars[k] = scalars[k].detach().clone().cpu()
        device = self._param_device()
        self._online = {
            k: scalars[f"online_{k}"].detach().clone().to(device)
            for k in ("dot", "sq")
            if f"online_{k}" in scalars
        }
        self._snap_grad_fresh = False

    def _param_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _warn_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        """Warn once per optimizer and ``key``; ``stacklevel`` as seen from the caller's caller
        (the default points at the user's call of the public method that called this)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
        logger.debug(message)

    def _named_params(self, model: nn.Module) -> list[tuple[str, Tensor]]:
        """(model name, param) for every optimizer param that requires grad, by identity."""
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                name = names.get(id(p))
                if name is None:
                    raise ValueError(
                        f"Invalid model value: optimizer parameter {pi} of param group {gi} "
                        f"(shape {tuple(p.shape)}) is not a parameter of the given model"
                    )
                out.append((name, p))
        return out

    # ---- the per-step snapshot gradient -------------------------------------------------------

    def snapshot_backward(
        self,
        model: nn.Module,
        closure: Callable[[nn.Module], Tensor],
        *,
        distributed: bool | None = None,
        process_group: Any = None,
        loss_scale: float | Tensor | None = None,
    ) -> Tensor | None:
        """Compute ``g_B(ws)`` for this step's batch and store it in ``state[p]['snap_grad']``.

        ``closure(module)`` must return the step's scalar loss computed with ``module`` in place
        of the model on the *same* batch as the current-weight loss (e.g.
        ``lambda m: objective(m, x, x_adv, y)``). ``module`` calls ``model`` through
        ``torch.func.functional_call`` with the snapshot weights and cloned buffers, in the model's
        current mode (train mode: batch statistics). ``p.grad`` and the model's buffers (BatchNorm
        running statistics, ``num_batches_tracked``) are never touched.

        Args:
            model: the module whose parameters this optimizer updates (matched by identity).
            closure: ``closure(module) -> scalar loss``.
            distributed: average ``g_B(ws)`` over the process group (as DDP averages ``p.grad``);
                ``None``: when ``torch.distributed`` is initialized with more than one process.
            process_group: the group for ``distributed`` (default: the world).
            loss_scale: mixed-precision loss scaling (float16 autocast): the loss is multiplied
                by this factor before differentiating and the gradient divided by it, so the
                stored ``snap_grad`` is on the scale of an unscaled ``p.grad`` (pass the scale
                ``torch.amp.GradScaler`` applied to the training loss, then ``unscale_`` ``p.grad``
                before :meth:`step`). An overflow leaves non-finite values in ``snap_grad``:
                check them before stepping (the step itself never skips). ``None``: no scaling.

        Returns:
            The snapshot loss (detached, unscaled), or ``None`` when there is no snapshot yet
            (before the first :meth:`refresh`; nothing is computed and the step uses ``v = g``).
        """
        named = [(n, p) for n, p in self._named_params(model) if "snapshot" in self.state[p]]
        if not named:
            return None
        leaves = [self.state[p]["snapshot"].detach().requires_grad_(True) for _, p in named]
        tensors = cloned_buffers(model)
        tensors.update({n: leaf for (n, _), leaf in zip(named, leaves)})
        with torch.enable_grad():
            loss = closure(FunctionalView(model, tensors))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"Invalid closure value: must return a scalar loss, got {loss!r}")
            target = loss if loss_scale is None else loss * loss_scale
            grads = torch.autograd.grad(target, leaves, allow_unused=True, materialize_grads=True)
        if dist_active(distributed, process_group):
            world = dist.get_world_size(process_group)
            all_reduce_flat(list(grads), process_group)
            for g in grads:
                g.div_(world)
        if loss_scale is not None:
            for g in grads:
                g.div_(loss_scale)
        for (_, p), g in zip(named, grads):
            st = self.state[p]
            # Positions that were pruned at the last refresh (a sparse layer zeroed their snapshot
            # and mu) and have regrown since: mu there is not the mean of g_B(ws), so the control
            # variate g_B(ws) - mu would not have zero mean. Drop the correction there (v = g) until
            # the next refresh. Derived from the state itself: an active position has mu != 0.
            st["snap_grad"] = g.detach().masked_fill_(_stale(st), 0)
        self._snap_grad_fresh = True
        return loss.detach()

    # ---- the step -------------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one update with the corrected gradient (never skipped).

        Uses ``p.grad`` as ``g_B(w)`` and, when :meth:`snapshot_backward` ran since the last step,
        ``state[p]['snap_grad']`` as ``g_B(ws)``. If a snapshot exists but no snapshot gradient
        was computed for this step, the step is taken with ``v = g`` and a warning (once).

        Args:
            closure: optional closure re-evaluating the loss at the current weights (as in SGD).
        """
        with torch.no_grad():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()

            fresh = self._snap_grad_fresh
            if not fresh and self.has_snapshot:
                self._warn_once(
                    "stale",
                    "AGC.step() without AGC.snapshot_backward() since the last step: the correction "
                    "is skipped for this step (v = g)",
                    stacklevel=4,  # step is called through torch's Optimizer.step wrapper
                )

            per_group = []
            for group in self.param_groups:
                params, grads, snaps, fulls, bufs = [], [], [], [], []
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("AGC does not support sparse gradients")
                    state = self.state[p]
                    params.append(p)
                    grads.append(p.grad)
                    ok = fresh and "snap_grad" in state and "full_grad" in state
                    snaps.append(state["snap_grad"] if ok else None)
                    fulls.append(state["full_grad"] if ok else None)
                    bufs.append(state.get("momentum_buffer"))
                per_group.append((params, grads, snaps, fulls, bufs))

            if fresh and self.param_groups[0]["estimator"] == "grad-online":
                self._accumulate_online(per_group)

            for group, (params, grads, snaps, fulls, bufs) in zip(self.param_groups, per_group):
                agc(
                    params,
                    grads,
                    snaps,
                    fulls,
                    bufs,
                    coef=self.group_coefficient(group) if fresh else 0.0,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                    foreach=group["foreach"],
                )
                if group["momentum"] != 0:
                    for p, buf in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = buf

            self._snap_grad_fresh = False
            self._scalars["steps"] += 1
            return loss

    def _accumulate_online(self, per_group: list[tuple[list, ...]]) -> None:
        dots, sqs = [], []
        for _, grads, snaps, fulls, _ in per_group:
            for g, gs, mu in zip(grads, snaps, fulls):
                if gs is None or mu is None:
                    continue
                d = gs - mu
                dots.append(torch.sum(g * d, dtype=torch.float64))
                sqs.append(torch.sum(d * d, dtype=torch.float64))
        if not dots:
            return
        if not self._online:
            zero = torch.zeros((), dtype=torch.float64, device=dots[0].device)
            self._online = {"dot": zero.clone(), "sq": zero.clone()}
        self._online["dot"] += torch.stack(dots).sum()
        self._online["sq"] += torch.stack(sqs).sum()
        self._scalars["online_count"] += 1

    # ---- the refresh --------------------------------------------------------------------------

    def refresh(
        self,
        model: nn.Module,
        batches: Iterable[tuple[Tensor, ...]],
        loss_fn: Callable[..., Tensor],
        *,
        distributed: bool | None = None,
        process_group: Any = None,
        loss_scale: float | Tensor | None = None,
    ) -> dict[str, float]:
        """Recompute ``mu`` at the current weights, update ``tau``, and make ``w`` the snapshot.

        For each batch ``B_i`` (``loss_fn(module, *batch)`` -> scalar mean loss): ``a_i`` = loss at
        the current weights with its gradient ``g_i`` (``torch.autograd.grad`` into fresh
        accumulators; ``p.grad`` is neither read nor written), and, for ``estimator="loss-slope"``
        when a previous snapshot exists, ``b_i`` = loss at the previous snapshot (forward only).
        ``mu`` is the mean of the ``g_i`` weighted by batch size (the length of each batch's first
        tensor), i.e. the mean gradient over all examples. Then ``tau_now`` (see the class
        docstring), ``tau = (1 - alpha) tau + alpha tau_now``, ``snapshot := w``,
        ``full_grad := mu``, and the online sums restart.

        Weights, ``p.grad`` and the model's buffers (BatchNorm running statistics) are unchanged:
        every pass uses ``functional_call`` with cloned buffers, in the model's current mode. Which
        data ``batches`` holds (clean, adversarial, a random fraction) is the caller's choice;
        record it (``docs/agc.md``, "Refreshes and the full gradient": adversarial batches match
        ``g_B(ws)``'s data).

        Args:
            model: the module whose parameters this optimizer updates.
            batches: iterable of tuples of tensors (already on the model's device).
            loss_fn: ``loss_fn(module, *batch) -> scalar mean loss``.
            distributed: all-reduce ``mu`` (example-weighted mean), all-gather ``a``/``b`` and
                all-reduce the online sums over the process group; ``None``: when
                ``torch.distributed`` is initialized with more than one process.
            process_group: the group for ``distributed`` (default: the world).
            loss_scale: mixed-precision loss scaling (float16 autocast), as in
                :meth:`snapshot_backward`: each batch's gradient is taken of ``loss * scale`` and
                divided by ``scale``; a batch whose scaled gradient is not finite while its loss
                is finite is differentiated again at half the scale (the graph is kept), down to
                a scale of 1. ``None``: no scaling.

        Returns:
            ``{"agc_tau_now", "agc_tau", "agc_coef", "agc_tau_updated", "refresh_batches",
            "refresh_examples", "refresh_grad_evals", "refresh_forwards", "refresh_time_s"}``:
            ``refresh_grad_evals`` counts examples through one forward+backward at the current
            weights, ``refresh_forwards`` examples through a snapshot forward-only pass.
        """
        with torch.no_grad():
            t0 = time.perf_counter()
            named = self._named_params(model)
            params = [p for _, p in named]
            estimator = self.param_groups[0]["estimator"]
            prev = [self.state[p].get("snapshot") for p in params]
            had_snapshot = bool(params) and all(s is not None for s in prev)
            use_b = estimator == "loss-slope" and had_snapshot
            current_view, snap_view = _refresh_views(model, named, prev, use_b)
            gp = full_gradient_pass(current_view, snap_view, params, batches, loss_fn, loss_scale)
            red = self._reduce_over_ranks(gp, distributed, process_group)
            if estimator == "loss-slope":
                tau_now = self._loss_slope_tau(red.a, red.b, had_snapshot)
            else:
                tau_now = self._grad_online_tau(red.online, red.online_count, had_snapshot)
            updated = self._update_tau(tau_now)
            self._move_snapshot(params, red.mu)
            self._refresh_losses = (red.a.cpu(), red.b.cpu())
            return self._refresh_report(tau_now, updated, gp, use_b, t0)

    def _reduce_over_ranks(
        self, gp: GradientPass, distributed: bool | None, process_group: Any
    ) -> _Reduced:
        """The refresh statistics over all ranks (when distributed) and ``mu`` from their sums."""
        a, b, acc = gp.a, gp.b, gp.grad_sum
        total = torch.tensor(float(gp.examples), dtype=torch.float64)
        online = {k: v.clone() for k, v in self._online.items()}
        online_count = int(self._scalars["online_count"])
        if dist_active(distributed, process_group):
            a, b, acc, total, online, online_count = dist_reduce(
                a, b, acc, total, online, online_count, process_group
            )
        if float(total) <= 0:
            raise ValueError("Invalid batches value: the refresh received no examples")
        mu = [t.div_(float(total)) for t in acc]
        return _Reduced(mu, a, b, online, online_count)

    def _loss_slope_tau(self, a: Tensor, b: Tensor, had_snapshot: bool) -> float:
        """``tau_now = cov(a, b) / var(b)`` (ddof=1) of the per-batch losses; NaN when undefined."""
        if not had_snapshot:
            logger.info("AGC refresh: no previous snapshot, tau kept at %g", self.tau)
            return math.nan
        if a.numel() < 2:
            self._warn_once(
                "few",
                f"AGC refresh with {a.numel()} batch(es): tau_now needs >= 2, tau kept",
                stacklevel=4,
            )
            return math.nan
        bc = b - b.mean()
        var_b = float((bc * bc).sum()) / (b.numel() - 1)
        cov_ab = float(((a - a.mean()) * bc).sum()) / (b.numel() - 1)
        # Below this the b_i differ only by float rounding (e.g. a previous snapshot whose loss is
        # the same constant on every batch, as a zero-initialised head gives) and the slope cov/var
        # is rounding noise divided by rounding noise: no estimate.
        resolution = (_VAR_RESOLUTION * float(b.abs().mean())) ** 2
        if var_b > resolution and math.isfinite(var_b) and math.isfinite(cov_ab):
            return cov_ab / var_b
        self._warn_once(
            "var0",
            f"AGC refresh: var(b) = {var_b:.3g} is at float resolution (the previous "
            "snapshot's loss is constant over batches): tau kept",
            stacklevel=4,
        )
        return math.nan

    def _grad_online_tau(
        self, online: dict[str, Tensor], online_count: int, had_snapshot: bool
    ) -> float:
        """``tau_now`` = ratio of the online sums ``dot / sq`` since the last refresh; NaN when
        undefined."""
        if online_count > 0 and online:
            sq = float(online["sq"])
            if sq > 0 and math.isfinite(sq):
                return float(online["dot"]) / sq
            self._warn_once(
                "var0", f"AGC refresh: mean ||g_snap - mu||^2 = {sq}, tau kept", stacklevel=4
            )
        elif had_snapshot and any(g["coef"] == "adaptive" for g in self.param_groups):
            self._warn_once(  # (fixed / ramp coefficients do not use tau: nothing is lost)
                "nostep",
                "AGC refresh: no step with a snapshot gradient since the last refresh",
                stacklevel=4,
            )
        return math.nan

    def _update_tau(self, tau_now: float) -> bool:
        """``tau = (1 - alpha) tau + alpha tau_now`` when ``tau_now`` is finite; whether it was."""
        updated = math.isfinite(tau_now)
        if updated:
            alpha = float(self.param_groups[0]["alpha"])
            self._scalars["tau_now"] = torch.tensor(tau_now, dtype=torch.float64)
            self._scalars["tau"] = (1 - alpha) * self._scalars["tau"] + alpha * tau_now
        return updated

    def _move_snapshot(self, params: list[Tensor], mu: list[Tensor]) -> None:
        """``snapshot := w``, ``full_grad := mu``; the step's snapshot gradients and the online
        sums restart."""
        for p, m in zip(params, mu):
            state = self.state[p]
            state["snapshot"] = p.detach().clone(memory_format=torch.preserve_format)
            state["full_grad"] = m
            state.pop("snap_grad", None)
        self._snap_grad_fresh = False
        self._scalars["refreshes"] += 1
        for v in self._online.values():
            v.zero_()
        self._scalars["online_count"].zero_()

    def _refresh_report(
        self, tau_now: float, updated: bool, gp: GradientPass, use_b: bool, t0: float
    ) -> dict[str, float]:
        """The refresh's telemetry (kept for :meth:`telemetry`) and its log line."""
        out = {
            "agc_tau_now": tau_now,
            "agc_tau": self.tau,
            "agc_coef": self.coefficient,
            "agc_tau_updated": float(updated),
            "refresh_batches": float(gp.num_batches),
            "refresh_examples": float(gp.examples),
            "refresh_grad_evals": float(gp.examples),
            "refresh_forwards": float(gp.examples if use_b else 0),
            "refresh_time_s": time.perf_counter() - t0,
        }
        self._last_refresh = {k: v for k, v in out.items() if k.startswith("refresh_")}
        logger.info(
            "AGC refresh %d: tau_now=%.4g tau=%.4g c=%.4g (%d batches, %d examples, %.2fs)",
            self.num_refreshes,
            tau_now,
            self.tau,
            self.coefficient,
            gp.num_batches,
            gp.examples,
            out["refresh_time_s"],
        )
        return out


class _Reduced(NamedTuple):
    """The refresh statistics after the reduction over ranks: ``mu`` and what ``tau_now`` needs."""

    mu: list[Tensor]
    a: Tensor
    b: Tensor
    online: dict[str, Tensor]
    online_count: int


def _refresh_views(
    model: nn.Module, named: list[tuple[str, Tensor]], prev: list[Tensor | None], use_b: bool
) -> tuple[FunctionalView, FunctionalView | None]:
    """The refresh's views of ``model``: at the current weights, and (``use_b``) at the previous
    snapshot ``prev``; both share one set of cloned buffers."""
    buffers = cloned_buffers(model)
    current_view = FunctionalView(model, buffers)
    if not use_b:
        return current_view, None
    snap_tensors = dict(buffers)
    snap_tensors.update({n: cast(Tensor, s) for (n, _), s in zip(named, prev)})
    return current_view, FunctionalView(model, snap_tensors)


#: Relative spread of the previous-snapshot losses below which ``var(b)`` counts as zero.
_VAR_RESOLUTION = 1e-5


def _stale(st: dict[str, Any]) -> Tensor:
    """The regrown-position rule, from the state itself: an active position has ``mu != 0``, so a
    zero snapshot with a zero ``mu`` marks one pruned at the last refresh."""
    return (st["snapshot"] == 0) & (st["full_grad"] == 0)


def _validate_group(group: dict[str, Any], stacklevel: int) -> None:
    """Raise ``ValueError`` (torch's wording) for invalid hyperparameters; warn for odd ones (at
    ``stacklevel`` frames above this function)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        raise ValueError(f"Invalid learning rate: {lr} (AGC takes a float learning rate)")
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    for key in ("momentum", "weight_decay", "gamma"):
        v = group[key]
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"Invalid {key} value: {v}")
    if not (0.0 <= group["dampening"] <= 1.0):
        raise ValueError(f"Invalid dampening value: {group['dampening']}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if not (0.0 <= group["alpha"] <= 1.0):
        raise ValueError(f"Invalid alpha value: {group['alpha']}")
    if not math.isfinite(group["tau_init"]):
        raise ValueError(f"Invalid tau_init value: {group['tau_init']}")
    if group["estimator"] not in ESTIMATORS:
        raise ValueError(f"Invalid estimator value: {group['estimator']!r} (one of {ESTIMATORS})")
    if group["coef"] not in COEF_MODES:
        raise ValueError(f"Invalid coef value: {group['coef']!r} (one of {COEF_MODES})")
    if not math.isfinite(group["fixed_coef"]):
        raise ValueError(f"Invalid fixed_coef value: {group['fixed_coef']}")
    if group["coef"] == "fixed" and not (0.0 <= group["fixed_coef"] <= 1.0):
        warnings.warn(
            f"fixed_coef={group['fixed_coef']} outside [0, 1]: the correction overshoots the "
            "variance-optimal range",
            UserWarning,
            stacklevel=stacklevel,
        )
    if group["gamma"] > 1.0:
        warnings.warn(
            f"gamma={group['gamma']} > 1: c = gamma * tau is usually in [0, 1] (default 0.1)",
            UserWarning,
            stacklevel=stacklevel,
        )
