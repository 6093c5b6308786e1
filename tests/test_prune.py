"""Robust pruning pipelines (robust_agc.prune): LWM, HYDRA, IMP, provenance, resume, bad sources.

Every run is tiny (96 real Fashion-MNIST training images, 1-2 epochs, 1 attack step): the tests
check the mechanics (exact masks, frozen weights, provenance, bit-identical resume), not accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_agc.checkpoint import build_model_from_checkpoint, load_checkpoint
from robust_agc.cli import main
from robust_agc.models import create_model
from robust_agc.prune import (
    attach_scores,
    imp_densities,
    load_source,
    magnitude_masks,
    top_masks,
)
from robust_agc.sparse import layer_counts
from robust_agc.train import TIMING_FIELDS

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset", "fashion-mnist", "--model", "small-cnn", "--train-subset", "96", "--val-size", "32",
    "--eval-subset", "16", "--eval-steps", "1", "--batch-size", "32", "--attack-steps", "1",
    "--epochs", "1", "--seed", "2", "--no-progress", "--threads", "1",
]  # fmt: skip
STEPS_PER_EPOCH = 3
MASK = ".weight_mask"


def run_cli(*argv: str) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def masks_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[: -len(MASK)]: v for k, v in state.items() if k.endswith(MASK)}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A dense PGD-AT run of 2 epochs that kept its initial weights (epoch0.pt) for rewinding."""
    out = tmp_path_factory.mktemp("src") / "dense"
    args = [*TINY, "--epochs", "2", "--save-epochs", "0", "1", "--out", out]
    assert run_cli("train", *args) == 0
    assert {"epoch0.pt", "epoch1.pt", "best.pt"} <= {p.name for p in out.iterdir()}
    return out


@pytest.fixture(scope="module")
def lwm(source, tmp_path_factory) -> Path:
    """``robust-agc prune SOURCE --method lwm --sparsity 0.9`` (one fine-tuning epoch)."""
    out = tmp_path_factory.mktemp("lwm") / "p"
    assert run_cli("prune", source / "best.pt", "--method", "lwm", "--sparsity", 0.9, *TINY,
                   "--out", out) == 0  # fmt: skip
    return out


# ------------------------------------------------------------------------- selection (no training)
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_top_masks_keep_exactly_the_largest_per_layer(distribution):
    g = torch.Generator().manual_seed(0)
    values = [torch.rand(s, generator=g) for s in ((8, 4, 3, 3), (16, 8), (10, 16))]
    masks = top_masks(values, 0.3, distribution=distribution)
    counts = layer_counts([v.shape for v in values], 0.3, distribution)
    for v, m, k in zip(values, masks, counts):
        assert m.dtype == torch.bool and m.shape == v.shape and int(m.sum()) == k
        assert v[m].min() > v[~m].max()  # the kept ones are the k largest
    glob = top_masks(values, 0.3, scope="global")
    kept = torch.cat([v[m] for v, m in zip(values, glob)])
    dropped = torch.cat([v[~m] for v, m in zip(values, glob)])
    assert kept.numel() == round(0.3 * sum(v.numel() for v in values))
    assert kept.min() > dropped.max()


def test_magnitude_masks_stay_inside_the_allowed_positions():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 10, generator=g)
    allowed = torch.rand(20, 10, generator=g) < 0.5
    (m,) = magnitude_masks([w], 0.2, allowed=[allowed])
    assert int(m.sum()) == 40 and not (m & ~allowed).any()
    assert w.abs()[m].min() >= w.abs()[allowed & ~m].max()
    with pytest.raises(ValueError, match="only .* are active"):
        magnitude_masks([w], 0.9, allowed=[allowed])


def test_imp_densities_are_geometric_and_end_exactly_at_the_target():
    d = imp_densities(0.01, 4)
    assert d[-1] == 0.01 and len(d) == 4
    assert d[:3] == pytest.approx([0.01 ** (r / 4) for r in (1, 2, 3)])
    assert imp_densities(0.1, 2, start=0.4) == pytest.approx([0.2, 0.1])


def test_hydra_scores_scaled_init_top_k_forward_and_straight_through_gradient():
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, input_size=28)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    group = attach_scores(model, density=0.2)
    conv = model.features[0]
    w = plain["features.0.weight"]
    fan_in = math.prod(w.shape[1:])
    assert torch.equal(
        conv.parametrizations.weight[0].scores, math.sqrt(6 / fan_in) * w / w.abs().max()
    )
    assert not conv.parametrizations.weight.original.requires_grad and not conv.bias.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    # the forward weight is w * top-k(|scores|), at the exact per-layer counts
    masks = group.masks()
    for layer, m in zip(group.layers, masks):
        s = layer.scores.detach().abs()
        assert s[m].min() >= s[~m].max()
    assert [int(m.sum()) for m in masks] == layer_counts([m.shape for m in masks], 0.2, "uniform")
    assert torch.equal(conv.weight, w * masks[0])
    # straight-through: d loss / d s = (d loss / d weight) * w * sign(s), pruned positions included
    x = torch.rand(4, 1, 28, 28)
    eff = conv.weight.detach().requires_grad_(True)
    out = torch.nn.functional.conv2d(x, eff, conv.bias, conv.stride, conv.padding).sum()
    out.backward()
    model.features[0](x).sum().backward()
    s = conv.parametrizations.weight[0].scores
    assert torch.allclose(s.grad, eff.grad * w * s.detach().sign())
    assert (s.grad[~masks[0]] != 0).any()


# ------------------------------------------------------------------------------------ pipelines
def test_lwm_prunes_the_smallest_weights_records_provenance_and_exports(source, lwm):
    src_state = load_source(source / "best.pt").state
    stage = lwm / "1-lwm"
    ckpt = torch.load(stage / "last.pt", weights_only=True)
    masks = masks_of(ckpt["model"])
    counts = layer_counts([m.shape for m in masks.values()], 0.1, "uniform")
    for (name, m), k in zip(masks.items(), counts):
        w = src_state[f"{name}.weight"].abs()
        assert int(m.sum()) == k and w[m].min() >= w[~m].max(), name
        assert torch.all(ckpt["model"][f"{name}.weight"][~m] == 0)
    # zeros in every optimizer-state tensor at pruned positions too (the sparse layer's hooks)
    names = [
        n for n, _ in create_model("small-cnn", in_channels=1, input_size=28).named_parameters()
    ]
    for i, n in enumerate(names):
        if n.endswith(".weight") and n[:-7] in masks:
            assert torch.all(ckpt["optimizer"]["state"][i]["momentum_buffer"][~masks[n[:-7]]] == 0)
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["source"]["sha256"] == sha256(source / "best.pt")
    assert summary["source"]["path"] == str(source / "best.pt") and summary["grad_evals"] > 0
    record = json.loads((lwm / "pipeline.json").read_text())
    src_summary = json.loads((source / "summary.json").read_text())
    assert record["grad_evals"] == summary["grad_evals"]
    assert record["grad_evals_total"] == summary["grad_evals"] + src_summary["grad_evals"]
    assert record["footnote"] == "Compressed model" and record["sparsity"] == pytest.approx(
        0.9, abs=1e-4
    )
    assert set(record["layer_densities"]) == set(masks)
    plain = torch.load(lwm / "model.pt", weights_only=True)
    fresh = create_model("small-cnn", in_channels=1, input_size=28)
    fresh.load_state_dict(plain, strict=True)  # the unmodified architecture, no mask keys
    best = torch.load(stage / "best.pt", weights_only=True)["model"]
    for name, m in masks_of(best).items():
        assert torch.equal(plain[f"{name}.weight"], best[f"{name}.weight"] * m)


def test_hydra_freezes_weights_in_score_training_and_fine_tunes_its_top_k(source, tmp_path):
    out = tmp_path / "hydra"
    assert run_cli("prune", source / "best.pt", "--method", "hydra", "--sparsity", 0.8, *TINY,
                   "--out", out, "--optimizer", "agc") == 0  # fmt: skip
    src_state = load_source(source / "best.pt").state
    scores_ckpt = torch.load(out / "1-scores" / "best.pt", weights_only=True)["model"]
    changed = 0
    for k, v in scores_ckpt.items():
        if k.endswith("parametrizations.weight.original"):
            layer = k[: -len(".parametrizations.weight.original")]
            assert torch.equal(v, src_state[f"{layer}.weight"]), k  # weights frozen
            assert torch.equal(scores_ckpt[f"{layer}.bias"], src_state[f"{layer}.bias"])
            changed += not torch.equal(
                scores_ckpt[f"{layer}.parametrizations.weight.0.scores"].abs().argsort(),
                src_state[f"{layer}.weight"].abs().argsort(),
            )
    assert changed > 0  # the scores were trained
    tuned_start = load_source(out / "1-scores" / "best.pt").masks
    tuned = torch.load(out / "2-finetune" / "last.pt", weights_only=True)["model"]
    assert not any("scores" in k for k in tuned)
    masks = masks_of(tuned)
    counts = layer_counts([m.shape for m in masks.values()], 0.2, "uniform")
    for (name, m), k in zip(masks.items(), counts):
        s = scores_ckpt[f"{name}.parametrizations.weight.0.scores"].abs()
        assert int(m.sum()) == k and s[m].min() >= s[~m].max(), name  # exact top-k of the scores
        assert torch.equal(m, tuned_start[name])  # the mask did not move while fine-tuning
        w0 = scores_ckpt[f"{name}.parametrizations.weight.original"]
        assert not torch.equal(tuned[f"{name}.weight"][m], w0[m])  # but the weights trained
    summary = json.loads((out / "2-finetune" / "summary.json").read_text())
    assert summary["source"]["sha256"] == sha256(out / "1-scores" / "best.pt")
    # the score checkpoint evaluates as the network it trained: weights times the top-k mask
    scored = build_model_from_checkpoint(load_checkpoint(out / "1-scores" / "best.pt"))
    folded = load_source(out / "1-scores" / "best.pt").state
    plain = scored.state_dict()
    assert plain.keys() == folded.keys()
    assert all(torch.equal(plain[k], folded[k]) for k in plain)
    w = plain["features.2.weight"]
    assert int((w != 0).sum()) == int(tuned_start["features.2"].sum())


def test_imp_reaches_the_exact_count_nested_with_rewinding(source, tmp_path):
    out = tmp_path / "imp"
    assert run_cli("prune", source / "best.pt", "--method", "imp", "--rounds", 2, "--sparsity",
                   0.9, "--rewind-epoch", 0, "--save-epochs", 0, *TINY, "--out", out) == 0  # fmt: skip
    r1 = masks_of(torch.load(out / "1-imp" / "last.pt", weights_only=True)["model"])
    r2 = masks_of(torch.load(out / "2-imp" / "last.pt", weights_only=True)["model"])
    n = sum(m.numel() for m in r2.values())
    assert sum(int(m.sum()) for m in r2.values()) == round(0.1 * n)
    assert sum(int(m.sum()) for m in r1.values()) == round(math.sqrt(0.1) * n)
    assert all(not (r2[k] & ~r1[k]).any() for k in r2)  # round 2 prunes round 1's survivors
    # rewinding: each round starts from the source's epoch-0 weights under its new mask
    init = torch.load(source / "epoch0.pt", weights_only=True)["model"]
    start = torch.load(out / "2-imp" / "epoch0.pt", weights_only=True)["model"]
    for name, m in r2.items():
        assert torch.equal(start[f"{name}.weight"], init[f"{name}.weight"] * m)


def _metrics(run: Path) -> list[str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}) for r in rows]


LWM2 = ["--method", "lwm", "--sparsity", "0.9", *TINY, "--epochs", "2"]


@pytest.fixture(scope="module")
def lwm2(source, tmp_path_factory) -> Path:
    """An uninterrupted LWM pipeline of 2 epochs: the reference of the resume tests."""
    out = tmp_path_factory.mktemp("lwm2") / "ref"
    assert run_cli("prune", source / "best.pt", *LWM2, "--out", out) == 0
    return out


def _assert_same_pipeline(ref: Path, other: Path) -> None:
    a = torch.load(ref / "1-lwm" / "last.pt", weights_only=True)
    b = torch.load(other / "1-lwm" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(ref / "1-lwm") == _metrics(other / "1-lwm")
    assert a["grad_evals"] == b["grad_evals"] and (b["epoch"], b["step"]) == (
        2,
        2 * STEPS_PER_EPOCH,
    )
    assert sha256(ref / "model.pt") == sha256(other / "model.pt")


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the trainer raise KeyboardInterrupt (as Ctrl-C) right after taking step ``step``."""
    from robust_agc.train import Trainer

    original = Trainer._optimizer_step

    def stop(self):
        stepped = original(self)
        if self.state.step == step:
            raise KeyboardInterrupt
        return stepped

    monkeypatch.setattr(Trainer, "_optimizer_step", stop)


def test_interrupted_stage_resumes_bit_identically(source, lwm2, tmp_path, monkeypatch):
    """In process: the stage stops at a fixed step of epoch 2 (an exception, as Ctrl-C), the
    pipeline's --resume finishes it from epoch 1's checkpoint; a different pipeline is refused."""
    from robust_agc.train import Trainer

    original = Trainer._optimizer_step
    out = tmp_path / "cut"
    _interrupt_at(monkeypatch, STEPS_PER_EPOCH + 1)
    assert run_cli("prune", source / "best.pt", *LWM2, "--out", out) == 130
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    assert torch.load(out / "1-lwm" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (out / "model.pt").exists()
    before = sha256(out / "pipeline.json")
    assert run_cli("prune", source / "best.pt", *LWM2, "--out", out, "--resume", "--lr", "0.2") == 2
    assert sha256(out / "pipeline.json") == before
    steps = []

    def count(self):
        steps.append(self.state.step)
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", count)
    assert run_cli("prune", source / "best.pt", *LWM2, "--out", out, "--resume") == 0
    assert steps == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))  # epoch 2 only
    _assert_same_pipeline(lwm2, out)


@pytest.mark.slow
def test_sigkill_mid_stage_and_resume_is_bit_identical(source, lwm2, tmp_path):
    """SIGKILL at a fixed step of epoch 2 (tests/_sigkill_driver.py), then --resume: the same
    weights, metrics and exported model as the uninterrupted pipeline (about 10 s: a process)."""
    killed, marker = tmp_path / "killed", tmp_path / "killed-at"
    cmd = [sys.executable, "-m", "tests._sigkill_driver", str(STEPS_PER_EPOCH + 1), str(marker),
           "prune", str(source / "best.pt"), *LWM2, "--out", str(killed)]  # fmt: skip
    res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert json.loads(Path(f"{marker}.0").read_text())["epoch"] == 1
    assert not (killed / "model.pt").exists()
    assert run_cli("prune", source / "best.pt", *LWM2, "--out", killed, "--resume") == 0
    _assert_same_pipeline(lwm2, killed)


# ---------------------------------------------------------------------------------- bad sources
def _corrupt(tmp: Path, source: Path, lwm: Path) -> Path:
    bad = tmp / "corrupt.pt"
    bad.write_bytes((source / "best.pt").read_bytes()[:1000])
    return bad


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", [], "checkpoint not found"),
        ("corrupt", [], "cannot read checkpoint"),
        ("architecture", ["--model", "mnist-cnn"], "does not fit this run's architecture"),
        ("lower", [], "lower than the source's"),
    ],
)
@pytest.mark.parametrize("command", ["prune", "train"])
def test_bad_sources_exit_2_with_one_line_and_touch_nothing(
    command, case, extra, message, source, lwm, tmp_path, capsys
):
    src = {
        "missing": tmp_path / "nope" / "best.pt",
        "corrupt": _corrupt(tmp_path, source, lwm),
        "architecture": source / "best.pt",
        "lower": lwm / "1-lwm" / "best.pt",  # sparsity 0.9; asked for 0.5
    }[case]
    sparsity = "0.5" if case == "lower" else "0.95"
    before = {p: p.read_bytes() for p in (source / "best.pt", lwm / "1-lwm" / "best.pt")}
    out = tmp_path / "out"
    if command == "prune":
        argv = ["prune", src, "--method", "lwm", "--sparsity", sparsity]
    else:
        argv = ["train", "--init-from", src, "--prune", "lwm", "--sparse-method", "static",
                "--sparsity", sparsity]  # fmt: skip
    assert run_cli(*argv, *TINY, *extra, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    assert all(p.read_bytes() == b for p, b in before.items())


def test_init_from_keeps_a_sparse_sources_masks_and_refuses_another_sparsity(lwm, tmp_path, capsys):
    src = lwm / "1-lwm" / "best.pt"
    out = tmp_path / "ft"
    base = ["train", "--init-from", src, "--sparse-method", "static", *TINY, "--out", out]
    assert run_cli(*base, "--sparsity", "0.95") == 2
    assert "--prune lwm" in capsys.readouterr().err and not out.exists()
    assert run_cli(*base, "--sparsity", "0.9") == 0
    a = masks_of(torch.load(src, weights_only=True)["model"])
    b = masks_of(torch.load(out / "last.pt", weights_only=True)["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["source"]["grad_evals_total"]
        == json.loads((lwm / "pipeline.json").read_text())["grad_evals_total"]
    )


# ------------------------------------------------------------- structured: L1 filter pruning
def test_lwm_by_filters_keeps_the_largest_l1_filters_and_shrinks(source, tmp_path):
    """``prune --method lwm --sparse-structure filter``: Li et al.'s L1 filter pruning of the
    dense source (per coupled group, ERK counts as from scratch), fine-tuned with whole filters
    removed, folded to the unmodified architecture, and physically shrinkable."""
    out = tmp_path / "p"
    assert run_cli("prune", source / "best.pt", "--method", "lwm", "--sparsity", 0.5,
                   "--sparse-structure", "filter", "--sparse-init", "erk", *TINY,
                   "--out", out) == 0  # fmt: skip
    src = load_source(source / "best.pt").state
    best = torch.load(out / "1-lwm" / "best.pt", weights_only=True)
    assert best["config"]["sparse_structure"] == "filter"
    masks = masks_of(best["model"])
    kept_any = False
    for name, m in masks.items():
        rows = m.flatten(1)
        kept = rows.all(1)
        assert torch.equal(kept, rows.any(1)), name  # whole filters (rows) kept or removed
        if name == "classifier.6":  # the head's outputs cannot be removed
            assert bool(kept.all())
            continue
        l1 = src[f"{name}.weight"].abs().flatten(1).sum(1)
        if not bool(kept.all()):
            kept_any = True
            assert l1[kept].min() >= l1[~kept].max(), name
        assert torch.all(best["model"][f"{name}.weight"][~kept] == 0), name
        bias = best["model"].get(f"{name}.bias")
        if bias is not None:
            assert torch.all(bias[~kept] == 0), name
    assert kept_any
    plain = torch.load(out / "model.pt", weights_only=True)
    create_model("small-cnn", in_channels=1, input_size=28).load_state_dict(plain, strict=True)
    # the fine-tuned checkpoint exports to a physically smaller network
    small = tmp_path / "small.pt"
    assert run_cli("export", out / "1-lwm" / "best.pt", "--out", small) == 0
    n_small = sum(v.numel() for v in torch.load(small, weights_only=True)["model"].values())
    assert n_small < sum(v.numel() for v in plain.values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "lwm", "--sparse-structure", "channel"], "only by filters"),
        (["--method", "hydra", "--sparse-structure", "channel"], "only by filters"),
        (["--method", "imp", "--rounds", "2"], "only by filters"),
    ],
)
def test_structured_pruning_other_than_filters_by_l1_or_scores_is_refused(
    source, tmp_path, capsys, extra, message
):
    out = tmp_path / "p"
    argv = ["prune", source / "best.pt", "--sparsity", 0.5, *extra]
    if "--sparse-structure" not in extra:
        argv += ["--sparse-structure", "filter"]
    assert run_cli(*argv, *TINY, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_l1_filter_pruning_of_a_sparse_source_is_refused(lwm, tmp_path, capsys):
    out = tmp_path / "ft"
    assert run_cli("train", "--init-from", lwm / "1-lwm" / "best.pt", "--prune", "lwm",
                   "--sparse-structure", "filter", "--sparse-method", "static",
                   "--sparsity", "0.95", *TINY, "--out", out) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "starts from a dense source" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ------------------------------------------------------------- structured: HYDRA filter scores
def _scored(name: str, shape: tuple[int, int, int], density: float = 0.5):
    """A registry model with a random (nonzero) head and filter scores attached; random scores."""
    from robust_agc.prune.filter_scores import attach_filter_scores

    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[0], input_size=shape[1], init="default")
    scores = attach_filter_scores(model, density=density, input_shape=shape)
    with torch.no_grad():
        for s in scores.scores:
            s.uniform_(-1, 1)
    return model, scores


@pytest.mark.parametrize(
    ("name", "shape"), [("small-cnn", (1, 28, 28)), ("preact-resnet18", (3, 32, 32))]
)
def test_filter_scores_compute_the_filter_pruned_network(name, shape):
    """The scored model's outputs (train and eval mode) are bit for bit those of the network its
    folded state dict describes: the top-k filters of each group kept, the rest removed with
    their BatchNorm parameters and biases; the masks are the exact top-k of the scores at the
    structured masks' counts."""
    from robust_agc.prune.filter_scores import fold_filter_score_state
    from robust_agc.sparse import coupled_groups, group_keep_counts

    model, scores = _scored(name, shape)
    groups = coupled_groups(create_model(name, in_channels=shape[0], input_size=shape[1]), shape)
    assert scores.counts == group_keep_counts(groups, "filter", 0.5, "uniform")
    for s, m, k in zip(scores.scores, scores.masks(), scores.counts):
        assert int(m.sum()) == k and s.abs()[m].min() >= s.abs()[~m].max()
    cfg = {"model": name, "num_classes": 10, "in_channels": shape[0], "input_size": shape[1],
           "sparsity": 0.5, "sparse_init": "uniform"}  # fmt: skip
    plain, masks = fold_filter_score_state(model.state_dict(), cfg)
    pruned = create_model(name, in_channels=shape[0], input_size=shape[1])
    pruned.load_state_dict(plain, strict=True)
    assert masks and all(
        torch.equal(m.flatten(1).all(1), m.flatten(1).any(1)) for m in masks.values()
    )
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(1))
    for mode in (True, False):
        model.train(mode), pruned.train(mode)
        with torch.no_grad():
            assert torch.equal(model(x), pruned(x)), mode


def test_filter_scores_start_at_l1_filter_pruning_and_reach_removed_filters():
    """The first mask is Li et al.'s L1 ranking; the conv/linear weights are frozen; and the
    straight-through gradient reaches the scores of removed channels too (the weight-level
    estimator's gradient of a removed filter is zero in conv-BN-ReLU networks)."""
    from robust_agc.prune.filter_scores import attach_filter_scores
    from robust_agc.sparse import l1_filter_masks, maskable_modules

    shape = (3, 32, 32)
    torch.manual_seed(0)
    ref = create_model("vgg16", in_channels=3, input_size=32, init="default")
    model = create_model("vgg16", in_channels=3, input_size=32, init="default")
    model.load_state_dict(ref.state_dict())
    l1 = l1_filter_masks(ref, 0.5, input_shape=shape)
    scores = attach_filter_scores(model, density=0.5, input_shape=shape)
    for i, m in enumerate(scores.masks()):
        assert torch.equal(m, l1.kept_channels(i)), i
    for _, m in maskable_modules(model):
        assert not m.weight.requires_grad
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(model.train()(x), torch.arange(8)).backward()
    removed = [s.grad[~m] for s, m in zip(scores.scores, scores.masks())]
    assert all(bool((g != 0).any()) for g in removed)


def test_hydra_by_filters_trains_scores_then_the_filters_they_select(source, tmp_path):
    """``prune --method hydra --sparse-structure filter``: the score stage leaves every conv and
    linear weight as the source's and moves the scores; the fine-tuning stage keeps exactly the
    top-k filters of the trained scores (and no scores), exports to a smaller network, and its
    score checkpoint evaluates as the pruned network it describes."""
    from robust_agc.prune.filter_scores import filter_score_tensors

    out = tmp_path / "p"
    assert run_cli("prune", source / "best.pt", "--method", "hydra", "--sparsity", 0.5,
                   "--sparse-structure", "filter", *TINY, "--out", out) == 0  # fmt: skip
    src = load_source(source / "best.pt").state
    sc = torch.load(out / "1-scores" / "best.pt", weights_only=True)["model"]
    for k, v in src.items():
        if k.endswith(".weight") and v.dim() > 1:
            assert torch.equal(sc[k], v), k  # frozen during score training
    scores = filter_score_tensors(sc)
    assert scores is not None
    first = load_source(out / "1-scores" / "best.pt")
    ft = torch.load(out / "2-finetune" / "best.pt", weights_only=True)
    assert filter_score_tensors(ft["model"]) is None
    masks = masks_of(ft["model"])
    assert masks.keys() == first.masks.keys()
    for name, m in masks.items():
        assert torch.equal(m, first.masks[name]), name
        rows = m.flatten(1)
        assert torch.equal(rows.all(1), rows.any(1)), name
    small = tmp_path / "small.pt"
    assert run_cli("export", out / "2-finetune" / "best.pt", "--out", small) == 0
    n_small = sum(v.numel() for v in torch.load(small, weights_only=True)["model"].values())
    assert n_small < sum(v.numel() for k, v in src.items())
    model = build_model_from_checkpoint(load_checkpoint(out / "1-scores" / "best.pt"))
    assert torch.equal(model.state_dict()["features.0.weight"], first.state["features.0.weight"])


def test_a_filter_score_source_is_fine_tuned_only_as_it_is(source, tmp_path, capsys):
    """A filter-score run is fine-tuned with --sparse-structure filter, its sparsity and no
    --prune; a dense source without scores and no --prune is refused: one line, nothing written."""
    scores = tmp_path / "scores"
    assert run_cli("train", "--init-from", source / "best.pt", "--prune", "hydra",
                   "--sparse-structure", "filter", "--sparsity", 0.5, *TINY,
                   "--out", scores) == 0  # fmt: skip
    for src, extra, message in [
        (scores, ["--sparsity", "0.75"], "holds HYDRA filter scores"),
        (scores, ["--sparsity", "0.5", "--prune", "lwm"], "holds HYDRA filter scores"),
        (scores, ["--sparsity", "0.5", "--sparse-init", "uniform"], "--sparse-init erk"),
        (source, ["--sparsity", "0.5"], "has no HYDRA filter scores"),
    ]:
        out = tmp_path / "ft"
        assert run_cli("train", "--init-from", src / "best.pt", "--sparse-method", "static",
                       "--sparse-structure", "filter", *extra, *TINY, "--out", out) == 2  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_a_filter_score_stage_resumes_bit_identically(source, tmp_path, monkeypatch):
    """The filter-score stage interrupted at a fixed step of epoch 2 (an exception, as Ctrl-C)
    and resumed from epoch 1's ``last.pt`` ends with the scores, weights and metrics of the stage
    run in one go (the gates' cached masks are rebuilt from the loaded scores)."""
    argv = ["train", "--init-from", source / "best.pt", "--prune", "hydra",
            "--sparse-structure", "filter", "--sparsity", 0.75, *TINY, "--epochs", "2"]  # fmt: skip
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_cli(*argv, "--out", ref) == 0
    _interrupt_at(monkeypatch, STEPS_PER_EPOCH + 1)
    assert run_cli(*argv, "--out", cut) == 130
    monkeypatch.undo()
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1
    assert run_cli(*argv, "--out", cut, "--resume") == 0
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert any(k.startswith("hydra_filter_scores.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [
        [{k: v for k, v in json.loads(x).items() if k not in TIMING_FIELDS} for x in
         (d / "metrics.jsonl").read_text().splitlines()]
        for d in (ref, cut)
    ]  # fmt: skip
    assert rows[0] == rows[1]
