"""Checkpoints: atomic writes, safe loading (pickle payloads refused and never run)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from robust_agc.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    strip_prefixes,
)
from robust_agc.errors import CheckpointError
from robust_agc.models import create_model


class _Payload:
    """Unpickling this object would create a marker file: proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def make_malicious_checkpoint(path: pathlib.Path, marker: pathlib.Path) -> None:
    """A file that looks like a checkpoint but carries a code-running pickle payload."""
    torch.save({"model": {}, "config": {}, "payload": _Payload(marker)}, path)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    make_malicious_checkpoint(path, marker)
    with pytest.raises(CheckpointError, match="unsafe pickle"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "cannot read checkpoint"), (b"not a torch file at all" * 10, "cannot read checkpoint")],
)
def test_corrupt_files(tmp_path, content, message):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_round_trip_and_no_temporary_left(tmp_path):
    obj = {
        "model": {"w": torch.arange(5.0)},
        "epoch": 3,
        "config": {"a": [1, 2]},
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(obj, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_build_model_folds_masks_and_checks_architecture():
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    sd = model.state_dict()
    mask = torch.rand_like(sd["classifier.1.weight"]) > 0.5
    sd["classifier.1.weight_mask"] = mask
    cfg = {"model": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 28}
    rebuilt = build_model_from_checkpoint(
        {"model": {f"module.{k}": v for k, v in sd.items()}, "config": cfg}
    )
    w = rebuilt.classifier[1].weight
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    assert torch.equal(w[mask], sd["classifier.1.weight"][mask])
    assert not rebuilt.training and "classifier.1.weight_mask" not in rebuilt.state_dict()
    with pytest.raises(CheckpointError, match="do not fit architecture 'mnist-cnn'"):
        build_model_from_checkpoint(
            {"model": model.state_dict(), "config": cfg | {"model": "mnist-cnn"}}
        )


def test_strip_prefixes():
    assert list(strip_prefixes({"module.model.a": 1, "b": 2})) == ["a", "b"]
