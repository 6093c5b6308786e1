"""Tests of the `attacks` package: threat-model constraints, effect, determinism, side effects,
restarts, early stopping, losses, validation and torchattacks interoperability."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

import attacks
from attacks import (
    FGSM,
    FGSMRS,
    NFGSM,
    PGD,
    PGDL2,
    Attack,
    TorchattacksAdapter,
    TRADESAttack,
    as_torchattacks,
    create_attack,
    list_attacks,
)
from attacks.losses import cross_entropy, dlr, kl_divergence, resolve_loss

EPS_LINF = 0.1  # Fashion-MNIST L-inf (protocols.md)
EPS_L2 = 1.5
N_POINTS = 100  # points for the property tests

# every attack the package exports, built from the registry, plus the option variants and the
# torchattacks adapter: (id, factory(model, seed) -> attack)
ATTACK_FACTORIES: dict[str, Callable[[nn.Module, int | None], Attack]] = {
    name: (
        lambda m, s, name=name: create_attack(
            name, m, eps=EPS_L2 if name == "pgd-l2" else EPS_LINF, seed=s
        )
    )
    for name in list_attacks()
}
ATTACK_FACTORIES.update(
    {
        "pgd-restarts": lambda m, s: PGD(m, EPS_LINF, steps=5, restarts=3, seed=s),
        "pgd-early-stop": lambda m, s: PGD(m, EPS_LINF, steps=10, early_stop=True, seed=s),
        "pgd-dlr": lambda m, s: PGD(m, EPS_LINF, steps=10, loss="dlr", seed=s),
        "pgd-l2-restarts": lambda m, s: PGDL2(m, EPS_L2, steps=5, restarts=2, seed=s),
        "adapter-ta-pgd": lambda m, s: TorchattacksAdapter(
            torchattacks.PGD(m, eps=EPS_LINF, alpha=0.025, steps=10), seed=s
        ),
        "adapter-ta-tpgd": lambda m, s: TorchattacksAdapter(
            torchattacks.TPGD(m, eps=EPS_LINF, alpha=0.025, steps=10), seed=s
        ),
    }
)
RANDOMIZED = [k for k in ATTACK_FACTORIES if k not in ("fgsm",)]


@pytest.fixture(scope="module")
def data(fmnist_tiny):
    _, _, xt, yt = fmnist_tiny
    return xt[:N_POINTS], yt[:N_POINTS]


class _TinyMLP(nn.Module):
    """A cheap classifier (784-64-10 MLP): convolution backward passes are slow on the shared CPU,
    and these tests run hundreds of attacks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture(scope="module")
def tiny_model(fmnist_tiny) -> nn.Module:
    """_TinyMLP trained naturally on the 2,000 real training images (about 75% test accuracy)."""
    x, y, _, _ = fmnist_tiny
    torch.manual_seed(0)
    model = _TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 100):
            idx = perm[i : i + 100]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


class _BNNet(nn.Module):
    """Tiny CNN with BatchNorm and dropout, for mode and running-statistics tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def _linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(dim=1)


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def _is_l2(attack: Attack) -> bool:
    return attack.norm == "L2"


# --------------------------------------------------------------------------- properties, all attacks
@pytest.mark.parametrize("name", list(ATTACK_FACTORIES))
def test_inside_ball_and_box(name, tiny_model, data):
    x, y = data
    attack = ATTACK_FACTORIES[name](tiny_model, 0)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if _is_l2(attack):
        assert float(_l2(x_adv, x).max()) <= attack.eps * (1 + 1e-5)
    elif isinstance(attack, NFGSM):  # unprojected by design: noise radius plus one step
        assert float(_linf(x_adv, x).max()) <= attack.noise * attack.eps + attack.alpha + 1e-6
    else:
        assert float(_linf(x_adv, x).max()) <= attack.eps + 1e-6
    assert float(_linf(x_adv, x).max()) > 0.0  # it did perturb


@pytest.mark.parametrize("name", list(ATTACK_FACTORIES))
def test_raises_loss_and_lowers_accuracy(name, tiny_model, data):
    x, y = data
    attack = ATTACK_FACTORIES[name](tiny_model, 0)
    x_adv = attack(x, y)
    with torch.no_grad():
        logits, logits_adv = tiny_model(x), tiny_model(x_adv)
    ce, ce_adv = F.cross_entropy(logits, y), F.cross_entropy(logits_adv, y)
    clean_acc = (logits.argmax(1) == y).float().mean()
    robust_acc = (logits_adv.argmax(1) == y).float().mean()
    assert clean_acc > 0.6  # the fixture model is trained
    assert ce_adv > ce + (0.2 if "early-stop" in name else 0.5), (float(ce), float(ce_adv))
    assert robust_acc <= clean_acc
    assert robust_acc < clean_acc - 0.2, (float(clean_acc), float(robust_acc))


@pytest.mark.parametrize("name", RANDOMIZED)
def test_seed_determinism(name, tiny_model, data):
    x, y = data
    a1 = ATTACK_FACTORIES[name](tiny_model, 123)(x, y)
    a2 = ATTACK_FACTORIES[name](tiny_model, 123)(x, y)
    a3 = ATTACK_FACTORIES[name](tiny_model, 7)(x, y)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


@pytest.mark.parametrize("name", RANDOMIZED)
def test_seed_none_uses_global_rng(name, tiny_model, data):
    x, y = data
    attack = ATTACK_FACTORIES[name](tiny_model, None)
    torch.manual_seed(5)
    a1 = attack(x, y)
    after = torch.random.get_rng_state()
    torch.manual_seed(5)
    a2 = attack(x, y)
    assert torch.equal(a1, a2)
    torch.manual_seed(5)
    assert not torch.equal(after, torch.random.get_rng_state())  # the global RNG was consumed


@pytest.mark.parametrize("name", RANDOMIZED)
def test_seeded_stream_continues_and_rng_state_round_trips(name, tiny_model, data):
    x, y = data[0][:16], data[1][:16]
    attack = ATTACK_FACTORIES[name](tiny_model, 3)
    global_state = torch.random.get_rng_state()
    state = attack.get_rng_state()
    first = attack(x, y)
    second = attack(x, y)
    assert not torch.equal(first, second)  # the stream continues across calls
    attack.set_rng_state(state)
    assert torch.equal(attack(x, y), first)
    assert torch.equal(global_state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("name", list(ATTACK_FACTORIES))
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_model_mode_grads_and_inputs_untouched(name, bn_mode):
    torch.manual_seed(0)
    model = _BNNet()
    model.train()
    model.drop.eval()  # mixed modes must be restored module by module
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)  # an existing gradient
    modes = [m.training for m in model.modules()]
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    x_copy = x.clone()
    attack = ATTACK_FACTORIES[name](model, 0)
    if isinstance(attack, TorchattacksAdapter):
        attack = TorchattacksAdapter(attack.attack, bn_mode=bn_mode, seed=0)
    else:
        attack.bn_mode = bn_mode
    model.bn.bias.requires_grad_(False)  # a parameter the user froze stays frozen
    seen: list[bool] = []
    rg_seen: list[bool] = []

    def hook(mod, i, o):
        seen.append(mod.training)
        rg_seen.append(any(p.requires_grad for p in model.parameters()))

    handle = model.bn.register_forward_hook(hook)
    with torch.no_grad():  # works inside no_grad evaluation code
        x_adv = attack(x, y)
    handle.remove()
    assert seen and all(s == (bn_mode == "train") for s in seen)
    assert not any(rg_seen)  # parameters frozen during the attack: no weight gradients
    assert [m.training for m in model.modules()] == modes
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["bn.bias"]
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert torch.equal(x, x_copy)
    assert not torch.equal(x_adv, x)


def test_frozen_parameters_restores_flags_on_error():
    model = _BNNet()
    model.fc.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"), attacks.frozen_parameters(model):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["fc.bias"]


def test_frozen_parameters_give_the_same_input_gradient(tiny_model, data):
    x, y = data[0][:16], data[1][:16]
    a = PGD(tiny_model, EPS_LINF, steps=3, seed=4)._perturb(x, y)  # base call bypassed
    b = PGD(tiny_model, EPS_LINF, steps=3, seed=4)(x, y)  # frozen by the base class
    assert torch.equal(PGD(tiny_model, EPS_LINF).project(a, x), b)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_bn_running_stats_only_change_in_train_mode(bn_mode):
    torch.manual_seed(0)
    model = _BNNet().train()
    before = model.bn.running_mean.clone()
    PGD(model, EPS_LINF, steps=3, bn_mode=bn_mode, seed=0)(
        torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    )
    assert torch.equal(model.bn.running_mean, before) == (bn_mode == "eval")
    assert model.training


@pytest.mark.parametrize("name", list(ATTACK_FACTORIES))
def test_cost_per_example(name, tiny_model):
    attack = ATTACK_FACTORIES[name](tiny_model, 0)
    expected = {
        "fgsm": 1,
        "fgsm-rs": 1,
        "n-fgsm": 1,
        "pgd": 10,
        "pgd-l2": 10,
        "trades": 10,
        "pgd-restarts": 15,
        "pgd-early-stop": 10,
        "pgd-dlr": 10,
        "pgd-l2-restarts": 10,
        "adapter-ta-pgd": 10,
        "adapter-ta-tpgd": 10,
    }
    assert attack.cost_per_example == expected[name]


def test_cost_per_example_counts_gradient_passes(tiny_model, data):
    """Count the examples that flow through backward: never more than cost_per_example * N."""
    x, y = data[0][:32], data[1][:32]
    counts = {"fwd_grad": 0}

    def hook(mod, inp, out):
        if out.requires_grad:
            counts["fwd_grad"] += out.shape[0]

    handle = tiny_model.classifier.register_forward_hook(hook)
    try:
        for attack in (
            PGD(tiny_model, EPS_LINF, steps=4, restarts=3, seed=0),
            TRADESAttack(tiny_model, EPS_LINF, steps=4, seed=0),
            PGD(tiny_model, EPS_LINF, steps=4, early_stop=True, seed=0),
        ):
            counts["fwd_grad"] = 0
            attack(x, y)
            assert 0 < counts["fwd_grad"] <= attack.cost_per_example * len(y)
    finally:
        handle.remove()


# --------------------------------------------------------------------------- specific behaviour
@pytest.mark.parametrize("cls, eps", [(PGD, EPS_LINF), (PGDL2, EPS_L2)])
def test_restarts_never_worse_than_one(cls, eps, tiny_model, data):
    x, y = data
    one = cls(tiny_model, eps, steps=3, seed=11)(x, y)
    many = cls(tiny_model, eps, steps=3, restarts=4, seed=11)(x, y)
    with torch.no_grad():
        lo, lm = tiny_model(one), tiny_model(many)
    broken_one, broken_many = lo.argmax(1) != y, lm.argmax(1) != y
    assert bool((broken_many | ~broken_one).all())  # every point broken by one restart stays broken
    assert int(broken_many.sum()) >= int(broken_one.sum())
    unbroken = ~broken_many
    loss_one = F.cross_entropy(lo, y, reduction="none")[unbroken]
    loss_many = F.cross_entropy(lm, y, reduction="none")[unbroken]
    assert bool((loss_many >= loss_one - 1e-5).all())


def test_restarts_find_more_with_weak_attack(tiny_model, data):
    """With a short step from a random start, the outcome depends on the start: 8 restarts break
    strictly more points than 1 (the option works)."""
    x, y = data
    one = FGSMRS(tiny_model, EPS_LINF, 0.02, seed=0)(x, y)
    many = FGSMRS(tiny_model, EPS_LINF, 0.02, restarts=8, seed=0)(x, y)
    with torch.no_grad():
        b1 = (tiny_model(one).argmax(1) != y).sum()
        b8 = (tiny_model(many).argmax(1) != y).sum()
    assert b8 > b1


def test_early_stop_points_are_misclassified(tiny_model, data):
    x, y = data
    plain = PGD(tiny_model, EPS_LINF, steps=10, seed=4)(x, y)
    early = PGD(tiny_model, EPS_LINF, steps=10, early_stop=True, seed=4)(x, y)
    with torch.no_grad():
        wrong_early = tiny_model(early).argmax(1) != y
        wrong_plain = tiny_model(plain).argmax(1) != y
    stopped = _linf(plain, early) > 1e-6  # trajectories agree until an example is frozen
    assert int(stopped.sum()) > 5
    assert bool(wrong_early[stopped].all())
    assert int(wrong_early.sum()) >= int(wrong_plain.sum())


def test_early_stop_frozen_at_first_misclassified_point(tiny_model, data):
    """Points already misclassified at the start are returned at the start, unchanged."""
    x, y = data
    with torch.no_grad():
        wrong_clean = tiny_model(x).argmax(1) != y
    assert int(wrong_clean.sum()) > 0
    early = PGD(tiny_model, EPS_LINF, steps=5, random_start=False, early_stop=True)(x, y)
    assert torch.equal(early[wrong_clean], x[wrong_clean])
    assert not torch.equal(early[~wrong_clean], x[~wrong_clean])


def test_fgsm_matches_closed_form(tiny_model, data):
    x, y = data
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(tiny_model(xr), y, reduction="sum"), xr)
    expected = (x + EPS_LINF * grad.sign()).clamp(0, 1)
    assert torch.allclose(FGSM(tiny_model, EPS_LINF)(x, y), expected, atol=1e-6)


def test_trades_attack_as_strong_as_torchattacks_tpgd(tiny_model, data):
    """Same algorithm as torchattacks' TPGD. Outputs cannot be compared bit for bit: at the
    0.001-noise start the KL gradient is ~0 and its sign is decided by rounding. Compare the KL
    reached, which must agree within 10%."""
    x, y = data
    torch.manual_seed(9)
    ours = TRADESAttack(tiny_model, EPS_LINF, alpha=0.02, steps=5)(x, y)
    torch.manual_seed(9)
    theirs = torchattacks.TPGD(tiny_model, eps=EPS_LINF, alpha=0.02, steps=5)(x, y)
    with torch.no_grad():
        log_p = torch.log_softmax(tiny_model(x), 1)
        kl_ours = kl_divergence(tiny_model(ours), log_p).mean()
        kl_theirs = kl_divergence(tiny_model(theirs), log_p).mean()
    assert float(kl_ours) > 0.1
    assert abs(float(kl_ours / kl_theirs) - 1.0) < 0.1, (float(kl_ours), float(kl_theirs))


def test_pgd_matches_torchattacks_without_random_start(tiny_model, data):
    x, y = data[0][:32], data[1][:32]
    ours = PGD(tiny_model, EPS_LINF, 0.02, 5, random_start=False)(x, y)
    theirs = torchattacks.PGD(tiny_model, eps=EPS_LINF, alpha=0.02, steps=5, random_start=False)(
        x, y
    )
    assert float((ours - theirs).abs().max()) < 1e-5


def test_callable_loss_mean_or_per_example_gives_same_result(tiny_model, data):
    x, y = data[0][:32], data[1][:32]
    a = PGD(tiny_model, EPS_LINF, steps=3, restarts=2, seed=0, loss=F.cross_entropy)(x, y)
    b = PGD(tiny_model, EPS_LINF, steps=3, restarts=2, seed=0, loss="ce")(x, y)
    assert torch.equal(a, b)


def test_channels_last_same_result():
    torch.manual_seed(0)
    model = _BNNet().eval()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    a = PGD(model, EPS_LINF, steps=3, seed=0, channels_last=True)(x, y)
    b = PGD(model, EPS_LINF, steps=3, seed=0)(x, y)
    assert torch.allclose(a, b, atol=1e-5)


class _BroadcastGradient(nn.Module):
    """Logits independent of the input except through ``0 * x.sum()``: autograd returns the input
    gradient as a stride-0 broadcast tensor, which in-place steps must not write into."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("logits", torch.linspace(-1.0, 1.0, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1) + 0.0 * x.sum()


@pytest.mark.parametrize("cls, eps", [(PGD, EPS_LINF), (PGDL2, EPS_L2)])
def test_broadcast_input_gradient(cls, eps):
    x, y = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    x_adv = cls(_BroadcastGradient(), eps, steps=2, random_start=False)(x, y)
    assert torch.equal(x_adv, x)  # zero gradient: no step moves the points


def test_empty_batch(tiny_model):
    x = torch.rand(0, 1, 28, 28)
    assert PGD(tiny_model, EPS_LINF)(x, torch.zeros(0, dtype=torch.long)).shape == x.shape


def test_eps_zero_warns_and_returns_input(tiny_model, data):
    x, y = data[0][:8], data[1][:8]
    with pytest.warns(UserWarning, match="eps=0"):
        attack = PGD(tiny_model, 0.0, steps=2)
    assert torch.equal(attack(x, y), x)


def test_large_linf_eps_warns(tiny_model):
    with pytest.warns(UserWarning, match="did you mean 8.0/255"):
        PGD(tiny_model, 8)


def test_repr_shows_threat_model(tiny_model):
    r = repr(PGD(tiny_model, 0.1, 0.01, 7, restarts=2, loss="dlr", seed=3))
    for part in ("eps=0.1", "norm='Linf'", "alpha=0.01", "steps=7", "restarts=2", "loss='dlr'"):
        assert part in r
    assert "norm='L2'" in repr(PGDL2(tiny_model, 0.5))
    assert "init_std=0.001" in repr(TRADESAttack(tiny_model, 0.1))


def test_defaults(tiny_model):
    assert math.isclose(PGD(tiny_model, 0.1, steps=10).alpha, 0.025)
    assert math.isclose(FGSMRS(tiny_model, 0.1).alpha, 0.125)
    assert FGSM(tiny_model, 0.1).alpha == 0.1
    t = TRADESAttack(tiny_model, 0.031)
    assert t.steps == 10 and math.isclose(t.alpha, 0.00775) and t.init_std == 0.001


# --------------------------------------------------------------------------- losses
def test_attack_losses_match_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)
    assert torch.allclose(cross_entropy(logits, y), -torch.log(p[[0, 1], [0, 2]]))
    # DLR: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)
    expected = torch.tensor([-(2.0 - 1.0) / (2.0 - 0.0), -(1.0 - 3.0) / (3.0 - 0.5)])
    assert torch.allclose(dlr(logits, y), expected)
    # KL(clean || adv), in that direction
    clean = torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    adv = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    pc, pa = torch.softmax(clean, 1), torch.softmax(adv, 1)
    kl = (pc * (pc.log() - pa.log())).sum(1)
    assert torch.allclose(kl_divergence(adv, torch.log_softmax(clean, 1)), kl)
    reverse = (pa * (pa.log() - pc.log())).sum(1)
    assert not torch.allclose(kl, reverse)


def test_dlr_shift_scale_invariant():
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    assert torch.allclose(dlr(logits, y), dlr(3.0 * logits + 2.0, y), atol=1e-5)


def test_callable_loss_bad_shape_rejected(tiny_model, data):
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(ValueError, match="Invalid loss value"):
        PGD(tiny_model, EPS_LINF, steps=1, loss=lambda z, t: z)(x, y)


def test_dlr_needs_three_classes():
    with pytest.raises(ValueError, match="Invalid logits value"):
        dlr(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- validation table
_M = nn.Linear(2, 2)

INVALID_ARGS = [
    (lambda: PGD(_M, -0.1), ValueError, "Invalid eps value"),
    (lambda: PGD(_M, float("nan")), ValueError, "Invalid eps value"),
    (lambda: PGD(_M, "0.1"), ValueError, "Invalid eps value"),
    (lambda: PGD(_M, 0.1, steps=0), ValueError, "Invalid steps value"),
    (lambda: PGD(_M, 0.1, steps=2.5), ValueError, "Invalid steps value"),
    (lambda: PGD(_M, 0.1, alpha=0.0), ValueError, "Invalid alpha value"),
    (lambda: PGD(_M, 0.1, alpha=-1.0), ValueError, "Invalid alpha value"),
    (lambda: PGD(_M, 0.1, restarts=0), ValueError, "Invalid restarts value"),
    (lambda: PGD(_M, 0.1, loss="hinge"), ValueError, "Invalid loss value"),
    (lambda: PGD(_M, 0.1, loss=3), ValueError, "Invalid loss value"),
    (lambda: PGD(_M, 0.1, bn_mode="frozen"), ValueError, "Invalid bn_mode value"),
    (lambda: PGD(_M, 0.1, seed=-1), ValueError, "Invalid seed value"),
    (lambda: PGD(_M, 0.1, seed=1.5), ValueError, "Invalid seed value"),
    (lambda: PGD(_M, 0.1, early_stop=1), ValueError, "Invalid early_stop value"),
    (lambda: PGD(_M, 0.1, random_start="yes"), ValueError, "Invalid random_start value"),
    (lambda: PGD("model", 0.1), TypeError, "Invalid model value"),
    (lambda: PGDL2(_M, -1.0), ValueError, "Invalid eps value"),
    (lambda: FGSM(_M, -0.1), ValueError, "Invalid eps value"),
    (lambda: FGSMRS(_M, 0.1, alpha=0.0), ValueError, "Invalid alpha value"),
    (lambda: TRADESAttack(_M, 0.1, init_std=-1.0), ValueError, "Invalid init_std value"),
    (lambda: create_attack("cw", _M, eps=0.1), ValueError, "Invalid attack value"),
    (lambda: resolve_loss("mse"), ValueError, "Invalid loss value"),
    (lambda: TorchattacksAdapter(object()), TypeError, "Invalid ta_attack value"),
    (
        lambda: TorchattacksAdapter(torchattacks.PGD(_M), cost_per_example=0),
        ValueError,
        "Invalid cost_per_example value",
    ),
    (lambda: as_torchattacks(lambda x, y: x), TypeError, "Invalid attack value"),
]


@pytest.mark.parametrize("make, error, message", INVALID_ARGS)
def test_invalid_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


INVALID_INPUTS = [
    (lambda: torch.rand(4, 1, 28, 28) * 255, torch.zeros(4, dtype=torch.long), "Invalid x value"),
    (
        lambda: torch.rand(4, 1, 28, 28) - 0.5,
        torch.zeros(4, dtype=torch.long),
        "Invalid x value",
    ),
    (lambda: torch.zeros(4, 1, 28, 28, dtype=torch.long), torch.zeros(4, dtype=torch.long), "x"),
    (lambda: torch.rand(4), torch.zeros(4, dtype=torch.long), "Invalid x value"),
    (lambda: torch.rand(4, 1, 28, 28), torch.zeros(3, dtype=torch.long), "Invalid y value"),
    (lambda: torch.rand(4, 1, 28, 28), torch.zeros(4), "Invalid y value"),
    (lambda: torch.rand(4, 1, 28, 28), torch.zeros(4, 1, dtype=torch.long), "Invalid y value"),
]


@pytest.mark.parametrize("make_x, y, message", INVALID_INPUTS)
def test_invalid_inputs(make_x, y, message, tiny_model):
    with pytest.raises(ValueError, match=message):
        PGD(tiny_model, EPS_LINF, steps=1)(make_x(), y)


def test_registry():
    assert list_attacks() == ["fgsm", "fgsm-rs", "n-fgsm", "pgd", "pgd-l2", "trades"]
    assert set(attacks.__all__) >= {"Attack", "PGD", "create_attack", "list_attacks"}
    assert isinstance(create_attack("pgd-l2", _M, eps=0.5, steps=3), PGDL2)


# --------------------------------------------------------------------------- interoperability
def _compare_with_torchattacks_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Our PGD and torchattacks.PGD (eps 0.1, alpha 0.025, 10 steps, random start) on the same
    points. Per point the outcome is nearly deterministic; only points whose fate depends on the
    random start can differ. If both are the same attack, each discordant point is equally likely
    to be broken by either (McNemar), so the difference of broken counts has standard deviation
    sqrt(#discordant); we allow 4 standard deviations (+1 for tiny counts)."""
    ours = PGD(model, EPS_LINF, 0.025, 10, seed=0)(x, y)
    torch.manual_seed(0)
    theirs = torchattacks.PGD(model, eps=EPS_LINF, alpha=0.025, steps=10)(x, y)
    with torch.no_grad():
        b_ours = model(ours).argmax(1) != y
        b_theirs = model(theirs).argmax(1) != y
    only_ours = int((b_ours & ~b_theirs).sum())
    only_theirs = int((b_theirs & ~b_ours).sum())
    assert abs(only_ours - only_theirs) <= 4 * math.sqrt(only_ours + only_theirs) + 1
    assert int(b_ours.sum()) > len(y) // 5  # the attack does something on this model


def test_same_success_rate_as_torchattacks_pgd(tiny_model, fmnist_tiny):
    _, _, x, y = fmnist_tiny
    _compare_with_torchattacks_pgd(tiny_model, x, y)


@pytest.mark.slow
def test_same_success_rate_as_torchattacks_pgd_trained_cnn(trained_cnn, fmnist_tiny):
    """The same comparison on the shared `small-cnn` fixture, 500 points (~1 min on 2 cores)."""
    _, _, x, y = fmnist_tiny
    _compare_with_torchattacks_pgd(trained_cnn, x, y)


def test_adapter_matches_torchattacks_and_restores_mode():
    torch.manual_seed(0)
    model = _BNNet().train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ta = torchattacks.PGD(model, eps=EPS_LINF, alpha=0.02, steps=3)
    torch.manual_seed(1)
    direct = ta(x, y)
    torch.manual_seed(1)
    adapted = TorchattacksAdapter(ta)(x, y)
    assert torch.equal(direct, adapted)
    assert model.training
    assert TorchattacksAdapter(ta).eps == EPS_LINF
    assert TorchattacksAdapter(torchattacks.PGDL2(model, eps=0.5)).norm == "L2"
    assert TorchattacksAdapter(torchattacks.FGSM(model, eps=0.1)).cost_per_example == 1


def test_ours_usable_by_torchattacks_code(tiny_model, data):
    x, y = data[0][:32], data[1][:32]
    ours = PGD(tiny_model, EPS_LINF, steps=5, seed=0)

    def torchattacks_style_eval(atk, images, labels):  # how torchattacks users call attacks
        adv = atk(images, labels)
        return (atk.model(adv).argmax(1) == labels.to(atk.device)).float().mean()

    direct = torchattacks_style_eval(ours, x, y)
    wrapped = as_torchattacks(PGD(tiny_model, EPS_LINF, steps=5, seed=0))
    assert isinstance(wrapped, torchattacks.attack.Attack)
    assert wrapped.eps == EPS_LINF and wrapped.steps == 5
    assert torch.equal(torchattacks_style_eval(wrapped, x, y), direct)
    multi = torchattacks.MultiAttack([wrapped, torchattacks.FGSM(tiny_model, eps=EPS_LINF)])
    adv = multi(x, y)
    assert float(_linf(adv, x).max()) <= EPS_LINF + 1e-6


# --------------------------------------------------------------------------- PGD's contract details


def test_broadcast_input_gradient_of_a_small_input():
    """Every broadcast dimension has size <= 2: the stride-0 gradient must still get own memory."""
    x, y = torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    assert torch.equal(PGD(_BroadcastGradient(), EPS_LINF, steps=2, random_start=False)(x, y), x)


def test_pgd_repr_names_the_whole_threat_model(tiny_model):
    atk = PGD(tiny_model, EPS_LINF, steps=3, restarts=2, early_stop=True, seed=5)
    assert repr(atk) == (
        f"PGD(model=_TinyMLP, eps={EPS_LINF!r}, norm='Linf', alpha={atk.alpha!r}, steps=3, "
        "random_start=True, restarts=2, loss='ce', early_stop=True, bn_mode='eval', seed=5, "
        "channels_last=False)"
    )


class _LayoutRecorder(nn.Module):
    """A linear model that records whether each input it sees is in channels_last layout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 3)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_converts_four_dimensional_inputs_only_when_asked(channels_last):
    model = _LayoutRecorder()
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    PGD(model, EPS_LINF, steps=2, seed=0, channels_last=channels_last)(x, y)
    assert model.seen and set(model.seen) == {channels_last}


class _TwoPoints(nn.Module):
    """Two classes, logits ``(0, w . x + b_i)`` per example: example 0 sits at the boundary (any
    step breaks it), example 1 far from it (no step within eps does)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 16))
        self.register_buffer("b", torch.tensor([-1e-3, -3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 0, 0, 0] > 0.5).long()  # example 1 is marked by its first pixel
        z = x.flatten(1) @ self.w + self.b[ids]
        return torch.stack([torch.zeros_like(z), z], dim=1)


def _two_points() -> tuple[_TwoPoints, torch.Tensor, torch.Tensor]:
    x = torch.full((2, 1, 4, 4), 0.3)
    x[1, 0, 0, 0] = 0.9
    x[0] = x[0] - (x[0].flatten() @ torch.linspace(-1.0, 1.0, 16)) / 16  # w . x = 0
    return _TwoPoints(), x.clamp(0, 1), torch.zeros(2, dtype=torch.long)


def _ce_each(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def test_restarts_keep_the_highest_loss_of_an_unbroken_point():
    """With one point broken in the first restart and one never broken, every later restart
    attacks the unbroken one and keeps its highest loss: above the first restart's."""
    model, x, y = _two_points()
    one = PGD(model, 0.05, alpha=0.005, steps=1, seed=1)(x, y)
    four = PGD(model, 0.05, alpha=0.005, steps=1, restarts=4, seed=1)(x, y)
    assert model(one).argmax(1).tolist() == [1, 0]  # broken, robust
    l1, l4 = _ce_each(model, one, y), _ce_each(model, four, y)
    assert l4[1] > l1[1]
    assert torch.equal(four[0], one[0])  # the broken point keeps its first adversarial example


def test_restarts_with_early_stop():
    model, x, y = _two_points()
    out = PGD(model, 0.05, alpha=0.005, steps=3, restarts=3, early_stop=True, seed=1)(x, y)
    assert model(out).argmax(1).tolist() == [1, 0]


def test_early_stop_keeps_attacking_the_last_unbroken_point():
    """Early stopping freezes the broken point and attacks the other exactly as without it."""
    model, x, y = _two_points()
    kw = dict(eps=0.05, alpha=0.005, steps=4, seed=1)
    stop, full = PGD(model, early_stop=True, **kw)(x, y), PGD(model, **kw)(x, y)
    torch.testing.assert_close(stop[1], full[1], rtol=0, atol=1e-7)
    assert not torch.equal(stop[0], full[0])  # the broken point stopped moving


@pytest.mark.parametrize("flag", ["random_start", "early_stop", "channels_last"])
def test_pgd_flags_must_be_bools(tiny_model, flag):
    with pytest.raises(ValueError, match=rf"^Invalid {flag} value: 'yes'$"):
        PGD(tiny_model, EPS_LINF, **{flag: "yes"})


def test_pgd_loss_attribute_is_the_name_or_the_callable(tiny_model):
    assert PGD(tiny_model, EPS_LINF, loss="dlr").loss == "dlr"
    assert PGD(tiny_model, EPS_LINF).loss == "ce"
    assert PGD(tiny_model, EPS_LINF, loss=cross_entropy).loss is cross_entropy
