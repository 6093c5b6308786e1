"""AGC on real data: the release's five defects are absent, the estimators match their references,
and the correction reduces gradient variance near the snapshot (docs/agc.md)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.optim import AGC


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def _batches(x, y, bs):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def _steps(model, opt, x, y, *, n, bs=64, offset=0):
    for k in range(n):
        i = (offset + k * bs) % (len(x) - bs)
        xb, yb = x[i : i + bs], y[i : i + bs]
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        opt.step()


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


# --------------------------------------------------------------------------- defect 1


def test_loss_slope_uses_the_previous_snapshot_and_matches_numpy(fmnist_tiny, trained_cnn):
    x, y, _, _ = fmnist_tiny
    xr, yr = x[:64], y[:64]
    model = copy.deepcopy(trained_cnn).train()
    opt = AGC(model.parameters(), lr=0.05, estimator="loss-slope")
    opt.refresh(model, _batches(xr, yr, 8), _ce)
    old = copy.deepcopy(model)  # the snapshot taken by refresh 1
    _steps(model, opt, x, y, n=2, bs=16)

    for r in (2, 3):
        with torch.no_grad():
            a_ref = np.array([_ce(model, xb, yb).item() for xb, yb in _batches(xr, yr, 8)])
            b_ref = np.array([_ce(old, xb, yb).item() for xb, yb in _batches(xr, yr, 8)])
        tau_prev = opt.tau
        out = opt.refresh(model, _batches(xr, yr, 8), _ce)
        a, b = opt.refresh_losses
        np.testing.assert_allclose(a.numpy(), a_ref, rtol=1e-5)
        np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-5)
        assert np.abs(a_ref - b_ref).max() > 1e-3  # a_i != b_i: the snapshot really is older
        expected = np.cov(a_ref, b_ref, ddof=1)[0, 1] / np.var(b_ref, ddof=1)
        assert out["agc_tau_now"] == pytest.approx(expected, rel=1e-3)
        assert abs(out["agc_tau_now"] - 1.0) > 1e-3, f"refresh {r}: tau_now stuck at 1"
        assert opt.tau == pytest.approx(0.7 * tau_prev + 0.3 * out["agc_tau_now"], rel=1e-12)
        assert out["refresh_batches"] == 8 and out["refresh_forwards"] == 64
        old = copy.deepcopy(model)  # refresh r's snapshot is refresh r+1's previous one
        _steps(model, opt, x, y, n=2, bs=16, offset=5 * r)


# --------------------------------------------------------------------------- defect 2


def test_mu_is_the_example_weighted_mean_gradient_of_the_given_batches(fmnist_tiny, trained_cnn):
    x, y, _, _ = fmnist_tiny
    xs, ys = x[:200], y[:200]
    model = copy.deepcopy(trained_cnn)
    opt = AGC(model.parameters(), lr=0.05)
    sizes = [(0, 100), (100, 160), (160, 200)]  # unequal batch sizes: weighted by examples
    opt.refresh(model, [(xs[i:j], ys[i:j]) for i, j in sizes], _ce)
    ref = torch.autograd.grad(_ce(model, xs, ys), list(model.parameters()))
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(opt.state[p]["full_grad"], g, rtol=1e-4, atol=1e-6)


def test_adversarial_refresh_data_is_consistent_with_the_step_gradients(fmnist_tiny, trained_cnn):
    """With mu on the adversarial batches the steps use, E[g_B(ws)] = mu (no clean-loss bias)."""
    x, y, _, _ = fmnist_tiny
    xs, ys = x[:128].clone(), y[:128]
    model = copy.deepcopy(trained_cnn)
    xs.requires_grad_(True)
    grad_x = torch.autograd.grad(_ce(model, xs, ys), xs)[0]
    xs = xs.detach()
    x_adv = (xs + 0.1 * grad_x.sign()).clamp(0, 1)  # FGSM at eps 0.1 (Fashion-MNIST)
    adv = _batches(x_adv, ys, 32)

    opt = AGC(model.parameters(), lr=0.05)
    opt.refresh(model, adv, _ce)
    mean_snap = [torch.zeros_like(p) for p in model.parameters()]
    for xb, yb in adv:
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        for acc, p in zip(mean_snap, model.parameters()):
            acc += opt.state[p]["snap_grad"] / len(adv)
    mu_adv = [opt.state[p]["full_grad"].clone() for p in model.parameters()]
    for acc, mu in zip(mean_snap, mu_adv):
        torch.testing.assert_close(acc, mu, rtol=1e-4, atol=1e-6)

    clean = AGC(model.parameters(), lr=0.05)  # the release's choice: mu on clean images
    clean.refresh(model, _batches(xs, ys, 32), _ce)
    bias = sum(
        float((clean.state[p]["full_grad"] - m).norm() ** 2)
        for p, m in zip(model.parameters(), mu_adv)
    )
    scale = sum(float(m.norm() ** 2) for m in mu_adv)
    assert bias > 0.05 * scale  # the clean mu is a different (biased) control variate here


# --------------------------------------------------------------------------- defect 3


@pytest.mark.parametrize("estimator", ["loss-slope", "grad-online"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_batchnorm_statistics_untouched_by_snapshot_and_refresh(fmnist_tiny, estimator, train_mode):
    x, y, _, _ = fmnist_tiny
    model = _bn_net().train()
    opt = AGC(model.parameters(), lr=0.05, estimator=estimator)
    _steps(model, opt, x[:256], y[:256], n=2)  # real running statistics
    model.train(train_mode)
    before = _buffers(model)
    assert int(before["1.num_batches_tracked"]) == 2
    ref = copy.deepcopy(model)  # reference loss at the current weights, mode as the model's
    with torch.no_grad():
        a_ref = [_ce(ref, xb, yb).item() for xb, yb in _batches(x[:256], y[:256], 64)]
    for r in range(2):  # the second refresh has a previous snapshot and online sums
        opt.refresh(model, _batches(x[:256], y[:256], 64), _ce)
        for k, v in _buffers(model).items():
            assert torch.equal(v, before[k]), k
        if r == 0:  # the refresh's current-weight losses are the model's own, in its mode
            np.testing.assert_allclose(opt.refresh_losses[0].numpy(), a_ref, rtol=1e-5)
        opt.zero_grad()
        _ce(model, x[:64], y[:64]).backward()  # the model's own forward may update statistics
        before = _buffers(model)
        opt.snapshot_backward(model, lambda m: _ce(m, x[:64], y[:64]))
        for k, v in _buffers(model).items():
            assert torch.equal(v, before[k]), k
        opt.step()
        assert model.training == train_mode


# --------------------------------------------------------------------------- defect 4


def test_refresh_ignores_and_preserves_stale_grads(fmnist_tiny, trained_cnn):
    x, y, _, _ = fmnist_tiny
    batches = _batches(x[:128], y[:128], 32)
    model = copy.deepcopy(trained_cnn)
    twin = copy.deepcopy(trained_cnn)
    opt, opt_twin = AGC(model.parameters(), lr=0.05), AGC(twin.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    garbage = [1e3 * torch.randn(p.shape, generator=g) for p in model.parameters()]
    for p, gb in zip(model.parameters(), garbage):
        p.grad = gb.clone()
    weights = [p.detach().clone() for p in model.parameters()]
    opt.refresh(model, batches, _ce)
    opt_twin.refresh(twin, batches, _ce)  # p.grad is None there
    for p, q, gb, w in zip(model.parameters(), twin.parameters(), garbage, weights):
        assert torch.equal(opt.state[p]["full_grad"], opt_twin.state[q]["full_grad"])
        assert torch.equal(p.grad, gb)  # neither zeroed nor accumulated into
        assert torch.equal(p.detach(), w)  # the refresh changes no weight
        assert q.grad is None


# --------------------------------------------------------------------------- defect 5


def test_every_step_updates_and_the_first_snapshot_is_the_model(fmnist_tiny):
    x, y, _, _ = fmnist_tiny
    model = _bn_net()
    opt = AGC(model.parameters(), lr=0.05)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.refresh(model, _batches(x[:128], y[:128], 64), _ce)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(opt.state[p]["snapshot"], w)  # never an unrelated random network
    changed = 0
    for k in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        xb, yb = x[64 * k : 64 * (k + 1)], y[64 * k : 64 * (k + 1)]
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        opt.step()
        changed += all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        if k == 2:
            opt.refresh(model, _batches(x[:128], y[:128], 64), _ce)
    assert changed == 6


# --------------------------------------------------------------------------- variance


def test_correction_reduces_gradient_variance_near_the_snapshot(fmnist_tiny):
    """Logistic regression on real Fashion-MNIST pixels (convex): near the snapshot the corrected
    gradient has much lower variance with c = 1 and with the adaptive (grad-online) estimate."""
    x, y, _, _ = fmnist_tiny
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for i in range(0, 2000, 100):  # one rough epoch
        sgd.zero_grad()
        _ce(model, x[i : i + 100], y[i : i + 100]).backward()
        sgd.step()
    opt = AGC(model.parameters(), lr=0.0, estimator="grad-online")
    opt.refresh(model, _batches(x, y, 250), _ce)  # ws = w, mu = full gradient
    with torch.no_grad():  # move a little away from the snapshot
        for p, mu in zip(
            model.parameters(), [opt.state[q]["full_grad"] for q in model.parameters()]
        ):
            p.sub_(0.05 * mu + 0.002 * torch.randn_like(p))
    mu = torch.cat([opt.state[p]["full_grad"].flatten() for p in model.parameters()])

    g_list, s_list = [], []
    gen = torch.Generator().manual_seed(1)
    for _ in range(80):
        idx = torch.randint(0, 2000, (32,), generator=gen)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        g_list.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        s_list.append(torch.cat([opt.state[p]["snap_grad"].flatten() for p in model.parameters()]))
        opt.step()  # lr = 0: weights stay, the online sums accumulate
    g, s = torch.stack(g_list).double(), torch.stack(s_list).double()

    def var(c: float) -> float:
        v = g + c * (mu.double() - s)
        return float(((v - v.mean(0)) ** 2).sum(1).mean())

    c_hat = opt.telemetry()["agc_online_estimate"]
    gc, sc = g - g.mean(0), s - s.mean(0)
    c_star = float((gc * sc).sum() / (sc * sc).sum())  # sample-optimal coefficient
    assert c_hat == pytest.approx(c_star, abs=0.1)
    assert 0.5 < c_hat < 1.5
    assert var(1.0) < 0.3 * var(0.0)
    assert var(c_hat) < 0.3 * var(0.0)
    assert var(c_hat) <= var(1.0) * 1.05
    out = opt.refresh(model, _batches(x, y, 250), _ce)
    assert out["agc_tau_now"] == pytest.approx(c_hat)
    assert var(opt.coefficient) < var(0.0)  # the damped default c = gamma * tau also helps


def test_rounding_level_spread_of_snapshot_losses_gives_no_estimate():
    """A previous snapshot with a constant loss (a zero-initialised head gives log(C) on every batch)
    makes var(b) pure float rounding; the slope must not be taken from it (it once gave
    tau_now = -64374 and NaN weights in the demo)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    x, y = torch.randn(203, 8), torch.randint(0, 3, (203,))  # unequal last batch: rounding differs
    opt = AGC(model.parameters(), lr=0.1, tau_init=0.1, estimator="loss-slope")
    opt.refresh(model, _batches(x, y, 16), _ce)  # snapshot = the constant-loss model
    _steps(model, opt, x, y, n=5, bs=16)
    with pytest.warns(RuntimeWarning, match="float resolution"):
        tel = opt.refresh(model, _batches(x, y, 16), _ce)
    _, b = opt.refresh_losses
    assert float(b.std()) < 1e-5 * float(b.mean())  # the constant loss, up to rounding
    assert opt.tau == pytest.approx(0.1) and not tel["agc_tau_updated"]
    _steps(model, opt, x, y, n=5, bs=16)
    tel = opt.refresh(
        model, _batches(x, y, 16), _ce
    )  # a trained previous snapshot: a real estimate
    assert tel["agc_tau_updated"] and abs(opt.tau) < 10


def test_positions_regrown_after_the_refresh_get_no_correction():
    """A position pruned at the refresh (snapshot and mu zeroed by the sparse hooks) that regrows
    before the next refresh has no valid mu: its snapshot gradient is dropped (v = g there), while
    every position alive at the refresh keeps the exact snapshot gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    w = model[0].weight
    mask = torch.rand_like(w) > 0.5
    with torch.no_grad():
        w.mul_(mask)
    opt = AGC(model.parameters(), lr=0.1, gamma=1.0)

    def zero_pruned(*_):  # what robust_agc.sparse's hooks do to same-shaped state
        with torch.no_grad():
            w.masked_fill_(~mask, 0)
            for v in opt.state[w].values():
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    v.masked_fill_(~mask, 0)

    opt.register_step_pre_hook(zero_pruned)
    opt.refresh(model, _batches(x, y, 16), _ce)
    zero_pruned()
    grown = ~mask & (torch.rand_like(w) > 0.5)
    assert grown.any()
    mask |= grown  # regrow: weight 0, state 0 at the grown positions
    snap = [opt.state[p]["snapshot"].clone() for p in model.parameters()]
    opt.snapshot_backward(model, lambda m: _ce(m, x[:16], y[:16]))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, s in zip(ref.parameters(), snap):
            p.copy_(s)
    _ce(ref, x[:16], y[:16]).backward()
    g_ref = next(ref.parameters()).grad
    g_snap = opt.state[w]["snap_grad"]
    assert torch.all(g_snap[grown] == 0) and g_ref[grown].abs().sum() > 0
    torch.testing.assert_close(g_snap[mask & ~grown], g_ref[mask & ~grown])
    for p, q in zip(list(model.parameters())[1:], list(ref.parameters())[1:]):
        torch.testing.assert_close(opt.state[p]["snap_grad"], q.grad)  # dense: untouched
