"""AGC's extra passes (robust_agc.optim.passes) and, through AGC, with mixed-precision loss scaling,
the functional view's mode forwarding, and the telemetry the trainer logs.

``refresh(loss_scale=s)`` and ``snapshot_backward(loss_scale=s)`` must store gradients on the scale
of unscaled ones; a refresh batch whose scaled gradient overflows while its loss is finite is
differentiated again at half the scale, down to 1; a closure that switches the module it is given
to eval mode switches the model (the view forwards ``train()``/``eval()``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.optim import AGC
from robust_agc.optim.passes import (
    FunctionalView,
    cloned_buffers,
    dist_active,
    full_gradient_pass,
    scaled_grad,
)
from robust_agc.utils import all_finite as _all_finite


def _net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def _refreshed(scale: float | None) -> tuple[nn.Module, AGC]:
    model = _net()
    x, y = _data()
    opt = AGC(model.parameters(), lr=0.1)
    opt.refresh(model, [(x[:12], y[:12]), (x[12:], y[12:])], _ce, loss_scale=scale)
    return model, opt


def test_all_finite():
    assert _all_finite([])
    assert _all_finite([torch.ones(3), torch.zeros(2, 2)])
    for bad in (math.inf, -math.inf, math.nan):
        t = torch.zeros(4)
        t[2] = bad
        assert not _all_finite([torch.ones(2), t]), bad


def test_scaled_refresh_and_snapshot_gradients_are_on_the_unscaled_scale():
    x, y = _data()
    ref_model, ref = _refreshed(None)
    model, opt = _refreshed(2.0**12)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(opt.state[q]["full_grad"], ref.state[p]["full_grad"])
        assert opt.state[q]["full_grad"].abs().max() > 0
    ref.snapshot_backward(ref_model, lambda m: _ce(m, x, y))
    opt.snapshot_backward(model, lambda m: _ce(m, x, y), loss_scale=2.0**12)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(opt.state[q]["snap_grad"], ref.state[p]["snap_grad"])


def test_an_overflowing_refresh_batch_is_retried_at_half_the_scale():
    """At 2**140 the scaled float32 loss overflows: the refresh halves the scale until the gradient
    is finite, and ``mu`` is then the unscaled mean gradient."""
    ref_model, ref = _refreshed(None)
    model, opt = _refreshed(2.0**140)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        mu = opt.state[q]["full_grad"]
        assert torch.isfinite(mu).all()
        torch.testing.assert_close(mu, ref.state[p]["full_grad"], rtol=1e-5, atol=1e-7)


class _Sqrt(nn.Module):
    """A loss that is finite at 0 while its gradient is not (d sqrt(w) / dw = inf at w = 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.w).sum() + 0 * x.sum()


def test_a_gradient_that_is_never_finite_stops_at_scale_one():
    model = _Sqrt()
    opt = AGC(model.parameters(), lr=0.1)
    x = torch.zeros(4, 1)
    opt.refresh(model, [(x,), (x,)], lambda m, xb: m(xb), loss_scale=8.0)
    mu = opt.state[model.w]["full_grad"]
    assert torch.isinf(mu).all() and (mu > 0).all()  # scale 1 kept: inf, not the NaN of scale 0


def test_a_closure_can_switch_the_model_to_eval_mode():
    """The view forwards ``eval()`` to the model: the refresh computes with BatchNorm's running
    statistics, as ``model.eval()`` would, and the model is left in eval mode."""
    x, y = _data()
    model = _net(bn=True)
    with torch.no_grad():
        model(x * 2 + 1)  # running statistics that differ from the batch's
    model.train()

    def eval_ce(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        assert m.eval() is m
        return _ce(m, xb, yb)

    opt = AGC(model.parameters(), lr=0.1)
    opt.refresh(model, [(x, y)], eval_ce)
    assert not model.training
    expected = torch.autograd.grad(_ce(model, x, y), list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(opt.state[p]["full_grad"], g)
    model.train()
    train_grad = torch.autograd.grad(_ce(model, x, y), list(model.parameters()))
    assert not torch.allclose(train_grad[0], expected[0])  # the mode made a difference


def test_the_view_forwards_train_and_eval_and_reports_its_mode():
    x, y = _data()
    model = _net(bn=True)
    seen: list[tuple[bool, bool]] = []

    def ce(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        m.eval()
        seen.append((m.training, model.training))
        m.train()
        seen.append((m.training, model.training))
        return _ce(m, xb, yb)

    AGC(model.parameters(), lr=0.1).refresh(model, [(x, y)], ce)
    assert seen == [(False, False), (True, True)]


def test_telemetry_reports_every_scalar_under_its_name():
    """The exact keys and values of ``telemetry()`` for both estimators (the trainer logs them)."""
    x, y = _data()
    for estimator in ("grad-online", "loss-slope"):
        model = _net()
        opt = AGC(model.parameters(), lr=0.1, estimator=estimator, gamma=0.5, tau_init=0.3)
        before = opt.telemetry()
        assert before["agc_has_snapshot"] == 0.0 and before["agc_refreshes"] == 0.0
        batches = [(x[:12], y[:12]), (x[12:], y[12:])]
        opt.refresh(model, batches, _ce)
        for _ in range(3):
            opt.zero_grad()
            _ce(model, x, y).backward()
            opt.snapshot_backward(model, lambda m: _ce(m, x, y))
            opt.step()
        if estimator == "loss-slope":
            opt.refresh(model, batches, _ce)
        tel = opt.telemetry()
        expected = {
            "agc_tau": opt.tau,
            "agc_tau_now": opt.tau_now,
            "agc_coef": 0.5 * opt.tau,
            "agc_refreshes": float(opt.num_refreshes),
            "agc_steps": 3.0,
            "agc_has_snapshot": 1.0,
            "refresh_batches": 2.0,
            "refresh_examples": 24.0,
            "refresh_grad_evals": 24.0,
            "refresh_forwards": 24.0 if estimator == "loss-slope" else 0.0,
        }
        if estimator == "grad-online":
            online = opt.state_dict()["agc"]
            expected["agc_online_estimate"] = float(online["online_dot"] / online["online_sq"])
            assert math.isfinite(expected["agc_online_estimate"])
        else:
            assert math.isfinite(tel["agc_tau_now"]) and tel["agc_tau"] != 0.3
        time_s = tel.pop("refresh_time_s")
        assert 0 < time_s < 60
        assert tel == pytest.approx(expected, nan_ok=True), estimator


def test_a_scaled_refresh_gives_zero_for_a_parameter_the_loss_does_not_use():
    model = _net()
    model.unused = nn.Parameter(torch.ones(3))
    x, y = _data()
    opt = AGC(model.parameters(), lr=0.1)
    opt.refresh(model, [(x, y)], _ce, loss_scale=2.0**140)
    assert torch.equal(opt.state[model.unused]["full_grad"], torch.zeros(3))


# --------------------------------------------------------------------------- the passes themselves


def test_cloned_buffers_are_equal_private_copies():
    model = _net(bn=True)
    model(_data()[0])  # non-trivial running statistics
    buffers = cloned_buffers(model)
    assert list(buffers) == [n for n, _ in model.named_buffers()]
    for name, b in model.named_buffers():
        assert torch.equal(buffers[name], b)
        assert buffers[name].data_ptr() != b.data_ptr()


def test_the_view_calls_the_model_with_other_weights_and_leaves_its_buffers_alone():
    x, _ = _data()
    model = _net(bn=True).train()
    other = {n: p.detach() * 2 for n, p in model.named_parameters()}
    ref = _net(bn=True).train()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(2)
    before = [b.clone() for b in model.buffers()]
    tensors = cloned_buffers(model)
    tensors.update(other)
    view = FunctionalView(model, tensors)
    assert list(view.parameters()) == [] and view.training
    torch.testing.assert_close(view(x), ref(x), rtol=0, atol=0)
    for b, b0 in zip(model.buffers(), before):
        assert torch.equal(b, b0)  # the model's running statistics did not move ...
    torch.testing.assert_close(tensors["1.running_mean"], ref[1].running_mean)  # ... the clones did
    assert view.eval() is view and not view.training and not model.training


def test_scaled_grad_is_the_unscaled_gradient_and_retries_an_overflow():
    model = _net()
    x, y = _data()
    params = list(model.parameters())
    plain = torch.autograd.grad(_ce(model, x, y), params)
    for scale in (1.0, 2.0**10, 2.0**140):
        grads = scaled_grad(_ce(model, x, y), params, scale)
        assert _all_finite(grads)
        for g, ref in zip(grads, plain):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_full_gradient_pass_collects_weighted_gradients_and_both_losses():
    model = _net()
    x, y = _data()
    params = list(model.parameters())
    snap = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    with torch.no_grad():
        gp = full_gradient_pass(
            FunctionalView(model, {}), FunctionalView(model, snap), params, batches, _ce, None
        )
    assert gp.examples == 24 and gp.num_batches == 2
    expected = [torch.zeros_like(p) for p in params]
    for xb, yb in batches:
        for e, g in zip(expected, torch.autograd.grad(_ce(model, xb, yb), params)):
            e.add_(g, alpha=len(xb))
    for got, e in zip(gp.grad_sum, expected):
        torch.testing.assert_close(got, e)
    with torch.no_grad():
        a = [float(_ce(model, xb, yb)) for xb, yb in batches]
        b = [float(_ce(FunctionalView(model, snap), xb, yb)) for xb, yb in batches]
    assert gp.a.dtype == gp.b.dtype == torch.float64
    assert gp.a.tolist() == pytest.approx(a) and gp.b.tolist() == pytest.approx(b)
    with torch.no_grad():
        none = full_gradient_pass(FunctionalView(model, {}), None, params, batches, _ce, None)
    assert none.b.numel() == 0 and torch.equal(none.a, gp.a)
    with pytest.raises(ValueError, match="Invalid loss_fn value"):
        full_gradient_pass(
            FunctionalView(model, {}), None, params, batches, lambda m, xb, yb: m(xb), None
        )


def test_dist_active_without_a_process_group():
    assert not dist_active(False, None)
    assert not dist_active(None, None)
    with pytest.raises(RuntimeError, match="distributed=True requires"):
        dist_active(True, None)


def test_full_gradient_pass_on_its_edges():
    """Plain-tensor batches (a loss of the input alone), a one-element loss of shape (1,), a
    parameter the loss never uses (zero, not missing), a loss scale (the same sums), a batch whose
    tensor is a scalar (one example), and no batches at all (empty float64 losses, zero sums)."""
    model = _net()
    unused = nn.Parameter(torch.ones(3))
    x, _ = _data()
    params = [*model.parameters(), unused]

    def energy(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        return m(xb).square().mean().reshape(1)

    batches = [x[:10], x[10:]]
    with torch.no_grad():
        gp = full_gradient_pass(FunctionalView(model, {}), None, params, batches, energy, None)
        scaled = full_gradient_pass(
            FunctionalView(model, {}), None, params, batches, energy, 2.0**10
        )
    assert gp.examples == 24 and gp.num_batches == 2
    assert gp.a.shape == (2,) and gp.b.shape == (0,)
    with torch.no_grad():
        assert gp.a.tolist() == pytest.approx([float(energy(model, xb)) for xb in batches])
    expected = [torch.zeros_like(p) for p in params]
    for xb in batches:
        grads = torch.autograd.grad(energy(model, xb), params, allow_unused=True)
        for e, g in zip(expected, grads):
            if g is not None:
                e.add_(g, alpha=len(xb))
    for got, ref, again in zip(gp.grad_sum, expected, scaled.grad_sum):
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(again, ref)
    assert torch.equal(gp.grad_sum[-1], torch.zeros(3))
    assert torch.equal(scaled.a, gp.a)

    w = nn.Parameter(torch.tensor(3.0))
    with torch.no_grad():
        one = full_gradient_pass(
            FunctionalView(nn.Module(), {}), None, [w], [torch.tensor(2.0)],
            lambda m, t: (w * t) ** 2, None,
        )  # fmt: skip
    assert one.examples == 1 and one.num_batches == 1 and one.a.tolist() == [36.0]
    assert one.grad_sum[0].item() == 24.0  # d/dw (w t)^2 = 2 w t^2, times one example
    with torch.no_grad():
        empty = full_gradient_pass(FunctionalView(model, {}), None, params, [], energy, None)
    assert empty.examples == 0 and empty.num_batches == 0
    assert empty.a.dtype == empty.b.dtype == torch.float64
    assert empty.a.shape == empty.b.shape == (0,)
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(empty.grad_sum, params))


def test_full_gradient_pass_refuses_a_loss_that_is_not_a_scalar_with_the_whole_message():
    model = _net()
    x, y = _data()
    for bad, shown in ((lambda m, xb, yb: m(xb), "tensor("), (lambda m, xb, yb: 1.5, "1.5")):
        with pytest.raises(ValueError) as err, torch.no_grad():
            full_gradient_pass(
                FunctionalView(model, {}), None, list(model.parameters()), [(x, y)], bad, None
            )
        assert str(err.value).startswith(
            "Invalid loss_fn value: must return a scalar loss, got " + shown
        )


def test_the_view_reports_the_mode_the_model_had_and_passes_keyword_arguments():
    model = _net().eval()
    assert FunctionalView(model, {}).training is False
    assert FunctionalView(model.train(), {}).training is True

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.zeros(2))

        def forward(self, x: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
            return x + self.b + shift

    view = FunctionalView(Shift(), {"b": torch.ones(2)})
    assert view(torch.zeros(2), shift=5.0).tolist() == [6.0, 6.0]
