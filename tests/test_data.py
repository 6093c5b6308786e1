"""Data layer: offline Fashion-MNIST found with no flags, value ranges, deterministic splits."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from robust_agc.data import DATASET_INFO, Batches, augment_batch, load_dataset, make_splits
from robust_agc.errors import DataUnavailableError, UserError


def test_offline_fashion_mnist_found_without_flags():
    x, y = load_dataset("fashion-mnist", "train")
    xt, yt = load_dataset("fashion-mnist", "test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    # the published class balance: 6,000 / 1,000 images per class
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10


def test_splits_deterministic_disjoint_and_test_unshuffled():
    a = make_splits("fashion-mnist", train_subset=300, val_size=200, test_size=50)
    b = make_splits("fashion-mnist", train_subset=300, val_size=200, test_size=50)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.x_train.shape[0] == 300 and a.x_val.shape[0] == 200
    # validation and training images never overlap (compare by content hashes)
    tr = {hash(t.numpy().tobytes()) for t in a.x_train}
    va = {hash(t.numpy().tobytes()) for t in a.x_val}
    assert not tr & va
    xt, yt = load_dataset("fashion-mnist", "test")
    assert torch.equal(a.x_test, xt[:50]) and torch.equal(a.y_test, yt[:50])
    # a larger subset extends the smaller one (the same permutation)
    c = make_splits("fashion-mnist", train_subset=400, val_size=200)
    assert torch.equal(c.x_train[:300], a.x_train)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_subset": 0}, "Invalid train_subset value"),
        ({"val_size": -1}, "Invalid val_size value"),
        ({"val_size": 60000}, "Invalid val_size value"),
        ({"train_subset": 59990, "val_size": 100}, "Invalid train_subset value"),
        ({"test_size": 0}, "Invalid test_size value"),
    ],
)
def test_bad_split_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_splits("fashion-mnist", **kwargs)


def test_unknown_dataset_and_missing_source(tmp_path):
    with pytest.raises(UserError, match="Invalid dataset value"):
        load_dataset("imagenet-21k")
    with pytest.raises(DataUnavailableError, match="--download"):
        load_dataset("mnist", "train", data_dir=tmp_path)


def _write_idx(path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def test_idx_files_in_data_dir_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6], dtype=torch.uint8)
    _write_idx(raw / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    x, y = load_dataset("mnist", "train", data_dir=tmp_path)
    assert torch.equal((x * 255).round().to(torch.uint8).squeeze(1), imgs)
    assert y.tolist() == list(range(7))
    # a truncated file is a clear error, not a crash
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 5, 28, 28) + b"\0" * 10)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels[:5])
    with pytest.raises(DataUnavailableError, match="truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_batches_seeded_per_epoch_and_sharded():
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    y = torch.arange(50)
    b = Batches(x, y, 8, seed=3)
    b.set_epoch(0)
    e0 = torch.cat([yb for _, yb in b])
    b.set_epoch(1)
    e1 = torch.cat([yb for _, yb in b])
    b.set_epoch(0)
    assert torch.equal(e0, torch.cat([yb for _, yb in b]))  # same epoch -> same order
    assert not torch.equal(e0, e1) and sorted(e0.tolist()) == list(range(50))
    # two ranks see disjoint halves of each global batch
    r0 = Batches(x, y, 8, seed=3, rank=0, num_replicas=2, drop_last=True)
    r1 = Batches(x, y, 8, seed=3, rank=1, num_replicas=2, drop_last=True)
    for (_, a), (_, c), (_, g) in zip(
        r0, r1, Batches(x, y, 8, seed=3, drop_last=True), strict=True
    ):
        assert torch.equal(torch.cat([a, c]), g)


def test_augmentation_is_crop_and_flip_of_the_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    out = augment_batch(x, "crop-flip", g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert augment_batch(x, "none", g) is x
    assert DATASET_INFO["cifar10"].augment == "crop-flip"
