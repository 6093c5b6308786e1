"""Tests of experiments/unit_activity.py: tables per model, --mask-from, bad input."""

from __future__ import annotations

import torch
from unit_activity import main

from robust_agc.models import create_model

KW = dict(num_classes=10, in_channels=1, input_size=28, mean=[0.2860], std=[0.3530], init="default")


def _save(path, model) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def test_tables_and_mask_from(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("small-cnn", **KW)
    src = _save(tmp_path / "src.pt", model)
    # a "pruned" model whose head has no weight left: the source masked by it is constant
    with torch.no_grad():
        model.classifier[6].weight.zero_()
    cut = _save(tmp_path / "cut.pt", model)
    common = ["--arch", "small-cnn", "--dataset", "fashion-mnist", "--n-examples", "20"]
    assert main([src, *common]) == 0
    out = capsys.readouterr().out
    assert "first 20 fashion-mnist test points" in out
    assert "| features.2 | 32 |" in out and "| classifier.6 | 200 |" in out
    std = float(out.strip().splitlines()[-1].split("|")[-2])
    assert std > 0
    assert main([src, "--mask-from", cut, *common]) == 0
    out = capsys.readouterr().out
    assert "(2000 zeroed)" in out
    assert float(out.strip().splitlines()[-1].split("|")[-2]) == 0.0


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    src = _save(tmp_path / "src.pt", create_model("small-cnn", **KW))
    assert (
        main([src, "--arch", "small-cnn", "--dataset", "fashion-mnist", "--n-examples", "1"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n-examples" in err
    other = _save(tmp_path / "other.pt", create_model("mnist-cnn", **KW))
    args = [src, "--mask-from", other, "--arch", "small-cnn", "--dataset", "fashion-mnist"]
    assert main(args) == 2
