"""Masks: allocation (uniform/ER/ERK), exact counts, buffers, enforcement hooks, FLOPs, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats
from torch import nn

from robust_agc.models import create_model
from robust_agc.sparse import (
    SparseMasks,
    apply_masks,
    create_scheduler,
    layer_counts,
    layer_densities,
    maskable_modules,
    training_flops_ratio,
)
from tests.test_sparse_helpers import TensorStateSGD, TinyNet, _one_thread, make_data, train_steps  # noqa: F401


def _three_linear() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 50)
    )


# --------------------------------------------------------------------- allocation
def test_erk_hand_computed_example() -> None:
    # Shapes (out, in): (10, 4) n=40, (20, 10) n=200, (50, 20) n=1000; N = 1240; density 0.5.
    # ERK raw scores sum(shape)/prod(shape): 14/40 = 0.35, 30/200 = 0.15, 70/1000 = 0.07.
    # Pass 1: rhs = 0.5 * 1240 = 620; divisor = 0.35*40 + 0.15*200 + 0.07*1000 = 14 + 30 + 70 = 114;
    #         eps = 620/114 = 5.4386; max density 0.35 * 5.4386 = 1.90 > 1 -> layer 0 dense.
    # Pass 2: rhs = 0.5*200 + 0.5*1000 - 0.5*40 = 580; divisor = 30 + 70 = 100; eps = 5.8;
    #         densities 0.15*5.8 = 0.87 and 0.07*5.8 = 0.406 (both <= 1: consistent).
    # Counts: 40, 0.87*200 = 174, 0.406*1000 = 406; total 620 = 0.5 * 1240.
    shapes = [(10, 4), (20, 10), (50, 20)]
    assert layer_densities(shapes, 0.5, "erk") == pytest.approx([1.0, 0.87, 0.406])
    assert layer_counts(shapes, 0.5, "erk") == [40, 174, 406]
    model = _three_linear()
    masks = apply_masks(model, sparsity=0.5, distribution="erk", generator=0)
    assert [int(m.sum()) for m in masks.masks()] == [40, 174, 406]


def test_er_vs_erk_on_conv_hand_computed() -> None:
    # conv (16, 8, 3, 3) n=1152, linear (10, 16) n=160; N=1312; density 0.2 -> 262.4 -> 262 weights.
    # ER raw (n_in+n_out)/(n_in*n_out): conv 24/128 = 0.1875, linear 26/160 = 0.1625.
    #   divisor = 0.1875*1152 + 0.1625*160 = 216 + 26 = 242; eps = 262.4/242;
    #   exact counts 216*eps = 234.21, 26*eps = 28.19 -> floors 234 + 28 = 262, nothing missing.
    # ERK raw: conv (16+8+3+3)/1152 = 30/1152, linear 26/160.
    #   divisor = 30 + 26 = 56; exact counts 30*262.4/56 = 140.57, 26*262.4/56 = 121.83
    #   -> floors 140 + 121 = 261, one missing, largest remainder (.83) -> linear: 140, 122.
    shapes = [(16, 8, 3, 3), (10, 16)]
    assert layer_counts(shapes, 0.2, "er") == [234, 28]
    assert layer_counts(shapes, 0.2, "erk") == [140, 122]
    dens = layer_densities(shapes, 0.2, "erk")
    assert dens == pytest.approx([30 / 1152 * 262.4 / 56, 26 / 160 * 262.4 / 56])


def test_uniform_counts_largest_remainder() -> None:
    # n = 9 and 15 at density 0.5: exact 4.5 and 7.5, total round(12) = 12; floors 4 + 7 = 11;
    # the tie in remainders goes to the first layer -> [5, 7].
    assert layer_counts([(3, 3), (5, 3)], 0.5, "uniform") == [5, 7]
    assert layer_densities([(3, 3), (5, 3)], 0.5, "uniform") == [0.5, 0.5]


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98])
def test_global_density_within_one_weight_per_layer(distribution: str, sparsity: float) -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = apply_masks(model, sparsity=sparsity, distribution=distribution, generator=1)
    n = masks.num_maskable
    assert abs(masks.num_active - (1 - sparsity) * n) <= len(masks)
    shapes = [tuple(w.shape) for w in masks.weights()]
    expected = layer_counts(shapes, 1 - sparsity, distribution)
    assert [int(m.sum()) for m in masks.masks()] == expected
    dens = layer_densities(shapes, 1 - sparsity, distribution)
    for k, d, w in zip(expected, dens, masks.weights()):
        assert abs(k - d * w.numel()) < 1.0 + 1e-9
        assert 0.0 < d <= 1.0
    # Weighted mean of the densities is the target.
    sizes = [w.numel() for w in masks.weights()]
    assert sum(d * s for d, s in zip(dens, sizes)) / n == pytest.approx(1 - sparsity)
    # Weights are zero exactly at pruned positions and keep their (rescaled) values elsewhere.
    for name, w, m in masks:
        w0 = ref[f"{name}.weight"]
        assert torch.all(w[~m] == 0)
        assert torch.equal(w != 0, m & (w0 != 0))


def test_erk_favours_small_layers() -> None:
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    d = apply_masks(model, sparsity=0.9, distribution="erk", generator=0).layer_densities()
    # The 1->32 first conv and the 200->10 output layer are small: ERK makes them dense.
    assert d["features.0"] == 1.0 and d["classifier.6"] == 1.0
    assert d["classifier.1"] < 0.1 < d["classifier.4"]


# --------------------------------------------------------------------- buffers
def test_masks_are_bool_buffers_on_owner_modules_only() -> None:
    model = TinyNet()
    before = copy.deepcopy(model)
    masks = apply_masks(model, sparsity=0.5, distribution="uniform", generator=0)
    sd = model.state_dict()
    assert set(k for k in sd if k.endswith("weight_mask")) == {
        "conv.weight_mask",
        "fc1.weight_mask",
        "fc2.weight_mask",
    }
    assert all(sd[k].dtype == torch.bool for k in sd if k.endswith("weight_mask"))
    assert not any("ever" in k for k in sd)  # the ever-active record is not persistent
    assert masks.names == ["conv", "fc1", "fc2"]
    assert not hasattr(model.bn, "weight_mask") and not hasattr(model.bn1, "weight_mask")
    # Only the conv/linear weights change: every bias and normalization parameter is kept as it
    # was, value for value (neither masked nor rescaled), and no bias has a mask.
    for (name, p), p0 in zip(model.named_parameters(), before.parameters()):
        if name in ("conv.weight", "fc1.weight", "fc2.weight"):
            assert not torch.equal(p, p0), name
        else:
            assert torch.equal(p, p0), name
    assert not any("bias_mask" in k for k in sd)


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_masks_have_exact_counts_and_are_seeded(distribution: str) -> None:
    """Each layer keeps exactly its layer_counts() weights; the same seed gives the same masks,
    another seed (or the continued stream of a Generator) other masks in every layer."""

    def draw(generator):
        return apply_masks(TinyNet(), sparsity=0.7, distribution=distribution, generator=generator)

    a, b, c = draw(3), draw(3), draw(4)
    shapes = [tuple(w.shape) for w in a.weights()]
    assert [int(m.sum()) for m in a.masks()] == layer_counts(shapes, 0.3, distribution)
    assert [int(m.sum()) for m in c.masks()] == layer_counts(shapes, 0.3, distribution)
    assert all(torch.equal(ma, mb) for ma, mb in zip(a.masks(), b.masks())), "same seed"
    dense = [int(m.sum()) == m.numel() for m in a.masks()]  # ERK may make a small layer dense
    assert not all(dense)
    same = [not d and torch.equal(ma, mc) for d, ma, mc in zip(dense, a.masks(), c.masks())]
    assert not any(same), f"seeds 3 and 4 give the same mask in layers {same}"
    gen = torch.Generator().manual_seed(3)
    first, second = draw(gen), draw(gen)  # the stream continues: new masks
    assert all(torch.equal(ma, mf) for ma, mf in zip(a.masks(), first.masks())), "Generator(3)"
    same = [
        not d and torch.equal(m1, m2) for d, m1, m2 in zip(dense, first.masks(), second.masks())
    ]
    assert not any(same), f"a continued Generator repeats the mask in layers {same}"


def test_masks_are_uniformly_random_k_subsets() -> None:
    """The documented contract: each layer's mask is the top-k of i.i.d. uniform scores, i.e. a
    uniformly random k-subset, drawn independently per layer. Over 400 seeds: exact counts every
    time (never Bernoulli); every position kept equally often (chi-square); neighbouring positions
    (along a row and down a column) and the same position of two layers kept together as often
    as for independent uniform subsets (a block, a repeated row or a shared draw fails)."""
    seeds, sparsity = 400, 0.7
    drawn: list[list[torch.Tensor]] = [[], []]
    for seed in range(seeds):
        model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
        masks = apply_masks(model, sparsity=sparsity, distribution="uniform", generator=seed)
        for acc, m in zip(drawn, masks.masks()):
            acc.append(m.clone())
    stacks = [torch.stack(ms).double() for ms in drawn]  # (seeds, out, in)
    for st in stacks:
        n = st[0].numel()
        k = round((1 - sparsity) * n)
        assert torch.all(st.flatten(1).sum(1) == k)  # exact count in every draw
        p = k / n
        kept = st.sum(0).flatten()  # how often each position was kept
        q = float(((kept - seeds * p) ** 2).sum() / (seeds * p * (1 - p))) * (n - 1) / n
        assert stats.chi2(n - 1).sf(q) > 1e-4, (q, n)
        both = k * (k - 1) / (n * (n - 1))  # P(two given positions are both kept)
        along_row = (st[:, :, 1:] * st[:, :, :-1]).mean()
        down_column = (st[:, 1:] * st[:, :-1]).mean()
        assert abs(float(along_row) - both) < 0.01, (float(along_row), both)
        assert abs(float(down_column) - both) < 0.01, (float(down_column), both)
    # layers are drawn independently: the first 60 positions of each are kept together p1 * p2
    a, b = stacks[0].flatten(1)[:, :60], stacks[1].flatten(1)
    assert abs(float((a * b).mean()) - 0.3 * 0.3) < 0.01


def test_global_rng_seeds_when_no_generator() -> None:
    torch.manual_seed(5)
    a = apply_masks(TinyNet(), sparsity=0.5)
    torch.manual_seed(5)
    b = apply_masks(TinyNet(), sparsity=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.masks(), b.masks()))


def test_fan_in_rescaling() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    ref = copy.deepcopy(model)
    masks = apply_masks(model, sparsity=0.75, distribution="uniform", generator=0)
    for (_, w, m), k in zip(masks, ["conv", "fc1", "fc2"]):
        w0 = getattr(ref, k).weight
        d = m.float().mean().item()
        assert torch.allclose(w[m], w0[m] / math.sqrt(d), rtol=1e-6, atol=0)
    model2 = copy.deepcopy(ref)
    masks2 = apply_masks(
        model2, sparsity=0.75, distribution="uniform", generator=0, rescale_init=False
    )
    for (_, w, m), k in zip(masks2, ["conv", "fc1", "fc2"]):
        assert torch.equal(w[m], getattr(ref, k).weight[m])
    # Biases and BN are untouched by masking.
    assert torch.equal(model.fc1.bias, ref.fc1.bias)
    assert torch.equal(model.bn.weight, ref.bn.weight)


def test_dense_first_and_last_layers() -> None:
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.5, dense_first_layer=True, skip_last=True, generator=0)
    assert masks.names == ["fc1"]
    assert not hasattr(model.conv, "weight_mask") and not hasattr(model.fc2, "weight_mask")
    assert masks.num_active == round(0.5 * 144 * 16)


def test_masks_follow_dtype_change_and_buffer_replacement() -> None:
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.5, generator=0)
    model.to(torch.float64)
    assert model.fc1.weight.dtype == torch.float64 and model.fc1.weight_mask.dtype == torch.bool
    new = torch.zeros_like(model.fc1.weight_mask)
    new[0, :5] = True
    model.fc1.weight_mask = new  # replacing the buffer object: the masks object must see it
    assert masks.masks()[1] is new
    masks.apply_()
    assert int((model.fc1.weight != 0).sum()) <= 5


def test_state_dict_round_trip_into_fresh_model() -> None:
    torch.manual_seed(0)
    src = TinyNet()
    src_masks = apply_masks(src, sparsity=0.8, generator=0)
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src_masks.attach(opt)
    sched = create_scheduler("set", src_masks, total_steps=40, update_interval=5, generator=0)
    x, y = make_data()
    train_steps(src, opt, sched, x, y, 20)
    sd = src.state_dict()
    # The trainer's order: apply_masks (registers buffers) -> load_state_dict -> sync.
    dst = TinyNet()
    dst_masks = apply_masks(dst, sparsity=0.8, generator=123)
    assert any(not torch.equal(a, b) for a, b in zip(dst_masks.masks(), src_masks.masks()))
    dst.load_state_dict(sd)
    dst_masks.sync_from_buffers()
    for a, b in zip(dst_masks.masks(), src_masks.masks()):
        assert torch.equal(a, b)
    assert all(torch.equal(e, m) for e, m in zip(dst_masks.ever_masks(), dst_masks.masks()))
    # from_model rebuilds the same view from the buffers alone.
    rebuilt = SparseMasks.from_model(dst)
    assert rebuilt.names == src_masks.names and rebuilt.density == pytest.approx(src_masks.density)
    dst.eval(), src.eval()
    assert torch.equal(dst(x), src(x))


# --------------------------------------------------------------------- enforcement
def _pruned_state_violations(masks: SparseMasks, opt: torch.optim.Optimizer) -> list[str]:
    bad = []
    for name, w, m in masks:
        if torch.any(w[~m] != 0):
            bad.append(f"{name}.weight")
        if w.grad is not None and torch.any(w.grad[~m] != 0):
            bad.append(f"{name}.grad")
        for key, v in opt.state.get(w, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == w.shape and torch.any(v[~m] != 0):
                bad.append(f"{name}.{key}")
    return bad


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "tensor-state": lambda p: TensorStateSGD(p, lr=0.05),
}


@pytest.mark.parametrize("method", ["static", "set", "rigl"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_zero_invariants_after_many_steps(method: str, opt_name: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.8, distribution="erk", generator=0)
    opt = OPTIMIZERS[opt_name](model.parameters())
    masks.attach(opt)
    sched = create_scheduler(
        method, masks, total_steps=60, update_interval=7, generator=1, optimizer=opt
    )
    x, y = make_data(64)
    for t in range(45):
        train_steps(model, opt, sched, x, y, 1)
        assert _pruned_state_violations(masks, opt) == [], f"step {t}"
    assert sched.num_updates == (0 if method == "static" else 6)  # 7, 14, ..., 42 < 0.75*60
    # The dummy's differently shaped and scalar state tensors are left alone.
    if opt_name == "tensor-state":
        st = opt.state[model.fc1.weight]
        assert torch.all(st["norms"] == 45) and st["count"].item() == 45
        assert torch.all(st["snapshot"][model.fc1.weight_mask] != 0)


def test_nan_at_pruned_gradient_positions_does_not_leak() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.6, generator=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks.attach(opt)
    x, y = make_data()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for _, w, m in masks:
            w.grad[~m] = float("nan")
            w.grad[~m.flip(-1) & ~m] = float("inf")
        opt.step()
    for _, w, m in masks:
        assert torch.isfinite(w).all()
        assert torch.all(w[~m] == 0)
        for v in opt.state[w].values():
            if v.shape == w.shape:
                assert torch.isfinite(v).all()


def test_hooks_can_be_removed_and_without_them_pruned_weights_move() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.6, generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = masks.attach(opt)
    assert len(handles) == 2
    with pytest.warns(UserWarning, match="already attached"):
        assert masks.attach(opt) == handles
    x, y = make_data()
    train_steps(model, opt, None, x, y, 2)
    assert _pruned_state_violations(masks, opt) == []
    masks.detach(opt)
    assert masks.optimizers == []
    train_steps(model, opt, None, x, y, 1)
    assert any(torch.any(w[~m] != 0) for _, w, m in masks)


def test_attach_warns_for_foreign_optimizer() -> None:
    masks = apply_masks(TinyNet(), sparsity=0.5, generator=0)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.warns(UserWarning, match="none of the masked weights"):
        masks.attach(other)


def test_enforcement_on_real_data_keeps_learning(fmnist_tiny) -> None:
    """90% ERK small-cnn with fan-in rescaling learns on real Fashion-MNIST (no stall)."""
    x, y, xt, yt = fmnist_tiny
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    masks = apply_masks(model, sparsity=0.9, distribution="erk", generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    masks.attach(opt)
    sched = create_scheduler("rigl", masks, total_steps=32, update_interval=10, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    for i in range(0, x.shape[0], 64):
        idx = perm[i : i + 64]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.5, acc  # chance is 0.1
    assert masks.density == pytest.approx(0.1, abs=len(masks) / masks.num_maskable)
    assert _pruned_state_violations(masks, opt) == []


# --------------------------------------------------------------------- FLOPs and report
def test_flops_hand_computed() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4))
    masks = apply_masks(
        model, sparsity=0.5, distribution="uniform", generator=0, rescale_init=False
    )
    f = masks.flops((1, 5, 5))
    # Conv: output 2x3x3 -> 9 positions per filter row; weight 18 (9 active); linear 72 (36 active).
    dense = 2 * (18 * 9) + 2 * 72
    sparse = 2 * (9 * 9) + 2 * 36
    assert f["dense"] == dense and f["sparse"] == sparse
    assert f["ratio"] == pytest.approx(sparse / dense)
    assert model.training  # mode restored


def test_flops_counts_unmasked_layers_dense() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    masks = apply_masks(model, sparsity=0.5, dense_first_layer=True, generator=0)
    f = masks.flops((4,))
    assert f["dense"] == 2 * (32 + 16) and f["sparse"] == 2 * (32 + 8)


def test_training_flops_formulas() -> None:
    f_s, f_d = 10.0, 100.0
    assert training_flops_ratio("static", f_s, f_d, 100) == pytest.approx(0.1)
    assert training_flops_ratio("set", f_s, f_d, 100) == pytest.approx(0.1)
    rigl = (3 * 10 * 100 + 2 * 10 + 100) / 101 / 300
    assert training_flops_ratio("rigl", f_s, f_d, 100) == pytest.approx(rigl)
    assert training_flops_ratio("itop-rigl", f_s, f_d, 100) == pytest.approx(rigl)
    assert training_flops_ratio("rigl", f_s, f_d, 100) > training_flops_ratio("set", f_s, f_d, 100)


def test_report_keys_and_values() -> None:
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    masks = apply_masks(model, sparsity=0.9, distribution="erk", generator=0)
    rep = masks.report()
    assert rep["density"] == pytest.approx(0.1, abs=1e-4)
    assert rep["exploration_rate"] == pytest.approx(rep["density"])
    assert rep["method"] is None and rep["last_update"] is None
    sched = create_scheduler("rigl", masks, total_steps=1000)
    rep = masks.report((1, 28, 28), scheduler=sched)
    assert set(rep) >= {
        "density",
        "layer_densities",
        "flops_ratio",
        "train_flops_ratio",
        "exploration_rate",
        "last_update",
    }
    assert 0.1 < rep["flops_ratio"] < 0.2  # dense first/last layers cost a little extra
    assert rep["train_flops_ratio"] > rep["flops_ratio"]


# --------------------------------------------------------------------- validation
BAD_APPLY = [
    ({"sparsity": 1.0}, ValueError, "Invalid sparsity value: 1.0"),
    ({"sparsity": -0.1}, ValueError, "Invalid sparsity value: -0.1"),
    ({"sparsity": float("nan")}, ValueError, "Invalid sparsity value: nan"),
    ({"sparsity": "0.9"}, TypeError, "Invalid sparsity value"),
    ({"sparsity": True}, TypeError, "Invalid sparsity value"),
    ({"sparsity": 0.5, "distribution": "gaussian"}, ValueError, "Invalid distribution value"),
    ({"sparsity": 0.5, "generator": "seed"}, TypeError, "Invalid generator value"),
    ({"sparsity": 0.5, "generator": 1.5}, TypeError, "Invalid generator value"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_APPLY)
def test_apply_masks_invalid_arguments(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        apply_masks(TinyNet(), **kwargs)


BAD_DISTRIBUTION = [
    (([(2, 3)], 0.0, "erk"), ValueError, "Invalid density value: 0.0"),
    (([(2, 3)], 1.5, "erk"), ValueError, "Invalid density value: 1.5"),
    (([(2, 3)], 0.5, "lognormal"), ValueError, "Invalid distribution value"),
    (([], 0.5, "erk"), ValueError, "Invalid shapes value"),
    (([(6,)], 0.5, "erk"), ValueError, "Invalid shape value"),
    (([(2, 0)], 0.5, "erk"), ValueError, "Invalid shape value"),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_DISTRIBUTION)
def test_layer_densities_invalid_arguments(args, error, message) -> None:
    with pytest.raises(error, match=message):
        layer_densities(*args)


def test_model_errors() -> None:
    with pytest.raises(TypeError, match="Invalid model value: dict"):
        apply_masks({}, sparsity=0.5)
    with pytest.raises(ValueError, match="Invalid model value: no conv/linear"):
        apply_masks(nn.Sequential(nn.ReLU()), sparsity=0.5)
    with pytest.raises(ValueError, match="Invalid model value: no conv/linear"):
        apply_masks(nn.Linear(3, 3), sparsity=0.5, dense_first_layer=True)
    model = TinyNet()
    apply_masks(model, sparsity=0.5, generator=0)
    with pytest.raises(ValueError, match="already has a 'weight_mask' buffer"):
        apply_masks(model, sparsity=0.5)
    with pytest.raises(ValueError, match="Invalid model value: no module has"):
        SparseMasks.from_model(TinyNet())
    with pytest.raises(ValueError, match="Invalid model value: lazy module"):
        maskable_modules(nn.Sequential(nn.LazyLinear(3)))
    masks = SparseMasks.from_model(model)
    with pytest.raises(ValueError, match="Invalid input_shape value"):
        masks.flops((0, 8, 8))
    with pytest.raises(TypeError, match="Invalid optimizer value"):
        masks.attach("sgd")
    with pytest.raises(ValueError, match="Invalid method value"):
        training_flops_ratio("gmp", 1.0, 2.0, 10)
    with pytest.raises(ValueError, match="Invalid dense_flops value"):
        training_flops_ratio("set", 1.0, 0.0, 10)
    model.fc1.weight_mask = model.fc1.weight_mask[:, :3].clone()
    with pytest.raises(ValueError, match="Invalid mask value: 'fc1' shape"):
        masks.sync_from_buffers()


def test_extreme_sparsity_warns() -> None:
    with pytest.warns(UserWarning) as record:
        masks = apply_masks(TinyNet(), sparsity=0.995, distribution="uniform", generator=0)
    messages = [str(r.message) for r in record]
    assert any("under 1%" in m for m in messages)
    # 0.005 * 36 = 0.18 and 0.005 * 48 = 0.24 round down to 0; total round(0.005 * 2388) = 12.
    assert "layer 'conv' gets no active weight at sparsity 0.995" in messages
    assert all(r.filename == __file__ for r in record)
    assert masks.num_active == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_zeroing_matches_where_reference_bit_for_bit(dtype: torch.dtype) -> None:
    masks = apply_masks(TinyNet(), sparsity=0.7, generator=0)
    mask = masks.masks()[1]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(mask.shape, generator=g).to(dtype)
    t[0, :4] = float("nan")
    t[1, :4] = float("-inf")
    t[2, :4] = -0.0
    ref = torch.where(mask, t, torch.zeros((), dtype=dtype))
    with torch.no_grad():
        masks._zero_pruned_(1, mask, t)
    assert torch.equal(t.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert torch.equal(t[ok], ref[ok])
    if not dtype.is_complex:  # bit pattern: +0.0 at pruned positions, untouched elsewhere
        assert torch.equal(t.signbit(), ref.signbit())


def test_cached_masks_follow_in_place_loads_and_replacement() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.5, generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks.attach(opt)
    x, y = make_data()
    train_steps(model, opt, None, x, y, 2)  # fills the integer-mask cache
    # In-place overwrite (what load_state_dict does), without calling sync_from_buffers.
    other = apply_masks(TinyNet(), sparsity=0.5, generator=9)
    with torch.no_grad():
        model.fc1.weight_mask.copy_(other.masks()[1])
    train_steps(model, opt, None, x, y, 2)
    assert _pruned_state_violations(masks, opt) == []
    # Replacement of the buffer object.
    new = torch.zeros_like(model.conv.weight_mask)
    new[:, :, 1, 1] = True
    model.conv.weight_mask = new
    train_steps(model, opt, None, x, y, 2)
    assert _pruned_state_violations(masks, opt) == []
    assert int((model.conv.weight != 0).sum()) <= 4
