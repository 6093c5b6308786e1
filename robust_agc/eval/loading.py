"""Loading a model to evaluate: our checkpoints, plain state dicts, RobustBench's model zoo (read
offline from a folder in RobustBench's layout).

:func:`load_model` returns an eval-ready model (eval mode, sparsity masks folded into the weights);
:func:`load_model_and_info` also describes where it came from, for the record's ``model_info``.
:func:`compression_info` measures how sparse a model is (the record's ``sparsity``, ``structure``
and RobustBench's ``footnote: "Compressed model"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import build_model_from_checkpoint, load_checkpoint, strip_prefixes
from ..errors import CheckpointError, UserError
from .plan import ThreatModel

__all__ = [
    "COMPRESSED_FOOTNOTE",
    "COMPRESSED_MIN_SPARSITY",
    "compression_info",
    "load_model",
    "load_model_and_info",
]

COMPRESSED_FOOTNOTE = "Compressed model"
"""RobustBench's ``footnote`` for a pruned model (the leaderboard's mark of compressed models)."""
COMPRESSED_MIN_SPARSITY = 0.01
"""A model whose conv and linear weights are at least this fraction exactly zero counts as pruned
(a dense model trained in floating point has essentially no exact zeros)."""


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
        if ckpt.get("widths") is not None:  # ``robust-agc export``: physically smaller
            from ..models import create_model

            with torch.device("meta"):  # shapes only, no memory
                full = create_model(
                    cfg["model"],
                    num_classes=int(cfg["num_classes"]),
                    in_channels=int(cfg["in_channels"]),
                    input_size=int(cfg["input_size"]),
                )
            info["export"] = ckpt.get("export")
            info["compression"] = compression_info(model, full=full)
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
    * ``load_model("Ding2020MMA", source="robustbench", dataset="cifar10", model_dir="models")``:
      RobustBench's model zoo read offline from ``models/cifar10/Linf/Ding2020MMA.pt``
      (the ``robustbench`` package must be importable; nothing is downloaded).

    Raises:
        CheckpointError: a missing, corrupt or unsafe file, or weights that do not fit ``arch``.
        UserError: unknown architecture or dataset, ``robustbench`` not importable, a name not in
            its zoo, or no checkpoint in ``model_dir``.
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
    from ..data import DATASET_INFO
    from ..models import create_model

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


ROBUSTBENCH_DATASETS: tuple[str, ...] = ("cifar10", "cifar100")
"""The RobustBench datasets whose zoo models :func:`load_model` reads offline."""


def _robustbench_zoo(dataset: str, threat: str) -> dict[str, Any]:
    """RobustBench's model-zoo entries for ``dataset`` and ``threat`` (its ``model_dicts``).

    Raises:
        UserError: robustbench not importable, or a dataset/threat model outside its zoo.
    """
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset
        from robustbench.model_zoo.enums import ThreatModel as RBThreatModel
    except ImportError as e:
        raise UserError(
            f"RobustBench zoo models need the 'robustbench' package importable, and robustbench "
            f"1.1.1 is not ({e}): it imports pkg_resources (pip install 'setuptools<81') and "
            "AutoAttack's package 'autoattack', which is not on PyPI (pip install "
            "git+https://github.com/fra31/auto-attack); or load a checkpoint or --state-dict"
        ) from None
    if dataset not in ROBUSTBENCH_DATASETS:
        raise UserError(
            f"Invalid dataset value: {dataset!r} for a RobustBench model (choose "
            f"{', '.join(ROBUSTBENCH_DATASETS)})"
        )
    return dict(model_dicts[BenchmarkDataset(dataset)].get(RBThreatModel(threat), {}))


def _load_robustbench(
    name: str,
    *,
    dataset: str | None,
    threat_model: ThreatModel | str,
    model_dir: str | Path | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A RobustBench zoo model read offline, as ``robustbench.utils.load_model`` (robustbench
    1.1.1, https://github.com/RobustBench/robustbench/blob/master/robustbench/utils.py) reads
    one it has downloaded: the zoo entry's constructor, the checkpoint
    ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` (its ``"state_dict"`` entry when there is
    one, else the whole file), ``module.``/``model.`` prefixes stripped. Unlike it: nothing is
    downloaded, the file is read with ``weights_only=True``, the weights must fit exactly (it
    relaxes ``strict`` for a list of known-failing models), and ensembles and timm-hosted
    entries are refused."""
    if dataset is None:
        raise UserError(f"a RobustBench model needs --dataset ({', '.join(ROBUSTBENCH_DATASETS)})")
    tm = ThreatModel.parse(threat_model).value
    if tm not in ("Linf", "L2"):
        raise UserError(f"Invalid threat_model value: {tm!r} for a RobustBench model (Linf or L2)")
    zoo = _robustbench_zoo(dataset, tm)
    if name not in zoo:
        names = sorted(zoo)
        raise UserError(
            f"Invalid robustbench value: {name!r} is not in RobustBench's {dataset} {tm} zoo "
            f"({len(names)} models: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        )
    entry = zoo[name]
    if isinstance(entry.get("gdrive_id"), list):
        raise UserError(f"RobustBench model {name!r} is an ensemble of checkpoints (not supported)")
    if model_dir is None:
        raise UserError(
            "a RobustBench model needs --model-dir, the folder holding "
            f"{dataset}/{tm}/{name}.pt (nothing is downloaded)"
        )
    path = Path(model_dir) / dataset / tm / f"{name}.pt"
    if not path.is_file():
        raise UserError(
            f"RobustBench checkpoint not found: {path} (robustbench.utils.load_model downloads it "
            "there on a machine with internet)"
        )
    try:
        model = entry["model"]()
    except Exception as e:  # e.g. a timm-registered architecture this timm lacks
        raise UserError(f"cannot build RobustBench model {name!r}: {e}") from None
    ckpt = load_checkpoint(path)  # weights_only; CheckpointError
    if isinstance(ckpt.get("last"), dict) and (  # robustbench takes these two models' "last"
        "Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding"
    ):
        ckpt = ckpt["last"]
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    try:
        model.load_state_dict(strip_prefixes(state), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit RobustBench model {name!r}: {first}") from None
    return model.eval(), {
        "source": "robustbench",
        "architecture": name,
        "dataset": dataset,
        "threat_model": tm,
        "path": str(path),
    }


def _zeros_are_structured(zero: Tensor) -> bool:
    """Whether every zero of a ``(out, in, ...)`` weight lies in a wholly zero output filter or a
    wholly zero input channel (filter or channel pruning)."""
    z = zero.reshape(zero.shape[0], zero.shape[1], -1)
    filters = z.flatten(1).all(1)
    channels = z.all(2).all(0)
    covered = filters.view(-1, 1, 1) | channels.view(1, -1, 1)
    return bool((z == covered.expand_as(z)).all())


def compression_info(model: nn.Module, *, full: nn.Module | None = None) -> dict[str, Any]:
    """How pruned ``model`` is, measured on its weights (any source, masks folded or not).

    ``full``: for a physically smaller network (``robust-agc export``), the same architecture at
    full width; ``sparsity`` is then relative to ``full``'s conv and linear weights (removed ones
    count as zeros) and ``structure`` is ``"structured"`` when anything was removed.

    Returns:
        ``{"sparsity", "structure", "footnote"}``: ``sparsity`` the fraction of the conv and linear
        weights (never biases or normalization layers) that are exactly zero (a ``weight_mask``
        buffer still on a layer counts as zeros where False); ``structure`` ``"dense"`` below
        :data:`COMPRESSED_MIN_SPARSITY`, else ``"structured"`` when every zero lies in a wholly
        zero output filter or input channel, else ``"unstructured"`` (our masks); ``footnote``
        RobustBench's ``"Compressed model"`` for a pruned model, else None. ``sparsity`` is None
        for a model without conv or linear weights.
    """
    from ..sparse import MASK_BUFFER, maskable_modules

    total = zeros = 0
    structured = True
    with torch.no_grad():
        for _, module in maskable_modules(model):
            zero = module.weight.detach() == 0
            mask = getattr(module, MASK_BUFFER, None)
            if isinstance(mask, Tensor) and mask.shape == zero.shape:
                zero = zero | ~mask.bool()
            total += zero.numel()
            n = int(zero.sum())
            zeros += n
            if n and structured and zero.ndim >= 2:
                structured = _zeros_are_structured(zero)
    if full is not None:
        full_total = sum(m.weight.numel() for _, m in maskable_modules(full))
        zeros, total = zeros + full_total - total, full_total
    if total == 0:
        return {"sparsity": None, "structure": None, "footnote": None}
    sparsity = zeros / total
    if sparsity < COMPRESSED_MIN_SPARSITY:
        return {"sparsity": sparsity, "structure": "dense", "footnote": None}
    structure = "structured" if structured else "unstructured"
    return {"sparsity": sparsity, "structure": structure, "footnote": COMPRESSED_FOOTNOTE}
