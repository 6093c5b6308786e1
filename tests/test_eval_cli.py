"""robust-agc eval (robust_agc.cli.eval) and robust_agc.eval.load_model: checkpoints, state dicts,
RobustBench path."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from robust_agc import eval as ev
from robust_agc.checkpoint import save_checkpoint
from robust_agc.cli.eval import add_eval_arguments, run_eval
from robust_agc.errors import CheckpointError, UserError
from robust_agc.models import create_model

CFG = {
    "model": "small-cnn",
    "dataset": "fashion-mnist",
    "num_classes": 10,
    "in_channels": 1,
    "input_size": 28,
    "sparse_method": "static",
    "sparsity": 0.5,
    "optimizer": "agc",
    "objective": "pgd-at",
    "eps": 0.1,
    "seed": 0,
}


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    """An (untrained, seeded) small-cnn: loading and the CLI do not need a trained model."""
    torch.manual_seed(0)
    return create_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()


def _parse(argv):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(argv)


def _ckpt(tmp_path, cnn, cfg=CFG, mask=True):
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    if mask:
        w = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
        m = torch.ones_like(state[w], dtype=torch.bool)
        m.view(-1)[::2] = False
        state[w.replace("weight", "weight_mask")] = m
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": state, "config": dict(cfg), "epoch": 3, "version": 1}, path)
    return path


def test_load_model_checkpoint_folds_masks(tmp_path, cnn):
    path = _ckpt(tmp_path, cnn)
    model, info = ev.load_model_and_info(path)
    assert not model.training
    assert info["config"]["eps"] == 0.1 and info["architecture"] == "small-cnn"
    w = next(p for p in model.parameters() if p.ndim == 4)
    assert bool((w.view(-1)[::2] == 0).all())
    assert isinstance(ev.load_model(path), torch.nn.Module)


def test_load_model_state_dict_strips_prefixes(tmp_path, cnn, fmnist_tiny):
    sd = {"module." + k: v for k, v in cnn.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save({"state_dict": sd}, path)
    model = ev.load_model(path, arch="small-cnn", dataset="fashion-mnist")
    x = fmnist_tiny[2][:8]
    with torch.no_grad():
        assert torch.allclose(model(x), cnn(x))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("setup", "kwargs", "error", "match"),
    [
        (
            "missing",
            {"arch": "small-cnn", "dataset": "fashion-mnist"},
            CheckpointError,
            "not found",
        ),
        (
            "garbage",
            {"arch": "small-cnn", "dataset": "fashion-mnist"},
            CheckpointError,
            "cannot read",
        ),
        ("evil", {"arch": "small-cnn", "dataset": "fashion-mnist"}, CheckpointError, "unsafe"),
        (
            "wrong",
            {"arch": "small-cnn", "dataset": "fashion-mnist"},
            CheckpointError,
            "does not fit",
        ),
        ("good", {"arch": "small-cnn"}, UserError, "--dataset"),
        ("good", {"arch": "small-cnn", "dataset": "nope"}, UserError, "Invalid dataset value"),
        ("good", {"arch": "nope", "dataset": "fashion-mnist"}, UserError, "Invalid model value"),
        ("good", {"source": "zoo"}, UserError, "Invalid source value"),
        ("missing", {}, CheckpointError, "not found"),
    ],
)
def test_load_model_errors(tmp_path, cnn, setup, kwargs, error, match):
    path = tmp_path / "f.pt"
    if setup == "garbage":
        path.write_bytes(b"not a torch file")
    elif setup == "evil":
        torch.save({"x": _Evil()}, path)
    elif setup == "wrong":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    elif setup == "good":
        torch.save(cnn.state_dict(), path)
    with pytest.raises(error, match=match):
        ev.load_model(path, **kwargs)


def test_robustbench_missing_is_user_error(monkeypatch):
    """More in tests/test_robustbench_offline.py (the zoo read offline)."""
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", None)
    with pytest.raises(UserError, match="robustbench"):
        ev.load_model("Carmon2019Unlabeled", source="robustbench", dataset="cifar10")


def test_cli_eps_from_checkpoint_config_to_stdout(tmp_path, cnn, capsys):
    path = _ckpt(tmp_path, cnn)
    rc = run_eval(_parse([str(path), "--attacks", "clean", "--n-examples", "20", "--no-progress"]))
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["eps"] == 0.1 and d["n_examples"] == 20 and d["dataset"] == "fashion-mnist"
    assert d["attack_config"]["eps_source"] == "checkpoint config"
    assert any("checkpoint config" in n for n in d["notes"])
    assert d["model_info"]["sparsity"] == 0.5 and d["model_info"]["optimizer"] == "agc"
    assert d["architecture"] == "small-cnn"


def test_cli_out_and_overwrite(tmp_path, cnn):
    path = _ckpt(tmp_path, cnn)
    out = tmp_path / "r.json"
    argv = [str(path), "--attacks", "clean", "--n-examples", "8", "--eps", "0.05", "--no-progress"]
    assert run_eval(_parse([*argv, "--out", str(out)])) == 0
    d = json.loads(out.read_text())
    assert d["eps"] == 0.05 and d["attack_config"]["eps_source"] == "--eps"
    out.write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        run_eval(_parse([*argv, "--out", str(out)]))
    assert out.read_text() == "keep me"
    assert run_eval(_parse([*argv, "--out", str(out), "--overwrite"])) == 0
    assert json.loads(out.read_text())["n_examples"] == 8


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--eps", "-1"], "Invalid eps value"),
        (["--eps", "0.1", "--attacks", "clean,cw"], "Invalid attacks value"),
        (["--eps", "0.1", "--version", "apgd-ce,foo"], "Invalid version value"),
        (["--eps", "0.1", "--batch-size", "0"], "Invalid batch_size value"),
        (["--eps", "0.1", "--arch", "small-cnn"], "--arch goes with --state-dict"),
    ],
)
def test_cli_user_errors(tmp_path, cnn, extra, match):
    path = _ckpt(tmp_path, cnn)
    with pytest.raises(UserError, match=match):
        run_eval(_parse([str(path), "--attacks", "clean", "--no-progress", *extra]))


def test_cli_eps_required_without_config_eps(tmp_path, cnn):
    cfg = {k: v for k, v in CFG.items() if k != "eps"}
    path = _ckpt(tmp_path, cnn, cfg=cfg)
    with pytest.raises(UserError, match="--eps is required"):
        run_eval(_parse([str(path), "--attacks", "clean", "--no-progress"]))


def test_cli_eps_null_in_config_is_the_datasets_default(tmp_path, cnn, capsys):
    # a run trained without --eps records eps: null and trained at fashion-mnist's 0.1
    path = _ckpt(tmp_path, cnn, cfg={**CFG, "eps": None})
    argv = [str(path), "--attacks", "clean", "--n-examples", "4", "--no-progress"]
    assert run_eval(_parse(argv)) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["eps"] == 0.1 and d["model_info"]["eps_source"] == "checkpoint config"
    # no dataset to take it from: still required
    path = _ckpt(tmp_path, cnn, cfg={**CFG, "eps": None, "dataset": "unknown"})
    with pytest.raises(UserError, match="--eps is required"):
        run_eval(_parse([*argv[:1], "--dataset", "fashion-mnist", *argv[1:]]))


def test_cli_state_dict_needs_one_source(tmp_path, cnn, capsys):
    sd = tmp_path / "w.pt"
    torch.save(cnn.state_dict(), sd)
    with pytest.raises(UserError, match="exactly one"):
        run_eval(_parse(["--no-progress", "--eps", "0.1"]))
    argv = ["--state-dict", str(sd), "--arch", "small-cnn", "--dataset", "fashion-mnist"]
    argv += ["--eps", "0.1", "--attacks", "clean", "--n-examples", "5", "--no-progress"]
    assert run_eval(_parse(argv)) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model_info"]["source"] == "state_dict" and d["n_examples"] == 5
