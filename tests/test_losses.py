"""Tests of robust_agc.losses: objective values against hand computations and the reference
code's formulas, the Objective interface, and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import PGD, TRADESAttack
from robust_agc.losses import (
    Objective,
    get_objective,
    list_objectives,
    mart_loss,
    natural_loss,
    pgd_at_loss,
    trades_loss,
)

LOGITS_CLEAN = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.2]])
LOGITS_ADV = torch.tensor([[0.5, 1.5, -0.5], [0.3, 0.1, 1.2]])
Y = torch.tensor([0, 1])


def _softmax_rows(z: torch.Tensor) -> list[list[float]]:
    out = []
    for row in z.tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def _ce(z: torch.Tensor, y: torch.Tensor) -> float:
    p = _softmax_rows(z)
    return sum(-math.log(p[i][int(y[i])]) for i in range(len(p))) / len(p)


def _kl_rows(p: list[list[float]], q: list[list[float]]) -> list[float]:
    """KL(p || q) per row, in plain Python."""
    return [sum(a * math.log(a / b) for a, b in zip(pr, qr)) for pr, qr in zip(p, q)]


def test_natural_and_pgd_at_are_cross_entropy():
    assert math.isclose(float(natural_loss(LOGITS_CLEAN, Y)), _ce(LOGITS_CLEAN, Y), rel_tol=1e-6)
    assert math.isclose(float(pgd_at_loss(LOGITS_ADV, Y)), _ce(LOGITS_ADV, Y), rel_tol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_matches_hand_computation(beta):
    pc, pa = _softmax_rows(LOGITS_CLEAN), _softmax_rows(LOGITS_ADV)
    kl = sum(_kl_rows(pc, pa)) / len(pc)  # KL(clean || adv), batchmean
    expected = _ce(LOGITS_CLEAN, Y) + beta * kl
    got = float(trades_loss(LOGITS_CLEAN, LOGITS_ADV, Y, beta=beta))
    assert math.isclose(got, expected, rel_tol=1e-6)


def test_trades_kl_direction_is_clean_to_adversarial():
    """The wrong direction KL(adv || clean) gives a different value; ours is KL(clean || adv)."""
    zc = torch.tensor([[4.0, 0.0, 0.0]])  # confident clean prediction
    za = torch.tensor([[0.0, 0.5, 0.0]])  # flat adversarial prediction
    y = torch.tensor([0])
    pc, pa = _softmax_rows(zc), _softmax_rows(za)
    right = _kl_rows(pc, pa)[0]
    wrong = _kl_rows(pa, pc)[0]
    assert abs(right - wrong) > 0.1
    got = float(trades_loss(zc, za, y, beta=1.0)) - _ce(zc, y)
    assert math.isclose(got, right, rel_tol=1e-5)


def test_trades_matches_reference_code():
    """The TRADES repository's formula: KLDivLoss(size_average=False) / batch_size."""
    torch.manual_seed(0)
    zc, za, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    ref = F.cross_entropy(zc, y) + 6.0 * (1.0 / 16) * nn.KLDivLoss(reduction="sum")(
        F.log_softmax(za, dim=1), F.softmax(zc, dim=1)
    )
    assert torch.allclose(trades_loss(zc, za, y), ref, atol=1e-6)


def test_trades_gradient_flows_through_both_logits():
    zc = LOGITS_CLEAN.clone().requires_grad_(True)
    za = LOGITS_ADV.clone().requires_grad_(True)
    trades_loss(zc, za, Y).backward()
    assert zc.grad is not None and za.grad is not None
    assert float(zc.grad.abs().sum()) > 0 and float(za.grad.abs().sum()) > 0


def test_trades_zero_kl_when_logits_equal():
    assert math.isclose(
        float(trades_loss(LOGITS_CLEAN, LOGITS_CLEAN, Y, beta=6.0)),
        _ce(LOGITS_CLEAN, Y),
        rel_tol=1e-6,
    )


@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_mart_matches_hand_computation(beta):
    pc, pa = _softmax_rows(LOGITS_CLEAN), _softmax_rows(LOGITS_ADV)
    n = len(pc)
    bce = 0.0
    robust = 0.0
    for i in range(n):
        yi = int(Y[i])
        wrong = max((k for k in range(3) if k != yi), key=lambda k: pa[i][k])
        bce += -math.log(pa[i][yi]) - math.log(1.0001 - pa[i][wrong] + 1e-12)
        kl = sum(pc[i][k] * (math.log(pc[i][k]) - math.log(pa[i][k] + 1e-12)) for k in range(3))
        robust += kl * (1.0000001 - pc[i][yi])  # weighted by 1 - p_y(clean)
    expected = bce / n + beta * robust / n
    got = float(mart_loss(LOGITS_CLEAN, LOGITS_ADV, Y, beta=beta))
    assert math.isclose(got, expected, rel_tol=1e-5)


def test_mart_weighting_downweights_confident_clean_points():
    """Raising p_y(clean) toward 1 (same KL otherwise impossible to keep, so check the weight):
    a point with p_y(clean) ~ 1 contributes ~0 robust loss even with a large KL."""
    zc = torch.tensor([[20.0, 0.0, 0.0]])  # p_y ~ 1
    za = torch.tensor([[0.0, 5.0, 0.0]])
    y = torch.tensor([0])
    robust_part = mart_loss(zc, za, y, beta=1.0) - mart_loss(zc, za, y, beta=0.0)
    kl = F.kl_div(F.log_softmax(za, 1), F.log_softmax(zc, 1), log_target=True, reduction="sum")
    assert float(kl) > 1.0
    assert float(robust_part) < 1e-4 * float(kl) + 1e-6


def test_mart_matches_reference_code():
    """The MART repository's formula, argsort version."""
    torch.manual_seed(1)
    zc, za, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    adv_probs = F.softmax(za, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(za, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(zc, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    kl = nn.KLDivLoss(reduction="none")
    loss_robust = (1.0 / 16) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    ref = loss_adv + 6.0 * loss_robust
    assert torch.allclose(mart_loss(zc, za, y), ref, atol=1e-6)


# --------------------------------------------------------------------------- Objective
class _CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    "name, needs_adv, forwards, attack_type",
    [
        ("natural", False, 1, type(None)),
        ("pgd-at", True, 1, PGD),
        ("trades", True, 2, TRADESAttack),
        ("mart", True, 2, PGD),
    ],
)
def test_objective_interface(name, needs_adv, forwards, attack_type):
    torch.manual_seed(0)
    obj = get_objective(name)
    assert isinstance(obj, Objective) and obj.name == name
    assert obj.needs_adversarial is needs_adv
    assert obj.forwards_per_step == forwards
    net = _CountingNet()
    attack = obj.default_attack(net, eps=0.1, alpha=0.02, steps=3)
    assert type(attack) is attack_type
    if attack is not None:
        assert attack.eps == 0.1 and attack.alpha == 0.02 and attack.steps == 3
        assert attack.random_start and attack.bn_mode == "eval"
        if name != "trades":
            assert attack._loss.name == "ce"
    x = torch.rand(5, 1, 3, 4)
    y = torch.randint(0, 3, (5,))
    x_adv = (x + 0.05).clamp(0, 1)
    net.calls = 0
    loss, logits = obj(net, x, x_adv if needs_adv else None, y)
    assert net.calls == forwards
    assert loss.dim() == 0 and loss.requires_grad
    with torch.no_grad():
        zc, za = net.fc(x.flatten(1)), net.fc(x_adv.flatten(1))
    expected_logits = za if needs_adv else zc
    assert torch.allclose(logits, expected_logits)
    ref = {
        "natural": lambda: natural_loss(zc, y),
        "pgd-at": lambda: pgd_at_loss(za, y),
        "trades": lambda: trades_loss(zc, za, y, 6.0),
        "mart": lambda: mart_loss(zc, za, y, 6.0),
    }[name]()
    assert torch.allclose(loss, ref, atol=1e-6)


def test_objective_beta_used():
    torch.manual_seed(0)
    zc, za, y = torch.randn(4, 3), torch.randn(4, 3), torch.randint(0, 3, (4,))
    assert torch.allclose(
        get_objective("trades", beta=1.0).loss(zc, za, y), trades_loss(zc, za, y, 1.0)
    )
    assert torch.allclose(
        get_objective("mart", beta=2.0).loss(zc, za, y), mart_loss(zc, za, y, 2.0)
    )
    assert get_objective("trades").beta == 6.0 and get_objective("mart").beta == 6.0


def test_objective_uses_only_model_calls():
    """A wrapper module that calls the same network (as the AGC snapshot evaluation does) sees
    every forward of the objective."""
    net = _CountingNet()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return torch.func.functional_call(net, dict(net.named_parameters()), (x,))

    w = Wrapper()
    x = torch.rand(3, 12)
    y = torch.tensor([0, 1, 2])
    loss, _ = get_objective("trades")(w, x, x.clone(), y)
    assert w.calls == 2
    loss.backward()
    assert net.fc.weight.grad is not None


def test_list_objectives():
    assert list_objectives() == ["natural", "pgd-at", "trades", "mart"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "fgsm"}, ValueError, "Invalid objective value"),
        ({"name": "trades", "beta": -1.0}, ValueError, "Invalid beta value"),
        ({"name": "mart", "beta": float("inf")}, ValueError, "Invalid beta value"),
        ({"name": "mart", "beta": "6"}, ValueError, "Invalid beta value"),
    ],
)
def test_get_objective_invalid(kwargs, error, message):
    with pytest.raises(error, match=message):
        get_objective(**kwargs)


def test_beta_ignored_warns():
    with pytest.warns(UserWarning, match="ignored"):
        get_objective("pgd-at", beta=3.0)


@pytest.mark.parametrize("name", ["pgd-at", "trades", "mart"])
def test_objective_needs_x_adv(name):
    net = _CountingNet()
    x, y = torch.rand(2, 12), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="Invalid x_adv value"):
        get_objective(name)(net, x, None, y)
    with pytest.raises(ValueError, match="Invalid x_adv value"):
        get_objective(name)(net, x, x[:1], y)
