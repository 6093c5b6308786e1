"""The training loop: attack generation alternating with (sparse) model updates, PGD-AT/TRADES/MART.

:func:`train` runs one configuration end to end and writes the run folder:

- ``config.yaml``: the resolved :class:`~robust_agc.config.TrainConfig`;
- ``metrics.jsonl``: one JSON object per epoch (see :data:`METRIC_FIELDS`);
- ``last.pt`` / ``best.pt``: checkpoints (best = highest validation robust accuracy);
- ``summary.json``: final metrics, total time and versions.

Every step: craft ``x_adv`` against the current model (BatchNorm in eval mode by default), compute the
objective on it, backpropagate, and -- with AGC -- evaluate the same objective on the *same* batch at
the snapshot weights, then take the optimizer step (masks enforced by the optimizer's step hooks) and
the topology scheduler's step. On CPU a run is bit-for-bit reproducible and resumable: the data order
depends only on ``(seed, epoch)``, and checkpoints carry every RNG state.

``--amp bf16|fp16`` runs the attack, the training forward and loss, and AGC's snapshot and refresh
passes under ``torch.autocast`` (parameters, optimizer state and evaluation stay float32); float16
adds a loss scaler whose skipped steps are counted (:meth:`Trainer._optimizer_step`).
``--channels-last`` puts the model's 4-d weights and the training inputs in ``channels_last``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_refresh
from .data import Batches, DataSplits, make_splits
from .errors import CheckpointError, UserError
from .models import create_model
from .sparse import EVER_BUFFER, MASK_BUFFER

__all__ = ["train", "Trainer", "METRIC_FIELDS", "evaluate_accuracy", "default_run_dir"]

logger = logging.getLogger(__name__)

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_clean_acc",
    "val_robust_acc",
    "test_clean_acc",
    "test_robust_acc",
    "lr",
    "epoch_time_s",
    "wall_time_s",
    "train_time_s",
    "cpu_time_s",
    "images_per_s",
    "grad_evals",
)
"""Fields every epoch's record has; AGC adds ``agc_*`` fields, sparse methods ``density`` etc."""

TIMING_FIELDS = (
    "epoch_time_s",
    "wall_time_s",
    "train_time_s",
    "cpu_time_s",
    "images_per_s",
    "refresh_time_s",
)
"""Fields that measure time and therefore differ between otherwise identical runs."""


def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<dataset>-<model>-<sparse>[-<sparsity>]-<optimizer>-<objective>-s<seed>``."""
    sparse = (
        cfg.sparse_method
        if cfg.sparse_method == "dense"
        else f"{cfg.sparse_method}{cfg.sparsity:g}"
    )
    return (
        Path("runs")
        / f"{cfg.dataset}-{cfg.model}-{sparse}-{cfg.optimizer}-{cfg.objective}-s{cfg.seed}"
    )


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat(
        [model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    )


def evaluate_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy (in [0, 1]) of ``model`` in eval mode on ``(x, y)``, optionally under ``attack``."""
    if x.shape[0] == 0:
        return float("nan")
    total = x.shape[0]
    rank, world = _dist_info()
    if world > 1:  # each rank evaluates its slice; the counts are summed
        x, y = x[rank::world], y[rank::world]
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            if attack is not None:
                xb = attack(xb, yb)
            with torch.no_grad():
                correct += int((model(xb).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    if world > 1:
        t = torch.tensor([correct], dtype=torch.int64, device=_comm_device(device))
        dist.all_reduce(t)
        correct = int(t.item())
    return correct / total


def _dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def mask_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sparse masks' buffers (``weight_mask``, ``weight_mask_ever``),
    which DDP leaves out of its per-forward buffer broadcast in the trainer."""
    return [
        n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in (MASK_BUFFER, EVER_BUFFER)
    ]


@dataclass
class _RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # training steps taken (float16 steps skipped by the loss scaler included)
    grad_evals: int = 0  # forward+backward passes over single examples, all sources
    wall_time_s: float = 0.0  # training + evaluation time, summed over sessions
    train_time_s: float = 0.0  # training only (incl. attacks, AGC refresh), wall-clock
    cpu_time_s: float = 0.0  # training only, CPU time of this process (robust to a loaded machine)
    best_val_robust: float = -1.0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    amp_skipped_steps: int = 0  # float16: steps skipped for non-finite gradients


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device synchronisation)."""
    if not tensors:
        return True
    # amax propagates NaN, and the largest magnitude is inf exactly when an element is
    return bool(torch.isfinite(torch.stack([t.detach().abs().amax() for t in tensors])).all())


class Trainer:
    """Builds every component of a run from a :class:`TrainConfig` and runs its epochs.

    The pieces are attributes (``model``, ``optimizer``, ``masks``, ``topology``, ``objective``,
    ``attack``), so research code can build a ``Trainer``, replace one, and call :meth:`fit`.
    """

    def __init__(self, cfg: TrainConfig, *, splits: DataSplits | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"Invalid device value: {cfg.device!r} (CUDA is not available here)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size = _dist_info()
        torch.manual_seed(cfg.seed)
        self.splits = splits or make_splits(
            cfg.dataset,
            data_dir=cfg.data_dir,
            download=cfg.download,
            train_subset=cfg.train_subset,
            val_size=cfg.val_size,
        )
        info = self.splits.info
        n_probe = cfg.probe_batches * cfg.batch_size
        if cfg.probe_variance_every and n_probe > len(self.splits.x_train):
            raise UserError(
                f"Invalid probe_batches value: {cfg.probe_batches} batches of {cfg.batch_size} "
                f"exceed the {len(self.splits.x_train)} training examples"
            )
        self.eps = info.eps_linf if cfg.eps is None else cfg.eps
        self.step_size = cfg.attack_step_size or 2.5 * self.eps / cfg.attack_steps
        self.model = create_model(
            cfg.model,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            input_size=info.input_size,
            mean=info.mean,
            std=info.std,
            init=cfg.init,
        ).to(self.device)
        if cfg.channels_last:  # 4-d weights (convolutions); before masks and optimizer state
            self.model.to(memory_format=torch.channels_last)
        self._build_amp()
        self._build_sparse()
        self._build_optimizer()
        self._build_objective()
        augment = cfg.augment if cfg.augment is not None else info.augment
        self.batches = Batches(
            self.splits.x_train,
            self.splits.y_train,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            augment=augment,
            rank=self.rank,
            num_replicas=self.world_size,
        )
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self._build_topology()
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = _RunState()
        self._refresh_kind, self._refresh_every = parse_refresh(cfg.agc_refresh)
        self._refresh_gen = torch.Generator().manual_seed(cfg.seed + 17)
        # Data parallel: DDP averages p.grad over ranks; attacks, AGC's snapshot pass and evaluation
        # use the plain module (AGC all-reduces its own gradients and statistics).
        self.train_model: nn.Module = self.model
        self._mask_updates_checked = 0
        if self.world_size > 1:
            if self.masks is not None:
                self.masks.broadcast_(src=0)
                # The masks were just broadcast and are checked equal after every topology update:
                # keep them out of DDP's per-forward buffer broadcast (1 byte per maskable weight
                # each, half the gradient payload). A workaround API of torch, used as documented.
                names = mask_buffer_names(self.model)
                ignore = getattr(
                    DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None
                )
                if ignore is not None:
                    ignore(self.model, names)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
            torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # distinct attack starts per rank
        from attacks import PGD

        # Per-epoch robust evaluation: its own seeded generator, so it never draws from the global RNG.
        self.eval_attack = PGD(
            self.model,
            eps=self.eps,
            alpha=2.5 * self.eps / cfg.eval_steps,
            steps=cfg.eval_steps,
            random_start=True,
            seed=cfg.seed + 1,
        )

    # ----------------------------------------------------------------------------------------- build
    def _build_amp(self) -> None:
        """Mixed precision: the autocast dtype, and a loss scaler for float16."""
        cfg, device_type = self.cfg, self.device.type
        self.amp_dtype: torch.dtype | None = _AMP_DTYPES.get(cfg.amp)
        self.scaler: torch.amp.GradScaler | None = None
        if self.amp_dtype is None:
            return
        ok = torch.amp.is_autocast_available(device_type)
        if ok:
            with self._autocast():  # older torch builds silently disable an unsupported dtype
                ok = torch.is_autocast_enabled(device_type)
        if not ok:
            raise UserError(
                f"Invalid amp value: {cfg.amp!r} (this torch build has no {cfg.amp} autocast "
                f"on {device_type}; use --amp off)"
            )
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(device_type)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` in the configured dtype (a no-op context with ``--amp off``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_input_format(self, x: Tensor) -> Tensor:
        if self.cfg.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss_scale_kwargs(self) -> dict[str, Tensor]:
        """``{"loss_scale": scale}`` for AGC's passes under float16 (the scaler's current scale as
        a device tensor, read without synchronising), else ``{}``."""
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale(torch.ones((), device=self.device))}

    def _optimizer_step(self) -> bool:
        """The optimizer step; returns whether it was taken.

        Without a loss scaler it always is. With float16 the gradients are unscaled, and the step is
        taken only if ``p.grad`` and (AGC) the snapshot gradients are all finite: otherwise it is
        skipped -- logged and counted in ``amp_skipped_steps`` -- and the scale backs off, as
        ``GradScaler.step`` does (the same single synchronisation per step); the snapshot gradient
        is checked too, which ``GradScaler`` cannot see.
        """
        opt, scaler = self.optimizer, self.scaler
        if scaler is None:
            opt.step()
            return True
        scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        snap_grads = []
        if self.is_agc:
            snap_grads = [
                opt.state[p]["snap_grad"] for p in params if "snap_grad" in opt.state.get(p, {})
            ]
        if _all_finite(grads + snap_grads):
            opt.step()
            scaler.update()
            return True
        scale = scaler.get_scale()
        if _all_finite(grads):  # only the snapshot gradient overflowed: GradScaler did not see it
            scaler.update(new_scale=scale * scaler.get_backoff_factor())
        else:  # GradScaler's own backoff (and growth-tracker reset)
            scaler.update()
        self.state.amp_skipped_steps += 1
        logger.warning(
            "fp16: non-finite gradient at step %d with loss scale %g: step skipped, scale %g",
            self.state.step + 1,
            scale,
            scaler.get_scale(),
        )
        return False

    def _build_sparse(self) -> None:
        cfg = self.cfg
        self.masks = None
        if cfg.sparse_method == "dense":
            return
        from .sparse import apply_masks

        g = torch.Generator().manual_seed(cfg.seed + 7)
        self.masks = apply_masks(
            self.model,
            sparsity=cfg.sparsity,
            distribution=cfg.sparse_init,
            dense_first_layer=cfg.dense_first_layer,
            generator=g,
        )

    def _build_optimizer(self) -> None:
        from .optim import create_optimizer

        cfg = self.cfg
        agc_kwargs: dict[str, Any] = {}
        if cfg.optimizer == "agc":
            agc_kwargs = dict(
                gamma=cfg.agc_gamma,
                alpha=cfg.agc_alpha,
                tau_init=cfg.agc_tau_init,
                estimator=cfg.agc_estimator,
            )
        elif cfg.optimizer == "svrg":
            agc_kwargs = dict(
                coef="ramp" if cfg.svrg_schedule == "ramp" else "fixed", fixed_coef=cfg.svrg_coef
            )
        params: Any = self.model.parameters()
        if cfg.sparse_method == "bsr":  # BSR-Net decays theta itself (decoupled, SGDW)
            masked = {id(w) for w in self.masks.weights()}
            rest = [p for p in self.model.parameters() if id(p) not in masked]
            params = [
                {"params": self.masks.weights(), "weight_decay": 0.0},
                {"params": rest, "weight_decay": cfg.weight_decay},
            ]
        self.optimizer = create_optimizer(
            cfg.optimizer,
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            **agc_kwargs,
        )
        self.is_agc = hasattr(self.optimizer, "snapshot_backward")
        if self.masks is not None:
            self.masks.attach(self.optimizer)

    def _build_objective(self) -> None:
        from .losses import get_objective

        cfg = self.cfg
        self.objective = get_objective(cfg.objective, beta=cfg.beta)
        self.attack = None
        if not self.objective.needs_adversarial:
            return
        if cfg.train_attack:
            from attacks import create_attack

            self.attack = create_attack(
                cfg.train_attack,
                self.model,
                eps=self.eps,
                alpha=self.step_size,
                steps=cfg.attack_steps,
            )
        else:
            self.attack = self.objective.default_attack(
                self.model,
                eps=self.eps,
                alpha=self.step_size,
                steps=cfg.attack_steps,
                bn_mode=cfg.attack_bn_mode,
            )

    def _build_topology(self) -> None:
        self.topology = None
        if self.masks is None:
            return
        from .sparse import create_scheduler

        cfg = self.cfg
        kw = {
            k: v
            for k, v in dict(
                update_interval=cfg.update_interval,
                drop_fraction=cfg.drop_fraction,
                update_end=cfg.update_end,
            ).items()
            if v is not None
        }
        if cfg.sparse_method == "bsr":
            from .sparse import BSRScheduler

            wd = cfg.weight_decay if cfg.bsr_weight_decay is None else cfg.bsr_weight_decay
            self.topology = BSRScheduler(
                self.masks,
                optimizer=self.optimizer,
                total_steps=self.total_steps,
                n_train=self.splits.x_train.shape[0],
                noise=cfg.bsr_noise,
                noise_form=cfg.bsr_noise_form,
                noise_milestone=cfg.bsr_noise_milestone,
                noise_factor=cfg.bsr_noise_factor,
                weight_decay=wd,
                init_theta=cfg.bsr_init_theta,
                generator=torch.Generator().manual_seed(cfg.seed + 11),
            )
            return
        self.topology = create_scheduler(
            cfg.sparse_method,
            self.masks,
            total_steps=self.total_steps,
            optimizer=self.optimizer,
            generator=torch.Generator().manual_seed(self.cfg.seed + 11),
            **kw,
        )

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        warm = cfg.warmup_epochs * self.steps_per_epoch
        if warm > 0 and step < warm:
            return (step + 1) / warm
        t = step / max(1, self.total_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if cfg.lr_schedule == "multistep":
            return cfg.lr_decay ** sum(t >= m for m in cfg.lr_milestones)
        return 1.0

    # --------------------------------------------------------------------------------------- pieces
    def _eps_now(self) -> float:
        w = self.cfg.eps_warmup_epochs * self.steps_per_epoch
        if w <= 0:
            return self.eps
        return self.eps * min(1.0, (self.state.step + 1) / w)

    def _craft(self, x: Tensor, y: Tensor) -> Tensor:
        if self.attack is None:
            return x
        if self.cfg.eps_warmup_epochs > 0:
            eps = self._eps_now()
            self.attack.eps = eps
            self.attack.alpha = self.step_size * eps / self.eps
        return self.attack(x, y)

    def _attack_cost(self, n: int) -> int:
        if self.attack is None:
            return 0
        return int(getattr(self.attack, "cost_per_example", self.cfg.attack_steps)) * n

    def _refresh_due(self, epoch_start: bool) -> bool:
        if not self.is_agc:
            return False
        if self._refresh_kind == "epoch":
            return epoch_start and self.state.epoch % self._refresh_every == 0
        return self.state.step % self._refresh_every == 0

    def _refresh(self) -> dict[str, Any]:
        """The AGC statistics pass over (a seeded fraction of) the training set."""
        cfg = self.cfg
        src = Batches(
            self.splits.x_train,
            self.splits.y_train,
            cfg.batch_size,
            shuffle=False,
            rank=self.rank,
            num_replicas=self.world_size,
        )
        n_batches = len(src)
        keep = n_batches
        if cfg.agc_refresh_fraction < 1.0:
            keep = max(2, round(cfg.agc_refresh_fraction * n_batches))
        chosen = set(torch.randperm(n_batches, generator=self._refresh_gen)[:keep].tolist())
        objective, device = self.objective, self.device
        attack_cost = 0

        def batches():
            nonlocal attack_cost
            for i, (x, y) in enumerate(src):
                if i not in chosen:
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x = self._to_input_format(x)
                if cfg.agc_full_grad == "adversarial" and self.attack is not None:
                    with self._autocast():
                        x_adv = self._craft(x, y)
                    attack_cost += self._attack_cost(x.shape[0])
                else:
                    x_adv = x
                yield x, x_adv, y

        def loss_fn(m: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
            with self._autocast():
                return objective(m, x, x_adv, y)[0]

        self.model.train()
        tel = self.optimizer.refresh(self.model, batches(), loss_fn, **self._loss_scale_kwargs())
        if self.masks is not None:  # mu is dense: keep every state tensor zero at pruned positions
            self.masks.zero_optimizer_state_(self.optimizer)
        local = int(tel.get("refresh_grad_evals", 0)) + attack_cost
        self.state.grad_evals += local * self.world_size
        return tel

    # ------------------------------------------------------------------------------------------ run
    def train_epoch(self, progress: bool = False) -> dict[str, Any]:
        """One epoch of training; returns the epoch's training statistics."""
        cfg, model, opt, device = self.cfg, self.model, self.optimizer, self.device
        objective = self.objective
        self.batches.set_epoch(self.state.epoch)
        refresh_tel: dict[str, Any] = {}
        refresh_time = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        probes: list[dict[str, float]] = []
        skipped_before = self.state.amp_skipped_steps
        autocast, scaler = self._autocast, self.scaler

        def snapshot_loss(m: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
            with autocast():
                return objective(m, x, x_adv, y)[0]

        it = self.batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(self.batches, desc=f"epoch {self.state.epoch + 1}/{cfg.epochs}", leave=False)
        for i, (x, y) in enumerate(it):
            if self._refresh_due(epoch_start=i == 0):
                t0 = time.perf_counter()
                refresh_tel = self._refresh()
                refresh_time += time.perf_counter() - t0
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = self._to_input_format(x)
            n = x.shape[0]
            with autocast():
                x_adv = self._craft(x, y)
            self.train_model.train()
            with autocast():
                loss, logits = objective(self.train_model, x, x_adv, y)
            opt.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()
            fb = objective.forwards_per_step * n
            if self.is_agc:
                opt.snapshot_backward(
                    model,
                    lambda m, x=x, xa=x_adv, y=y: snapshot_loss(m, x, xa, y),
                    **self._loss_scale_kwargs(),
                )
                fb *= 2
            stepped = self._optimizer_step()
            self.lr_scheduler.step()
            # A step skipped by the float16 loss scaler is skipped by the topology too (RigL's
            # gradient is not finite; BSR-Net's step is the continuation of the optimizer's).
            if self.topology is not None and stepped:
                self.topology.step()
                if self.world_size > 1:
                    self._check_masks_agree()
            self.state.step += 1
            self.state.grad_evals += (fb + self._attack_cost(n)) * self.world_size
            if cfg.probe_variance_every and self.state.step % cfg.probe_variance_every == 0:
                probes.append(self._probe_variance())
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
        if self.world_size > 1:
            stats = torch.stack(
                [loss_sum, correct.double(), torch.tensor(seen, dtype=torch.float64, device=device)]
            ).to(_comm_device(device))
            dist.all_reduce(stats)
            loss_sum, correct, seen = stats[0], int(stats[1].item()), int(stats[2].item())
        out = {"train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen}
        if probes:
            out["grad_var"] = probes
        if self.is_agc:
            tel = self.optimizer.telemetry()
            out.update({k: tel[k] for k in ("agc_tau_now", "agc_tau", "agc_coef") if k in tel})
            out["refresh_time_s"] = refresh_time
            if refresh_tel:
                out["refresh_batches"] = refresh_tel.get("refresh_batches")
        if self.scaler is not None:
            out["amp_skipped_steps"] = self.state.amp_skipped_steps - skipped_before
            out["amp_loss_scale"] = self.scaler.get_scale()
        return out

    def _probe_variance(self) -> dict[str, float]:
        """:func:`robust_agc.probe.gradient_variance` on the first ``probe_batches`` training
        batches (adversarial examples crafted at the current weights and radius). The global RNG
        state and every model buffer are restored, so the training trajectory is unchanged."""
        from .probe import gradient_variance

        t0 = time.perf_counter()
        cfg, device = self.cfg, self.device
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        get_state = getattr(self.attack, "get_rng_state", None)
        attack_rng = get_state() if callable(get_state) else None
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        mode = self.model.training
        batches = []
        for i in range(cfg.probe_batches):
            x = self.splits.x_train[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)
            y = self.splits.y_train[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)
            batches.append((x, self._craft(x, y), y))
        self.model.train()
        objective = self.objective
        masks = None
        if self.masks is not None:
            masks = {id(w): m for w, m in zip(self.masks.weights(), self.masks.masks())}
        out = gradient_variance(
            self.model,
            lambda m, x, xa, y: objective(m, x, xa, y)[0],
            batches,
            optimizer=self.optimizer if self.is_agc else None,
            masks=masks,
        )
        self.model.train(mode)
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                b.copy_(buffers[k])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if attack_rng is not None:
            self.attack.set_rng_state(attack_rng)
        return {"step": self.state.step, **out, "time_s": time.perf_counter() - t0}

    def _check_masks_agree(self) -> None:
        """After each topology update, verify (not assume) that every rank holds the same masks."""
        n = self.topology.num_updates
        if n == self._mask_updates_checked:
            return
        self._mask_updates_checked = n
        if not self.masks.masks_equal_across_ranks():
            raise RuntimeError(f"sparse masks differ across ranks after topology update {n}")

    def evaluate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the validation points and the first ``eval_subset`` test points."""
        n = self.cfg.eval_subset
        s = self.splits
        out: dict[str, float] = {}
        for name, x, y in (("val", s.x_val[:n], s.y_val[:n]), ("test", s.x_test[:n], s.y_test[:n])):
            out[f"{name}_clean_acc"] = evaluate_accuracy(self.model, x, y, device=self.device)
            out[f"{name}_robust_acc"] = evaluate_accuracy(
                self.model, x, y, attack=self.eval_attack, device=self.device
            )
        return out

    def sparse_report(self) -> dict[str, Any]:
        """Density, exploration rate, FLOPs ratios and per-layer densities (empty when dense)."""
        if self.masks is None:
            return {}
        info = self.splits.info
        rep = self.masks.report(input_shape=(info.in_channels, info.input_size, info.input_size))
        keys = (
            "density",
            "exploration_rate",
            "flops_ratio",
            "train_flops_ratio",
            "layer_densities",
            "last_update",
        )
        return {k: rep[k] for k in keys if k in rep}

    # ------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: weights, optimizer, schedules, RNG, counters."""
        st = self.state
        ckpt: dict[str, Any] = {
            "format": "robust_agc.train/1",
            "version": __version__,
            "config": self.cfg.to_dict() | self._model_meta(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": st.epoch,
            "step": st.step,
            "grad_evals": st.grad_evals,
            "wall_time_s": st.wall_time_s,
            "train_time_s": st.train_time_s,
            "cpu_time_s": st.cpu_time_s,
            "best_val_robust": st.best_val_robust,
            "metrics": st.metrics,
            "rng": {"torch": torch.get_rng_state(), "refresh": self._refresh_gen.get_state()},
            "world_size": self.world_size,
        }
        if self.world_size > 1:
            states: list[Any] = [None] * self.world_size
            dist.all_gather_object(states, torch.get_rng_state())
            ckpt["rng"]["torch_per_rank"] = states
        if self.device.type == "cuda":
            ckpt["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.topology is not None:
            ckpt["topology"] = self.topology.state_dict()
        ckpt["rng"]["eval_attack"] = self.eval_attack.get_rng_state()
        if self.scaler is not None:
            ckpt["amp"] = {
                "scaler": self.scaler.state_dict(),
                "skipped_steps": st.amp_skipped_steps,
            }
        return ckpt

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the config must describe the same run)."""
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.masks is not None:
                self.masks.sync_from_buffers()  # the loaded masks; then the scheduler's history
            if self.topology is not None:
                self.topology.load_state_dict(ckpt["topology"])
            st = self.state
            st.epoch, st.step = int(ckpt["epoch"]), int(ckpt["step"])
            st.grad_evals, st.wall_time_s = int(ckpt["grad_evals"]), float(ckpt["wall_time_s"])
            st.train_time_s = float(ckpt.get("train_time_s", 0.0))
            st.cpu_time_s = float(ckpt.get("cpu_time_s", 0.0))
            st.best_val_robust, st.metrics = float(ckpt["best_val_robust"]), list(ckpt["metrics"])
            rng = ckpt["rng"]
            saved_world = int(ckpt.get("world_size", 1))
            if saved_world == self.world_size:
                per_rank = rng.get("torch_per_rank") or [rng["torch"]]
                torch.set_rng_state(per_rank[self.rank])
            else:  # another world size: the same data order, but attack random starts differ
                logger.warning(
                    "resuming a %d-process run on %d processes: attack random starts are "
                    "reseeded, so the continuation is not bit-identical",
                    saved_world,
                    self.world_size,
                )
                torch.manual_seed(self.cfg.seed + 7919 * st.epoch + 1_000_003 * self.rank)
            self._refresh_gen.set_state(rng["refresh"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            self.eval_attack.set_rng_state(rng["eval_attack"])
            if self.scaler is not None:
                self.scaler.load_state_dict(ckpt["amp"]["scaler"])
                st.amp_skipped_steps = int(ckpt["amp"]["skipped_steps"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint does not match this run's configuration: {first}"
            ) from None

    def _model_meta(self) -> dict[str, Any]:
        info = self.splits.info
        return {
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "input_size": info.input_size,
            "eps_resolved": self.eps,
            "attack_step_size_resolved": self.step_size,
        }

    # ------------------------------------------------------------------------------------------- fit
    def fit(self, out_dir: Path | None = None, *, progress: bool = False) -> dict[str, Any]:
        """Train the remaining epochs, writing metrics and checkpoints to ``out_dir`` when given."""
        cfg, st = self.cfg, self.state
        n_train = self.splits.x_train.shape[0]
        while st.epoch < cfg.epochs:
            t0, c0 = time.perf_counter(), time.process_time()
            rec: dict[str, Any] = {"epoch": st.epoch + 1}
            rec.update(self.train_epoch(progress=progress))
            train_time = time.perf_counter() - t0
            st.train_time_s += train_time
            st.cpu_time_s += time.process_time() - c0
            rec["lr"] = self.optimizer.param_groups[0]["lr"]
            rec.update(self.evaluate())
            rec.update(self.sparse_report())
            st.epoch += 1
            epoch_time = time.perf_counter() - t0
            st.wall_time_s += epoch_time
            rec.update(
                epoch_time_s=epoch_time,
                wall_time_s=st.wall_time_s,
                train_time_s=st.train_time_s,
                cpu_time_s=st.cpu_time_s,
                images_per_s=n_train / train_time,
                grad_evals=st.grad_evals,
                step=st.step,
            )
            st.metrics.append(rec)
            # No validation points (--val-size 0): best.pt follows the last epoch (the test set never
            # selects checkpoints).
            is_best = (
                math.isnan(rec["val_robust_acc"]) or rec["val_robust_acc"] > st.best_val_robust
            )
            if is_best:
                st.best_val_robust = rec["val_robust_acc"]
            logger.info(
                "epoch %d/%d loss %.4f train %.3f val %.3f/%.3f test %.3f/%.3f (%.1fs)",
                st.epoch,
                cfg.epochs,
                rec["train_loss"],
                rec["train_acc"],
                rec["val_clean_acc"],
                rec["val_robust_acc"],
                rec["test_clean_acc"],
                rec["test_robust_acc"],
                epoch_time,
            )
            ckpt = self.state_dict() if out_dir is not None else None  # collective under DDP
            if out_dir is not None and self.rank == 0:
                _write_metrics(out_dir, st.metrics)
                save_checkpoint(ckpt, out_dir / "last.pt")
                if is_best:
                    save_checkpoint(ckpt, out_dir / "best.pt")
        summary = self.summary()
        if out_dir is not None and self.rank == 0:
            atomic_write_bytes(
                out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode()
            )
        return summary

    def summary(self) -> dict[str, Any]:
        """Final metrics, totals and versions."""
        st = self.state
        last = st.metrics[-1] if st.metrics else {}
        best = max(st.metrics, key=lambda r: r["val_robust_acc"], default={})
        import torchvision

        return {
            "final": last,
            "best_val_epoch": best.get("epoch"),
            "best_val": {k: best.get(k) for k in METRIC_FIELDS if k.startswith(("val_", "test_"))},
            "epochs": st.epoch,
            "steps": st.step,
            "grad_evals": st.grad_evals,
            "wall_time_s": st.wall_time_s,
            "train_time_s": st.train_time_s,
            "cpu_time_s": st.cpu_time_s,
            "config": self.cfg.to_dict(),
            "versions": {
                "robust_agc": __version__,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "python": platform.python_version(),
            },
            "machine": {
                "cpu": cpu_model(),
                "threads": torch.get_num_threads(),
                "world_size": self.world_size,
            },
        }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_metrics(out_dir: Path, metrics: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in metrics)
    atomic_write_bytes(out_dir / "metrics.jsonl", text.encode())


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if cfg.resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"nothing to resume: {out / 'last.pt'} does not exist")
        return out
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(
                f"run folder {out} exists and is not empty: pass --resume to continue it or --overwrite to replace it"
            )
        if not (out / "config.yaml").is_file():
            raise UserError(
                f"refusing to overwrite {out}: it is not a robust_agc run folder (no config.yaml)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig) -> tuple[dict[str, Any], Path]:
    """Run (or resume) the training described by ``cfg``; returns ``(summary, run folder)``."""
    cfg.validate()
    rank, world = _dist_info()
    if rank == 0:
        out = _prepare_run_dir(cfg)
    if world > 1:
        dist.barrier()  # rank 0 has checked and prepared the folder
        out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    trainer = Trainer(cfg)
    if cfg.resume:
        ckpt = load_checkpoint(out / "last.pt", map_location=trainer.device)
        saved = {k: v for k, v in ckpt.get("config", {}).items() if k in cfg.to_dict()}
        mine = cfg.to_dict()
        ignore = {"resume", "overwrite", "progress", "device", "threads", "out", "data_dir"}
        diff = sorted(k for k in saved if k not in ignore and saved[k] != mine[k])
        if diff:
            raise UserError(
                f"--resume with a different configuration ({', '.join(diff)}); use a new --out"
            )
        trainer.load_state_dict(ckpt)
        logger.info("resumed %s at epoch %d", out, trainer.state.epoch)
    if rank == 0:
        cfg_text = yaml.safe_dump(cfg.to_dict() | trainer._model_meta(), sort_keys=False)
        atomic_write_bytes(out / "config.yaml", cfg_text.encode())
    summary = trainer.fit(out, progress=cfg.progress)
    return summary, out
