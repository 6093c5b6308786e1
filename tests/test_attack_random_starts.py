"""Random starts of every attack: the distribution each docstring claims, clipping, independence,
seeding and restarts.

The attacks run against a recording model whose input gradient is exactly zero (its logits are
``bias + w * sum(x)`` with ``w = 0``): every signed or normalized step is then a no-op, and the
input of each forward taken with gradient (one per restart with ``steps=1``) is the start the
attack drew, as the model saw it. Statistical checks use fixed seeds, so they are deterministic;
their thresholds (p > 1e-4, |correlation| < 5 / sqrt(n)) leave wide margins at these sample sizes
and fail by orders of magnitude for a wrong distribution (a box of [0, eps], a radius on the sphere,
one draw shared by all examples, channels or restarts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchattacks
from scipy import stats
from torch import nn

from attacks import FGSM, FGSMRS, PGD, PGDL2, TorchattacksAdapter, TRADESAttack, create_attack

EPS = 0.1
SHAPE = (64, 3, 8, 8)  # 12,288 coordinates per call


class _Recorder(nn.Module):
    """Constant logits (class 0 wins) with an exactly zero input gradient; records the inputs of
    the forwards taken with gradient (the attack steps), which here are the random starts."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor([2.0, 0.0, -1.0]))
        self.w = nn.Parameter(torch.zeros(()))  # a parameter, as torchattacks expects
        self.starts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            self.starts.append(x.detach().clone())
        return self.bias.expand(x.shape[0], 3) + self.w * x.flatten(1).sum(1, keepdim=True)


def _x(value: float = 0.5, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant images and label 0 (the recorder's prediction: no point is ever broken)."""
    return torch.full(shape, value), torch.zeros(shape[0], dtype=torch.int64)


def _starts(make, x, y, *, calls: int = 1) -> list[torch.Tensor]:
    """Run ``make(model)`` on (x, y) ``calls`` times; return the recorded starts, checking that
    the attack returns its (only) start when nothing moves it."""
    model = _Recorder()
    attack = make(model)
    for _ in range(calls):
        out = attack(x, y)
        if getattr(attack, "restarts", 1) == 1:
            torch.testing.assert_close(
                out, model.starts[-1], rtol=0, atol=1e-6,
                msg="the model saw another start than the attack returned (an unprojected start?)",
            )  # fmt: skip
    return model.starts


def _assert_independent(delta: torch.Tensor) -> None:
    """The noise of neighbouring examples, channels, rows and columns is uncorrelated (|r| below
    5 standard errors): catches one draw shared by the batch, the channels or a row."""
    pairs = {
        "examples": (delta[1:], delta[:-1]),
        "channels": (delta[:, 1:], delta[:, :-1]),
        "rows": (delta[:, :, 1:], delta[:, :, :-1]),
        "columns": (delta[..., 1:], delta[..., :-1]),
    }
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1]
        assert abs(r) < 5 / math.sqrt(a.numel()), (name, r)


# --------------------------------------------------------------------------- L-inf: uniform box

LINF_UNIFORM = {  # documented start: x + U(-eps, eps) per coordinate, then clipped to [0, 1]
    "pgd": lambda m: PGD(m, EPS, steps=1, seed=0),
    "fgsm-rs": lambda m: FGSMRS(m, EPS, seed=0),
    "pgd-registry": lambda m: create_attack("pgd", m, eps=EPS, steps=1, seed=0),
}


@pytest.mark.parametrize("name", list(LINF_UNIFORM))
def test_linf_start_is_uniform_in_the_box_and_independent(name):
    x, y = _x(0.5)  # far from 0 and 1: nothing is clipped
    (start,) = _starts(LINF_UNIFORM[name], x, y)
    delta = (start - x).double()
    assert float(delta.abs().max()) <= EPS + 1e-6
    ks = stats.kstest(delta.flatten().numpy(), stats.uniform(loc=-EPS, scale=2 * EPS).cdf)
    assert ks.pvalue > 1e-4, ks
    # the whole box is covered: each tenth of [-eps, eps] holds about a tenth of the draws
    hist = np.histogram(delta.numpy(), bins=10, range=(-EPS, EPS))[0]
    chi2 = stats.chisquare(hist)
    assert chi2.pvalue > 1e-4 and hist.min() > 0, hist
    _assert_independent(delta)


@pytest.mark.parametrize("name", list(LINF_UNIFORM))
def test_linf_start_is_clipped_to_the_image_range(name):
    """Near the edges of [0, 1] the start is clamp(x + U(-eps, eps), 0, 1): the mass beyond an edge
    sits exactly on it, the rest is uniform on the part of the box inside [0, 1]."""
    x, y = _x(0.5)
    x[:, :, :4] = 0.02  # [x - eps, x + eps] = [-0.08, 0.12]: P(start == 0) = 0.08 / 0.2 = 0.4
    x[:, :, 4:] = 0.97  # [0.87, 1.07]: P(start == 1) = 0.07 / 0.2 = 0.35
    (start,) = _starts(LINF_UNIFORM[name], x, y)
    assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0
    assert float((start - x).abs().max()) <= EPS + 1e-6
    low, high = start[:, :, :4].flatten(), start[:, :, 4:].flatten()
    for part, edge, p in ((low, 0.0, 0.4), (high, 1.0, 0.35)):
        at_edge = int((part == edge).sum())
        fraction = at_edge / part.numel()
        assert stats.binomtest(at_edge, part.numel(), p).pvalue > 1e-4, (edge, fraction)
    inside = low[low > 0].double().numpy()
    ks = stats.kstest(inside, stats.uniform(loc=0.0, scale=0.02 + EPS).cdf)
    assert ks.pvalue > 1e-4, ks


# --------------------------------------------------------------------------- L2: uniform radius


def test_l2_start_has_a_uniform_radius_and_an_isotropic_direction():
    """PGDL2's documented start: a Gaussian direction scaled to U(0, 1) * eps (uniform in radius,
    torchattacks' choice; not uniform in the ball's volume)."""
    eps = 0.4
    x, y = _x(0.5, shape=(400, 3, 8, 8))  # |delta_i| <= ||delta|| <= 0.4: nothing is clipped
    (start,) = _starts(lambda m: PGDL2(m, eps, steps=1, seed=0), x, y)
    delta = (start - x).double().flatten(1)
    radius = delta.norm(dim=1)
    assert float(radius.max()) <= eps + 1e-6
    ks = stats.kstest((radius / eps).numpy(), stats.uniform.cdf)
    assert ks.pvalue > 1e-4, ks
    d = delta.shape[1]
    u = delta / radius[:, None]  # directions, uniform on the unit sphere
    # each squared component of a uniform direction in R^d is Beta(1/2, (d - 1)/2)
    ks = stats.kstest((u**2).flatten().numpy(), stats.beta(0.5, (d - 1) / 2).cdf)
    assert ks.pvalue > 1e-4, ks
    # no preferred direction: the mean direction is as small as for independent isotropic draws
    chi2 = float((u.mean(0) ** 2).sum()) * d * len(u)  # ~ chi2(d)
    assert stats.chi2(d).sf(chi2) > 1e-4, chi2
    assert abs(stats.pearsonr(radius.numpy(), u[:, 0].numpy()).statistic) < 5 / math.sqrt(len(u))
    _assert_independent((start - x).double())


def test_l2_start_is_clipped_to_the_image_range():
    """At x = 0 every coordinate with a negative offset (each one independently with probability
    1/2: the sign of a Gaussian) is clipped to 0 exactly; the start stays in the ball."""
    eps = 1.0
    x, y = _x(0.0)
    (start,) = _starts(lambda m: PGDL2(m, eps, steps=1, seed=1), x, y)
    assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0
    assert float(start.flatten(1).norm(dim=1).max()) <= eps + 1e-6
    at_zero = int((start == 0).sum())
    assert stats.binomtest(at_zero, start.numel(), 0.5).pvalue > 1e-4, at_zero / start.numel()


# --------------------------------------------------------------------------- TRADES: Gaussian


def test_trades_start_is_gaussian_with_the_documented_std():
    x, y = _x(0.5)  # 0.001 * N(0, 1) never reaches 0, 1 or the eps-ball here
    (start,) = _starts(lambda m: TRADESAttack(m, EPS, steps=1, seed=0), x, y)
    delta = (start.double() - x.double()).flatten().numpy()
    ks = stats.kstest(delta, stats.norm(scale=0.001).cdf)
    assert ks.pvalue > 1e-4, ks
    assert abs(delta.std() / 0.001 - 1) < 0.03, delta.std()
    assert abs(delta.mean()) < 4 * 0.001 / math.sqrt(delta.size), delta.mean()
    _assert_independent(start.double() - x.double())


def test_trades_start_is_projected_onto_the_ball_and_the_image_range():
    """x + init_std * N(0, 1), then clipped: with init_std = 0.2 > eps = 0.1, a coordinate lands on
    the ball's boundary with probability P(|Z| > 0.5) = 0.617; at x = 0 half of them sit at 0."""
    x, y = _x(0.5)
    x[:, 0] = 0.0
    (start,) = _starts(lambda m: TRADESAttack(m, EPS, steps=1, init_std=0.2, seed=0), x, y)
    delta = (start - x).double()
    assert float(start.min()) >= 0.0 and float(delta.abs().max()) <= EPS + 1e-6
    free = delta[:, 1:].flatten()
    on_ball = int((free.abs() >= EPS - 1e-6).sum())
    p = 2 * stats.norm.sf(EPS / 0.2)
    assert stats.binomtest(on_ball, free.numel(), p).pvalue > 1e-4, on_ball / free.numel()
    at_zero = start[:, 0].flatten()
    assert stats.binomtest(int((at_zero == 0).sum()), at_zero.numel(), 0.5).pvalue > 1e-4


# --------------------------------------------------------------------------- no random start


NO_NOISE = {
    "pgd-random_start=False": lambda m: PGD(m, EPS, steps=1, random_start=False),
    "pgd-l2-random_start=False": lambda m: PGDL2(m, 0.5, steps=1, random_start=False),
    "fgsm": lambda m: FGSM(m, EPS),
    "fgsm-seeded": lambda m: FGSM(m, EPS, seed=3),
    "trades-init_std=0": lambda m: TRADESAttack(m, EPS, steps=1, init_std=0.0),
}


@pytest.mark.parametrize("name", list(NO_NOISE))
def test_without_random_start_the_attack_starts_at_x_and_draws_nothing(name):
    x, y = _x(0.5)
    x += torch.linspace(-0.4, 0.4, x.numel()).view(x.shape)  # not a constant image
    state = torch.random.get_rng_state()
    (start,) = _starts(NO_NOISE[name], x, y)
    assert torch.equal(start, x)
    if name != "trades-init_std=0":  # (it draws its zero-scaled noise)
        assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was consumed"


# --------------------------------------------------------------------------- seeds and restarts


RANDOMIZED = {
    "pgd": lambda m, s: PGD(m, EPS, steps=1, seed=s),
    "pgd-l2": lambda m, s: PGDL2(m, 0.5, steps=1, seed=s),
    "fgsm-rs": lambda m, s: FGSMRS(m, EPS, seed=s),
    "trades": lambda m, s: TRADESAttack(m, EPS, steps=1, seed=s),
    "adapter-ta-pgd": lambda m, s: TorchattacksAdapter(
        torchattacks.PGD(m, eps=EPS, alpha=0.01, steps=1), seed=s
    ),
}


@pytest.mark.parametrize("name", list(RANDOMIZED))
def test_seeded_starts_are_reproducible_differ_across_seeds_and_spare_the_global_rng(name):
    x, y = _x(0.5, shape=(8, 3, 8, 8))
    make = RANDOMIZED[name]
    state = torch.random.get_rng_state()
    a = _starts(lambda m: make(m, 11), x, y, calls=2)
    b = _starts(lambda m: make(m, 11), x, y, calls=2)
    c = _starts(lambda m: make(m, 12), x, y)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded attack used the global RNG"
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "same seed, other starts"
    assert not torch.equal(a[0], x), "no noise"
    assert not torch.equal(a[0], a[1]), "the second call repeated the first call's start"
    assert (a[0] != c[0]).float().mean() > 0.99, "another seed, the same draws"
    # seed=None: the global RNG decides
    torch.manual_seed(5)
    d = _starts(lambda m: make(m, None), x, y)
    torch.manual_seed(5)
    e = _starts(lambda m: make(m, None), x, y)
    assert torch.equal(d[0], e[0]), "seed=None: torch.manual_seed does not reproduce the start"
    assert not torch.equal(d[0], a[0])


def test_adapter_start_is_torchattacks_uniform_box():
    x, y = _x(0.5)
    (start,) = _starts(lambda m: RANDOMIZED["adapter-ta-pgd"](m, 0), x, y)
    delta = (start - x).double()
    ks = stats.kstest(delta.flatten().numpy(), stats.uniform(loc=-EPS, scale=2 * EPS).cdf)
    assert ks.pvalue > 1e-4, ks
    _assert_independent(delta)


RESTARTED = {
    "pgd": (lambda m: PGD(m, EPS, steps=1, restarts=4, seed=0), "box"),
    "pgd-seed-none": (lambda m: PGD(m, EPS, steps=1, restarts=4), "box"),
    "fgsm-rs": (lambda m: FGSMRS(m, EPS, restarts=4, seed=0), "box"),
    "pgd-l2": (lambda m: PGDL2(m, 0.4, steps=1, restarts=4, seed=0), "radius"),
}


@pytest.mark.parametrize("name", list(RESTARTED))
def test_every_restart_draws_a_fresh_start_from_the_same_distribution(name):
    make, kind = RESTARTED[name]
    x, y = _x(0.5, shape=(256, 3, 8, 8))
    torch.manual_seed(0)
    starts = _starts(make, x, y)
    assert len(starts) == 4  # nothing broken (constant logits): every restart attacks every point
    deltas = [(s - x).double() for s in starts]
    for r, d in enumerate(deltas):
        if kind == "box":
            ks = stats.kstest(d.flatten().numpy(), stats.uniform(loc=-EPS, scale=2 * EPS).cdf)
        else:  # the radius over eps is U(0, 1) (eps = 0.4 at x = 0.5: nothing is clipped)
            ks = stats.kstest(d.flatten(1).norm(dim=1).numpy() / 0.4, stats.uniform.cdf)
        assert ks.pvalue > 1e-4, (r, ks)
    for r in range(1, 4):  # independent of the first restart's draw
        corr = np.corrcoef(deltas[0].flatten().numpy(), deltas[r].flatten().numpy())[0, 1]
        assert abs(corr) < 5 / math.sqrt(deltas[0].numel()), (r, corr)
