"""``--preset apb`` (the Adversarial Pruning Benchmark's evaluation, ``robust_agc.eval.presets``):
the settings it fills and the ones given explicitly, APB's model key and FMN number, an end-to-end
run on Fashion-MNIST with explicit overrides that the record names, and bad presets or slices."""

from __future__ import annotations

import json
import math

import pytest
import torch

from robust_agc import eval as ev
from robust_agc.cli import build_parser, main
from robust_agc.cli.eval import CLI_DEFAULTS, _check_early
from robust_agc.eval.plan import default_eps_grid
from robust_agc.eval.presets import APB_DEVIATIONS, PRESETS, apb_model_key, apb_record
from robust_agc.models import create_model


def test_apb_plan_has_apbs_settings():
    p = PRESETS["apb"]
    s = p.settings
    plan = ev.make_plan(
        eps=s["eps"], threat_model=s["norm"], n_examples=s["n_examples"], attacks=s["attacks"],
        version=s["version"], batch_size=s["batch_size"], fmn_steps=s["fmn_steps"],
        eps_grid=p.eps_grid(s["eps"]), fmn_slice=s["fmn_slice"],
    )  # fmt: skip
    assert plan.threat is ev.ThreatModel.Linf and plan.eps == 0.031
    assert plan.n_examples == 10000 and plan.batch_size == 500
    assert plan.stages == ("clean", "autoattack", "fmn")
    assert plan.components == ev.AUTOATTACK_VERSIONS["standard"] and plan.aa_version == "standard"
    assert plan.fmn_steps == 200 and plan.fmn_slice == (2048, 2176)
    assert 8 / 255 in plan.eps_grid and 0.031 in plan.eps_grid  # APB's FMN threshold, AA's eps
    assert PRESETS["apb"].source.endswith("0ae46e7b0ed3ae41c1bd1dc439cc014bb5cd2826")


@pytest.mark.parametrize(
    ("args", "key", "n_mismatch"),
    [
        (("rigl-agc", "resnet18", "cifar10", "unstructured", 0.9), "rigl-agc_R18_CIFAR10_US_90", 0),
        (("HYDRA", "vgg16", "svhn", "unstructured", 0.99), "HYDRA_V16_SVHN_US_99", 0),
        (("hydra", "vgg16", "cifar10", "structured", 0.751), "hydra_V16_CIFAR10_S_75", 0),
        (("set", "resnet18", "cifar10", "unstructured", 0.93), "set_R18_CIFAR10_US_93", 1),
        (("set", "resnet18", "cifar10", "structured", 0.95), "set_R18_CIFAR10_S_95", 1),
        (
            ("rigl", "preact-resnet18", "cifar10", "unstructured", 0.9),
            "rigl_preact-resnet18_CIFAR10_US_90",
            1,
        ),
        (
            (None, "small-cnn", "fashion-mnist", "dense", 0.0),
            "unknown_small-cnn_fashion-mnist_dense_0",
            3,
        ),
    ],
)
def test_apb_model_key(args, key, n_mismatch):
    got, mismatches = apb_model_key(*args)
    assert got == key and len(mismatches) == n_mismatch, mismatches


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_apb_preset_end_to_end_with_overrides(tmp_path):
    torch.manual_seed(0)
    cnn = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()
    sd = tmp_path / "w.pt"
    torch.save(cnn.state_dict(), sd)
    out = tmp_path / "r.json"
    argv = ["eval", "--state-dict", str(sd), "--arch", "small-cnn", "--dataset", "fashion-mnist"]
    argv += ["--preset", "apb", "--n-examples", "8", "--fmn-slice", "2:6", "--fmn-steps", "10"]
    argv += ["--version", "apgd-ce", "--no-checks", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    d = json.loads(out.read_text())
    assert d["preset"] == "apb"
    apb = d["apb"]
    assert apb["overrides"] == {
        "n_examples": 8, "fmn_slice": [2, 6], "fmn_steps": 10, "version": "apgd-ce"
    }  # fmt: skip
    assert any("preset apb with explicit overrides" in n for n in d["notes"])
    assert d["eps"] == 0.031 and d["threat_model"] == "Linf" and d["n_examples"] == 8
    assert d["attack_config"]["batch_size"] == 500 and d["attack_config"]["fmn"]["slice"] == [2, 6]
    assert d["attack_config"]["eps_source"] == "preset apb"
    assert [s["name"] for s in d["stages"]] == ["clean", "autoattack", "fmn"]
    radii = [None if r is None else float(r) for r in d["fmn"]["radii"]]
    assert all(r is None for r in radii[:2] + radii[6:]) and d["fmn"]["n_points"] == 4
    assert apb["fmn_robust_acc_8_255"] == sum(r > 8 / 255 for r in radii[2:6]) / 4
    assert apb["model_key"].startswith("unknown_small-cnn_fashion-mnist_dense_")
    assert len(apb["key_mismatches"]) == 3 and apb["deviations"] == list(APB_DEVIATIONS)
    assert "0ae46e7" in apb["source"]


def _args(*extra: str):
    return build_parser().parse_args(["eval", "ckpt.pt", *extra])


def test_cli_fills_every_unset_option_from_the_preset():
    args = _args("--preset", "apb")
    assert _check_early(args) == {}
    assert (args.attacks, args.version, args.norm) == ("clean,autoattack,fmn", "standard", "Linf")
    assert (args.eps, args.n_examples, args.batch_size) == (0.031, 10000, 500)
    assert (args.fmn_steps, args.fmn_slice) == (200, (2048, 2176))
    assert args.eps_source == "preset apb"
    assert args.eps_grid == sorted({*default_eps_grid(0.031), 8 / 255})
    assert all(b > a for a, b in zip(args.eps_grid, args.eps_grid[1:]))


def test_cli_explicit_options_override_the_preset():
    args = _args("--preset", "apb", "--eps", "0.05", "--batch-size", "500", "--norm", "L2")
    assert _check_early(args) == {"eps": 0.05, "norm": "L2"}  # 500 is the preset's own value
    assert args.eps == 0.05 and args.norm == "L2" and args.batch_size == 500
    assert not hasattr(args, "eps_source")  # the CLI then records "--eps"
    assert args.eps_grid == sorted({*default_eps_grid(0.05), 8 / 255})  # follows the eps
    assert args.n_examples == 10000 and args.fmn_slice == (2048, 2176)

    args = _args("--preset", "apb", "--attacks", "clean,autoattack", "--eps-grid", "0,0.1")
    assert _check_early(args) == {"attacks": "clean,autoattack"}
    assert args.fmn_slice is None  # the preset's slice needs the fmn stage
    assert args.eps_grid == [0.0, 0.1]


def test_without_preset_the_defaults_are_unchanged():
    args = _args()
    assert _check_early(args) == {}
    assert {k: getattr(args, k) for k in CLI_DEFAULTS} == {
        "attacks": "clean,autoattack", "version": "standard", "norm": "Linf",
        "batch_size": 256, "fmn_steps": 1000,
    }  # fmt: skip
    assert args.eps is None and args.n_examples is None and args.fmn_slice is None
    assert args.eps_grid is None and not hasattr(args, "eps_source")


def test_apb_fmn_number_counts_radii_above_8_255_in_the_slice_only():
    radii = [None, 0.0, 0.02, 0.031, 8 / 255 + 1e-6, math.inf, None]
    rec = apb_record(
        method="rigl-agc", architecture="resnet18", dataset="cifar10", structure="unstructured",
        sparsity=0.9, radii=radii, overrides={"n_examples": 8},
    )  # fmt: skip
    assert rec["fmn_robust_acc_8_255"] == 2 / 5  # 0.031 < 8/255: broken at APB's FMN threshold
    assert rec["model_key"] == "rigl-agc_R18_CIFAR10_US_90" and rec["key_mismatches"] == []
    assert rec["overrides"] == {"n_examples": 8}
    kw = {"method": None, "architecture": None, "dataset": None, "structure": None}
    assert apb_record(**kw, sparsity=None, radii=None, overrides={})["fmn_robust_acc_8_255"] is None
    l2 = apb_record(**kw, sparsity=None, radii=radii, overrides={}, threat_model="L2")
    assert l2["fmn_robust_acc_8_255"] is None  # APB's threshold is an L-inf radius


@pytest.fixture
def state_dict(tmp_path):
    torch.manual_seed(0)
    cnn = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()
    path = tmp_path / "w.pt"
    torch.save(cnn.state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "APB"], "Invalid preset value: 'APB' (choose apb)"),
        (["--preset", ""], "Invalid preset value: '' (choose apb)"),
        (["--preset", "apb", "--fmn-slice", ""], "Invalid fmn_slice value: '' (START:STOP"),
        (["--preset", "apb", "--fmn-slice", "2048"], "Invalid fmn_slice value: '2048' (START"),
        (["--preset", "apb", "--fmn-slice", "1:2:3"], "Invalid fmn_slice value: '1:2:3' (START"),
        (["--preset", "apb", "--fmn-slice", "a:b"], "Invalid fmn_slice value: 'a:b' (START"),
        (["--preset", "apb", "--fmn-slice", "5:5"], "Invalid fmn_slice value: (5, 5)"),
        (["--preset", "apb", "--fmn-slice=-1:3"], "Invalid fmn_slice value: (-1, 3)"),
        (
            ["--preset", "apb", "--n-examples", "100"],
            "2048:2176 (must lie within the n_examples=100",
        ),
        (["--preset", "apb", "--n-examples", "8", "--fmn-slice", "4:9"], "4:9 (must lie within"),
        # no --n-examples: the bound is the test set's 10,000 points, known once the data is read
        (["--attacks", "clean,fmn", "--fmn-slice", "9990:10001"], "9990:10001 (only 10000 points)"),
    ],
)
def test_bad_preset_or_slice_one_line_exit_2_nothing_written(
    tmp_path, state_dict, capsys, extra, message
):
    out, state = tmp_path / "r.json", tmp_path / "st.json"
    argv = ["eval", "--state-dict", str(state_dict), "--arch", "small-cnn"]
    argv += ["--dataset", "fashion-mnist", "--eps", "0.1", "--no-progress", "--no-checks"]
    argv += ["--out", str(out), "--state", str(state), *extra]
    code = main(argv)
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists() and not state.exists() and cap.out == ""
