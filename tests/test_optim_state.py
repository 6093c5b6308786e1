"""AGC's state across save/load, its warnings and its loss-scale retries: behaviours that
mutation testing (tests/MUTATION.md) showed no other test pinned."""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.optim import AGC

from .test_optim_passes import _Sqrt  # a finite loss whose gradient is inf at every scale


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(m(x), y)


def _setup(seed: int = 0, **kw: object) -> tuple[nn.Module, AGC, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    opt = AGC(model.parameters(), lr=0.1, **kw)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return model, opt, x, y


def _corrected_step(model: nn.Module, opt: AGC, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    _ce(model, x, y).backward()
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))
    opt.step()


def test_a_state_dict_without_maximize_and_foreach_loads_with_their_defaults() -> None:
    """Param groups saved before ``maximize``/``foreach`` existed get ``False``/``None`` and then
    step exactly like a fresh optimizer's."""
    model, opt, x, y = _setup()
    opt.refresh(model, [(x, y)], _ce)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["maximize"], g["foreach"]
    twin = nn.Linear(5, 3)
    twin.load_state_dict(model.state_dict())
    loaded = AGC(twin.parameters(), lr=0.1)
    loaded.load_state_dict(sd)
    assert all(g["maximize"] is False and g["foreach"] is None for g in loaded.param_groups)
    _corrected_step(model, opt, x, y)
    _corrected_step(twin, loaded, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_after_loading_the_first_step_needs_a_new_snapshot_gradient() -> None:
    """A loaded optimizer has no snapshot gradient for the coming step, even if the saved state
    holds one: a step without ``snapshot_backward`` is the plain SGD step (and warns)."""
    model, opt, x, y = _setup(momentum=0.0, nesterov=False)
    opt.refresh(model, [(x, y)], _ce)
    _corrected_step(model, opt, x, y)  # moves the weights away from the snapshot
    opt.zero_grad()
    _ce(model, x, y).backward()
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))  # saved with a snapshot gradient
    sd = opt.state_dict()
    loaded = AGC(model.parameters(), lr=0.1, momentum=0.0, nesterov=False)
    loaded.load_state_dict(sd)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="without AGC.snapshot_backward"):
        loaded.step()
    for p, w, g in zip(model.parameters(), before, grads):
        assert torch.equal(p.detach(), w.add(g, alpha=-0.1))  # v = g: the plain SGD update


def test_loading_a_foreign_state_dict_names_the_missing_entry() -> None:
    model, opt, _, _ = _setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sgd.state_dict())
    assert str(err.value) == (
        "Invalid state_dict value: no 'agc' entry (not a state dict of robust_agc.optim.AGC)"
    )


def test_an_optimizer_with_only_empty_groups_saves_and_loads() -> None:
    opt = AGC([{"params": []}], lr=0.1)
    other = AGC([{"params": []}], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert other.num_refreshes == 0


def test_a_missing_snapshot_gradient_warns_once_at_the_callers_line() -> None:
    model, opt, x, y = _setup()
    opt.refresh(model, [(x, y)], _ce)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            _ce(model, x, y).backward()
            opt.step()
    ours = [r for r in rec if "snapshot_backward" in str(r.message)]
    assert len(ours) == 1
    assert str(ours[0].message) == (
        "AGC.step() without AGC.snapshot_backward() since the last step: the correction "
        "is skipped for this step (v = g)"
    )
    assert ours[0].filename == __file__  # points at the user's call, not into torch or AGC


def test_the_online_estimate_after_one_step_and_when_the_control_variate_is_zero() -> None:
    """``agc_online_estimate`` is dot/sq after the first corrected step, and NaN when the control
    variate is exactly zero (a linear loss: the snapshot gradient equals ``mu`` everywhere)."""
    model, opt, x, y = _setup(estimator="grad-online")
    x2, y2 = torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt.refresh(model, [(x, y), (x2, y2)], _ce)  # mu: the mean over two batches
    opt.zero_grad()
    _ce(model, x, y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))
    d = [
        opt.snapshot_gradients()[i] - opt.full_gradient_of(p)
        for i, p in enumerate(model.parameters())
    ]
    opt.step()
    dot = sum(float(torch.sum(gi * di, dtype=torch.float64)) for gi, di in zip(g, d))
    sq = sum(float(torch.sum(di * di, dtype=torch.float64)) for di in d)
    assert opt.telemetry()["agc_online_estimate"] == pytest.approx(dot / sq, rel=1e-12)

    opt2 = _zero_control_variate()[1]
    assert math.isnan(opt2.telemetry()["agc_online_estimate"])


def _linear_loss(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    return m(xb).mean()


def _zero_control_variate() -> tuple[nn.Module, AGC, torch.Tensor]:
    """A grad-online AGC after a refresh and one corrected step on a linear loss: the snapshot
    gradient equals ``mu`` everywhere, so the control variate is exactly zero."""
    torch.manual_seed(1)
    lin = nn.Linear(4, 1, bias=False)
    opt = AGC(lin.parameters(), lr=0.1, estimator="grad-online")
    xs = torch.ones(8, 4)
    opt.refresh(lin, [(xs,)], _linear_loss)
    opt.zero_grad()
    _linear_loss(lin, xs).backward()
    opt.snapshot_backward(lin, lambda m: _linear_loss(m, xs))
    opt.step()
    return lin, opt, xs


def test_an_overflowing_refresh_halves_the_scale_down_to_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Scale 4: tries at 4, 2 and 1, and stops there (two retries logged, at 4 and 2)."""
    model = _Sqrt()
    opt = AGC(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="robust_agc.optim"):
        opt.refresh(model, [(torch.zeros(4, 1),)], lambda m, xb: m(xb), loss_scale=4.0)
    retries = [r.getMessage() for r in caplog.records if "retrying at half" in r.getMessage()]
    assert retries == [
        "AGC refresh: gradient overflow at loss scale 4, retrying at half",
        "AGC refresh: gradient overflow at loss scale 2, retrying at half",
    ]


def test_a_sparse_gradient_is_refused_by_name() -> None:
    emb = nn.Embedding(6, 3, sparse=True)
    opt = AGC(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == "AGC does not support sparse gradients"


def test_the_loss_slope_estimator_keeps_no_online_sums() -> None:
    """Only ``grad-online`` accumulates the per-step sums (saved in the state dict)."""
    for estimator, saved in (("loss-slope", False), ("grad-online", True)):
        model, opt, x, y = _setup(estimator=estimator)
        opt.refresh(model, [(x, y)], _ce)
        _corrected_step(model, opt, x, y)
        assert ("online_dot" in opt.state_dict()["agc"]) is saved


@pytest.mark.parametrize("kind", ["float", "vector"])
def test_a_closure_that_is_not_a_scalar_loss_is_refused(kind: str) -> None:
    model, opt, x, y = _setup()
    opt.refresh(model, [(x, y)], _ce)
    bad = (lambda m: 1.0) if kind == "float" else (lambda m: m(x).sum(0))
    with pytest.raises(ValueError, match="^Invalid closure value: must return a scalar loss"):
        opt.snapshot_backward(model, bad)


def test_a_parameter_the_loss_does_not_use_gets_a_zero_snapshot_gradient() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    torch.manual_seed(0)
    model = TwoHeads()
    opt = AGC(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt.refresh(model, [(x, y)], _ce)
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))
    snaps = opt.snapshot_gradients()
    assert len(snaps) == 4
    assert all(torch.equal(g, torch.zeros_like(g)) for g in snaps[2:])
    assert all(g.abs().sum() > 0 for g in snaps[:2])


def test_a_loss_slope_refresh_on_one_batch_keeps_tau_and_says_why() -> None:
    model, opt, x, y = _setup(estimator="loss-slope")
    opt.refresh(model, [(x, y)], _ce)
    _corrected_step(model, opt, x, y)
    tau = opt.tau
    with pytest.warns(RuntimeWarning) as rec:
        opt.refresh(model, [(x, y)], _ce)
    assert [str(r.message) for r in rec] == [
        "AGC refresh with 1 batch(es): tau_now needs >= 2, tau kept"
    ]
    assert opt.tau == tau and math.isnan(opt.telemetry()["agc_tau_now"])


def test_the_few_batches_warning_is_given_once_per_optimizer() -> None:
    """Three one-batch loss-slope refreshes after the first: one warning, not three."""
    model, opt, x, y = _setup(estimator="loss-slope")
    opt.refresh(model, [(x, y)], _ce)
    with pytest.warns(RuntimeWarning) as rec:
        for _ in range(3):
            _corrected_step(model, opt, x, y)
            opt.refresh(model, [(x, y)], _ce)
    assert [str(r.message) for r in rec] == [
        "AGC refresh with 1 batch(es): tau_now needs >= 2, tau kept"
    ]


def test_loss_slope_tau_takes_the_slope_only_above_float_resolution() -> None:
    """``tau_now = cov(a, b) / var(b)`` once ``var(b)`` exceeds ``(1e-5 * mean|b|)^2``: per-batch
    losses that differ by 1e-4 give the slope around a loss of 2 (resolution 4e-10 < var 1.7e-8)
    and no estimate around a loss of 100 (resolution 1e-6); all-zero losses (resolution 0, var 0)
    give no estimate and no division by zero."""
    _, opt, _, _ = _setup(estimator="loss-slope")
    spread = 1e-4 * torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)
    b = 2.0 + spread
    assert opt._loss_slope_tau(3.0 * b, b, True) == pytest.approx(3.0, rel=1e-9)
    with pytest.warns(RuntimeWarning, match=r"is at float resolution \(the previous snapshot's"):
        assert math.isnan(opt._loss_slope_tau(3.0 * (100.0 + spread), 100.0 + spread, True))
    fresh = _setup(estimator="loss-slope")[1]
    zeros = torch.zeros(4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="loss is constant over batches\\): tau kept"):
        assert math.isnan(fresh._loss_slope_tau(torch.arange(4.0), zeros, True))


def test_the_refresh_warnings_point_at_the_callers_line() -> None:
    """The few-batches, float-resolution and zero-control-variate warnings name the line that
    called ``refresh`` (deselected under mutmut, whose trampolines add a frame; checked by
    planting instead)."""
    model, opt, x, y = _setup(estimator="loss-slope")
    opt.refresh(model, [(x, y)], _ce)
    _corrected_step(model, opt, x, y)
    with pytest.warns(RuntimeWarning) as rec:
        opt.refresh(model, [(x, y)], _ce)
    assert rec[0].filename == __file__
    model, opt, x, y = _setup(estimator="loss-slope")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # a constant loss log(C) on every batch: var(b) at float resolution
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    opt.refresh(model, batches, _ce)
    _corrected_step(model, opt, x, y)
    with pytest.warns(RuntimeWarning, match="float resolution") as rec:
        opt.refresh(model, batches, _ce)
    assert rec[0].filename == __file__
    # grad-online with a linear loss: the control variate is exactly zero, tau kept
    lin, online, xs = _zero_control_variate()
    with pytest.warns(RuntimeWarning, match=r"mean \|\|g_snap - mu\|\|\^2 = 0.0") as rec:
        online.refresh(lin, [(xs,)], _linear_loss)
    assert rec[0].filename == __file__


def test_the_hyperparameter_warnings_point_at_the_callers_line() -> None:
    """An odd gamma or fixed_coef warns at the line that built the optimizer or added the group
    (deselected under mutmut, whose trampolines add a frame; checked by planting instead)."""
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = AGC([p], lr=0.1, gamma=3.0)
        line = inspect.currentframe().f_lineno - 1
        opt.add_param_group({"params": [q], "gamma": 0.1, "coef": "fixed", "fixed_coef": 2.0})
    assert [(r.filename, r.lineno) for r in rec] == [(__file__, line), (__file__, line + 2)]
    assert "gamma=3.0 > 1" in str(rec[0].message) and "fixed_coef=2.0" in str(rec[1].message)


def test_before_any_refresh_a_parameter_has_no_full_gradient_and_no_stale_positions() -> None:
    """``full_gradient_of`` and ``stale_positions`` of a parameter the optimizer holds no state
    for yet are ``None`` (not an error)."""
    model, opt, _, _ = _setup()
    for p in model.parameters():
        assert opt.full_gradient_of(p) is None and opt.stale_positions(p) is None


def test_a_parameter_unfrozen_after_the_refresh_stays_out_of_the_online_sums() -> None:
    """A parameter frozen during the refresh and unfrozen before the next step (gradual
    unfreezing) has no snapshot and no ``mu``: the grad-online sums skip it and keep every other
    parameter of its group (the estimate is dot/sq over the bias alone)."""
    model, opt, x, y = _setup(estimator="grad-online")
    x2, y2 = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model.weight.requires_grad_(False)  # the first parameter of the only group
    opt.refresh(model, [(x, y), (x2, y2)], _ce)
    model.weight.requires_grad_(True)
    assert opt.full_gradient_of(model.weight) is None
    mu = opt.full_gradient_of(model.bias)
    opt.zero_grad()
    _ce(model, x, y).backward()
    g = model.bias.grad.clone()
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))
    d = [s for s in opt.snapshot_gradients() if s.shape == mu.shape][0] - mu
    opt.step()
    dot = float(torch.sum(g * d, dtype=torch.float64))
    sq = float(torch.sum(d * d, dtype=torch.float64))
    assert sq > 0
    assert opt.telemetry()["agc_online_estimate"] == pytest.approx(dot / sq, rel=1e-12)


def _sums(dot: float, sq: float) -> dict[str, torch.Tensor]:
    return {
        "dot": torch.tensor(dot, dtype=torch.float64),
        "sq": torch.tensor(sq, dtype=torch.float64),
    }


def test_grad_online_tau_is_dot_over_sq_when_defined_and_says_why_not() -> None:
    """``tau_now`` of the grad-online estimator from the sums since the last refresh: dot/sq after
    one step or more; NaN and a warning naming the cause when ``||g_snap - mu||^2`` is zero or not
    finite, or when no step took a snapshot gradient (adaptive coefficient only: a fixed one
    does not use tau); NaN and no warning without a previous snapshot. The step counter saved in
    the state dict counts the corrected steps."""
    model, opt, x, y = _setup(estimator="grad-online")
    opt.refresh(model, [(x, y)], _ce)
    for _ in range(3):
        _corrected_step(model, opt, x, y)
    assert int(opt.state_dict()["agc"]["online_count"]) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt._grad_online_tau(_sums(1.5, 3.0), 1, True) == 0.5
        assert math.isnan(opt._grad_online_tau({}, 0, False))
    for sq in (0.0, math.inf):
        fresh = _setup(estimator="grad-online")[1]
        with pytest.warns(RuntimeWarning) as rec:
            assert math.isnan(fresh._grad_online_tau(_sums(1.0, sq), 2, True))
        assert [str(r.message) for r in rec] == [
            f"AGC refresh: mean ||g_snap - mu||^2 = {sq}, tau kept"
        ]
    fresh = _setup(estimator="grad-online")[1]
    with pytest.warns(RuntimeWarning) as rec:
        assert math.isnan(fresh._grad_online_tau(_sums(0.0, 0.0), 0, True))
    assert [str(r.message) for r in rec] == [
        "AGC refresh: no step with a snapshot gradient since the last refresh"
    ]
    fixed = _setup(estimator="grad-online", coef="fixed")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(fixed._grad_online_tau({}, 0, True))


def test_step_returns_the_closures_loss_and_none_without_a_closure() -> None:
    """As ``torch.optim.SGD``: ``step()`` returns ``None``, ``step(closure)`` the closure's loss,
    evaluated with gradients enabled (the closure may call ``backward``)."""
    model, opt, x, y = _setup()
    _ce(model, x, y).backward()
    assert opt.step() is None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _ce(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    with torch.no_grad():
        assert float(loss.detach()) == pytest.approx(float(_ce(model, x, y)), rel=0.5)


def test_a_parameter_without_a_gradient_does_not_stop_the_step_for_the_rest() -> None:
    """A parameter listed first in its group with no gradient (unused by the loss) is skipped;
    the parameters after it are updated as SGD with the same momentum would update them."""
    torch.manual_seed(0)
    unused, lin = nn.Parameter(torch.randn(3)), nn.Linear(5, 3)
    opt = AGC([unused, *lin.parameters()], lr=0.1)
    ref = torch.optim.SGD(copy.deepcopy(lin).parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in lin.parameters()]
    F.cross_entropy(lin(x), y).backward()
    for p, q in zip(lin.parameters(), ref.param_groups[0]["params"]):
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert unused.grad is None
    for p, q, b in zip(lin.parameters(), ref.param_groups[0]["params"], before):
        assert not torch.equal(p, b) and torch.equal(p, q)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_state_holds_a_momentum_buffer_exactly_when_sgd_would(momentum: float) -> None:
    """As ``torch.optim.SGD``: a momentum buffer is kept (and saved) only with momentum, so a
    momentum-free AGC's state has the same entries as before the first step plus its own."""
    model, opt, x, y = _setup(momentum=momentum, nesterov=False, weight_decay=0.0)
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum)
    for _ in range(2):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            _ce(m, x, y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert ("momentum_buffer" in opt.state[p]) == ("momentum_buffer" in sgd.state[q])
        assert ("momentum_buffer" in opt.state[p]) == (momentum != 0)
        if momentum:
            assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


@pytest.mark.filterwarnings("ignore:AGC refresh")  # one batch: tau kept, said by a warning
def test_a_refresh_drops_the_snapshot_gradients_of_the_old_snapshot() -> None:
    """``g_B(ws)`` belongs to the snapshot it was taken at: after a refresh moves the snapshot,
    no parameter's state (nor a saved state dict) still holds one until the next
    :meth:`AGC.snapshot_backward`."""
    model, opt, x, y = _setup()
    opt.refresh(model, [(x, y)], _ce)
    _corrected_step(model, opt, x, y)
    assert all("snap_grad" in opt.state[p] for p in model.parameters())
    opt.refresh(model, [(x, y)], _ce)
    assert not any("snap_grad" in opt.state[p] for p in model.parameters())
    assert not any("snap_grad" in s for s in opt.state_dict()["state"].values())
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))
    assert all("snap_grad" in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize("estimator", ["grad-online", "loss-slope"])
def test_a_refresh_returns_its_telemetry_and_logs_it_in_one_line(caplog, estimator: str) -> None:
    """What :meth:`AGC.refresh` returns (the trainer records it per epoch): the new ``tau`` and
    coefficient, whether ``tau`` moved, and the refresh's cost; the same in one log line."""
    model, opt, x, y = _setup(gamma=0.5, estimator=estimator)
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    opt.refresh(model, batches, _ce)
    for xb, yb in batches:
        _corrected_step(model, opt, xb, yb)
    with caplog.at_level(logging.INFO, logger="robust_agc.optim.agc"):
        out = opt.refresh(model, batches, _ce)
    seconds = out.pop("refresh_time_s")
    assert 0 < seconds < 60
    assert math.isfinite(opt.tau_now) and opt.coefficient == 0.5 * opt.tau != 0
    assert out == {
        "agc_tau_now": opt.tau_now,
        "agc_tau": opt.tau,
        "agc_coef": opt.coefficient,
        "agc_tau_updated": 1.0,
        "refresh_batches": 4.0,
        "refresh_examples": 8.0,
        "refresh_grad_evals": 8.0,
        # the loss at the previous snapshot, for the slope
        "refresh_forwards": 8.0 if estimator == "loss-slope" else 0.0,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "robust_agc.optim.agc"]
    assert lines == [
        f"AGC refresh 2: tau_now={opt.tau_now:.4g} tau={opt.tau:.4g} c={opt.coefficient:.4g} "
        f"(4 batches, 8 examples, {seconds:.2f}s)"
    ]


@pytest.mark.parametrize("rows", [None, 0])
def test_a_refresh_without_examples_is_refused_and_changes_nothing(rows: int | None) -> None:
    """No batches, or only empty ones: a clear error, and no snapshot (``mu`` would be 0/0)."""
    model, opt, x, y = _setup()
    batches = [] if rows is None else [(x[:rows], y[:rows])]
    with pytest.raises(ValueError) as err:
        opt.refresh(model, batches, _ce)
    assert str(err.value) == "Invalid batches value: the refresh received no examples"
    assert not opt.has_snapshot and opt.num_refreshes == 0


@pytest.mark.filterwarnings("ignore:AGC refresh")  # one batch: tau kept, said by a warning
def test_a_refresh_on_a_single_example_takes_its_gradient_as_mu() -> None:
    model, opt, x, y = _setup()
    opt.refresh(model, [(x[:1], y[:1])], _ce)
    grads = torch.autograd.grad(_ce(model, x[:1], y[:1]), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(opt.full_gradient_of(p), g)


def test_a_grad_online_refresh_without_a_step_since_the_last_says_so_and_keeps_tau() -> None:
    """Through :meth:`AGC.refresh` (not only the estimator's own function): the first refresh has
    nothing to estimate and is silent; a second one with no corrected step in between warns and
    keeps ``tau``."""
    model, opt, x, y = _setup(estimator="grad-online", tau_init=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.refresh(model, [(x, y)], _ce)
    with pytest.warns(RuntimeWarning, match="^AGC refresh: no step with a snapshot gradient since"):
        out = opt.refresh(model, [(x, y)], _ce)
    assert math.isnan(out["agc_tau_now"]) and opt.tau == 0.3 and out["agc_tau_updated"] == 0.0


def test_a_refresh_takes_bare_tensors_as_batches_weighted_by_their_rows() -> None:
    """A batch may be one tensor instead of a tuple (``loss_fn(module, x)``); it holds as many
    examples as its first dimension, a 0-dim one one. ``mu`` is the example-weighted mean of the
    batch gradients."""
    model, opt, x, _ = _setup()

    def energy(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        return m(xb.reshape(-1, 5)).pow(2).mean()

    point = x[0, 0].clone()  # a 0-dim batch: one example, read as a constant input row
    batches = [x[:2], x[2:], point, x[1]]  # the last: 1-dim, its 5 entries count as 5 rows
    opt.refresh(model, batches, lambda m, t: energy(m, t if t.dim() else t.expand(5)))
    params = list(model.parameters())
    parts = [
        (2, torch.autograd.grad(energy(model, x[:2]), params)),
        (6, torch.autograd.grad(energy(model, x[2:]), params)),
        (1, torch.autograd.grad(energy(model, point.expand(5)), params)),
        (5, torch.autograd.grad(energy(model, x[1]), params)),
    ]
    for i, p in enumerate(params):
        mu = sum(n * g[i] for n, g in parts) / 14
        torch.testing.assert_close(opt.full_gradient_of(p), mu)
