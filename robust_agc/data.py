"""Datasets as float tensors in [0, 1] (NCHW), splits, and a fast seeded batch iterator.

Sources, in order of preference, for each dataset:

1. ``data_dir`` in torchvision's layout (``<data_dir>/FashionMNIST/raw/*.gz``, ``<data_dir>/cifar-10-batches-py``,
   ``<data_dir>/cifar-100-python``, ``<data_dir>/test_32x32.mat``...), or a flat folder holding the
   original idx ``.gz`` files (MNIST / Fashion-MNIST). CIFAR's python batches are pickles: they are
   read with a restricted unpickler that builds only dicts, lists, strings, numbers and numpy
   arrays (any other object in the file is refused, nothing runs); SVHN's ``.mat`` files are read
   with ``scipy.io.loadmat`` (no pickle);
2. for Fashion-MNIST, the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``):
   the embedded default, found with no flags;
3. torchvision's download, only when ``download=True``.

Evaluation always uses the *first* ``n`` test points, unshuffled. The test split is never used for
model selection: a validation split is carved from the training set instead.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import DataUnavailableError, UserError

__all__ = [
    "AUGMENTATIONS",
    "DATASET_INFO",
    "DatasetInfo",
    "DataSplits",
    "Batches",
    "list_datasets",
    "load_dataset",
    "make_splits",
    "augment_batch",
    "epoch_seed",
]

AUGMENTATIONS: tuple[str, ...] = ("none", "crop", "crop-flip")
"""Training augmentations: none, random crop (4-pixel zero padding), random crop and horizontal flip."""

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shape, classes, normalization and the usual L-inf radius."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps_linf: float
    augment: str  # "none", "crop-flip" or "crop"


DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), 0.1, "none"),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 0.3, "none"),
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2471, 0.2435, 0.2616),
        8 / 255,
        "crop-flip",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        3,
        32,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        8 / 255,
        "crop-flip",
    ),
    "svhn": DatasetInfo(
        "svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 8 / 255, "crop"
    ),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_TV_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_CIFAR_FILES = {  # torchvision's folder, training files, test file, label key
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels"),
}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in protocol-5 pickles
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    }
)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(DATASET_INFO)


def _info(name: str) -> DatasetInfo:
    try:
        return DATASET_INFO[name]
    except KeyError:
        raise UserError(
            f"Invalid dataset value: {name!r} (choose from {', '.join(list_datasets())})"
        ) from None


def _read_idx(path: Path) -> Tensor:
    """Read an idx file (optionally gzipped) into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataUnavailableError(f"cannot read {path}: {e}") from None
    if len(data) < 4:
        raise DataUnavailableError(f"{path} is not an idx file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataUnavailableError(f"{path} is not an unsigned-byte idx file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(dims):
        raise DataUnavailableError(f"{path} is truncated or corrupt")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


def _idx_candidates(name: str, data_dir: Path | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [data_dir / _TV_FOLDER[name] / "raw", data_dir / name, data_dir]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def _load_idx_dataset(
    name: str, split: str, data_dir: Path | None, download: bool
) -> tuple[Tensor, Tensor]:
    img_file, lbl_file = _IDX_FILES[split]
    for d in _idx_candidates(name, data_dir):
        for suffix in ("", ".gz"):
            img = d / img_file.replace(".gz", suffix)
            lbl = d / lbl_file.replace(".gz", suffix)
            if img.is_file() and lbl.is_file():
                logger.info("loading %s %s from %s", name, split, d)
                x = _read_idx(img)
                y = _read_idx(lbl)
                if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                    raise DataUnavailableError(f"{img} and {lbl} do not form an image/label pair")
                return x.unsqueeze(1), y.long()
    if download:
        return _torchvision(name, split, data_dir, download=True)
    hint = (
        "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        if name == "fashion-mnist"
        else ""
    )
    raise DataUnavailableError(
        f"{name} ({split}) not found: {hint}put the original idx .gz files in --data-dir, "
        "or pass --download to fetch it with torchvision"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays (CIFAR's batches)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    """One CIFAR python batch: ``(uint8 NCHW images, int64 labels)``, unpickled restrictedly."""
    import numpy as np

    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataUnavailableError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise DataUnavailableError(f"{path} is not a CIFAR batch (not a dict)")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = obj.get("data"), obj.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataUnavailableError(f"{path} holds no (N, 3072) 'data' array")
    if labels is None or len(labels) != data.shape[0]:
        raise DataUnavailableError(f"{path}: {label_key!r} missing or of the wrong length")
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(-1, 3, 32, 32)
    return x, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _read_svhn(path: Path) -> tuple[Tensor, Tensor]:
    """An SVHN ``.mat`` file: ``X`` (32, 32, 3, N), ``y`` (N, 1) with digit 0 stored as 10."""
    import numpy as np
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise DataUnavailableError(f"cannot read {path}: {e}") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataUnavailableError(f"{path} holds no (32, 32, 3, N) 'X' array")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise DataUnavailableError(f"{path}: 'y' missing or of the wrong length")
    labels = torch.as_tensor(y.reshape(-1).astype(np.int64)) % 10  # 10 is the digit 0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)), labels


def _read_local(name: str, split: str, root: Path) -> tuple[Tensor, Tensor] | None:
    """CIFAR-10/100 or SVHN from ``root`` in torchvision's layout, or None if the files are absent."""
    if name == "svhn":
        path = root / _SVHN_FILES[split]
        return _read_svhn(path) if path.is_file() else None
    folder, train_files, test_file, key = _CIFAR_FILES[name]
    files = [root / folder / f for f in (train_files if split == "train" else (test_file,))]
    if not all(f.is_file() for f in files):
        return None
    parts = [_read_cifar_batch(f, key) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _torchvision(
    name: str, split: str, data_dir: Path | None, download: bool
) -> tuple[Tensor, Tensor]:
    import torchvision

    if name not in _TV_FOLDER:  # CIFAR, SVHN: our readers first (torchvision's after a download
        local = _read_local(name, split, data_dir if data_dir is not None else Path("data"))
        if local is not None:  # verifies the official files' checksums before unpickling them)
            return local
    if not download:
        raise DataUnavailableError(
            f"{name} ({split}) not found in {data_dir or 'data'}: pass --data-dir to a folder "
            "holding it in torchvision's layout, or --download when the network is reachable"
        )
    root = str(data_dir if data_dir is not None else Path("data"))
    train = split == "train"
    try:
        if name == "fashion-mnist":
            ds = torchvision.datasets.FashionMNIST(root, train=train, download=download)
        elif name == "mnist":
            ds = torchvision.datasets.MNIST(root, train=train, download=download)
        elif name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
        elif name == "cifar100":
            ds = torchvision.datasets.CIFAR100(root, train=train, download=download)
        else:
            ds = torchvision.datasets.SVHN(
                root, split="train" if train else "test", download=download
            )
    except (RuntimeError, OSError) as e:
        raise DataUnavailableError(
            f"{name} ({split}) not available in {root}: {e}. Pass --data-dir to a folder holding it "
            "in torchvision's layout, or --download when the network is reachable"
        ) from None
    data = ds.data
    x = torch.as_tensor(data) if not isinstance(data, Tensor) else data
    if name in ("cifar10", "cifar100"):
        x = x.permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW
    elif name == "svhn":
        pass  # already NCHW
    else:
        x = x.unsqueeze(1)
    targets = ds.labels if name == "svhn" else ds.targets
    return x.contiguous(), torch.as_tensor(targets).long()


_CACHE: dict[tuple[str, str, str | None], tuple[Tensor, Tensor]] = {}


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load a whole split as ``(x, y)``: ``x`` float32 in [0, 1], NCHW; ``y`` int64.

    Args:
        name: one of :func:`list_datasets`.
        split: ``"train"`` or ``"test"``.
        data_dir: folder to look in first (torchvision layout or the raw idx files).
        download: allow torchvision to download the data when it is not found locally.

    Raises:
        DataUnavailableError: no local source and ``download`` is False (the message names the ways
            to provide the data).
    """
    info = _info(name)
    if split not in ("train", "test"):
        raise UserError(f"Invalid split value: {split!r} (choose train or test)")
    ddir = Path(data_dir) if data_dir is not None else None
    key = (info.name, split, str(ddir) if ddir else None)
    if key not in _CACHE:
        if info.name in _TV_FOLDER:
            x8, y = _load_idx_dataset(info.name, split, ddir, download)
        else:
            x8, y = _torchvision(info.name, split, ddir, download)
        _CACHE[key] = (x8.to(torch.float32).div_(255.0), y)
    x, y = _CACHE[key]
    return x, y


@dataclass
class DataSplits:
    """Training, validation and test tensors of one run."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    info: DatasetInfo


def make_splits(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    train_subset: int | None = None,
    val_size: int = 0,
    test_size: int | None = None,
    split_seed: int = 0,
) -> DataSplits:
    """Carve a deterministic validation split (and optional training subset) from the training set.

    A fixed permutation of the training set (seeded by ``split_seed``, independent of the training seed)
    gives the validation points first and the training points after them, so the two never overlap and
    the same ``--train-subset N`` always selects the same images. The test split is the first
    ``test_size`` test points, unshuffled.
    """
    info = _info(name)
    x, y = load_dataset(info.name, "train", data_dir=data_dir, download=download)
    xt, yt = load_dataset(info.name, "test", data_dir=data_dir, download=download)
    n = x.shape[0]
    if val_size < 0 or val_size >= n:
        raise UserError(f"Invalid val_size value: {val_size} (must be in [0, {n - 1}])")
    available = n - val_size
    if train_subset is not None and not 1 <= train_subset <= available:
        raise UserError(
            f"Invalid train_subset value: {train_subset} (must be in [1, {available}] with val_size={val_size})"
        )
    if test_size is not None and not 1 <= test_size <= xt.shape[0]:
        raise UserError(f"Invalid test_size value: {test_size} (must be in [1, {xt.shape[0]}])")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    val_idx = perm[:val_size]
    train_idx = perm[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    if train_subset is None and val_size == 0:
        x_train, y_train = x, y  # the whole set, in file order
    else:
        x_train, y_train = x[train_idx], y[train_idx]
    nt = xt.shape[0] if test_size is None else test_size
    return DataSplits(x_train, y_train, x[val_idx], y[val_idx], xt[:nt], yt[:nt], info)


def augment_batch(x: Tensor, mode: str, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Standard augmentation on a batch: random crop with zero padding (+ horizontal flip)."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    idx_c = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    out = padded[idx_n, idx_c, rows, cols]
    if mode == "crop-flip":
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s permutation and augmentation draws for base seed ``seed``
    (the data-order stream; the trainer's other streams are in :mod:`robust_agc.train.seeds`)."""
    return seed * 1_000_003 + epoch


class Batches:
    """Seeded minibatches over in-memory tensors (much faster than a DataLoader for small images).

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same batches.
    With ``num_replicas > 1`` each rank takes a disjoint, equal-sized shard of every epoch's permutation
    (the DistributedSampler convention) and the per-rank batch is ``batch_size // num_replicas``.

    Args:
        x, y: the data.
        batch_size: global batch size.
        shuffle: permute each epoch.
        seed: base seed of the permutation and augmentation.
        augment: ``"none"``, ``"crop"`` or ``"crop-flip"``.
        drop_last: drop the last incomplete batch.
        rank, num_replicas: data-parallel position.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: str = "none",
        drop_last: bool = False,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"Invalid batch_size value: {batch_size}")
        if batch_size % num_replicas != 0:
            raise UserError(
                f"Invalid batch_size value: {batch_size} (must be divisible by the world size {num_replicas})"
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation (and augmentation draws) of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.x.shape[0]
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        local = self.batch_size // self.num_replicas
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.num_replicas > 1:
                if (
                    idx.numel() < self.batch_size
                ):  # pad the last batch so every rank gets equal work
                    idx = torch.cat([idx, order[: self.batch_size - idx.numel()]])
                idx = idx[self.rank * local : (self.rank + 1) * local]
            xb = self.x[idx]
            if self.augment != "none":
                xb = augment_batch(xb, self.augment, g)
            yield xb, self.y[idx]
