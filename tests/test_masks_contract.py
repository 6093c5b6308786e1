"""`SparseMasks`' smaller contracts, each checked against a hand computation: FLOPs per layer,
the report's fields, the training-FLOPs formulas, buffer re-validation, optimizer-state zeroing,
detaching and the dense-gradient stash. Written against the mutants that survived
`make mutation MUTATION_GROUPS=masks` (tests/MUTATION.md)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robust_agc.sparse import SparseMasks, apply_masks
from robust_agc.sparse.masks import (
    EVER_BUFFER,
    MASK_BUFFER,
    check_generator,
    training_flops_ratio,
)


class ConvLinear(nn.Module):
    """conv 1->2 (3x3, padding 1) on 4x4, then linear 32->3: FLOPs are easy to count by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class SharedTwice(nn.Module):
    """One linear layer applied twice, and a second one: per-layer FLOPs must add both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(self.shared(x)))


class UnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _masked(model: nn.Module, sparsity: float = 0.5, seed: int = 0) -> SparseMasks:
    torch.manual_seed(seed)
    return apply_masks(model, sparsity=sparsity, distribution="uniform", generator=seed)


def test_flops_per_layer_by_hand() -> None:
    model = ConvLinear()
    masks = _masked(model)
    f = masks.flops((1, 4, 4))
    conv_active = int(model.conv.weight_mask.sum())
    fc_active = int(model.fc.weight_mask.sum())
    # conv: 16 output positions per output channel, 9 weights per channel -> 2 * 16 * 18.
    assert f["per_layer"] == {
        "conv": (2.0 * 16 * 18, 2.0 * 16 * conv_active),
        "fc": (2.0 * 1 * 96, 2.0 * 1 * fc_active),
    }
    assert f["dense"] == 2.0 * 16 * 18 + 2.0 * 96
    assert f["sparse"] == 2.0 * 16 * conv_active + 2.0 * fc_active
    assert f["ratio"] == f["sparse"] / f["dense"]


def test_flops_add_every_call_of_a_shared_layer() -> None:
    model = SharedTwice()
    masks = _masked(model)
    a_shared = int(model.shared.weight_mask.sum())
    a_head = int(model.head.weight_mask.sum())
    assert a_shared != 16  # the sparse and dense sums differ, so mixing them up shows
    f = masks.flops((4,))
    assert f["per_layer"]["shared"] == (2 * 2.0 * 16, 2 * 2.0 * a_shared)
    assert f["per_layer"]["head"] == (2.0 * 8, 2.0 * a_head)


@pytest.mark.parametrize("train", [True, False])
def test_flops_in_float64_and_restores_mode(train: bool) -> None:
    model = ConvLinear().double()
    masks = _masked(model)
    model.train(train)
    f = masks.flops((1, 4, 4))
    assert f["dense"] == 2.0 * 16 * 18 + 2.0 * 96
    assert model.training is train


def test_flops_rejects_a_model_whose_masked_layers_never_run() -> None:
    masks = _masked(UnusedLayer())
    with pytest.raises(ValueError, match=r"^Invalid model value: no conv/linear layer ran"):
        masks.flops((4,))


@pytest.mark.parametrize("shape", [(), (0, 4), (4, -1), (4.0,)])
def test_flops_rejects_bad_shapes(shape: tuple) -> None:
    masks = _masked(ConvLinear())
    with pytest.raises(ValueError, match="Invalid input_shape value"):
        masks.flops(shape)


class FakeScheduler:
    method = "rigl"
    update_interval = 7
    last_update = {"step": 14, "changed": 3}
    num_updates = 2


def test_report_fields_without_and_with_a_scheduler() -> None:
    model = ConvLinear()
    masks = _masked(model)
    plain = masks.report()
    assert plain == {
        "density": masks.density,
        "num_active": masks.num_active,
        "num_maskable": 18 + 96,
        "layer_densities": masks.layer_densities(),
        "exploration_rate": masks.exploration_rate,
        "method": None,
        "last_update": None,
        "num_updates": 0,
    }
    assert masks.num_active == int(model.conv.weight_mask.sum() + model.fc.weight_mask.sum())
    f = masks.flops((1, 4, 4))
    full = masks.report((1, 4, 4), scheduler=FakeScheduler())
    assert full["method"] == "rigl"
    assert full["last_update"] == {"step": 14, "changed": 3}
    assert full["num_updates"] == 2
    assert (full["flops_dense"], full["flops_sparse"], full["flops_ratio"]) == (
        f["dense"],
        f["sparse"],
        f["ratio"],
    )
    assert full["train_flops_ratio"] == training_flops_ratio("rigl", f["sparse"], f["dense"], 7)
    static = masks.report((1, 4, 4))
    assert static["train_flops_ratio"] == f["sparse"] / f["dense"]


@pytest.mark.parametrize("method", ["static", "set", "bsr", "itop-set"])
def test_training_flops_ratio_of_fixed_cost_methods(method: str) -> None:
    assert training_flops_ratio(method, 3.0, 12.0, 100) == 0.25


@pytest.mark.parametrize("method", ["rigl", "itop-rigl"])
def test_training_flops_ratio_of_rigl_by_hand(method: str) -> None:
    # (3 * 2 * 4 + 2 * 2 + 10) / 5 = 7.6 per step, over 3 * 10 dense.
    assert training_flops_ratio(method, 2.0, 10.0, 4) == pytest.approx(7.6 / 30.0, rel=1e-15)


def test_training_flops_ratio_bad_values() -> None:
    assert training_flops_ratio("static", 0.25, 0.5, 1) == 0.5  # a dense cost below 1 is fine
    with pytest.raises(ValueError, match="Invalid dense_flops value: 0"):
        training_flops_ratio("static", 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="Invalid method value: 'dense'"):
        training_flops_ratio("dense", 1.0, 1.0, 1)


def test_from_model_keeps_the_model() -> None:
    model = ConvLinear()
    _masked(model)
    rebuilt = SparseMasks.from_model(model)
    assert rebuilt.model is model
    assert rebuilt.flops((1, 4, 4))["dense"] == 2.0 * 16 * 18 + 2.0 * 96


def test_sync_from_buffers_validates_and_reapplies() -> None:
    model = ConvLinear()
    masks = _masked(model)
    new = torch.zeros_like(model.fc.weight_mask)
    new[0, :5] = True
    model.fc.weight_mask = new  # a loaded checkpoint replaces the buffer
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
    masks.sync_from_buffers()
    assert torch.equal(model.fc.weight != 0, new)
    assert torch.equal(getattr(model.fc, EVER_BUFFER), new)
    assert EVER_BUFFER not in model.fc.state_dict()

    model.fc.weight_mask = new.to(torch.uint8)
    with pytest.raises(ValueError, match=r"^Invalid mask value: 'fc' has no bool weight_mask"):
        masks.sync_from_buffers()
    del model.fc.weight_mask
    with pytest.raises(ValueError, match=r"^Invalid mask value: 'fc' has no bool weight_mask"):
        masks.sync_from_buffers()
    model.fc.register_buffer(MASK_BUFFER, torch.ones(3, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^Invalid mask value: 'fc' shape \(3, 31\) != \(3, 32\)"):
        masks.sync_from_buffers()


def _momentum_state(model: nn.Module, which: list[nn.Module]) -> torch.optim.SGD:
    """SGD with momentum whose state exists only for the weights of ``which``."""
    opt = torch.optim.SGD([m.weight for m in (model.conv, model.fc)], lr=0.1, momentum=0.9)
    for m in which:
        opt.state[m.weight]["momentum_buffer"] = torch.ones_like(m.weight)
    return opt


def test_zero_optimizer_state_skips_layers_without_state() -> None:
    model = ConvLinear()
    masks = _masked(model)
    opt = _momentum_state(model, [model.fc])  # no state for the first layer
    masks.zero_optimizer_state_(opt)
    buf = opt.state[model.fc.weight]["momentum_buffer"]
    assert torch.equal(buf != 0, model.fc.weight_mask)


def test_zero_optimizer_state_where() -> None:
    model = ConvLinear()
    masks = _masked(model)
    opt = _momentum_state(model, [model.conv, model.fc])
    where = [torch.zeros_like(model.conv.weight_mask), torch.zeros_like(model.fc.weight_mask)]
    where[1][1, 3] = True
    masks.zero_optimizer_state_(opt, where)
    assert bool((opt.state[model.conv.weight]["momentum_buffer"] == 1).all())
    fc_buf = opt.state[model.fc.weight]["momentum_buffer"]
    assert torch.equal(fc_buf == 0, where[1])


def test_detach_of_an_optimizer_never_attached_is_a_no_op() -> None:
    model = ConvLinear()
    masks = _masked(model)
    attached = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(attached)
    masks.detach(other)
    assert masks.optimizers == [attached]
    masks.detach(attached)
    assert masks.optimizers == []


def test_dense_gradient_stash_with_a_weight_that_has_no_gradient() -> None:
    model = ConvLinear()
    masks = _masked(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    masks.request_dense_grads(lambda: True)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 2.0)  # conv.weight.grad is None
    opt.step()
    grads = masks.pop_dense_grads()
    assert grads is not None and grads[0] is None
    assert bool((grads[1] == 2.0).all())  # taken before the masking
    assert torch.equal(model.fc.weight.grad != 0, model.fc.weight_mask)
    assert masks.pop_dense_grads() is None


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _with_buffers(model: TwoLayers) -> list[tuple[str, nn.Module]]:
    """``weight_mask`` buffers put on by hand (no ever-active record), as a loader would."""
    for i, m in enumerate((model.a, model.b)):
        mask = torch.zeros_like(m.weight, dtype=torch.bool)
        mask.view(-1)[i::2] = True
        m.register_buffer(MASK_BUFFER, mask)
    return [("a", model.a), ("b", model.b)]


def test_constructor_records_what_it_was_given_and_the_ever_active_masks() -> None:
    model = TwoLayers()
    masks = SparseMasks(model, _with_buffers(model), distribution="erk", target_density=0.5)
    assert (masks.distribution, masks.target_density) == ("erk", 0.5)
    assert masks.pop_dense_grads() is None  # nothing stashed yet
    for ever, mask in zip(masks.ever_masks(), masks.masks()):
        assert torch.equal(ever, mask) and ever is not mask
    assert set(model.a.state_dict()) == {"weight", "bias", MASK_BUFFER}  # ever: not persistent
    # an ever-active record already there is kept (a scheduler restored it)
    ever = torch.ones_like(model.a.weight, dtype=torch.bool)
    model.a.register_buffer(EVER_BUFFER, ever, persistent=False)
    SparseMasks(model, [("a", model.a)])
    assert getattr(model.a, EVER_BUFFER) is ever


def test_constructor_refuses_bad_layers() -> None:
    model = TwoLayers()
    with pytest.raises(ValueError, match=r"^Invalid layers value: \[\] \(no masked layers\)$"):
        SparseMasks(model, [])
    with pytest.raises(ValueError, match=r"^Invalid layer value: 'a' has no bool weight_mask"):
        SparseMasks(model, [("a", model.a)])
    model.a.register_buffer(MASK_BUFFER, torch.ones(6, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^Invalid layer value: 'a' has no bool weight_mask"):
        SparseMasks(model, [("a", model.a)])
    model.a.register_buffer(MASK_BUFFER, torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"^Invalid layer value: 'a' mask shape \(4, 6\) != weight shape \(6, 4\)$"
    ):
        SparseMasks(model, [("a", model.a)])


def test_lazy_layers_are_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(
        ValueError, match=r"is not initialised \(run one forward pass before masking\)"
    ):
        apply_masks(model, sparsity=0.5, generator=0)


def test_attach_warnings_and_errors(recwarn: pytest.WarningsRecorder) -> None:
    model = TwoLayers()
    masks = _masked(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = masks.attach(opt)
    assert len(recwarn) == 0  # an optimizer holding the masked weights: no warning
    with pytest.warns(UserWarning, match="^masks are already attached to this optimizer$"):
        assert masks.attach(opt) is handles
    foreign = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.warns(
        UserWarning, match="^the optimizer holds none of the masked weights; attaching anyway$"
    ):
        masks.attach(foreign)
    with pytest.raises(TypeError, match="^Invalid optimizer value: dict$"):
        masks.attach({})  # type: ignore[arg-type]


def test_a_layer_left_without_weights_warns_and_the_others_do_not() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply_masks(TwoLayers(), sparsity=0.95, distribution="uniform", generator=0)
    # uniform 5%: one weight in 'a' and one in 'b' (layer_counts): no layer is empty
    assert [str(r.message) for r in record] == []
    with pytest.warns(UserWarning) as record:
        # uniform 2%: one weight in 'a', none in 'b'
        apply_masks(TwoLayers(), sparsity=0.98, distribution="uniform", generator=0)
    messages = [str(r.message) for r in record if "gets no active weight" in str(r.message)]
    assert messages == ["layer 'b' gets no active weight at sparsity 0.98"]


class IntAndComplexState(torch.optim.Optimizer):
    """Keeps an int64 counter and a complex128 accumulator shaped like each parameter: tensors the
    masks zero through the fallback path (no same-size integer view for 16-byte elements)."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["visits"] = torch.zeros_like(p, dtype=torch.int64)
                    st["acc"] = torch.zeros_like(p, dtype=torch.complex128)
                st["visits"].add_(1)
                st["acc"].add_(1 + 2j)


def test_integer_and_wide_complex_state_are_zeroed_at_pruned_positions() -> None:
    model = TwoLayers()
    masks = _masked(model)
    opt = IntAndComplexState(model.parameters())
    masks.attach(opt)
    for _ in range(3):
        opt.step()
    for m in (model.a, model.b):
        st = opt.state[m.weight]
        mask = m.weight_mask
        assert torch.equal(st["visits"], torch.where(mask, 3, 0))
        assert torch.equal(st["acc"], torch.where(mask, 3 + 6j, 0j).to(torch.complex128))
        assert bool((opt.state[m.bias]["visits"] == 3).all())  # biases are not masked


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_generator_errors_name_the_value() -> None:
    with pytest.raises(TypeError, match=r"^Invalid generator value: True$"):
        check_generator(True)  # a bool is not an int seed
    with pytest.raises(TypeError, match=r"^Invalid generator value: 'x' \(expected"):
        check_generator("x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_generator_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"^Invalid generator value: a cuda(:0)? generator"):
        check_generator(torch.Generator(device="cuda"))


def test_seeds_drawn_from_the_global_rng_are_reproducible_and_distinct() -> None:
    """``generator=None`` seeds from torch's global RNG over a wide range: 200 draws never repeat
    a seed (and so never repeat a mask), and ``torch.manual_seed`` replays them."""
    torch.manual_seed(0)
    seeds = [check_generator(None).initial_seed() for _ in range(200)]
    assert len(set(seeds)) == len(seeds)
    torch.manual_seed(0)
    assert [check_generator(None).initial_seed() for _ in range(200)] == seeds


def test_apply_masks_errors_name_the_accepted_values_and_the_fix() -> None:
    with pytest.raises(
        ValueError,
        match=r"^Invalid distribution value: 'gauss' \(choose from uniform, er, erk\)$",
    ):
        apply_masks(TwoLayers(), sparsity=0.5, distribution="gauss", generator=0)
    model = TwoLayers()
    apply_masks(model, sparsity=0.5, generator=0)
    with pytest.raises(
        ValueError,
        match=r"^Invalid model value: 'a' already has a 'weight_mask' buffer "
        r"\(use SparseMasks.from_model\)$",
    ):
        apply_masks(model, sparsity=0.5, generator=0)
    with pytest.raises(
        ValueError, match=r"^Invalid model value: no conv/linear weight left to mask$"
    ):
        apply_masks(nn.Sequential(nn.Linear(3, 2)), sparsity=0.5, skip_last=True, generator=0)


def test_skip_last_leaves_only_the_last_layer_dense() -> None:
    model = ThreeLayers()
    masks = apply_masks(model, sparsity=0.5, skip_last=True, generator=0)
    assert masks.names == ["a", "b"]
    assert not hasattr(model.c, MASK_BUFFER)


def test_apply_masks_records_its_target_density() -> None:
    masks = apply_masks(TwoLayers(), sparsity=0.75, distribution="er", generator=0)
    assert (masks.distribution, masks.target_density) == ("er", 0.25)


def test_the_extreme_sparsity_warning_starts_above_99_percent() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply_masks(ThreeLayers(), sparsity=0.99, distribution="uniform", generator=0)
    assert not [r for r in record if "under 1%" in str(r.message)]  # exactly 1% left
    with pytest.warns(UserWarning) as record:
        apply_masks(ThreeLayers(), sparsity=0.995, distribution="uniform", generator=0)
    messages = [str(r.message) for r in record if "under 1%" in str(r.message)]
    assert messages == ["sparsity 0.995 leaves under 1% of the weights"]


def test_attach_warnings_point_at_the_caller() -> None:
    """Deselected in the mutation run (mutmut's trampolines add a frame): planted bugs judge it."""
    model = TwoLayers()
    masks = _masked(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    foreign = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.warns(UserWarning) as record:
        masks.attach(opt)
        masks.attach(foreign)
    assert len(record) == 2
    assert all(r.filename == __file__ for r in record)


def test_repr_names_the_class_and_its_summary() -> None:
    masks = apply_masks(TwoLayers(), sparsity=0.5, distribution="uniform", generator=0)
    assert repr(masks) == "SparseMasks(layers=2, density=0.5000, distribution='uniform')"


class HalfPrecisionMomentum(torch.optim.Optimizer):
    """SGD with its momentum kept in bfloat16 for float32 weights (a low-precision optimizer
    state): the masks zero tensors of two element sizes for the same mask."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["momentum"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["momentum"].mul_(0.9).add_(p.grad.to(torch.bfloat16))
                p.data.add_(st["momentum"].to(p.dtype), alpha=-group["lr"])


def test_low_precision_state_of_full_precision_weights_is_zeroed() -> None:
    model = TwoLayers()
    masks = _masked(model)
    opt = HalfPrecisionMomentum(model.parameters())
    masks.attach(opt)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    for m in (model.a, model.b):
        mom = opt.state[m.weight]["momentum"]
        assert mom.dtype == torch.bfloat16
        assert bool((mom[~m.weight_mask] == 0).all()) and bool((mom[m.weight_mask] != 0).all())
        assert bool((m.weight[~m.weight_mask] == 0).all())
