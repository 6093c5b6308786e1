"""From a :class:`~robust_agc.config.TrainConfig` to the pieces of a run.

Each ``build_*`` function makes one component (model, masks, optimizer, objective and training
attack, batches, topology scheduler, evaluation attack, data-parallel wrapper);
:class:`~robust_agc.train.Trainer` calls them in a fixed order (the order fixes which random
numbers each one draws, so it is part of a run's reproducibility). Research code can call them
to build a single piece the way the trainer does.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from attacks import FGSM, PGD, Attack, create_attack

from ..config import TrainConfig
from ..data import Batches, DatasetInfo, DataSplits, make_splits
from ..errors import UserError
from ..losses import Objective, get_objective
from ..models import create_model
from ..optim.registry import create_optimizer, optimizer_kwargs
from ..prune.source import InitSource, prepare_model, source_masks
from ..sparse import (
    EVER_BUFFER,
    MASK_BUFFER,
    SparseMasks,
    TopologyScheduler,
    apply_masks,
    apply_structured_masks,
    create_scheduler,
)
from .seeds import rank_seed, stream_generator, stream_seed

__all__ = [
    "build_batches",
    "build_eval_attack",
    "build_guard_attack",
    "build_init_source",
    "build_masks",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_splits",
    "build_topology",
    "lr_factor",
    "mask_buffer_names",
    "resolve_device",
    "resolve_step_size",
    "wrap_data_parallel",
]


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The run's device; a :class:`UserError` for CUDA where there is none. With
    ``cfg.deterministic``, deterministic kernels are switched on process-wide first
    (:func:`use_deterministic_kernels`)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Invalid device value: {cfg.device!r} (CUDA is not available here)")
    if cfg.deterministic:
        use_deterministic_kernels()
    return device


def use_deterministic_kernels() -> None:
    """Deterministic kernels from now on in this process: ``torch.use_deterministic_algorithms``
    (an op without a deterministic kernel raises), cuDNN deterministic without autotuning, and
    cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when this
    process first uses it; an existing setting is kept). PyTorch's reproducibility notes:
    https://pytorch.org/docs/stable/notes/randomness.html"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def build_splits(cfg: TrainConfig, splits: DataSplits | None = None) -> DataSplits:
    """The data splits (``splits`` if given), checked against the probe's batch count."""
    splits = splits or make_splits(
        cfg.dataset,
        data_dir=cfg.data_dir,
        download=cfg.download,
        train_subset=cfg.train_subset,
        val_size=cfg.val_size,
    )
    n_probe = cfg.probe_batches * cfg.batch_size
    if cfg.probe_variance_every and n_probe > len(splits.x_train):
        raise UserError(
            f"Invalid probe_batches value: {cfg.probe_batches} batches of {cfg.batch_size} "
            f"exceed the {len(splits.x_train)} training examples"
        )
    return splits


def build_model(
    cfg: TrainConfig,
    info: DatasetInfo,
    device: torch.device,
    widths: dict[str, int] | None = None,
) -> nn.Module:
    """The architecture on ``device`` (4-d weights in ``channels_last`` with ``--channels-last``,
    before masks and optimizer state exist), at ``widths`` (layer name -> output width) when
    given: the smaller network of a structurally pruned ``--init-from`` source."""
    model = create_model(
        cfg.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=info.input_size,
        mean=info.mean,
        std=info.std,
        init=cfg.init,
        widths=widths,
    ).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_init_source(
    cfg: TrainConfig, model: nn.Module, source: InitSource | None = None
) -> InitSource | None:
    """``--init-from``: the source's weights loaded into ``model`` (and ``--prune hydra``'s
    scores attached); ``None`` without it (:mod:`robust_agc.prune.source`)."""
    return prepare_model(cfg, model, source)


def build_masks(
    cfg: TrainConfig,
    model: nn.Module,
    source: InitSource | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> SparseMasks | None:
    """The initial sparse masks on ``model`` (``None`` for ``dense``), seeded by the ``masks``
    stream; from ``source`` (``--init-from``) as :func:`robust_agc.prune.source.source_masks`
    says; filter/channel masks (``--sparse-structure``) need one input's ``input_shape``."""
    if cfg.sparse_method == "dense":
        return None
    if source is not None:
        return source_masks(cfg, model, source, generator=stream_generator(cfg.seed, "masks"))
    if cfg.sparse_structure != "unstructured":
        if input_shape is None:
            raise ValueError(f"Invalid input_shape value: None ({cfg.sparse_structure} masks)")
        return apply_structured_masks(
            model,
            sparsity=cfg.sparsity,
            structure=cfg.sparse_structure,
            input_shape=input_shape,
            distribution=cfg.sparse_init,
            dense_first_layer=cfg.dense_first_layer,
            generator=stream_generator(cfg.seed, "masks"),
        )
    return apply_masks(
        model,
        sparsity=cfg.sparsity,
        distribution=cfg.sparse_init,
        dense_first_layer=cfg.dense_first_layer,
        generator=stream_generator(cfg.seed, "masks"),
    )


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, masks: SparseMasks | None
) -> torch.optim.Optimizer:
    """The optimizer of ``model``, with the masks attached (their hooks enforce the masks).

    BSR-Net decays its masked weights itself (decoupled, SGDW), so they get ``weight_decay=0``.
    Frozen parameters (``requires_grad=False``: HYDRA's weights) are left out.
    """
    params: Any = [p for p in model.parameters() if p.requires_grad]
    if cfg.sparse_method == "bsr" and masks is not None:
        masked = {id(w) for w in masks.weights()}
        rest = [p for p in model.parameters() if id(p) not in masked]
        params = [
            {"params": masks.weights(), "weight_decay": 0.0},
            {"params": rest, "weight_decay": cfg.weight_decay},
        ]
    optimizer = create_optimizer(cfg.optimizer, params, **optimizer_kwargs(cfg))
    if masks is not None:
        masks.attach(optimizer)
    return optimizer


def build_objective(
    cfg: TrainConfig, model: nn.Module, eps: float, step_size: float
) -> tuple[Objective, Attack | None]:
    """The training objective and the attack crafting its inputs (``None`` for natural training
    and for free adversarial training, whose perturbation the trainer carries): ``--train-attack``
    if given, else the objective's own default attack."""
    objective = get_objective(cfg.objective, beta=cfg.beta)
    if not objective.needs_adversarial or cfg.free_replays > 1:  # free AT: its own perturbation
        return objective, None
    if cfg.train_attack:
        attack = create_attack(
            cfg.train_attack, model, **_train_attack_kwargs(cfg, eps=eps, step_size=step_size)
        )
    else:
        attack = objective.default_attack(
            model, eps=eps, alpha=step_size, steps=cfg.attack_steps, bn_mode=cfg.attack_bn_mode
        )
    return objective, attack


def resolve_step_size(cfg: TrainConfig, eps: float) -> float:
    """The training attack's step size: ``--attack-step-size`` if given, else ``eps`` for
    free adversarial training, FGSM and N-FGSM, ``1.25 * eps`` for FGSM-RS (the papers' choices),
    and ``2.5 * eps / attack_steps`` for the multi-step attacks."""
    if cfg.attack_step_size:
        return cfg.attack_step_size
    if cfg.free_replays > 1 or cfg.train_attack in ("fgsm", "n-fgsm"):
        return eps
    if cfg.train_attack == "fgsm-rs":
        return 1.25 * eps
    return 2.5 * eps / cfg.attack_steps


def _train_attack_kwargs(cfg: TrainConfig, *, eps: float, step_size: float) -> dict[str, Any]:
    """The arguments ``--train-attack``'s class takes: the single-step attacks take no ``steps``
    (FGSM no ``alpha`` either: its step is ``eps``), N-FGSM its noise multiplier; every one
    ``--attack-bn-mode``."""
    kwargs: dict[str, Any] = {"eps": eps, "bn_mode": cfg.attack_bn_mode}
    if cfg.train_attack == "fgsm":
        return kwargs
    kwargs["alpha"] = step_size
    if cfg.train_attack == "fgsm-rs":
        return kwargs
    if cfg.train_attack == "n-fgsm":
        return kwargs | {"noise": 2.0 if cfg.nfgsm_noise is None else cfg.nfgsm_noise}
    return kwargs | {"steps": cfg.attack_steps}


def build_batches(cfg: TrainConfig, splits: DataSplits, *, rank: int, world_size: int) -> Batches:
    """The seeded training batches of this rank (augmentation: the config's, else the dataset's)."""
    augment = cfg.augment if cfg.augment is not None else splits.info.augment
    return Batches(
        splits.x_train,
        splits.y_train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        augment=augment,
        rank=rank,
        num_replicas=world_size,
    )


def build_topology(
    cfg: TrainConfig,
    masks: SparseMasks | None,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    n_train: int,
) -> TopologyScheduler | None:
    """The topology scheduler of ``--sparse-method`` (``None`` when dense), seeded by the
    ``topology`` stream; unset options take the method's defaults."""
    if masks is None:
        return None
    if cfg.sparse_method == "bsr":
        wd = cfg.weight_decay if cfg.bsr_weight_decay is None else cfg.bsr_weight_decay
        kw: dict[str, Any] = dict(
            n_train=n_train,
            noise=cfg.bsr_noise,
            noise_form=cfg.bsr_noise_form,
            noise_milestone=cfg.bsr_noise_milestone,
            noise_factor=cfg.bsr_noise_factor,
            weight_decay=wd,
            init_theta=cfg.bsr_init_theta,
        )
    else:
        options = dict(
            update_interval=cfg.update_interval,
            drop_fraction=cfg.drop_fraction,
            update_end=cfg.update_end,
        )
        kw = {k: v for k, v in options.items() if v is not None}
    return create_scheduler(
        cfg.sparse_method,
        masks,
        total_steps=total_steps,
        optimizer=optimizer,
        generator=stream_generator(cfg.seed, "topology"),
        **kw,
    )


def lr_factor(cfg: TrainConfig, step: int, *, steps_per_epoch: int, total_steps: int) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then cosine, multistep or
    constant over ``total_steps``."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    t = step / max(1, total_steps)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if cfg.lr_schedule == "multistep":
        return cfg.lr_decay ** sum(t >= m for m in cfg.lr_milestones)
    return 1.0


def mask_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sparse masks' buffers (``weight_mask``, ``weight_mask_ever``),
    which DDP leaves out of its per-forward buffer broadcast in the trainer."""
    return [
        n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in (MASK_BUFFER, EVER_BUFFER)
    ]


def wrap_data_parallel(
    cfg: TrainConfig,
    model: nn.Module,
    masks: SparseMasks | None,
    *,
    device: torch.device,
    rank: int,
    world_size: int,
) -> nn.Module:
    """The module the training forward runs through: ``model`` itself, or (world size > 1)
    ``model`` wrapped in DDP, which averages ``p.grad`` over ranks.

    Under DDP the masks are broadcast from rank 0 and kept out of DDP's per-forward buffer
    broadcast (the trainer checks them equal after every topology update instead), and the global
    RNG is reseeded per rank (distinct attack random starts). Attacks, a corrected optimizer's
    snapshot pass and evaluation use the plain module.
    """
    if world_size <= 1:
        return model
    if masks is not None:
        masks.broadcast_(src=0)
        # 1 byte per maskable weight each, half the gradient payload. A workaround API of
        # torch, used as documented.
        ignore = getattr(
            DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None
        )
        if ignore is not None:
            ignore(model, mask_buffer_names(model))
    ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=ids)
    torch.manual_seed(rank_seed(cfg.seed, rank))
    return wrapped


def build_eval_attack(cfg: TrainConfig, model: nn.Module, eps: float) -> PGD:
    """The per-epoch robust evaluation's PGD, with its own generator (the ``eval_attack`` stream),
    so it never draws from the global RNG."""
    return PGD(
        model,
        eps=eps,
        alpha=2.5 * eps / cfg.eval_steps,
        steps=cfg.eval_steps,
        random_start=True,
        seed=stream_seed(cfg.seed, "eval_attack"),
    )


def build_guard_attack(model: nn.Module, eps: float) -> FGSM:
    """The single-step attack of the catastrophic-overfitting guard's per-epoch check: FGSM at
    ``eps`` (deterministic: no random numbers drawn)."""
    return FGSM(model, eps)
