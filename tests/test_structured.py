"""Filter and channel sparsity: exact counts, whole slices, BatchNorm/bias invariants under
optimizer steps (SGD and AGC), channel RigL, the physical export for every registered model,
the weights-only round trip, and the CLI (train, export, bad input)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from robust_agc.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from robust_agc.cli import main
from robust_agc.config import TrainConfig
from robust_agc.errors import UserError
from robust_agc.eval import compression_info, load_model
from robust_agc.models import create_model, list_models
from robust_agc.optim import AGC
from robust_agc.sparse import (
    StructuredMasks,
    apply_structured_masks,
    create_scheduler,
    export_structured,
    l1_filter_masks,
    layer_widths,
    maskable_modules,
)
from robust_agc.train import Trainer

SHAPES = {"small-cnn": (1, 16, 16), "mnist-cnn": (1, 16, 16)}  # others: (3, 8, 8)
BIG = ("preact-resnet18", "vgg16", "wrn-28-4")  # their channel-structure exports are `slow`


def shape_of(name: str) -> tuple[int, int, int]:
    return SHAPES.get(name, (3, 8, 8))


class TinyBN(nn.Module):
    """conv-BN-ReLU x2 with a residual sum, pool, linear: VGG's and ResNet's parts, small."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 12, 3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        a = a + torch.relu(self.bn2(self.conv2(a)))
        a = torch.relu(self.bn3(self.conv3(a)))
        return self.fc(nn.functional.adaptive_avg_pool2d(a, 1).flatten(1))


def build(name: str, seed: int = 0) -> nn.Module:
    """A model (registered, or ``tiny-bn``) with random BatchNorm statistics and nonzero
    biases/heads, so that a wrongly removed channel changes the outputs."""
    c, s, _ = shape_of(name)
    torch.manual_seed(seed)
    model = TinyBN() if name == "tiny-bn" else create_model(name, in_channels=c, input_size=s)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0, 0.05)
    return model


def rows(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-slice ``(any, all)`` of a mask along ``dim``."""
    flat = mask.transpose(0, dim).reshape(mask.shape[dim], -1)
    return flat.any(1), flat.all(1)


# ------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("structure,dim", [("filter", 0), ("channel", 1)])
@pytest.mark.parametrize("name", ["small-cnn", "preact-resnet18"])
def test_whole_slices_and_exact_counts(name, structure, dim):
    model = build(name)
    masks = apply_structured_masks(
        model, sparsity=0.5, structure=structure, input_shape=shape_of(name), generator=3
    )
    assert isinstance(masks, StructuredMasks) and len(masks) > 0
    for gi, g in enumerate(masks.groups):
        kept = masks.kept_channels(gi)
        assert int(kept.sum()) == round(0.5 * g.size)  # uniform: exactly half of each group
        for s in g.members(structure):
            mask = s.module.weight_mask
            any_, all_ = rows(mask, dim)
            assert torch.equal(any_, all_)  # every slice is wholly kept or wholly pruned
            assert torch.equal(any_[s.index], kept[s.root])  # coupled layers agree
            w = s.module.weight.detach().transpose(0, dim).reshape(mask.shape[dim], -1)
            assert torch.count_nonzero(w[~any_]) == 0
    if name == "preact-resnet18" and structure == "filter":
        # the residual stream of stage 1 is one group: stem and both blocks' last convs
        stream = next(g for g in masks.groups if g.root in ("conv1", "layers.1.conv2"))
        names = {s.name for s in stream.producers}
        assert {"conv1", "layers.0.conv2", "layers.1.conv2"} <= names


def test_erk_counts_follow_the_layer_densities():
    model = build("small-cnn")
    masks = apply_structured_masks(
        model, sparsity=0.75, structure="filter", input_shape=(1, 16, 16), distribution="erk"
    )
    counts = masks.channel_counts()
    # ERK gives the first (smallest) conv the highest density and the big fc layer the lowest
    assert counts["features.0"] / 32 > counts["classifier.1"] / 200
    assert all(c >= 1 for c in counts.values())


def test_l1_filter_masks_keep_the_largest_filters():
    model = build("small-cnn")
    conv = model.features[0]
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.weight[[3, 7, 11]] *= 1000.0  # three filters with by far the largest L1 norm
    masks = l1_filter_masks(model, 0.9, input_shape=(1, 16, 16))
    kept = masks.kept_channels(
        next(i for i, g in enumerate(masks.groups) if g.root == "features.0")
    )
    assert set(kept.nonzero().flatten().tolist()) == {3, 7, 11}  # round(0.1 * 32) = 3


def test_bad_arguments():
    model = build("small-cnn")
    with pytest.raises(ValueError, match="Invalid structure value"):
        apply_structured_masks(model, sparsity=0.5, structure="block", input_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="Invalid sparsity value"):
        apply_structured_masks(model, sparsity=1.0, input_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="Invalid input_shape value"):
        apply_structured_masks(model, sparsity=0.5, input_shape=(1, 0, 16))
    masks = apply_structured_masks(model, sparsity=0.5, input_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="Invalid method value: 'set' with filter masks"):
        create_scheduler("set", masks, total_steps=10)


# ------------------------------------------------------------------------------- invariants
def _removed_1d(masks: StructuredMasks) -> list[tuple[nn.Parameter, torch.Tensor]]:
    out = masks.removed_parameters()
    assert out, "no removed BatchNorm/bias entries to check"
    return out


@pytest.mark.parametrize("name", ["small-cnn", "tiny-bn"])
@pytest.mark.parametrize("optimizer", ["sgd", "agc"])
def test_removed_filters_bn_and_bias_stay_zero_under_steps(name, optimizer):
    model = build(name)
    shape = shape_of(name)
    masks = apply_structured_masks(model, sparsity=0.5, input_shape=shape, generator=1)
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3
        )
    else:
        opt = AGC(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3, gamma=0.5)
    masks.attach(opt)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g)

    def ce(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    if optimizer == "agc":
        opt.refresh(model, [(x, y)], lambda m, xb, yb: ce(m))
        masks.zero_optimizer_state_(opt)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        ce(model).backward()
        if optimizer == "agc":
            opt.snapshot_backward(model, ce)
        opt.step()
        for p, pos in _removed_1d(masks):
            assert torch.count_nonzero(p.detach()[pos]) == 0
            assert p.grad is None or torch.count_nonzero(p.grad[pos]) == 0
            states = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
            assert states and all(torch.count_nonzero(v[pos]) == 0 for v in states)
        for _, w, m in masks:
            assert torch.count_nonzero(w.detach()[~m]) == 0
    # the surviving parameters did move
    kept = [p for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert kept


# ------------------------------------------------------------------------------- regrowth
@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_structured_rigl_keeps_exact_counts_and_moves_channels(structure):
    model = build("tiny-bn")
    masks = apply_structured_masks(
        model, sparsity=0.5, structure=structure, input_shape=(3, 8, 8), generator=2
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masks.attach(opt)
    sched = create_scheduler(
        "rigl", masks, total_steps=12, update_interval=2, drop_fraction=0.5, optimizer=opt
    )
    counts = masks.channel_counts()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    model.train()
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        assert masks.channel_counts() == counts
        for gi, grp in enumerate(masks.groups):
            kept = masks.kept_channels(gi)
            for s in grp.members(structure):
                any_, all_ = rows(s.module.weight_mask, s.dim)
                assert torch.equal(any_, all_) and torch.equal(any_[s.index], kept[s.root])
        for p, pos in masks.removed_parameters():
            assert torch.count_nonzero(p.detach()[pos]) == 0
    assert sched.num_updates == 3  # steps 2, 4, 6 (< 0.75 * 12)
    assert sum(h["changed"] for h in sched.history) > 0
    assert masks.exploration_rate > masks.density
    if structure == "filter":  # a regrown filter is alive: nonzero weights, BatchNorm weight 1
        for gi, grp in enumerate(masks.groups):
            kept = masks.kept_channels(gi)
            for s in grp.producers:
                w = s.module.weight.detach().reshape(s.module.weight.shape[0], -1)
                assert bool((w[s.index[kept[s.root]]].abs().sum(1) > 0).all())


def test_filter_rigl_regrows_where_the_activation_gradient_is_largest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = apply_structured_masks(model, sparsity=0.5, input_shape=(6,), generator=0)
    kept = masks.kept_channels(0)
    with torch.no_grad():  # the consumer weighs one pruned unit 100x more than the others
        target = int((~kept).nonzero()[0])
        model[2].weight.mul_(0.01)
        model[2].weight[:, target] = torch.tensor([3.0, -2.0, 0.5])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    masks.attach(opt)
    sched = create_scheduler(
        "rigl", masks, total_steps=4, update_interval=1, drop_fraction=0.5, optimizer=opt
    )
    x = torch.rand(32, 6)
    nn.functional.cross_entropy(model(x), torch.zeros(32, dtype=torch.long)).backward()
    opt.step()
    summary = sched.step()
    assert summary is not None and summary["grown"] == 1
    assert bool(masks.kept_channels(0)[target])


# ------------------------------------------------------------------------------- export
EXPORT_CASES = [(name, "filter") for name in list_models()] + [
    pytest.param(name, "channel", marks=[pytest.mark.slow] if name in BIG else [])
    for name in list_models()
]


@pytest.mark.parametrize("name,structure", EXPORT_CASES)
def test_export_is_smaller_with_equal_outputs_and_round_trips(name, structure, tmp_path):
    model = build(name)
    shape = shape_of(name)
    apply_structured_masks(model, sparsity=0.5, structure=structure, input_shape=shape)
    model.eval()
    small, widths = export_structured(model, shape)
    small.eval()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    n_ref = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.5 * n_ref
    assert not any(n.endswith("weight_mask") for n, _ in small.named_buffers())
    assert widths == layer_widths(small)
    # saved as plain tensors + widths, rebuilt by the registry, loaded weights-only
    c, s, _ = shape
    cfg = {"model": name, "num_classes": 10, "in_channels": c, "input_size": s}
    path = tmp_path / "small.pt"
    save_checkpoint({"model": small.state_dict(), "config": cfg, "widths": widths}, path)
    loaded = build_model_from_checkpoint(load_checkpoint(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert torch.equal(load_model(path)(x).detach(), out)


@pytest.mark.parametrize("name", list_models())
def test_default_widths_rebuild_the_default_model_bit_for_bit(name):
    c, s, _ = shape_of(name)
    torch.manual_seed(0)
    ref = create_model(name, in_channels=c, input_size=s, init="default")
    torch.manual_seed(0)
    same = create_model(name, in_channels=c, input_size=s, init="default", widths=layer_widths(ref))
    assert list(ref.state_dict()) == list(same.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(ref.state_dict().values(), same.state_dict().values())
    )
    with pytest.raises(UserError, match="Invalid widths value"):
        create_model(name, in_channels=c, input_size=s, widths={"no.such.layer": 3})


def test_export_of_a_model_without_structure_removes_nothing():
    model = build("small-cnn")
    small, widths = export_structured(model, (1, 16, 16))
    assert widths == layer_widths(model)


# ------------------------------------------------------------------------------- CLI
TINY = [
    "train", "--model", "small-cnn", "--train-subset", "64", "--val-size", "0", "--eval-subset",
    "16", "--eval-steps", "1", "--batch-size", "32", "--attack-steps", "1", "--epochs", "1",
    "--no-progress", "--threads", "1", "--sparsity", "0.5", "--sparse-init", "uniform",
]  # fmt: skip


def run_cli(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as e:
        return int(e.code)


def test_cli_train_filter_export_and_eval_load(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*TINY, "--sparse-method", "rigl", "--update-interval", "1", "--sparse-structure"]
    assert run_cli(*argv, "filter", "--out", str(run)) == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["sparse_structure"] == "filter"
    small_path = tmp_path / "small.pt"
    assert run_cli("export", str(run / "last.pt"), "--out", str(small_path)) == 0
    assert "exported" in capsys.readouterr().out
    masked = build_model_from_checkpoint(ckpt)
    small = load_model(small_path)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(
        p.numel() for p in masked.parameters()
    )
    # the evaluation record: the training's eps, and the sparsity of the masked model it came from
    out = tmp_path / "eval.json"
    argv = ["eval", str(small_path), "--attacks", "clean", "--n-examples", "8", "--no-progress"]
    assert run_cli(*argv, "--out", str(out)) == 0
    rec = json.loads(out.read_text())
    masked_info = compression_info(masked)
    assert rec["eps"] == 0.1 and rec["structure"] == "structured" == masked_info["structure"]
    # removing a filter also removes the next layer's weights on its channel: more than the zeros
    kept = sum(m.weight.numel() for _, m in maskable_modules(small))
    full = sum(m.weight.numel() for _, m in maskable_modules(masked))
    assert rec["sparsity"] == pytest.approx(1 - kept / full)
    assert rec["sparsity"] > masked_info["sparsity"] + 0.1
    assert rec["footnote"] == "Compressed model"
    # never overwrites without --overwrite
    before = small_path.read_bytes()
    assert run_cli("export", str(run / "last.pt"), "--out", str(small_path)) == 2
    assert "exists" in capsys.readouterr().err and small_path.read_bytes() == before
    # the exported network trains as itself: --init-from builds it at its widths
    tuned = tmp_path / "tuned"
    assert run_cli(*TINY, "--init-from", str(small_path), "--out", str(tuned)) == 0
    small_ckpt = load_checkpoint(small_path)
    after = load_checkpoint(tuned / "last.pt")
    assert after["widths"] == small_ckpt["widths"]
    n_small = sum(p.numel() for p in small.parameters())
    assert json.loads((tuned / "summary.json").read_text())["params"] == n_small
    trained = build_model_from_checkpoint(after)  # eval rebuilds it at those widths too
    assert sum(p.numel() for p in trained.parameters()) == n_small
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), small.parameters()))
    argv = ["eval", str(tuned / "last.pt"), "--attacks", "clean", "--n-examples", "8"]
    assert run_cli(*argv, "--no-progress", "--out", str(tmp_path / "tuned.json")) == 0


def test_a_run_from_an_exported_network_resumes_bit_identically(tmp_path):
    run, small_path = tmp_path / "run", tmp_path / "small.pt"
    argv = [*TINY, "--sparse-method", "static", "--sparse-structure", "filter"]
    assert run_cli(*argv, "--out", str(run)) == 0
    assert run_cli("export", str(run / "last.pt"), "--out", str(small_path)) == 0
    cfg = TrainConfig(model="small-cnn", train_subset=64, val_size=16, eval_subset=16,
                      eval_steps=1, batch_size=32, attack_steps=1, epochs=2, threads=1,
                      progress=False, init_from=str(small_path))  # fmt: skip
    ref = Trainer(cfg)
    ref.fit()
    first = Trainer(cfg)
    first.cfg = dataclasses.replace(cfg, epochs=1)  # the schedule stays the two-epoch run's
    first.fit()
    ckpt = first.state_dict()
    resumed = Trainer(cfg)
    resumed.load_state_dict(ckpt)
    resumed.fit()
    assert ckpt["widths"] == load_checkpoint(small_path)["widths"]
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sparse-structure", "block"], "invalid choice"),
        (["--sparse-method", "set", "--sparse-structure", "filter"], "Invalid combination"),
        (["--sparse-method", "bsr", "--sparse-structure", "channel"], "Invalid combination"),
        (["--sparse-structure", "filter"], "Invalid combination"),  # dense
        (  # from a source, filters only: refused before any file is read
            ["--sparse-method", "static", "--sparse-structure", "channel", "--init-from", "x.pt"],
            "only by filters",
        ),
        (
            [
                "--sparse-method",
                "static",
                "--sparse-structure",
                "filter",
                "--init-from",
                "x.pt",
                "--prune",
                "lwm",
                "--rewind-from",
                "y.pt",
            ],
            "--rewind-from",
        ),
    ],
)
def test_cli_bad_structure_input_exits_2_with_one_line(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*TINY, *extra, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_export_of_an_unstructured_checkpoint_exits_2(tmp_path, capsys):
    # PyTorch's init: a He-initialised model's zero head would make its inputs removable
    model = create_model("small-cnn", in_channels=1, input_size=28, init="default")
    cfg = {"model": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 28}
    save_checkpoint({"model": model.state_dict(), "config": cfg}, tmp_path / "dense.pt")
    assert run_cli("export", str(tmp_path / "dense.pt"), "--out", str(tmp_path / "s.pt")) == 2
    assert "nothing to remove" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()
