"""CIFAR-10/100 and SVHN read offline from files in torchvision's formats that the test writes
(python pickle batches, ``.mat`` files), and the restricted unpickler that refuses other objects."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from robust_agc import data as rd
from robust_agc.errors import DataUnavailableError


def _cifar_batch(path, n, seed, label_key="labels", protocol=2):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    # CIFAR's own files: bytes keys, an (N, 3072) uint8 array in channel-major (CHW) order
    obj = {b"batch_label": b"x", label_key.encode(): labels, b"data": images.reshape(n, -1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return images, labels


@pytest.fixture(autouse=True)
def _fresh_cache():
    rd._CACHE.clear()
    yield
    rd._CACHE.clear()


def test_cifar10_from_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    train = [_cifar_batch(folder / f"data_batch_{i}", 3, i) for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch", 4, 99, protocol=pickle.HIGHEST_PROTOCOL)
    x, y = rd.load_dataset("cifar10", "test", data_dir=tmp_path)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(test_x))
    assert y.tolist() == test_y and y.dtype == torch.int64
    xt, yt = rd.load_dataset("cifar10", "train", data_dir=tmp_path)
    assert xt.shape[0] == 15  # the five batches in order
    assert torch.equal(
        (xt * 255).round().to(torch.uint8), torch.from_numpy(np.concatenate([b[0] for b in train]))
    )
    assert yt.tolist() == [v for b in train for v in b[1]]


def test_cifar100_fine_labels(tmp_path):
    images, labels = _cifar_batch(tmp_path / "cifar-100-python" / "test", 5, 3, "fine_labels")
    x, y = rd.load_dataset("cifar100", "test", data_dir=tmp_path)
    assert y.tolist() == labels and torch.equal(
        (x * 255).round().to(torch.uint8), torch.from_numpy(images)
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar_pickle_with_other_objects_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}))
    with pytest.raises(DataUnavailableError, match="os.system|posix.system|not allowed"):
        rd.load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


def test_svhn_mat_labels_10_is_zero(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    n = 6
    hwcn = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    digits = np.array([[10], [1], [2], [9], [10], [5]], dtype=np.uint8)  # SVHN stores 0 as 10
    savemat(tmp_path / "test_32x32.mat", {"X": hwcn, "y": digits})
    x, y = rd.load_dataset("svhn", "test", data_dir=tmp_path)
    assert y.tolist() == [0, 1, 2, 9, 0, 5]
    assert x.shape == (n, 3, 32, 32)
    # torchvision's transpose: image k, channel c, row h, column w is X[h, w, c, k]
    u8 = (x * 255).round().to(torch.uint8)
    assert int(u8[4, 2, 7, 11]) == int(hwcn[7, 11, 2, 4])
    assert torch.equal(u8, torch.from_numpy(hwcn.transpose(3, 2, 0, 1).copy()))


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_missing_files_say_how_to_provide_them(tmp_path, name):
    with pytest.raises(DataUnavailableError, match="--data-dir"):
        rd.load_dataset(name, "test", data_dir=tmp_path)
