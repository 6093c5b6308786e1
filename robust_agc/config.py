"""The training configuration: one dataclass, its command-line flags, and YAML files.

Every field of :class:`TrainConfig` is a flag of ``robust-agc train`` (``agc_gamma`` ->
``--agc-gamma``), grouped by concern. Precedence: dataclass defaults < ``--config FILE.yaml`` <
command line. The resolved configuration is saved as ``config.yaml`` in the run folder and inside
every checkpoint.

A run folder's ``config.yaml`` is accepted back by ``--config``, so rerunning a run is one command
(``robust-agc train --config RUN/config.yaml --out NEW``): the keys the trainer adds there
(:data:`DERIVED_KEYS`) are dropped on input.

Every ``choices`` comes from a registry (:func:`robust_agc.models.list_models`,
:func:`robust_agc.optim.list_optimizers`, :func:`robust_agc.losses.list_objectives`,
:func:`robust_agc.sparse.list_sparse_methods`, :func:`robust_agc.data.list_datasets`), looked up
when a parser is built or a config validated, so a name registered later is accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attacks import BN_MODES, check_attack_name

from .data import AUGMENTATIONS, list_datasets
from .errors import UserError
from .losses import list_objectives
from .models import INITS, list_models
from .optim import ESTIMATORS, list_optimizers
from .sparse import DISTRIBUTIONS, NOISE_FORMS, STRUCTURES, list_sparse_methods, structured_methods

__all__ = [
    "COLLAPSE_ACTIONS",
    "STRUCTURED_SOURCE_RULE",
    "DERIVED_KEYS",
    "SINGLE_STEP_ATTACKS",
    "EXECUTION_KEYS",
    "PRUNE_METHODS",
    "PRUNE_SCOPES",
    "TrainConfig",
    "add_train_arguments",
    "config_from_args",
    "field_choices",
    "load_yaml",
    "parse_refresh",
    "trainable_optimizers",
    "sparse_method_choices",
]

EXECUTION_KEYS: frozenset[str] = frozenset(
    {"out", "threads", "progress", "resume", "overwrite", "device", "data_dir"}
)
"""Settings that say where and how a run executes, not what it computes. The one list of keys
that may differ between two runs of "the same" configuration: ``--resume`` and the study driver
do not compare them, and ``robust-agc report`` does not group by them."""

DERIVED_KEYS: frozenset[str] = frozenset(
    {"num_classes", "in_channels", "input_size", "eps_resolved", "attack_step_size_resolved"}
)
"""Keys the trainer adds to a run folder's ``config.yaml`` next to the settings (the dataset's
shape and the resolved attack radius and step size). Not settings: :func:`load_yaml` accepts and
drops them. They are not checked against what the settings derive: the settings are the source
of truth, and "rerun this run with another radius" (``--config RUN/config.yaml --eps 0.2``, or an
edited copy) must not be refused because the stale derived value disagrees."""


COLLAPSE_ACTIONS: tuple[str, ...] = ("auto", "off", "warn", "stop", "rollback")
"""Accepted ``--on-collapse`` values (``auto`` resolves to ``warn`` or ``off``:
:meth:`TrainConfig.collapse_action`)."""

SINGLE_STEP_ATTACKS: frozenset[str] = frozenset({"fgsm", "fgsm-rs", "n-fgsm"})
"""Training attacks of one signed-gradient step, prone to catastrophic overfitting."""

PRUNE_METHODS: tuple[str, ...] = ("lwm", "hydra")
"""Values of ``--prune`` (robust_agc.prune: the pruning applied when a run starts)."""

PRUNE_SCOPES: tuple[str, ...] = ("layerwise", "global")
"""Values of ``--prune-scope``."""


#: Why other structured selections from a trained source are refused (HYDRA's scores and IMP's
#: rounds select single weights here); the one wording for the config and the pipelines.
STRUCTURED_SOURCE_RULE = (
    "a source is pruned structurally only by filters: with --prune lwm (L1 norm) or --prune "
    "hydra (filter scores), and fine-tuned from a HYDRA filter-score run without --prune"
)


def trainable_optimizers() -> list[str]:
    """The optimizers the Trainer trains with: every name of
    :func:`robust_agc.optim.list_optimizers`. The one place to filter out a registered optimizer
    the Trainer cannot drive (none today: the Trainer passes ``lr``, ``momentum``, ``nesterov``
    and ``weight_decay`` to :func:`~robust_agc.optim.create_optimizer`, which maps them onto Adam
    and AdamW too, and the masks zero every same-shaped optimizer state tensor)."""
    return list_optimizers()


def sparse_method_choices() -> list[str]:
    """``dense`` and the registered sparse methods (:func:`robust_agc.sparse.list_sparse_methods`,
    BSR-Net's ``bsr`` included)."""
    return ["dense", *list_sparse_methods()]


_REGISTRIES = {
    "dataset": list_datasets,
    "model": list_models,
    "optimizer": trainable_optimizers,
    "objective": list_objectives,
    "sparse_method": sparse_method_choices,
}


# fields whose names are checked by TrainConfig.validate() rather than by argparse: a dataset's
# error names the datasets (argparse's would too, but the message predates this list), and a model
# registered after the parser was built must still be accepted
_VALIDATED_ONLY = frozenset({"dataset", "model"})


def field_choices(name: str) -> tuple[str, ...] | None:
    """The accepted values of the :class:`TrainConfig` field ``name`` (None: any value), read from
    its registry now for the registered names (dataset, model, optimizer, objective,
    sparse_method)."""
    if name in _REGISTRIES:
        return tuple(_REGISTRIES[name]())
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}[name]
    return meta.get("choices")


def _f(default: Any, group: str, help: str, **kw: Any) -> Any:
    meta = {"group": group, "help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All settings of a training run (see ``robust-agc train --help``)."""

    # data
    dataset: str = _f(
        "fashion-mnist",
        "data",
        "dataset name (robust_agc.data.list_datasets())",
    )
    data_dir: str | None = _f(
        None, "data", "folder holding the data (torchvision layout or raw idx files)"
    )
    download: bool = _f(False, "data", "allow torchvision to download the dataset")
    train_subset: int | None = _f(None, "data", "train on a deterministic subset of N images")
    val_size: int = _f(
        1000, "data", "validation images carved from the training set (model selection)"
    )
    augment: str | None = _f(
        None,
        "data",
        "augmentation (default: the dataset's standard one)",
        choices=AUGMENTATIONS,
    )
    # model
    model: str = _f("small-cnn", "model", "architecture name (robust_agc.models.list_models())")
    init: str = _f("he", "model", "weight initialisation", choices=INITS)
    # optimisation
    optimizer: str = _f(
        "sgd",
        "optimization",
        "sgd (plain baseline), agc (adaptive correction), svrg (fixed-coefficient ablation), "
        "adam, adamw (robust_agc.optim.list_optimizers())",
    )
    epochs: int = _f(10, "optimization", "training epochs")
    batch_size: int = _f(128, "optimization", "global minibatch size")
    lr: float = _f(0.05, "optimization", "peak learning rate")
    momentum: float = _f(0.9, "optimization", "momentum")
    nesterov: bool = _f(True, "optimization", "Nesterov momentum (--no-nesterov to disable)")
    weight_decay: float = _f(5e-4, "optimization", "L2 weight decay")
    lr_schedule: str = _f(
        "cosine",
        "optimization",
        "learning-rate schedule (per step)",
        choices=("cosine", "multistep", "constant"),
    )
    lr_milestones: list[float] = _f(
        [0.5, 0.75], "optimization", "multistep: fractions of training where the lr drops"
    )
    lr_decay: float = _f(0.1, "optimization", "multistep: factor at each milestone")
    warmup_epochs: float = _f(0.0, "optimization", "linear learning-rate warm-up (epochs)")
    # AGC
    agc_gamma: float = _f(0.1, "agc", "damping gamma: coefficient c = gamma * tau")
    agc_alpha: float = _f(0.3, "agc", "EMA weight of the new coefficient estimate")
    agc_tau_init: float = _f(0.1, "agc", "initial tau")
    agc_estimator: str = _f(
        "grad-online",
        "agc",
        "coefficient estimator: grad-online (default: from the steps' own gradients, no extra pass) "
        "or loss-slope (the release's; one extra forward per refresh batch)",
        choices=ESTIMATORS,
    )
    agc_full_grad: str = _f(
        "clean",
        "agc",
        "data of the full gradient mu: clean training images (release) or adversarial ones crafted against the model (consistent)",
        choices=("clean", "adversarial"),
    )
    agc_refresh_fraction: float = _f(
        0.25,
        "agc",
        "fraction of the epoch's batches (random, seeded) used by each refresh (default 0.25; "
        "1.0 = every batch, as the release)",
    )
    agc_refresh: str = _f("1e", "agc", "refresh period: Ne = every N epochs, Ns = every N steps")
    svrg_coef: float = _f(0.1, "agc", "svrg: the fixed correction coefficient")
    svrg_schedule: str = _f(
        "fixed",
        "agc",
        "svrg: constant coefficient or the release's ramp 0.1*(1-0.7^e)",
        choices=("fixed", "ramp"),
    )
    # adversarial objective
    objective: str = _f(
        "pgd-at",
        "adversarial",
        "training objective (robust_agc.losses.list_objectives())",
    )
    beta: float = _f(6.0, "adversarial", "TRADES / MART trade-off beta")
    eps: float | None = _f(
        None,
        "adversarial",
        "L-inf radius (default: the dataset's: 0.1 Fashion-MNIST, 0.3 MNIST, 8/255 CIFAR/SVHN)",
    )
    attack_steps: int = _f(10, "adversarial", "attack iterations during training")
    attack_step_size: float | None = _f(
        None, "adversarial", "attack step size (default 2.5 * eps / steps)"
    )
    attack_bn_mode: str = _f(
        "eval",
        "adversarial",
        "BatchNorm mode while crafting training attacks",
        choices=BN_MODES,
    )
    train_attack: str | None = _f(
        None,
        "adversarial",
        "attack used in training instead of the objective's own (attacks.list_attacks(), or "
        "torchattacks:NAME: torchattacks' class NAME built with --eps, the step size and "
        "--attack-steps where it takes them)",
    )
    eps_warmup_epochs: float = _f(
        0.0, "adversarial", "ramp the radius linearly from 0 over this many epochs"
    )
    # fast adversarial training (single-step and replay; docs/usage.md "Fast adversarial training")
    nfgsm_noise: float | None = _f(
        None,
        "fast-at",
        "n-fgsm (--train-attack n-fgsm): noise radius as a multiple k of eps (default 2)",
    )
    grad_align: float = _f(
        0.0,
        "fast-at",
        "GradAlign weight lambda of 1 - cos(grad_x CE(x), grad_x CE(x + eta)) added to the "
        "objective (0: off; 3 extra forward+backward passes per example, counted)",
    )
    free_replays: int = _f(
        1,
        "fast-at",
        "free adversarial training: replay each batch M times, one optimizer step and one "
        "signed step of a carried perturbation per replay (1: off; an epoch is M optimizer "
        "steps per batch)",
    )
    on_collapse: str = _f(
        "auto",
        "fast-at",
        "catastrophic-overfitting guard: off, warn, stop, or rollback (restore the last good "
        "epoch's checkpoint and stop); auto = warn with a single-step training attack or "
        "free replays, off otherwise",
        choices=COLLAPSE_ACTIONS,
    )
    collapse_gap: float = _f(
        0.3, "fast-at", "guard: flag when validation FGSM accuracy exceeds PGD accuracy by this"
    )
    collapse_drop: float = _f(
        0.2,
        "fast-at",
        "guard: flag when validation PGD accuracy falls this far below the best good epoch's",
    )
    # sparsity
    sparse_method: str = _f(
        "dense",
        "sparse",
        "sparse-training method: dense or one of robust_agc.sparse.list_sparse_methods()",
    )
    sparsity: float = _f(0.9, "sparse", "fraction of maskable weights that are zero")
    sparse_init: str = _f("erk", "sparse", "initial per-layer density", choices=DISTRIBUTIONS)
    update_interval: int | None = _f(
        None, "sparse", "steps between topology updates (method default)"
    )
    drop_fraction: float | None = _f(
        None, "sparse", "initial drop fraction, cosine-decayed (method default)"
    )
    update_end: float | None = _f(
        None, "sparse", "fraction of training after which the topology is frozen (method default)"
    )
    dense_first_layer: bool = _f(False, "sparse", "keep the first layer dense")
    sparse_structure: str = _f(
        "unstructured",
        "sparse",
        "what a mask removes: single weights, whole filters (output channels) or input channels "
        "(filter/channel: --sparse-method static or rigl; docs/usage.md, Structured sparsity)",
        choices=STRUCTURES,
    )
    bsr_noise: float = _f(
        1.0, "sparse", "bsr: Langevin noise scale sigma (std sqrt(2 lr T / N) * sigma)"
    )
    bsr_noise_form: str = _f(
        "langevin",
        "sparse",
        "bsr: noise form (release = lr * sigma * sqrt(T), the TF code's)",
        choices=NOISE_FORMS,
    )
    bsr_noise_milestone: float | None = _f(
        None, "sparse", "bsr: fraction of training after which the temperature T is multiplied"
    )
    bsr_noise_factor: float = _f(1.0, "sparse", "bsr: temperature factor at the milestone")
    bsr_weight_decay: float | None = _f(
        None, "sparse", "bsr: decoupled (SGDW) decay of theta (default: --weight-decay)"
    )
    bsr_init_theta: float = _f(1e-12, "sparse", "bsr: theta of re-activated connections")
    # pruning pipelines (docs/usage.md, "Robust pruning"; robust_agc.prune)
    init_from: str | None = _f(
        None,
        "pruning",
        "start from this checkpoint: its weights (masks folded) and, with a sparse method, its "
        "masks if it is sparse; optimizer state, counters, lr schedule and seeds start fresh",
    )
    prune: str | None = _f(
        None,
        "pruning",
        "prune the --init-from weights: lwm (keep the largest |w|, to --sparsity, then train "
        "them) or hydra (train HYDRA importance scores, weights frozen; a dense run)",
        choices=PRUNE_METHODS,
    )
    prune_scope: str | None = _f(
        None,
        "pruning",
        "lwm/hydra: per-layer counts from --sparse-init (default: layerwise) or one global ranking",
        choices=PRUNE_SCOPES,
    )
    rewind_from: str | None = _f(
        None,
        "pruning",
        "lwm: after choosing the mask, take this checkpoint's weights (IMP's rewinding)",
    )
    save_epochs: list[int] | None = _f(
        None,
        "pruning",
        "also keep the checkpoint after these epochs as epoch<N>.pt (0: the initial weights)",
    )
    # evaluation during training
    eval_subset: int = _f(
        500, "evaluation", "validation and test points evaluated each epoch (first N test points)"
    )
    eval_steps: int = _f(20, "evaluation", "PGD steps of the per-epoch robust evaluation")
    probe_variance_every: int = _f(
        0,
        "evaluation",
        "every N steps, the variance of the plain and the AGC-corrected minibatch gradient over "
        "fixed probe batches (robust_agc.probe; extra passes, not counted in grad_evals; 0: off)",
    )
    probe_batches: int = _f(8, "evaluation", "probe batches (the first N training batches)")
    # run
    seed: int = _f(0, "run", "random seed (weights, data order, attacks)")
    device: str = _f("cpu", "run", "cpu, cuda or cuda:N")
    amp: str = _f(
        "off",
        "run",
        "mixed precision (autocast) for training, attacks, AGC's snapshot pass and refresh; fp16 adds a loss scaler; parameters, optimizer state and per-epoch evaluation stay float32",
        choices=("off", "bf16", "fp16"),
    )
    channels_last: bool = _f(
        False, "run", "channels_last memory format for the model and the training inputs"
    )
    deterministic: bool = _f(
        False,
        "run",
        "deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, a fixed "
        "cuBLAS workspace; process-wide): bit-reproducible CUDA runs and resumes, at a speed cost; "
        "CPU runs are reproducible without it",
    )
    threads: int | None = _f(None, "run", "CPU threads (torch.set_num_threads)")
    out: str | None = _f(
        None, "run", "run folder (default runs/<dataset>-<model>-<sparse>-<optimizer>-s<seed>)"
    )
    resume: bool = _f(False, "run", "continue the run in --out from its last checkpoint")
    overwrite: bool = _f(False, "run", "replace an existing run folder")
    progress: bool = _f(True, "run", "progress bar (--no-progress to disable)")

    def validate(self) -> None:
        """Raise :class:`~robust_agc.errors.UserError` naming the first invalid value."""
        checks: list[tuple[str, bool]] = [
            ("epochs", self.epochs >= 1),
            ("probe_variance_every", self.probe_variance_every >= 0),
            ("probe_batches", self.probe_batches >= 2),
            ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0 and math.isfinite(self.lr)),
            ("momentum", 0.0 <= self.momentum < 1.0),
            ("weight_decay", self.weight_decay >= 0),
            ("lr_decay", 0 < self.lr_decay <= 1),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs),
            ("val_size", self.val_size >= 0),
            ("agc_gamma", self.agc_gamma >= 0 and math.isfinite(self.agc_gamma)),
            ("agc_alpha", 0.0 <= self.agc_alpha <= 1.0),
            ("agc_tau_init", math.isfinite(self.agc_tau_init)),
            ("agc_refresh_fraction", 0.0 < self.agc_refresh_fraction <= 1.0),
            ("svrg_coef", math.isfinite(self.svrg_coef)),
            ("beta", self.beta >= 0),
            ("eps", self.eps is None or 0 <= self.eps <= 1),
            ("attack_steps", self.attack_steps >= 1),
            ("attack_step_size", self.attack_step_size is None or self.attack_step_size > 0),
            ("eps_warmup_epochs", 0 <= self.eps_warmup_epochs <= self.epochs),
            ("sparsity", 0.0 <= self.sparsity < 1.0),
            ("update_interval", self.update_interval is None or self.update_interval >= 1),
            ("drop_fraction", self.drop_fraction is None or 0.0 <= self.drop_fraction <= 1.0),
            ("update_end", self.update_end is None or 0.0 <= self.update_end <= 1.0),
            ("bsr_noise", self.bsr_noise >= 0),
            (
                "bsr_noise_milestone",
                self.bsr_noise_milestone is None or 0 <= self.bsr_noise_milestone <= 1,
            ),
            ("bsr_noise_factor", self.bsr_noise_factor > 0),
            ("bsr_weight_decay", self.bsr_weight_decay is None or self.bsr_weight_decay >= 0),
            ("bsr_init_theta", self.bsr_init_theta > 0),
            ("eval_subset", self.eval_subset >= 0),
            ("eval_steps", self.eval_steps >= 1),
            ("threads", self.threads is None or self.threads >= 1),
            ("train_subset", self.train_subset is None or self.train_subset >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise UserError(f"Invalid {name} value: {getattr(self, name)}")
        if not all(0 < m < 1 for m in self.lr_milestones):
            raise UserError(
                f"Invalid lr_milestones value: {self.lr_milestones} (fractions in (0, 1))"
            )
        for f in dataclasses.fields(self):
            choices = field_choices(f.name)
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UserError(
                    f"Invalid {f.name} value: {value!r} (choose from {', '.join(choices)})"
                )
        parse_refresh(self.agc_refresh)
        self._validate_fast_at()
        self._validate_pruning()
        self._validate_structure()
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise UserError(f"Invalid device value: {self.device!r} (cpu, cuda or cuda:N)")

    def _validate_fast_at(self) -> None:
        """The fast adversarial training settings and the combinations they exclude."""
        if self.train_attack is not None:
            try:
                check_attack_name(self.train_attack)
            except ValueError as e:
                raise UserError(str(e).replace("attack value", "train_attack value", 1)) from None
        checks: list[tuple[str, bool]] = [
            ("nfgsm_noise", self.nfgsm_noise is None or 0 <= self.nfgsm_noise < math.inf),
            ("grad_align", 0 <= self.grad_align < math.inf),
            ("free_replays", self.free_replays >= 1),
            ("collapse_gap", 0.0 <= self.collapse_gap <= 1.0),
            ("collapse_drop", 0.0 <= self.collapse_drop <= 1.0),
        ]
        for name, ok in checks:
            if not ok:
                raise UserError(f"Invalid {name} value: {getattr(self, name)}")
        excluded = [
            (self.nfgsm_noise is not None and self.train_attack != "n-fgsm",
             "--nfgsm-noise applies to --train-attack n-fgsm only"),
            (self.grad_align > 0 and self.amp == "fp16",
             "--grad-align with --amp fp16: GradAlign's input gradients are not loss-scaled"),
            (self.free_replays > 1 and self.train_attack is not None,
             "--free-replays crafts its own perturbation: drop --train-attack"),
            (self.free_replays > 1 and self.objective == "natural",
             "--free-replays needs an adversarial objective, not natural"),
            (self.free_replays > 1 and self.agc_full_grad == "adversarial",
             "--free-replays has no attack to craft the refresh's adversarial batches: "
             "use --agc-full-grad clean"),
            (self.free_replays > 1 and self.probe_variance_every > 0,
             "--free-replays has no attack for the variance probe's batches"),
            (self.on_collapse in ("warn", "stop", "rollback")
             and min(self.val_size, self.eval_subset) == 0,
             f"--on-collapse {self.on_collapse} needs validation points "
             "(--val-size and --eval-subset above 0)"),
        ]  # fmt: skip
        for bad, message in excluded:
            if bad:
                raise UserError(f"Invalid combination: {message}")

    def _validate_structure(self) -> None:
        """``--sparse-structure filter/channel`` needs a method with a structured scheduler."""
        if self.sparse_structure == "unstructured":
            return
        if self.init_from is not None:
            # From a trained source, filters only: L1 filter pruning (Li et al. 2017), HYDRA's
            # filter scores, or the fine-tuning of a filter-score run (its source is checked
            # then); IMP's rewinding is per weight.
            why = None
            if self.sparse_structure != "filter":
                why = STRUCTURED_SOURCE_RULE
            elif self.rewind_from is not None:
                why = "--rewind-from (rewinding is for unstructured IMP)"
            if why is not None:
                raise UserError(
                    f"Invalid combination: --sparse-structure {self.sparse_structure} with "
                    f"--init-from: {why}"
                )
            if self.prune == "hydra":
                return  # the score stage: a dense run (checked by _validate_pruning)
        allowed = structured_methods(self.sparse_structure)
        if self.sparse_method not in allowed:
            raise UserError(
                f"Invalid combination: --sparse-structure {self.sparse_structure} with "
                f"--sparse-method {self.sparse_method} (choose from {', '.join(allowed)})"
            )

    def collapse_action(self) -> str:
        """The catastrophic-overfitting guard's action: ``off``, ``warn``, ``stop`` or
        ``rollback``. ``auto`` is ``warn`` for a single-step training attack
        (:data:`SINGLE_STEP_ATTACKS`) or free replays with validation points to watch, else
        ``off``."""
        if self.on_collapse != "auto":
            return self.on_collapse
        fast = self.train_attack in SINGLE_STEP_ATTACKS or self.free_replays > 1
        watched = min(self.val_size, self.eval_subset) > 0
        return "warn" if fast and watched and self.objective != "natural" else "off"

    def _validate_pruning(self) -> None:
        """The pruning fields' combinations (docs/usage.md, "Robust pruning")."""
        if self.prune is not None and self.init_from is None:
            raise UserError(f"Invalid prune value: {self.prune!r} needs --init-from CKPT")
        if self.prune == "lwm" and self.sparse_method == "dense":
            raise UserError(
                "Invalid prune value: 'lwm' needs a sparse method (--sparse-method static)"
            )
        if self.prune == "hydra" and self.sparse_method != "dense":
            raise UserError(
                "Invalid prune value: 'hydra' trains scores on the dense weights (--sparse-method "
                "dense); fine-tune its result with --init-from RUN/best.pt --sparse-method static"
            )
        if self.rewind_from is not None and self.prune != "lwm":
            raise UserError("Invalid rewind_from value: rewinding needs --prune lwm")
        if self.save_epochs is not None and any(e < 0 for e in self.save_epochs):
            raise UserError(f"Invalid save_epochs value: {self.save_epochs}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)


def parse_refresh(spec: str) -> tuple[str, int]:
    """``"1e"`` -> ``("epoch", 1)``; ``"500s"`` -> ``("step", 500)``; a bare number means epochs."""
    m = re.fullmatch(r"\s*(\d+)\s*([es]?)\s*", str(spec))
    if not m or int(m.group(1)) < 1:
        raise UserError(
            f"Invalid agc_refresh value: {spec!r} (e.g. 1e for every epoch, 500s for every 500 steps)"
        )
    return ("step" if m.group(2) == "s" else "epoch", int(m.group(1)))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (safe loader); keys may use dashes or underscores.

    A run folder's ``config.yaml`` is accepted: its :data:`DERIVED_KEYS` are dropped. Any other
    key that is not a :class:`TrainConfig` field raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in DERIVED_KEYS:
            continue
        if key not in known:
            raise UserError(f"unknown setting {k!r} in {path}")
        out[key] = v
    return out


def _bool_flag(group: argparse._ArgumentGroup, name: str, help: str) -> None:
    flag = name.replace("_", "-")
    group.add_argument(
        f"--{flag}", dest=name, action="store_true", default=argparse.SUPPRESS, help=help
    )
    group.add_argument(f"--no-{flag}", dest=name, action="store_false", default=argparse.SUPPRESS)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field, grouped by concern, plus ``--config``."""
    parser.add_argument("--config", help="YAML file of settings (the command line wins)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        group = groups[g]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.type in ("bool", bool):
            _bool_flag(group, f.name, help_text)
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        base = str(f.type).replace(" | None", "")
        if base == "int":
            kw["type"] = int
        elif base == "float":
            kw["type"] = float
        elif base == "list[float]":
            kw["type"] = float
            kw["nargs"] = "+"
        elif base == "list[int]":
            kw["type"] = int
            kw["nargs"] = "+"
        choices = field_choices(f.name)
        if choices and f.name not in _VALIDATED_ONLY:
            kw["choices"] = choices
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, ``--config`` and explicit flags (in that order) and validate."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in known})
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise UserError(str(e)) from None
    cfg.validate()
    return cfg
