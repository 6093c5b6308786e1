"""End-to-end CLI: a real Fashion-MNIST run, SIGKILL-and-resume equality, bad inputs exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_agc.cli import main
from robust_agc.models import create_model
from robust_agc.train import TIMING_FIELDS

from .test_checkpoint import make_malicious_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# A small but complete run: sparse RigL + AGC + PGD-AT on 384 real images.
SMALL = [
    "--dataset", "fashion-mnist", "--model", "small-cnn", "--train-subset", "384", "--val-size", "64",
    "--eval-subset", "64", "--eval-steps", "2", "--batch-size", "64", "--attack-steps", "2",
    "--epochs", "3", "--seed", "1", "--no-progress", "--threads", "1",
]  # fmt: skip
SPARSE_AGC = [
    "--optimizer",
    "agc",
    "--sparse-method",
    "rigl",
    "--sparsity",
    "0.8",
    "--update-interval",
    "2",
]


def run_cli(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as e:  # argparse usage errors
        return int(e.code)


def _metrics(run: Path) -> list[str]:
    """Each epoch's record without the timing fields, as canonical JSON (so NaN compares equal)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
        for r in rows
    ]


def test_train_end_to_end_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *SMALL, *SPARSE_AGC, "--out", str(out)) == 0
    assert "clean accuracy" in capsys.readouterr().out
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    required = {
        "epoch", "train_loss", "train_acc", "val_clean_acc", "val_robust_acc", "test_clean_acc",
        "test_robust_acc", "lr", "epoch_time_s", "wall_time_s", "images_per_s", "grad_evals",
        "agc_tau", "agc_coef", "density", "exploration_rate", "flops_ratio", "train_time_s",
        "cpu_time_s",
    }  # fmt: skip
    assert required <= set(rows[-1])
    # training-only clocks: below the epoch's wall time (which adds the evaluation), increasing
    assert 0 < rows[0]["train_time_s"] < rows[0]["wall_time_s"]
    assert 0 < rows[0]["cpu_time_s"] < rows[2]["cpu_time_s"]
    assert rows[-1]["density"] == pytest.approx(0.2, abs=0.01)
    assert rows[0]["grad_evals"] < rows[1]["grad_evals"] < rows[2]["grad_evals"]
    assert rows[0]["wall_time_s"] < rows[2]["wall_time_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["versions"]["torch"] == torch.__version__
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["optimizer"] == "agc" and ckpt["epoch"] == 3
    masks = {k: v for k, v in ckpt["model"].items() if k.endswith("weight_mask")}
    assert masks and all(v.dtype == torch.bool for v in masks.values())
    for k, m in masks.items():
        assert torch.all(ckpt["model"][k[: -len("_mask")]][~m] == 0)
    # every AGC state tensor is zero at pruned positions too (full gradient included)
    names = [
        n for n, _ in create_model("small-cnn", in_channels=1, input_size=28).named_parameters()
    ]
    opt_state = ckpt["optimizer"]["state"]
    checked = 0
    for i, name in enumerate(names):
        if f"{name}_mask" in masks:
            pruned = ~masks[f"{name}_mask"]
            for key in ("momentum_buffer", "snapshot", "full_grad", "snap_grad"):
                assert torch.all(opt_state[i][key][pruned] == 0), (name, key)
                checked += 1
    assert checked >= 4 * 4


def test_dense_pgd_at_learns_on_real_data(tmp_path):
    """A short dense PGD-AT run is clearly above chance, clean and robust (10 classes: chance 0.1)."""
    out = tmp_path / "dense"
    args = ["--train-subset", "2000", "--val-size", "200", "--eval-subset", "200", "--epochs", "2"]
    assert run_cli("train", *SMALL, *args, "--attack-steps", "3", "--out", str(out)) == 0
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final["test_clean_acc"] > 0.5 and final["test_robust_acc"] > 0.25


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    """SIGKILL a run at a fixed step of epoch 2 (after epoch 1's checkpoint was written), resume it
    with the CLI: the final weights, metrics, gradient evaluations and step count are those of a run
    never interrupted. The kill point is set by patching the trainer in the killed process
    (tests/_sigkill_driver.py), not by a clock, so the run cannot finish first."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_cli("train", *SMALL, *SPARSE_AGC, "--out", str(ref)) == 0
    a = torch.load(ref / "last.pt", weights_only=True)
    per_epoch = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])["step"]
    kill_step = per_epoch + 2  # the third step of epoch 2, taken in memory, then SIGKILL
    marker = tmp_path / "killed-at"
    cmd = [sys.executable, "-m", "tests._sigkill_driver", str(kill_step), str(marker), "train",
           *SMALL, *SPARSE_AGC, "--out", str(killed)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    at = json.loads(Path(f"{marker}.0").read_text())
    assert at == {"epoch": 1, "step": kill_step, "last_pt_existed": True}
    cut = torch.load(killed / "last.pt", weights_only=True)
    assert (cut["epoch"], cut["step"]) == (1, per_epoch) and cut["step"] < a["step"]
    assert _metrics(killed) == _metrics(ref)[:1]  # epoch 1 only, as the uninterrupted run's
    assert run_cli("train", *SMALL, *SPARSE_AGC, "--out", str(killed), "--resume") == 0
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(ref) == _metrics(killed)  # epochs 2 and 3 trained after the resume
    assert (b["epoch"], b["step"]) == (3, 3 * per_epoch)
    assert a["grad_evals"] == b["grad_evals"] and a["step"] == b["step"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epochs", "0"], "Invalid epochs value"),
        (["train", "--model", "resnet-9000"], "Invalid model value"),
        (["train", "--dataset", "imagenet"], "Invalid dataset value"),
        (["train", "--sparsity", "1.5", "--sparse-method", "rigl"], "Invalid sparsity value"),
        (["train", "--lr", "-1"], "Invalid lr value"),
        (["train", "--momentum", "1.0"], "Invalid momentum value"),
        (["train", "--agc-refresh", "often"], "Invalid agc_refresh value"),
        (["train", "--eps", "3"], "Invalid eps value"),
        (["train", "--device", "tpu"], "Invalid device value"),
        (["train", "--config", "/nonexistent/x.yaml"], "config file not found"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "not found"),
        (["train", "--epochs", "two"], "invalid int value"),
        (["train", "--objective", "fgsm"], "invalid choice"),
        (["eval", "/nonexistent/ckpt.pt", "--eps", "0.1"], "not found"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(argv, message, capsys, tmp_path):
    code = run_cli(*argv, *(["--out", str(tmp_path / "r")] if argv[0] == "train" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_bad_yaml_key_and_cli_wins(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert run_cli("train", "--config", str(bad)) == 2
    assert "unknown setting 'epochz'" in capsys.readouterr().err
    from robust_agc.cli import build_parser
    from robust_agc.config import config_from_args

    good = tmp_path / "good.yaml"
    good.write_text("epochs: 3\nlr: 0.2\nsparse-method: set\n")
    args = build_parser().parse_args(["train", "--config", str(good), "--lr", "0.01"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.sparse_method) == (3, 0.01, "set")


def test_existing_run_is_never_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert run_cli("train", *SMALL, "--out", str(out)) == 2
    assert "--resume" in capsys.readouterr().err
    # --overwrite refuses a folder that is not a run folder
    assert run_cli("train", *SMALL, "--out", str(out), "--overwrite") == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_cli("train", *SMALL, "--out", str(tmp_path / "none"), "--resume") == 2


def test_malicious_checkpoint_refused_by_resume_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 1\n")
    marker = tmp_path / "pwned"
    make_malicious_checkpoint(out / "last.pt", marker)
    assert run_cli("train", *SMALL, "--out", str(out), "--resume") == 2
    assert "unsafe pickle" in capsys.readouterr().err
    assert run_cli("eval", str(out / "last.pt"), "--eps", "0.1") == 2
    assert "unsafe pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_with_a_different_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", "1", "--out", str(out)) == 0
    before = (out / "last.pt").read_bytes()
    assert (
        run_cli("train", *SMALL, "--epochs", "1", "--lr", "0.2", "--out", str(out), "--resume") == 2
    )
    assert "different configuration (lr)" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before


def test_python_dash_m_matches_console_script():
    res = subprocess.run(
        [sys.executable, "-m", "robust_agc", "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert res.returncode == 0 and res.stdout.startswith("robust_agc ")


def test_bsr_with_agc_keeps_the_exact_budget(tmp_path):
    """`--sparse-method bsr --sparsity 0.99 --optimizer agc --objective pgd-at` (issue 9's command)."""
    out = tmp_path / "bsr"
    argv = [
        *SMALL,
        "--epochs",
        "2",
        "--optimizer",
        "agc",
        "--sparse-method",
        "bsr",
        "--sparsity",
        "0.99",
    ]
    assert run_cli("train", *argv, "--out", str(out)) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    masks = [v for k, v in ckpt["model"].items() if k.endswith("weight_mask")]
    total = sum(m.numel() for m in masks)
    assert (
        sum(int(m.sum()) for m in masks) == ckpt["topology"]["bsr"]["budget"] == round(0.01 * total)
    )
    signs = ckpt["topology"]["bsr"]["signs"]
    for (k, m), s in zip(
        ((k, v) for k, v in ckpt["model"].items() if k.endswith("weight_mask")), signs
    ):
        w = ckpt["model"][k[: -len("_mask")]]
        assert torch.all(w[~m] == 0) and torch.all(w[m] * s[m] > 0)  # active theta > 0, fixed sign
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["density"] == pytest.approx(0.01, abs=1e-4) and "layer_densities" in rows[-1]


def test_without_validation_points_best_follows_the_last_epoch(tmp_path):
    out = tmp_path / "noval"
    assert run_cli("train", *SMALL, "--epochs", "1", "--val-size", "0", "--out", str(out)) == 0
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 1


def test_a_run_folders_config_yaml_reruns_the_run(tmp_path):
    """`--config RUN/config.yaml` is accepted (its derived keys dropped) and reproduces the run."""
    import yaml

    from robust_agc.config import DERIVED_KEYS

    first, second = tmp_path / "first", tmp_path / "second"
    argv = [*SMALL, "--epochs", "2", *SPARSE_AGC]
    assert run_cli("train", *argv, "--out", str(first)) == 0
    assert set(yaml.safe_load((first / "config.yaml").read_text())) >= DERIVED_KEYS
    assert run_cli("train", "--config", str(first / "config.yaml"), "--out", str(second)) == 0
    assert _metrics(second) == _metrics(first)
    saved = yaml.safe_load((first / "config.yaml").read_text())
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "out"} == {
        k: v for k, v in saved.items() if k != "out"
    }


def test_choices_come_from_the_registries(capsys):
    from robust_agc.cli import build_parser
    from robust_agc.config import TrainConfig, field_choices
    from robust_agc.losses import list_objectives
    from robust_agc.models import list_models
    from robust_agc.optim import list_optimizers
    from robust_agc.sparse import list_sparse_methods

    assert set(field_choices("optimizer")) == set(list_optimizers())
    assert set(field_choices("objective")) == set(list_objectives())
    assert set(field_choices("model")) == set(list_models())
    assert {"dense", "bsr", *list_sparse_methods()} == set(field_choices("sparse_method"))
    build_parser().parse_args(["train", "--optimizer", "adamw", "--sparse-method", "bsr"])
    with pytest.raises(Exception, match="Invalid model value"):
        TrainConfig(model="no-such-net").validate()
    assert run_cli("train", "--optimizer", "lion") == 2
    assert "invalid choice" in capsys.readouterr().err
