"""The training loop: attack generation alternating with (sparse) model updates, PGD-AT/TRADES/MART.

Every step: craft ``x_adv`` against the current model (BatchNorm in eval mode by default), compute the
objective on it, backpropagate, and -- with a corrected optimizer such as AGC (``docs/agc.md``) --
evaluate the same objective on the *same* batch at the snapshot weights, then take the optimizer
step (masks enforced by the optimizer's step hooks) and the topology scheduler's step. On CPU a run
is bit-for-bit reproducible and resumable: the data order depends only on ``(seed, epoch)``, and
checkpoints carry every RNG state (the streams are listed in :mod:`robust_agc.train.seeds`).

The pieces are built by :mod:`robust_agc.train.build`, mixed precision is
:mod:`robust_agc.train.amp`, and the run folder :mod:`robust_agc.train.run_dir`.
``--channels-last`` puts the model's 4-d weights and the training inputs in ``channels_last``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import __version__
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig, parse_refresh
from ..data import Batches, DataSplits
from ..errors import CheckpointError, UserError
from ..losses import grad_align_penalty
from ..optim import is_corrected
from ..probe import gradient_variance
from ..prune.source import check_resume_source, load_source, preflight
from ..utils import comm_device, dist_info, machine_info
from . import build
from .accuracy import evaluate_accuracy
from .amp import autocast, build_scaler, loss_scale_kwargs, scaled_step
from .fast_at import CollapseGuard, FreePerturbation
from .run_dir import (
    METRIC_FIELDS,
    check_resume_config,
    prepare_run_dir,
    run_dir_of,
    write_config,
    write_metrics,
    write_summary,
)
from .seeds import reseeded_rank_seed, stream_generator, stream_seed

__all__ = ["RunState", "Trainer", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "robust_agc.train/1"
"""The ``format`` field of a trainer checkpoint."""


@dataclass
class RunState:
    """The counters of a run that a checkpoint carries."""

    epoch: int = 0  # epochs completed
    step: int = 0  # training steps taken (float16 steps skipped by the loss scaler included)
    grad_evals: int = 0  # forward+backward passes over single examples, all sources
    wall_time_s: float = 0.0  # training + evaluation time, summed over sessions
    train_time_s: float = 0.0  # training only (incl. attacks, AGC refresh), wall-clock
    cpu_time_s: float = 0.0  # training only, CPU time of this process (robust to a loaded machine)
    best_val_robust: float = -1.0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    amp_skipped_steps: int = 0  # float16: steps skipped for non-finite gradients


class _EpochStats:
    """Loss and accuracy sums of one epoch, kept on the device (no synchronisation per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += n

    def result(self, world_size: int) -> dict[str, float]:
        loss_sum, correct, seen = self.loss_sum, self.correct, self.seen
        if world_size > 1:
            seen_t = torch.tensor(seen, dtype=torch.float64, device=self.device)
            stats = torch.stack([loss_sum, correct.double(), seen_t]).to(comm_device(self.device))
            dist.all_reduce(stats)
            loss_sum, correct, seen = stats[0], int(stats[1].item()), int(stats[2].item())
        return {"train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen}


class Trainer:
    """Builds every component of a run from a :class:`TrainConfig` and runs its epochs.

    The pieces are attributes (``model``, ``optimizer``, ``masks``, ``topology``, ``objective``,
    ``attack``), so research code can build a ``Trainer``, replace one, and call :meth:`fit`.
    """

    def __init__(self, cfg: TrainConfig, *, splits: DataSplits | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = build.resolve_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size = dist_info()
        torch.manual_seed(stream_seed(cfg.seed, "global"))
        self.splits = build.build_splits(cfg, splits)
        info = self.splits.info
        self.eps = info.eps_linf if cfg.eps is None else cfg.eps
        self.step_size = build.resolve_step_size(cfg, self.eps)
        # read once; a structurally pruned (exported) source: this run trains that smaller network
        source = load_source(cfg.init_from) if cfg.init_from else None
        self.widths = None if source is None else source.widths
        self.model = build.build_model(cfg, info, self.device, self.widths)
        self.init_source = build.build_init_source(cfg, self.model, source)
        self.amp_dtype, self.scaler = build_scaler(cfg.amp, self.device.type)
        shape = (info.in_channels, info.input_size, info.input_size)
        self.masks = build.build_masks(cfg, self.model, self.init_source, shape)
        self.optimizer = build.build_optimizer(cfg, self.model, self.masks)
        self.is_agc = is_corrected(self.optimizer)
        self.objective, self.attack = build.build_objective(
            cfg, self.model, self.eps, self.step_size
        )
        self.batches = build.build_batches(
            cfg, self.splits, rank=self.rank, world_size=self.world_size
        )
        self.steps_per_epoch = len(self.batches) * cfg.free_replays  # optimizer steps
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.topology = build.build_topology(
            cfg,
            self.masks,
            self.optimizer,
            total_steps=self.total_steps,
            n_train=self.splits.x_train.shape[0],
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = RunState()
        self._refresh_kind, self._refresh_every = parse_refresh(cfg.agc_refresh)
        self._refresh_gen = stream_generator(cfg.seed, "agc_refresh")
        self._mask_updates_checked = 0
        self.train_model: nn.Module = build.wrap_data_parallel(
            cfg,
            self.model,
            self.masks,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.eval_attack = build.build_eval_attack(cfg, self.model, self.eps)
        self._init_fast_at(cfg)

    def _init_fast_at(self, cfg: TrainConfig) -> None:
        """Free adversarial training's perturbation, GradAlign's noise stream and the collapse
        guard, each only when its option is on (no state and no random draws otherwise)."""
        self.free = FreePerturbation() if cfg.free_replays > 1 else None
        self._grad_align_gen = (
            stream_generator(cfg.seed, "grad_align") if cfg.grad_align > 0 else None
        )
        action = cfg.collapse_action()
        self.guard = None
        if action != "off":
            self.guard = CollapseGuard(action, gap=cfg.collapse_gap, drop=cfg.collapse_drop)
            self.guard_attack = build.build_guard_attack(self.model, self.eps)

    # --------------------------------------------------------------------------------------- pieces
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` in the configured dtype (a no-op context with ``--amp off``)."""
        return autocast(self.device.type, self.amp_dtype)

    def _to_input_format(self, x: Tensor) -> Tensor:
        if self.cfg.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss_scale_kwargs(self) -> dict[str, Tensor]:
        return loss_scale_kwargs(self.scaler, self.device)

    def _optimizer_step(self) -> bool:
        """The optimizer step; returns whether it was taken (:func:`~robust_agc.train.amp.
        scaled_step`). A float16 step skipped for non-finite gradients is logged and counted in
        ``amp_skipped_steps``."""
        scale = None if self.scaler is None else self.scaler.get_scale()
        if scaled_step(self.optimizer, self.scaler, corrected=self.is_agc):
            return True
        self.state.amp_skipped_steps += 1
        logger.warning(
            "fp16: non-finite gradient at step %d with loss scale %g: step skipped, scale %g",
            self.state.step + 1,
            scale,
            self.scaler.get_scale(),  # type: ignore[union-attr]
        )
        return False

    def _lr_factor(self, step: int) -> float:
        return build.lr_factor(
            self.cfg, step, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps
        )

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

    def _objective_loss(self, m: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """The objective's loss under autocast (for a corrected optimizer's extra passes)."""
        with self._autocast():
            return self.objective(m, x, x_adv, y)[0]

    # ------------------------------------------------------------------------------- AGC refresh
    def _refresh_due(self, epoch_start: bool) -> bool:
        if not self.is_agc:
            return False
        if self._refresh_kind == "epoch":
            return epoch_start and self.state.epoch % self._refresh_every == 0
        return self.state.step % self._refresh_every == 0

    def _refresh_batches(self, counter: list[int]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The refresh's ``(x, x_adv, y)`` batches: a seeded fraction of the training set (the
        ``agc_refresh`` stream); the attack cost is added to ``counter[0]``."""
        cfg, device = self.cfg, self.device
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
        for i, (x, y) in enumerate(src):
            if i not in chosen:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = self._to_input_format(x)
            if cfg.agc_full_grad == "adversarial" and self.attack is not None:
                with self._autocast():
                    x_adv = self._craft(x, y)
                counter[0] += self._attack_cost(x.shape[0])
            else:
                x_adv = x
            yield x, x_adv, y

    def _refresh(self) -> dict[str, Any]:
        """The corrected optimizer's statistics pass over (a seeded fraction of) the training set."""
        attack_cost = [0]
        self.model.train()
        tel = self.optimizer.refresh(  # type: ignore[attr-defined]
            self.model,
            self._refresh_batches(attack_cost),
            self._objective_loss,
            **self._loss_scale_kwargs(),
        )
        if self.masks is not None:  # mu is dense: keep every state tensor zero at pruned positions
            self.masks.zero_optimizer_state_(self.optimizer)
        local = int(tel.get("refresh_grad_evals", 0)) + attack_cost[0]
        self.state.grad_evals += local * self.world_size
        return tel

    # ------------------------------------------------------------------------------------------ run
    def _grad_align_term(self, x: Tensor, y: Tensor) -> Tensor:
        """``--grad-align`` times :func:`~robust_agc.losses.grad_align_penalty` on the training
        model, with ``eta ~ U(-eps, eps)`` from the ``grad_align`` stream (the current radius).
        Every rank draws the noise of the whole global batch and takes its own shard's rows, so
        each example gets the noise one process would give it (and the rank's stream stays in step
        with the others')."""
        eps = self._eps_now()
        g = self._grad_align_gen
        n = x.shape[0]
        eta = torch.rand((n * self.world_size, *x.shape[1:]), generator=g, dtype=x.dtype)
        eta = eta[self.rank * n : (self.rank + 1) * n].mul_(2.0 * eps).sub_(eps)
        eta = eta.to(x.device, memory_format=torch.preserve_format)
        return self.cfg.grad_align * grad_align_penalty(self.train_model, x, y, eta)

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One training step on ``(x, y)``; returns ``(loss, logits)``.

        With free adversarial training the input is ``x`` plus the carried perturbation, which
        the same backward pass then moves one signed step. GradAlign's penalty is added to the
        loss whose gradient the step takes; a corrected optimizer's snapshot pass (and refresh)
        evaluate the objective alone, so the correction stays zero-mean and the penalty's
        gradient enters uncorrected."""
        opt, scaler, n = self.optimizer, self.scaler, x.shape[0]
        with self._autocast():
            x_adv = self._craft(x, y) if self.free is None else self.free.start(x)
        self.train_model.train()
        with self._autocast():
            loss, logits = self.objective(self.train_model, x, x_adv, y)
        if self._grad_align_gen is not None:
            with self._autocast():
                loss = loss + self._grad_align_term(x, y)
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        fb = self.objective.forwards_per_step * n
        if self.free is not None:
            x_adv = x_adv.detach()
            eps = self._eps_now()
            alpha = self.step_size if eps == self.eps else self.step_size * eps / self.eps
            self.free.step_(eps=eps, alpha=alpha)
        if self.is_agc:
            opt.snapshot_backward(  # type: ignore[attr-defined]
                self.model,
                lambda m, x=x, xa=x_adv, y=y: self._objective_loss(m, x, xa, y),
                **self._loss_scale_kwargs(),
            )
            fb *= 2
        if self._grad_align_gen is not None:
            fb += 3 * n
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
        return loss, logits

    def _epoch_batches(self, progress: bool) -> Any:
        if not progress:
            return self.batches
        from tqdm.auto import tqdm

        desc = f"epoch {self.state.epoch + 1}/{self.cfg.epochs}"
        return tqdm(self.batches, desc=desc, leave=False)

    def train_epoch(self, progress: bool = False) -> dict[str, Any]:
        """One epoch of training; returns the epoch's training statistics."""
        cfg, device = self.cfg, self.device
        self.batches.set_epoch(self.state.epoch)
        refresh_tel: dict[str, Any] = {}
        refresh_time = 0.0
        stats = _EpochStats(device)
        probes: list[dict[str, float]] = []
        skipped_before = self.state.amp_skipped_steps
        for i, (x, y) in enumerate(self._epoch_batches(progress)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = self._to_input_format(x)
            for j in range(cfg.free_replays):  # one optimizer step each (free AT replays)
                if self._refresh_due(epoch_start=i == 0 and j == 0):
                    t0 = time.perf_counter()
                    refresh_tel = self._refresh()
                    refresh_time += time.perf_counter() - t0
                loss, logits = self._train_step(x, y)
                if cfg.probe_variance_every and self.state.step % cfg.probe_variance_every == 0:
                    probes.append(self._probe_variance())
                stats.add(loss, logits, y)
        out: dict[str, Any] = stats.result(self.world_size)
        if probes:
            out["grad_var"] = probes
        if self.is_agc:
            tel = self.optimizer.telemetry()  # type: ignore[attr-defined]
            out.update({k: tel[k] for k in ("agc_tau_now", "agc_tau", "agc_coef") if k in tel})
            out["refresh_time_s"] = refresh_time
            if refresh_tel:
                out["refresh_batches"] = refresh_tel.get("refresh_batches")
        if self.scaler is not None:
            out["amp_skipped_steps"] = self.state.amp_skipped_steps - skipped_before
            out["amp_loss_scale"] = self.scaler.get_scale()
        return out

    @contextlib.contextmanager
    def _preserved_trajectory(self) -> Iterator[None]:
        """Restore the global (and CUDA) RNG, the attack's generator, every model buffer and the
        model's mode after the block, so a measurement leaves the training trajectory unchanged."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        get_state = getattr(self.attack, "get_rng_state", None)
        attack_rng = get_state() if callable(get_state) else None
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        mode = self.model.training
        yield
        self.model.train(mode)
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                b.copy_(buffers[k])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if attack_rng is not None:
            self.attack.set_rng_state(attack_rng)  # type: ignore[union-attr]

    def _probe_variance(self) -> dict[str, float]:
        """:func:`robust_agc.probe.gradient_variance` on the first ``probe_batches`` training
        batches (adversarial examples crafted at the current weights and radius). The global RNG
        state and every model buffer are restored, so the training trajectory is unchanged."""
        t0 = time.perf_counter()
        cfg, device, bs = self.cfg, self.device, self.cfg.batch_size
        with self._preserved_trajectory():
            batches = []
            for i in range(cfg.probe_batches):
                x = self.splits.x_train[i * bs : (i + 1) * bs].to(device)
                y = self.splits.y_train[i * bs : (i + 1) * bs].to(device)
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
        return {"step": self.state.step, **out, "time_s": time.perf_counter() - t0}

    def _check_masks_agree(self) -> None:
        """After each topology update, verify (not assume) that every rank holds the same masks."""
        n = self.topology.num_updates  # type: ignore[union-attr]
        if n == self._mask_updates_checked:
            return
        self._mask_updates_checked = n
        if not self.masks.masks_equal_across_ranks():  # type: ignore[union-attr]
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
            if self.guard is not None and name == "val":  # the guard's single-step accuracy
                out["val_fgsm_acc"] = evaluate_accuracy(
                    self.model, x, y, attack=self.guard_attack, device=self.device
                )
        return out

    def sparse_report(self) -> dict[str, Any]:
        """Density, exploration rate, FLOPs ratios and per-layer densities (empty when dense)."""
        if self.masks is None:
            return {}
        info = self.splits.info
        rep = self.masks.report(
            input_shape=(info.in_channels, info.input_size, info.input_size),
            scheduler=self.topology,
        )
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
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "config": self.cfg.to_dict() | self.model_meta(),
            "model": self.model.state_dict(),
            **({} if self.widths is None else {"widths": dict(self.widths)}),
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
        self._fast_at_state(ckpt)
        if self.init_source is not None:
            ckpt["source"] = self.init_source.provenance()
        return ckpt

    def _fast_at_state(self, ckpt: dict[str, Any]) -> None:
        """Add the state of the fast adversarial training options that are on to ``ckpt``."""
        if self.free is not None:
            ckpt["free_at"] = self.free.state_dict()
        if self._grad_align_gen is not None:
            ckpt["rng"]["grad_align"] = self._grad_align_gen.get_state()
        if self.guard is not None:
            ckpt["collapse_guard"] = self.guard.state_dict()

    def _load_fast_at_state(self, ckpt: dict[str, Any], rng: dict[str, Any]) -> None:
        if self.free is not None:
            self.free.load_state_dict(ckpt["free_at"])
        if self._grad_align_gen is not None:
            self._grad_align_gen.set_state(rng["grad_align"])
        if self.guard is not None:
            self.guard.load_state_dict(ckpt["collapse_guard"])

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the config must describe the same run). ``ckpt`` may
        have been loaded onto the run's device; the random states are moved back to the CPU, where
        ``set_rng_state`` and ``Generator.set_state`` want them."""
        try:
            rng = {k: _on_cpu(v) for k, v in ckpt["rng"].items()}
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.masks is not None:
                self.masks.sync_from_buffers()  # the loaded masks; then the scheduler's history
            if self.topology is not None:
                self.topology.load_state_dict(ckpt["topology"])
            self._load_counters(ckpt)
            self._load_rng(rng, saved_world=int(ckpt.get("world_size", 1)))
            if self.scaler is not None:
                self.scaler.load_state_dict(ckpt["amp"]["scaler"])
                self.state.amp_skipped_steps = int(ckpt["amp"]["skipped_steps"])
            self._load_fast_at_state(ckpt, rng)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint does not match this run's configuration: {first}"
            ) from None

    def _load_counters(self, ckpt: dict[str, Any]) -> None:
        st = self.state
        st.epoch, st.step = int(ckpt["epoch"]), int(ckpt["step"])
        st.grad_evals, st.wall_time_s = int(ckpt["grad_evals"]), float(ckpt["wall_time_s"])
        st.train_time_s = float(ckpt.get("train_time_s", 0.0))
        st.cpu_time_s = float(ckpt.get("cpu_time_s", 0.0))
        st.best_val_robust, st.metrics = float(ckpt["best_val_robust"]), list(ckpt["metrics"])

    def _load_rng(self, rng: dict[str, Any], *, saved_world: int) -> None:
        """Restore every RNG stream; on another world size the global RNG is reseeded instead."""
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
            torch.manual_seed(reseeded_rank_seed(self.cfg.seed, self.state.epoch, self.rank))
        self._refresh_gen.set_state(rng["refresh"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.eval_attack.set_rng_state(rng["eval_attack"])

    def model_meta(self) -> dict[str, Any]:
        """What rebuilding the model and its attack radius needs besides the config (written to
        ``config.yaml`` and the checkpoint's ``config``)."""
        info = self.splits.info
        return {
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "input_size": info.input_size,
            "eps_resolved": self.eps,
            "attack_step_size_resolved": self.step_size,
        }

    # ------------------------------------------------------------------------------------------- fit
    def _run_epoch(self, progress: bool) -> dict[str, Any]:
        """Train and evaluate one epoch, advance the counters; returns the epoch's record."""
        st = self.state
        t0, c0 = time.perf_counter(), time.process_time()
        rec: dict[str, Any] = {"epoch": st.epoch + 1}
        rec.update(self.train_epoch(progress=progress))
        train_time = time.perf_counter() - t0
        st.train_time_s += train_time
        st.cpu_time_s += time.process_time() - c0
        rec["lr"] = self.optimizer.param_groups[0]["lr"]
        if not self._weights_finite():
            rec["nonfinite_weights"] = True
            logger.warning(
                "epoch %d: training diverged: the model's weights are not finite (training "
                "loss %s); it cannot recover from here",
                rec["epoch"],
                rec["train_loss"],
            )
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
            images_per_s=self.splits.x_train.shape[0] / train_time,
            grad_evals=st.grad_evals,
            step=st.step,
        )
        st.metrics.append(rec)
        return rec

    def _weights_finite(self) -> bool:
        """Whether every floating parameter and buffer of the model is finite (one reduction
        per tensor; with float16 loss scaling a non-finite step is skipped, so only a real
        divergence makes this false)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def _log_epoch(self, rec: dict[str, Any]) -> None:
        logger.info(
            "epoch %d/%d loss %.4f train %.3f val %.3f/%.3f test %.3f/%.3f (%.1fs)",
            self.state.epoch,
            self.cfg.epochs,
            rec["train_loss"],
            rec["train_acc"],
            rec["val_clean_acc"],
            rec["val_robust_acc"],
            rec["test_clean_acc"],
            rec["test_robust_acc"],
            rec["epoch_time_s"],
        )

    def fit(self, out_dir: Path | None = None, *, progress: bool = False) -> dict[str, Any]:
        """Train the remaining epochs, writing metrics and checkpoints to ``out_dir`` when given."""
        st = self.state
        self._prepare_rollback(out_dir)
        if out_dir is not None and st.epoch == 0 and 0 in (self.cfg.save_epochs or ()):
            self._save_epoch(out_dir, self.state_dict())
        while st.epoch < self.cfg.epochs and not (self.guard is not None and self.guard.stopped):
            rec = self._run_epoch(progress)
            if self._check_collapse(rec) == "rollback":
                self._rollback(out_dir, rec)  # type: ignore[arg-type]
                break
            # No validation points (--val-size 0): best.pt follows the last epoch (the test set never
            # selects checkpoints).
            is_best = (
                math.isnan(rec["val_robust_acc"]) or rec["val_robust_acc"] > st.best_val_robust
            )
            if is_best:
                st.best_val_robust = rec["val_robust_acc"]
            self._log_epoch(rec)
            ckpt = self.state_dict() if out_dir is not None else None  # collective under DDP
            if out_dir is not None and self.rank == 0:
                write_metrics(out_dir, st.metrics)
                save_checkpoint(ckpt, out_dir / "last.pt")
                if is_best:
                    save_checkpoint(ckpt, out_dir / "best.pt")
            if st.epoch in (self.cfg.save_epochs or ()):
                self._save_epoch(out_dir, ckpt)
        summary = self.summary()
        if out_dir is not None and self.rank == 0:
            write_summary(out_dir, summary)
        return summary

    # ------------------------------------------------------------- catastrophic-overfitting guard
    def _check_collapse(self, rec: dict[str, Any]) -> str | None:
        """Run the guard on an epoch's record (flags it in place); the action to take, or None."""
        if self.guard is None:
            return None
        best = self.guard.best_robust
        reasons = self.guard.check(rec)
        if not reasons:
            return None
        logger.warning(
            "epoch %d: catastrophic overfitting suspected (%s): validation PGD accuracy %.3f, "
            "FGSM accuracy %.3f, best PGD accuracy of the good epochs %s; on-collapse: %s",
            rec["epoch"],
            ", ".join(reasons),
            rec["val_robust_acc"],
            rec.get("val_fgsm_acc", float("nan")),
            "none" if best is None else f"{best:.3f}",
            self.guard.action,
        )
        if self.guard.action == "stop":
            self.guard.stopped = True
        return self.guard.action

    def _prepare_rollback(self, out_dir: Path | None) -> None:
        """``--on-collapse rollback`` needs a checkpoint of the last good epoch on disk: a run
        folder is required (a :class:`UserError` before any training otherwise), and a new run
        writes its initial state as ``last.pt`` (the state a collapse in epoch 1 returns to)."""
        if self.guard is None or self.guard.action != "rollback":
            return
        if out_dir is None:
            raise UserError(
                "Invalid on_collapse value: 'rollback' needs a run folder to keep the last good "
                "checkpoint in (fit(out_dir=...))"
            )
        if self.state.epoch == 0 and not (out_dir / "last.pt").is_file():
            ckpt = self.state_dict()  # collective under DDP
            if self.rank == 0:
                save_checkpoint(ckpt, out_dir / "last.pt")

    def _rollback(self, out_dir: Path, rec: dict[str, Any]) -> None:
        """Restore the last good epoch's checkpoint (weights, optimizer, masks and topology,
        schedules, RNG streams, counters) and end the run there. The flagged epoch stays in the
        metrics marked ``rolled_back``; the compute it spent stays in ``grad_evals`` and the
        clocks."""
        st, guard = self.state, self.guard
        assert guard is not None
        spent = (st.grad_evals, st.wall_time_s, st.train_time_s, st.cpu_time_s)
        if self.world_size > 1:
            dist.barrier()
        self.load_state_dict(load_checkpoint(out_dir / "last.pt", map_location=self.device))
        st.grad_evals, st.wall_time_s, st.train_time_s, st.cpu_time_s = spent
        st.metrics.append(dict(rec, rolled_back=True))
        guard.flagged.append(int(rec["epoch"]))
        guard.stopped, guard.rolled_back_to = True, st.epoch
        logger.warning("rolled back to epoch %d (the last good one); the run ends", st.epoch)
        ckpt = self.state_dict()
        if self.rank == 0:
            write_metrics(out_dir, st.metrics)
            save_checkpoint(ckpt, out_dir / "last.pt")

    def _save_epoch(self, out_dir: Path | None, ckpt: dict[str, Any] | None) -> None:
        """``--save-epochs``: keep this epoch's checkpoint as ``epoch<N>.pt`` (for rewinding)."""
        if out_dir is not None and ckpt is not None and self.rank == 0:
            save_checkpoint(ckpt, out_dir / f"epoch{self.state.epoch}.pt")

    def summary(self) -> dict[str, Any]:
        """Final metrics, totals, versions and the machine
        (:func:`~robust_agc.utils.machine_info`). An epoch undone by a rollback is neither final
        nor best."""
        st = self.state
        kept = [r for r in st.metrics if not r.get("rolled_back")]
        last = kept[-1] if kept else {}
        best = max(kept, key=lambda r: r["val_robust_acc"], default={})
        import torchvision

        out: dict[str, Any] = (
            {} if self.init_source is None else {"source": self.init_source.provenance()}
        )
        if self.widths is not None:  # a structurally pruned network: its size, as trained
            out["widths"] = dict(self.widths)
            out["params"] = sum(p.numel() for p in self.model.parameters())
        return (
            out
            | {
                "final": last,
                "best_val_epoch": best.get("epoch"),
                "best_val": {
                    k: best.get(k) for k in METRIC_FIELDS if k.startswith(("val_", "test_"))
                },
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
                "machine": machine_info(world_size=self.world_size),
            }
            | ({} if self.guard is None else {"collapse_guard": self.guard.state_dict()})
        )


def _on_cpu(value: Any) -> Any:
    """A saved random state (a tensor, a list of them, or None) on the CPU."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, list | tuple):
        return [_on_cpu(v) for v in value]
    return value


def train(cfg: TrainConfig) -> tuple[dict[str, Any], Path]:
    """Run (or resume) the training described by ``cfg``; returns ``(summary, run folder)``."""
    cfg.validate()
    rank, world = dist_info()
    preflight(cfg)  # --init-from: every check of the source before the folder is touched
    if rank == 0:
        out = prepare_run_dir(cfg)
    if world > 1:
        dist.barrier()  # rank 0 has checked and prepared the folder
        out = run_dir_of(cfg)
    trainer = Trainer(cfg)
    if cfg.resume:
        ckpt = load_checkpoint(out / "last.pt", map_location=trainer.device)
        check_resume_config(cfg, ckpt)
        check_resume_source(ckpt, trainer.init_source)
        trainer.load_state_dict(ckpt)
        logger.info("resumed %s at epoch %d", out, trainer.state.epoch)
    if rank == 0:
        write_config(out, cfg.to_dict() | trainer.model_meta())
    summary = trainer.fit(out, progress=cfg.progress)
    return summary, out
