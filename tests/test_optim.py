"""AGC optimizer: kernel vs a float64 reference, SGD equivalence, state, validation, factory, masks."""

from __future__ import annotations

import copy
import importlib
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.optim import AGC, agc, corrected_gradient, create_optimizer, list_optimizers


def _net(bn: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, stride=2)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)]
    return nn.Sequential(*layers).to(dtype)


def _data(n: int = 48, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 14, 14, generator=g, dtype=dtype), torch.randint(
        0, 10, (n,), generator=g
    )


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def _train(
    model,
    opt,
    x,
    y,
    *,
    epochs=3,
    bs=16,
    agc_opt=True,
    refresh_bs=16,
    start_epoch=0,
    do_refresh=True,
):
    """Plain training loop: snapshot gradient every step, refresh at the end of every epoch."""
    losses = []
    for e in range(start_epoch, start_epoch + epochs):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(100 + e))
        for i in range(0, x.shape[0], bs):
            xb, yb = x[perm[i : i + bs]], y[perm[i : i + bs]]
            opt.zero_grad()
            loss = _ce(model, xb, yb)
            loss.backward()
            if agc_opt:
                opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
            opt.step()
            losses.append(loss.item())
        if agc_opt and do_refresh:
            batches = [
                (x[i : i + refresh_bs], y[i : i + refresh_bs]) for i in range(0, len(x), refresh_bs)
            ]
            opt.refresh(model, batches, _ce)
    return losses


# --------------------------------------------------------------------------- the kernel


def _reference(p0, gs_seq, *, coef, lr, wd, momentum, dampening, nesterov, maximize):
    """Plain float64 re-statement of docs/agc.md + torch.optim.SGD, one parameter."""
    p = p0.clone().double()
    buf = None
    for g, gsnap, mu in gs_seq:
        g, gsnap, mu = g.double(), gsnap.double(), mu.double()
        v = g + coef * (mu - gsnap)
        if maximize:
            v = -v
        v = v + wd * p
        if momentum != 0:
            buf = v.clone() if buf is None else momentum * buf + (1 - dampening) * v
            v = v + momentum * buf if nesterov else buf
        p = p - lr * v
    return p


KERNEL_CONFIGS = [
    dict(coef=0.3, lr=0.1, wd=0.01, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
    dict(coef=0.05, lr=0.05, wd=0.0, momentum=0.9, dampening=0.1, nesterov=False, maximize=False),
    dict(coef=1.0, lr=0.2, wd=5e-4, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(coef=0.7, lr=0.1, wd=0.02, momentum=0.5, dampening=0.0, nesterov=True, maximize=True),
    # Nesterov on the caller's own gradients (no decay, no maximize: nothing copied them yet)
    dict(coef=0.3, lr=0.1, wd=0.0, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
    # the boundary values 1 of weight decay and momentum
    dict(coef=0.2, lr=0.05, wd=1.0, momentum=1.0, dampening=0.5, nesterov=False, maximize=False),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cfg", KERNEL_CONFIGS)
def test_kernel_matches_float64_reference(cfg, foreach):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), ()]  # includes a 0-dim parameter
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    p0 = [p.clone() for p in params]
    seqs = [
        [
            tuple(torch.randn(s, generator=g, dtype=torch.float64) for _ in range(3))
            for _ in range(5)
        ]
        for s in shapes
    ]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    for t in range(5):
        grads = [seqs[i][t][0] for i in range(len(params))]
        grads_before = [x.clone() for x in grads]
        agc(
            params,
            grads,
            [seqs[i][t][1] for i in range(len(params))],
            [seqs[i][t][2] for i in range(len(params))],
            bufs,
            coef=cfg["coef"],
            lr=cfg["lr"],
            weight_decay=cfg["wd"],
            momentum=cfg["momentum"],
            dampening=cfg["dampening"],
            nesterov=cfg["nesterov"],
            maximize=cfg["maximize"],
            foreach=foreach,
        )
        for a, b in zip(grads, grads_before):
            assert torch.equal(a, b), "the kernel must not modify the gradients"
    for i in range(len(params)):
        ref = _reference(p0[i], seqs[i], **cfg)
        torch.testing.assert_close(params[i], ref, rtol=1e-12, atol=1e-12)
        assert not torch.equal(params[i], p0[i])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cfg", KERNEL_CONFIGS[:2] + KERNEL_CONFIGS[3:])
def test_kernel_with_a_parameter_that_joins_later(cfg, foreach):
    """A parameter without a gradient on the first step (no momentum buffer yet) joins on the
    second, while the others already have buffers: each follows its own reference."""
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 4), (5,), (2, 3)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    p0 = [p.clone() for p in params]
    seqs = [
        [
            tuple(torch.randn(s, generator=g, dtype=torch.float64) for _ in range(3))
            for _ in range(4)
        ]
        for s in shapes
    ]
    bufs: list[torch.Tensor | None] = [None] * 3
    kw = {k: cfg[k] for k in ("coef", "lr", "momentum", "dampening", "nesterov", "maximize")}
    for t in range(4):
        idx = [0, 2] if t == 0 else [0, 1, 2]
        sub = [bufs[i] for i in idx]
        agc([params[i] for i in idx], *([seqs[i][t][j] for i in idx] for j in range(3)), sub,
            weight_decay=cfg["wd"], foreach=foreach, **kw)  # fmt: skip
        for i, b in zip(idx, sub):
            bufs[i] = b
    for i in range(3):
        ref = _reference(p0[i], seqs[i][1:] if i == 1 else seqs[i], **cfg)
        torch.testing.assert_close(params[i], ref, rtol=1e-12, atol=1e-12)


def test_foreach_equals_for_loop_with_missing_snapshots():
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    runs = {}
    for foreach in (False, True):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
        bufs: list[torch.Tensor | None] = [None] * 3
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            snaps = [torch.randn(s, generator=gen) for s in shapes]
            fulls = [torch.randn(s, generator=gen) for s in shapes]
            snaps[1] = None  # no snapshot gradient for this one: v = g
            agc(params, grads, snaps, fulls, bufs, coef=0.4, lr=0.1, weight_decay=1e-3,
                momentum=0.9, dampening=0.0, nesterov=True, foreach=foreach)  # fmt: skip
        runs[foreach] = params
    del g
    for a, b in zip(runs[False], runs[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def spy_kernels(monkeypatch) -> list[str]:
    """Record, in the returned list, the name of each AGC kernel the functional update runs."""
    # the module (the package's attribute ``agc`` is the function of the same name)
    agc_module = importlib.import_module("robust_agc.optim.agc")
    called: list[str] = []
    for name in ("_multi_tensor_agc", "_single_tensor_agc"):
        real = getattr(agc_module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            called.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(agc_module, name, spy)
    return called


@pytest.mark.parametrize("foreach", [None, False, True])
def test_the_functional_update_runs_the_kernel_asked_for_and_descends_by_default(
    foreach, monkeypatch
):
    """``foreach=True`` runs the multi-tensor kernel, ``False`` the loop and ``None`` torch's own
    choice (the loop on the CPU, as ``torch.optim.sgd``); without ``maximize`` it descends."""
    called = spy_kernels(monkeypatch)
    p0, g = torch.randn(3, 2), torch.randn(3, 2)
    params = [p0.clone()]
    agc(params, [g], [None], [None], [None], coef=0.0, lr=0.1, weight_decay=0.0, momentum=0.0,
        dampening=0.0, nesterov=False, foreach=foreach)  # fmt: skip
    assert called == ["_multi_tensor_agc" if foreach else "_single_tensor_agc"]
    torch.testing.assert_close(params[0], p0 - 0.1 * g, rtol=0, atol=1e-7)


def test_the_functional_update_refuses_lists_of_different_lengths():
    p = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(ValueError) as err:
        agc(p, p, [None], [None, None], [None, None], coef=0.0, lr=0.1, weight_decay=0.0,
            momentum=0.0, dampening=0.0, nesterov=False)  # fmt: skip
    assert str(err.value) == (
        "Invalid lists value: params, grads, snap_grads, full_grads and momentum_buffers "
        "must have the same length"
    )


def test_corrected_gradient_formula_and_shape_check():
    g, gs, mu = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(corrected_gradient(g, gs, mu, 0.25), g + 0.25 * (mu - gs))
    assert torch.equal(corrected_gradient(g, gs, mu, 0.0), g)
    with pytest.raises(ValueError, match="Invalid shapes value"):
        corrected_gradient(g, gs, mu[:1], 0.1)


# --------------------------------------------------------------------------- SGD equivalence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("mode", ["gamma0", "fixed0"])
def test_zero_coefficient_is_bitwise_sgd(dtype, foreach, mode):
    x, y = _data(dtype=dtype)
    m_sgd = _net(dtype=dtype)
    m_agc = copy.deepcopy(m_sgd)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=foreach)
    sgd = torch.optim.SGD(m_sgd.parameters(), **kw)
    extra = dict(gamma=0.0) if mode == "gamma0" else dict(coef="fixed", fixed_coef=0.0)
    opt = AGC(m_agc.parameters(), **kw, **extra)
    _train(m_sgd, sgd, x, y, agc_opt=False)
    _train(m_agc, opt, x, y)  # with snapshot gradients and refreshes in between
    assert opt.has_snapshot and opt.num_refreshes == 3
    for a, b in zip(m_sgd.state_dict().values(), m_agc.state_dict().values()):
        assert torch.equal(a, b)


def test_nonzero_coefficient_differs_from_sgd():
    x, y = _data()
    m1, m2 = _net(), _net()
    _train(
        m1,
        torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        x,
        y,
        agc_opt=False,
    )
    _train(m2, AGC(m2.parameters(), lr=0.1, coef="fixed", fixed_coef=0.5), x, y)
    assert not torch.equal(m1[0].weight, m2[0].weight)


def test_param_without_grad_is_skipped_and_zero_dim_param_works():
    w = nn.Parameter(torch.randn(3))
    s = nn.Parameter(torch.tensor(0.5))  # 0-dim
    unused = nn.Parameter(torch.randn(2))
    opt = AGC([w, s, unused], lr=0.1, weight_decay=0.1)
    before = unused.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (s * w.sum()).backward()
        opt.step()
    assert torch.equal(unused, before)
    assert "momentum_buffer" not in opt.state[unused]
    assert opt.state[s]["momentum_buffer"].shape == ()


def test_step_without_snapshot_backward_warns_and_uses_plain_gradient():
    x, y = _data()
    model = _net(bn=False)
    opt = AGC(model.parameters(), lr=0.1, coef="fixed", fixed_coef=0.5)
    opt.refresh(model, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
    ref = copy.deepcopy(model)
    ref_opt = AGC(ref.parameters(), lr=0.1, coef="fixed", fixed_coef=0.0)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        _ce(m, x, y).backward()
    with pytest.warns(RuntimeWarning, match="snapshot_backward"):
        opt.step()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- snapshot_backward


def test_snapshot_backward_matches_a_model_copy_and_leaves_grad_and_buffers():
    x, y = _data()
    model = _net()
    model.train()
    opt = AGC(model.parameters(), lr=0.1)
    assert opt.snapshot_backward(model, lambda m: _ce(m, x, y)) is None  # no snapshot yet
    opt.refresh(model, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
    snap_copy = copy.deepcopy(model)
    _train(model, opt, x, y, epochs=1, do_refresh=False)  # moves the weights, snapshot stays
    opt.zero_grad()
    _ce(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }
    loss = opt.snapshot_backward(model, lambda m: _ce(m, x[:20], y[:20]))
    # reference: the old weights in a real copy, same (train) mode and same buffers
    snap_copy.load_state_dict({**snap_copy.state_dict(), **buffers})
    ref_loss = _ce(snap_copy, x[:20], y[:20])
    ref_grads = torch.autograd.grad(ref_loss, list(snap_copy.parameters()))
    torch.testing.assert_close(loss, ref_loss.detach())
    for p, rg, g0 in zip(model.parameters(), ref_grads, grads):
        torch.testing.assert_close(opt.state[p]["snap_grad"], rg)
        assert torch.equal(p.grad, g0)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_snapshot_backward_rejects_foreign_params():
    x, y = _data()
    model = _net(bn=False)
    opt = AGC(list(model.parameters()) + [nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="Invalid model value"):
        opt.refresh(model, [(x, y)], _ce)


# --------------------------------------------------------------------------- coefficient and tau


def test_coefficient_modes():
    p = [nn.Parameter(torch.zeros(2))]
    assert AGC(p, lr=0.1).coefficient == pytest.approx(0.1 * 0.1)
    assert AGC(p, lr=0.1, coef="fixed", fixed_coef=0.3).coefficient == 0.3
    model = _net(bn=False)
    x, y = _data()
    opt = AGC(model.parameters(), lr=0.1, coef="ramp")
    got = [opt.coefficient]
    for _ in range(4):
        opt.refresh(model, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
        got.append(opt.coefficient)
    assert got == pytest.approx([0.1 * (1 - 0.7**e) for e in range(5)])


def test_tau_is_an_ema_of_tau_now():
    x, y = _data(96)
    model = _net()
    opt = AGC(model.parameters(), lr=0.2, alpha=0.3, tau_init=0.1, gamma=0.5)
    taus = [opt.tau]
    for e in range(3):
        _train(model, opt, x, y, epochs=1, agc_opt=True, start_epoch=e, refresh_bs=16)
        taus.append(opt.tau)
        if e == 0:
            assert taus[-1] == taus[-2]  # first refresh: no previous snapshot
        else:
            assert opt.tau == pytest.approx(0.7 * taus[-2] + 0.3 * opt.tau_now, rel=1e-12)
            assert opt.coefficient == pytest.approx(0.5 * opt.tau, rel=1e-12)


def test_grad_online_sums_match_manual_computation():
    x, y = _data()
    model = _net(bn=False)
    opt = AGC(model.parameters(), lr=0.05, estimator="grad-online")
    opt.refresh(model, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
    dot = sq = 0.0
    for i in range(0, 48, 12):
        xb, yb = x[i : i + 12], y[i : i + 12]
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        for p in model.parameters():
            d = (opt.state[p]["snap_grad"] - opt.state[p]["full_grad"]).double()
            dot += float((p.grad.double() * d).sum())
            sq += float((d * d).sum())
        opt.step()
    est = opt.telemetry()["agc_online_estimate"]
    assert est == pytest.approx(dot / sq, rel=1e-6)
    tau0 = opt.tau
    out = opt.refresh(model, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
    assert out["agc_tau_now"] == pytest.approx(dot / sq, rel=1e-6)
    assert opt.tau == pytest.approx(0.7 * tau0 + 0.3 * dot / sq, rel=1e-6)
    assert out["refresh_forwards"] == 0  # no snapshot forward pass for this estimator
    assert math.isnan(opt.telemetry()["agc_online_estimate"])  # sums restart


# --------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("estimator", ["loss-slope", "grad-online"])
def test_state_dict_round_trip_resumes_bit_for_bit(estimator):
    x, y = _data(64)
    model = _net()
    kw = dict(lr=0.1, weight_decay=1e-3, estimator=estimator, gamma=0.5)
    opt = AGC(model.parameters(), **kw)
    _train(model, opt, x, y, epochs=2)
    _train(model, opt, x[:24], y[:24], epochs=1, start_epoch=2, do_refresh=False)  # mid-period
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert "agc" in saved_opt

    _train(model, opt, x, y, epochs=2, start_epoch=3)
    model2 = _net()
    model2.load_state_dict(saved_model)
    opt2 = AGC(model2.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    assert opt2.tau == float(saved_opt["agc"]["tau"])
    _train(model2, opt2, x, y, epochs=2, start_epoch=3)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt.tau == opt2.tau and opt.num_refreshes == opt2.num_refreshes == 4


def test_load_state_dict_of_another_optimizer_raises():
    p = [nn.Parameter(torch.zeros(2))]
    sd = torch.optim.SGD(p, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="Invalid state_dict value"):
        AGC(p, lr=0.1).load_state_dict(sd)


# --------------------------------------------------------------------------- validation

BAD_HYPERPARAMETERS = [
    (dict(lr=-0.1), r"Invalid learning rate: -0.1"),
    (dict(lr=float("nan")), r"Invalid learning rate: nan"),
    (dict(lr=torch.tensor(0.1)), r"Invalid learning rate"),
    (dict(momentum=-0.5), r"Invalid momentum value: -0.5"),
    (dict(weight_decay=-1e-4), r"Invalid weight_decay value: -0.0001"),
    (dict(gamma=-0.1), r"Invalid gamma value: -0.1"),
    (dict(dampening=1.5, nesterov=False), r"Invalid dampening value: 1.5"),
    (dict(momentum=0.0), r"^Nesterov momentum requires a momentum and zero dampening$"),
    (dict(dampening=0.1), r"^Nesterov momentum requires a momentum and zero dampening$"),
    (dict(alpha=1.3), r"Invalid alpha value: 1.3"),
    (dict(alpha=-0.1), r"Invalid alpha value: -0.1"),
    (dict(tau_init=float("inf")), r"Invalid tau_init value: inf"),
    (dict(estimator="slope"), r"Invalid estimator value: 'slope'"),
    (dict(coef="svrg"), r"Invalid coef value: 'svrg'"),
    (dict(fixed_coef=float("nan")), r"Invalid fixed_coef value: nan"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise(kwargs, message):
    kw = dict(lr=0.1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AGC([nn.Parameter(torch.zeros(2))], **kw)


def test_the_defaults_are_the_documented_ones_and_the_scalars_start_empty():
    """The defaults of the docs (Nesterov momentum 0.9, gamma 0.1, alpha 0.3, tau_init 0.1, the
    online estimator, the adaptive coefficient) and a fresh optimizer's scalar state: tau exactly
    tau_init in float64, no raw estimate, no refresh, no step, no online sums."""
    p = nn.Parameter(torch.zeros(2))
    opt = AGC([p], lr=0.1)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert group == dict(
        lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, gamma=0.1,
        alpha=0.3, tau_init=0.1, estimator="grad-online", coef="adaptive", fixed_coef=0.1,
        foreach=None, maximize=False,
    )  # fmt: skip
    assert opt.defaults == {**group, "lr": 0.1}
    scalars = opt.state_dict()["agc"]
    assert set(scalars) == {"tau", "tau_now", "refreshes", "steps", "online_count"}
    assert scalars["tau"].dtype == scalars["tau_now"].dtype == torch.float64
    assert scalars["tau"].item() == 0.1 and math.isnan(scalars["tau_now"].item())
    for k in ("refreshes", "steps", "online_count"):
        assert scalars[k].dtype == torch.int64 and scalars[k].item() == 0
    assert opt.tau == 0.1 and math.isnan(opt.tau_now) and opt.num_refreshes == 0
    assert opt.refresh_losses is None
    assert not opt.has_snapshot and opt.state == {}  # reading has_snapshot adds no state
    assert AGC([p], lr=0.1, tau_init=0.25).tau == 0.25


EDGE_HYPERPARAMETERS = [
    dict(lr=0.0),
    dict(momentum=0.0, nesterov=False),
    dict(momentum=0.0, nesterov=False, dampening=1.0),
    dict(nesterov=False, dampening=1.0),
    dict(weight_decay=0.0, gamma=0.0),
    dict(alpha=0.0),
    dict(alpha=1.0),
    dict(tau_init=-1.0),
    dict(coef="fixed", fixed_coef=0.0),
    dict(coef="fixed", fixed_coef=1.0),
    dict(coef="adaptive", fixed_coef=5.0),
    dict(gamma=1.0),
    dict(estimator="loss-slope"),
    dict(coef="ramp"),
]


@pytest.mark.parametrize("kwargs", EDGE_HYPERPARAMETERS)
def test_hyperparameters_on_the_edges_of_their_ranges_are_taken_silently(kwargs):
    """The closed ends of every range are valid and warn about nothing (a fixed_coef outside
    [0, 1] only matters for coef='fixed')."""
    kw = dict(lr=0.1)
    kw.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = AGC([nn.Parameter(torch.zeros(2))], **kw)
    group = opt.param_groups[0]
    assert all(group[k] == v for k, v in kw.items())


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lr=float("inf")), r"^Invalid learning rate: inf$"),
    (dict(momentum=float("inf")), r"^Invalid momentum value: inf$"),
    (dict(weight_decay=float("nan")), r"^Invalid weight_decay value: nan$"),
    (dict(gamma=float("inf")), r"^Invalid gamma value: inf$"),
    (dict(dampening=-0.1, nesterov=False), r"^Invalid dampening value: -0.1$"),
    (dict(tau_init=float("nan")), r"^Invalid tau_init value: nan$"),
    (dict(fixed_coef=float("-inf")), r"^Invalid fixed_coef value: -inf$"),
    (dict(lr=torch.tensor(0.1)), r"^Invalid learning rate: 0\.1\d* \(AGC takes a float learning rate\)$"),
    (dict(estimator="slope"), r"^Invalid estimator value: 'slope' \(one of \('loss-slope', 'grad-online'\)\)$"),
    (dict(coef="svrg"), r"^Invalid coef value: 'svrg' \(one of \('adaptive', 'fixed', 'ramp'\)\)$"),
])  # fmt: skip
def test_non_finite_and_out_of_range_hyperparameters_raise_with_the_whole_message(kwargs, message):
    kw = dict(lr=0.1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AGC([nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(coef="fixed", fixed_coef=-0.5),
     r"^fixed_coef=-0.5 outside \[0, 1\]: the correction overshoots the variance-optimal range$"),
    (dict(coef="fixed", fixed_coef=1.5), r"^fixed_coef=1.5 outside \[0, 1\]"),
    (dict(coef="fixed", fixed_coef=2.0), r"^fixed_coef=2.0 outside \[0, 1\]"),
    (dict(gamma=3.0), r"^gamma=3.0 > 1: "),
    (dict(gamma=1.5), r"^gamma=1.5 > 1: c = gamma \* tau is usually in \[0, 1\] \(default 0.1\)$"),
])  # fmt: skip
def test_suspicious_hyperparameters_warn_once_with_the_whole_message(kwargs, message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AGC([nn.Parameter(torch.zeros(2))], lr=0.1, **kwargs)
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert re.match(message, str(caught[0].message))


def test_param_groups_must_share_the_tau_settings_and_may_differ_in_gamma():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid alpha value: 0.5"):
        AGC([{"params": [a]}, {"params": [b], "alpha": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="Invalid gamma value: -1"):
        AGC([{"params": [a]}, {"params": [b], "gamma": -1}], lr=0.1)
    opt = AGC([{"params": [a]}, {"params": [b], "gamma": 0.0}], lr=0.1)
    assert opt.group_coefficient(opt.param_groups[1]) == 0.0
    assert opt.coefficient == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("key", "value"), [("alpha", 0.5), ("tau_init", 0.2), ("estimator", "loss-slope")]
)
def test_a_later_group_with_its_own_tau_setting_is_refused_with_the_whole_message(key, value):
    """alpha, tau_init and the estimator belong to the one optimizer-wide tau: a group added later
    (at construction or by add_param_group) must repeat the first group's, and nothing is added."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    first = {"alpha": 0.3, "tau_init": 0.1, "estimator": "grad-online"}[key]
    message = (
        f"Invalid {key} value: {value} (all param groups must share {key}, got {first} in the "
        "first group; tau is one optimizer-wide estimate)"
    )
    with pytest.raises(ValueError) as err:
        AGC([{"params": [a]}, {"params": [b], key: value}], lr=0.1)
    assert str(err.value) == message
    opt = AGC([a], lr=0.1)
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": [b], key: value})
    assert str(err.value) == message
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    assert len(opt.param_groups) == 1  # the refused groups were not kept
    opt.add_param_group({"params": [b], key: first, "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5


def test_defaults_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AGC([nn.Parameter(torch.zeros(2))], lr=0.1)


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", list_optimizers())
def test_factory_builds_every_optimizer_and_it_trains(name):
    x, y = _data()
    model = _net(bn=False)
    opt = create_optimizer(name, model.parameters(), lr=0.05, weight_decay=1e-4)
    expected = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    assert isinstance(opt, expected.get(name, AGC))
    if name == "agc":
        assert opt.param_groups[0]["coef"] == "adaptive"
    if name == "svrg":
        assert opt.param_groups[0]["coef"] == "fixed"
    before = _ce(model, x, y).item()
    _train(model, opt, x, y, epochs=3, agc_opt=isinstance(opt, AGC))
    assert _ce(model, x, y).item() < before


def test_factory_svrg_ramp_and_agc_estimator():
    p = [nn.Parameter(torch.zeros(2))]
    assert create_optimizer("svrg", p, lr=0.1, coef="ramp").param_groups[0]["coef"] == "ramp"
    opt = create_optimizer("agc", p, lr=0.1, estimator="grad-online", gamma=0.2)
    assert opt.param_groups[0]["estimator"] == "grad-online" and opt.coefficient == pytest.approx(
        0.02
    )
    assert create_optimizer("adam", p, lr=0.1, momentum=0.8).param_groups[0]["betas"] == (
        0.8,
        0.999,
    )


BAD_FACTORY = [
    (dict(name="lion"), r"Invalid name value: 'lion'"),
    (dict(name="sgd", gamma=0.1), r"Invalid keyword value: gamma for optimizer 'sgd'"),
    (dict(name="agc", coef="fixed"), r"Invalid keyword value: coef for optimizer 'agc'"),
    (dict(name="svrg", coef="adaptive"), r"Invalid coef value: 'adaptive'"),
    (dict(name="adam", estimator="grad-online"), r"Invalid keyword value: estimator"),
    (dict(name="agc", lr=-1.0), r"Invalid learning rate: -1.0"),
    (dict(name="agc", alpha=2.0), r"Invalid alpha value: 2.0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_FACTORY)
def test_factory_rejects_bad_input(kwargs, message):
    kw = dict(lr=0.1)
    kw.update(kwargs)
    name = kw.pop("name")
    with pytest.raises(ValueError, match=message):
        create_optimizer(name, [nn.Parameter(torch.zeros(2))], **kw)


# --------------------------------------------------------------------------- masks


def _mask_hooks(opt: torch.optim.Optimizer, masks: dict[nn.Parameter, torch.Tensor]) -> None:
    """What the sparse layer does: zero p.grad and every state tensor shaped like p, pre and post."""

    def apply(optimizer, args, kwargs):
        with torch.no_grad():
            for p, m in masks.items():
                if p.grad is not None:
                    p.grad.copy_(torch.where(m, p.grad, torch.zeros_like(p.grad)))
                for k, v in optimizer.state[p].items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        optimizer.state[p][k] = torch.where(m, v, torch.zeros_like(v))
                p.copy_(torch.where(m, p, torch.zeros_like(p)))

    opt.register_step_pre_hook(apply)
    opt.register_step_post_hook(apply)


@pytest.mark.parametrize("estimator", ["loss-slope", "grad-online"])
def test_masking_hooks_keep_pruned_positions_zero_everywhere(estimator):
    x, y = _data(64)
    model = _net()
    g = torch.Generator().manual_seed(5)
    masks = {
        model[0].weight: torch.rand(model[0].weight.shape, generator=g) > 0.5,
        model[4].weight: torch.rand(model[4].weight.shape, generator=g) > 0.8,
    }
    with torch.no_grad():
        for p, m in masks.items():
            p.mul_(m)
    opt = AGC(model.parameters(), lr=0.1, weight_decay=1e-3, gamma=0.5, estimator=estimator)
    _mask_hooks(opt, masks)
    _train(model, opt, x, y, epochs=3)
    opt.zero_grad()
    _ce(model, x, y).backward()
    opt.snapshot_backward(model, lambda m: _ce(m, x, y))
    opt.step()  # state after a step with a snapshot gradient
    for p, m in masks.items():
        st = opt.state[p]
        for key in ("momentum_buffer", "snapshot", "full_grad", "snap_grad"):
            assert key in st, key
            assert torch.count_nonzero(st[key][~m]) == 0, key
            assert torch.count_nonzero(st[key][m]) > 0, (
                key
            )  # the test can fail: live positions move
        assert torch.count_nonzero(p[~m]) == 0


# --------------------------------------------------------------------------- distributed hook


def test_distributed_true_without_process_group_raises():
    x, y = _data()
    model = _net(bn=False)
    opt = AGC(model.parameters(), lr=0.1)
    message = r"^distributed=True requires an initialized torch\.distributed process group$"
    with pytest.raises(RuntimeError, match=message):
        opt.refresh(model, [(x, y)], _ce, distributed=True)
    opt.refresh(model, [(x, y)], _ce)  # a snapshot, so that the snapshot gradient is computed
    with pytest.raises(RuntimeError, match=message):
        opt.snapshot_backward(model, lambda m: _ce(m, x, y), distributed=True)


def _agc_run(
    estimator: str, *, rank: int = 0, world: int = 1, reduce: bool = True, auto: bool = False
) -> dict:
    """Refresh, four steps with the snapshot gradient, refresh, on three global batches of 16
    examples of which this process holds rows ``[16 / world * rank, 16 / world * (rank + 1))``;
    ``reduce`` (with ``world > 1``): ``distributed=True`` and ``p.grad`` averaged over the ranks
    (as DDP does), else ``distributed=False``; ``auto``: ``distributed=None`` (the optimizer's
    own choice) in place of ``True``. Returns the statistics along the way."""
    import torch.distributed as dist

    x, y = _data(48)
    local = 16 // world
    batches = [
        (x[i + rank * local : i + (rank + 1) * local], y[i + rank * local : i + (rank + 1) * local])
        for i in range(0, 48, 16)
    ]
    reducing = reduce and world > 1
    distributed = None if auto and reducing else reducing
    model = _net(bn=False)  # no BatchNorm: a global batch's loss is the mean of its shards'
    opt = AGC(model.parameters(), lr=0.1, estimator=estimator)
    params = list(model.parameters())
    out: dict = {
        "tau_now_1": opt.refresh(model, batches, _ce, distributed=distributed)["agc_tau_now"]
    }
    out["mu_1"] = [opt.state[p]["full_grad"].clone() for p in params]
    out["snap_grad"] = []
    for xb, yb in [*batches, batches[0]]:
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        if reducing:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.snapshot_backward(
            model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb), distributed=distributed
        )
        out["snap_grad"].append([opt.state[p]["snap_grad"].clone() for p in params])
        opt.step()
    tel = opt.refresh(model, batches, _ce, distributed=distributed)
    out["tau_now_2"], out["tau"] = tel["agc_tau_now"], tel["agc_tau"]
    out["mu_2"] = [opt.state[p]["full_grad"].clone() for p in params]
    out["weights"] = [p.detach().clone() for p in params]
    return out


def _two_rank_agc_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        res = {e: _agc_run(e, rank=rank, world=2) for e in ("loss-slope", "grad-online")}
        # in the same world: distributed=False (each rank its own half), distributed=None
        res["own"] = _agc_run("loss-slope", rank=rank, world=2, reduce=False)
        res["auto"] = _agc_run("loss-slope", rank=rank, world=2, auto=True)
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_agc(tmp_path_factory) -> list[dict]:
    """:func:`_agc_run` on each of two gloo processes (file:// rendezvous), each holding one half
    of every batch: one spawn (about 5 s) for both estimators."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    tmp = tmp_path_factory.mktemp("agc-two-ranks")
    mp.spawn(_two_rank_agc_worker, args=(str(tmp / "store"), str(tmp / "res")), nprocs=2)
    return [torch.load(tmp / f"res.{rank}", weights_only=True) for rank in (0, 1)]


def test_in_a_world_of_two_distributed_false_keeps_to_the_rank_and_none_reduces(two_rank_agc):
    """``distributed=False`` with a process group initialised: each rank's refresh, snapshot
    gradients and weights are those of its own half alone; ``distributed=None`` (the default)
    reduces as ``True`` does, so every rank gets one process's statistics on the whole batches."""
    ref = _agc_run("loss-slope")
    for rank, res in enumerate(two_rank_agc):
        own = _agc_run("loss-slope", rank=rank, world=2, reduce=False)
        for key in ("mu_1", "mu_2", "weights"):
            _close(res["own"][key], own[key], f"own {key}")
            _close(res["auto"][key], ref[key], f"auto {key}")
        for g, h in zip(res["own"]["snap_grad"], own["snap_grad"], strict=True):
            _close(g, h, "own snap_grad")
        for g, h in zip(res["auto"]["snap_grad"], ref["snap_grad"], strict=True):
            _close(g, h, "auto snap_grad")
        assert res["own"]["tau"] == pytest.approx(own["tau"], rel=1e-4)
        assert res["auto"]["tau"] == pytest.approx(ref["tau"], rel=1e-4)


def _close(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for i, (s, t) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-7, msg=f"{what}[{i}]")


@pytest.mark.parametrize("estimator", ["loss-slope", "grad-online"])
def test_distributed_reductions_over_two_processes_match_one_process(two_rank_agc, estimator):
    """Two ranks holding different halves of every batch: ``refresh(distributed=True)`` gives the
    mu and tau_now of one process on the whole batches, ``snapshot_backward(distributed=True)``
    its g_B(ws), and the ranks stay identical to each other, bit for bit."""
    ref = _agc_run(estimator)
    ranks = [r[estimator] for r in two_rank_agc]
    # the reductions are not identities: one rank's own half gives another mu and g_B(ws)
    own = _agc_run(estimator, rank=0, world=2, reduce=False)
    assert not torch.allclose(own["mu_1"][0], ref["mu_1"][0], rtol=1e-3)
    assert not torch.allclose(own["snap_grad"][1][0], ref["snap_grad"][1][0], rtol=1e-3)
    assert math.isfinite(ref["tau_now_2"]) and own["tau_now_2"] != pytest.approx(ref["tau_now_2"])
    for res in ranks:
        assert math.isnan(res["tau_now_1"]) and math.isnan(ref["tau_now_1"])  # no snapshot yet
        _close(res["mu_1"], ref["mu_1"], "mu_1")
        for step, (g, h) in enumerate(zip(res["snap_grad"], ref["snap_grad"], strict=True)):
            _close(g, h, f"snap_grad step {step}")
        assert res["tau_now_2"] == pytest.approx(ref["tau_now_2"], rel=1e-4)
        assert res["tau"] == pytest.approx(ref["tau"], rel=1e-4)
        _close(res["mu_2"], ref["mu_2"], "mu_2")
        _close(res["weights"], ref["weights"], "weights")
    r0, r1 = ranks
    for key in ("mu_1", "mu_2", "weights"):
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key])), key
    assert r0["tau_now_2"] == r1["tau_now_2"]
