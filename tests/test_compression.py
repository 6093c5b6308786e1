"""The record's ``sparsity``, ``structure`` and RobustBench's ``footnote: "Compressed model"``,
measured on the evaluated model's weights (robust_agc.eval.compression_info)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robust_agc import eval as ev
from robust_agc.checkpoint import save_checkpoint
from robust_agc.cli.eval import add_eval_arguments, run_eval
from robust_agc.models import create_model
from robust_agc.sparse import apply_masks, maskable_modules

CFG = {
    "model": "small-cnn",
    "dataset": "fashion-mnist",
    "num_classes": 10,
    "in_channels": 1,
    "input_size": 28,
    "eps": 0.1,
}


def _cnn() -> nn.Module:
    """A small-cnn whose weights are all non-zero, as after training (its last layer starts at 0)."""
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()
    with torch.no_grad():
        last = maskable_modules(model)[-1][1]
        last.weight.copy_(torch.randn_like(last.weight) * 0.01)
    return model


def _n_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for _, m in maskable_modules(model))


def test_dense_model_is_dense_without_footnote():
    info = ev.compression_info(_cnn())
    assert info == {"sparsity": 0.0, "structure": "dense", "footnote": None}
    assert ev.compression_info(nn.Sequential(nn.ReLU()))["sparsity"] is None


def test_masks_give_unstructured_compressed_model_with_exact_sparsity():
    model = _cnn()
    masks = apply_masks(model, sparsity=0.8, distribution="erk", generator=0)
    pruned = sum(int((~m.weight_mask).sum()) for _, m in maskable_modules(model))
    info = ev.compression_info(model)
    assert info["sparsity"] == pruned / _n_weights(model)
    assert info["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert info["structure"] == "unstructured" and info["footnote"] == "Compressed model"
    # a mask counts even where the weight is not zero yet (masks applied lazily elsewhere)
    with torch.no_grad():
        for _, m in maskable_modules(model):
            m.weight.fill_(1.0)
    assert ev.compression_info(model)["sparsity"] == info["sparsity"]
    del masks


def test_whole_filters_and_channels_are_structured():
    model = _cnn()
    convs = [m for _, m in maskable_modules(model) if m.weight.ndim == 4]
    with torch.no_grad():
        convs[0].weight[::2] = 0  # half of the first layer's filters
        convs[1].weight[:, 1::2] = 0  # half of the second layer's input channels
    info = ev.compression_info(model)
    zeros = convs[0].weight[::2].numel() + convs[1].weight[:, 1::2].numel()
    assert info["sparsity"] == zeros / _n_weights(model) >= ev.loading.COMPRESSED_MIN_SPARSITY
    assert info["structure"] == "structured" and info["footnote"] == "Compressed model"
    with torch.no_grad():
        convs[1].weight[0, 0, 0, 0] = 0  # one stray zero outside the pruned channels
    assert ev.compression_info(model)["structure"] == "unstructured"


def test_few_zeros_stay_dense():
    model = _cnn()
    n = _n_weights(model)
    lin = [m for _, m in maskable_modules(model)][-1]
    k = int(0.005 * n)
    with torch.no_grad():
        lin.weight.view(-1)[:k] = 0
    info = ev.compression_info(model)
    assert info["sparsity"] == k / n and info["structure"] == "dense" and info["footnote"] is None


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("sparse", [True, False])
def test_cli_record_carries_the_fields(tmp_path, sparse):
    model = _cnn()
    if sparse:
        apply_masks(model, sparsity=0.9, distribution="erk", generator=1)
    expected = ev.compression_info(model)
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": model.state_dict(), "config": CFG, "epoch": 1, "version": 1}, path)
    out = tmp_path / "r.json"
    argv = [str(path), "--attacks", "clean", "--n-examples", "4", "--no-progress"]
    assert run_eval(_parse([*argv, "--out", str(out)])) == 0
    d = json.loads(out.read_text())
    assert {k: d[k] for k in ("sparsity", "structure", "footnote")} == expected
    assert (d["footnote"] == "Compressed model") is sparse
    assert d["structure"] == ("unstructured" if sparse else "dense")
