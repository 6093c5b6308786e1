"""`AGC.step()` end to end on a tiny MLP against a plain float64 re-statement of docs/agc.md.

The reference below recomputes everything from the weights alone: the MLP and its cross-entropy
written out, gradients by autograd on plain tensors, the snapshot and ``mu`` (the mean gradient over
all refresh examples), ``tau_now`` for both estimators, the EMA of ``tau``, the coefficient of each
coefficient mode, the stale-position rule, and the SGD update (L2 weight decay, momentum with
dampening, Nesterov, learning rate, maximize). It never calls the library's kernel. The optimizer
runs with four param groups that differ in every per-group setting, so a coefficient, a
hyperparameter or a rule applied to the wrong group (or to none) moves the trajectory.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.optim import AGC

ALPHA, TAU_INIT = 0.4, 0.3

# Four param groups over the MLP's parameters [W0, b0, W1, b1, W2, b2] (indices): every
# coefficient mode, two adaptive groups with different gamma (so one group's gamma used for
# another shows), and different lr, weight decay, momentum, dampening, Nesterov and maximize.
GROUPS = [
    dict(idx=[0], lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01,
         gamma=0.6, coef="adaptive", fixed_coef=0.1, maximize=False),
    dict(idx=[1, 2], lr=0.05, momentum=0.5, dampening=0.25, nesterov=False, weight_decay=0.0,
         gamma=0.8, coef="ramp", fixed_coef=0.1, maximize=False),
    dict(idx=[3, 4], lr=0.08, momentum=0.7, dampening=0.0, nesterov=True, weight_decay=0.02,
         gamma=0.25, coef="adaptive", fixed_coef=0.3, maximize=False),
    dict(idx=[5], lr=0.2, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.005,
         gamma=0.1, coef="fixed", fixed_coef=0.7, maximize=True),
]  # fmt: skip
PRUNED = (0, 4)  # W0 and W2 get pruned positions that regrow (stale until the next refresh)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


# --------------------------------------------------------------------------- the reference


def _ref_loss(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the MLP tanh(tanh(x W0^T + b0) W1^T + b1) W2^T + b2, written out."""
    h = torch.tanh(torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3])
    z = h @ w[4].T + w[5]
    return (torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1)).mean()


def _ref_grad(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_ref_loss(leaves, x, y), leaves)]


class _Reference:
    """AGC restated plainly in float64 (docs/agc.md, the class docstring of AGC)."""

    def __init__(self, w: list[torch.Tensor], groups: list[dict], estimator: str) -> None:
        self.w = [t.detach().clone() for t in w]
        self.groups = groups
        self.estimator = estimator
        self.buf: list[torch.Tensor | None] = [None] * len(w)
        self.snap: list[torch.Tensor] | None = None
        self.mu: list[torch.Tensor] | None = None
        self.tau, self.tau_now, self.refreshes = TAU_INIT, math.nan, 0
        self.dot, self.sq, self.count = 0.0, 0.0, 0
        # evidence that the test can fail: the largest correction each group received, and the
        # largest |g_snap - mu| at stale positions (where the rule says: no correction)
        self.max_correction = [0.0] * len(groups)
        self.max_stale_diff = 0.0

    def coef(self, group: dict) -> float:
        if group["coef"] == "fixed":
            return group["fixed_coef"]
        if group["coef"] == "ramp":
            return group["gamma"] * (1.0 - (1.0 - ALPHA) ** self.refreshes)
        return group["gamma"] * self.tau

    def step(self, x: torch.Tensor, y: torch.Tensor, *, snapshot: bool) -> list[torch.Tensor]:
        g = _ref_grad(self.w, x, y)
        corrected = snapshot and self.snap is not None
        if corrected:
            assert self.snap is not None and self.mu is not None
            gs = _ref_grad(self.snap, x, y)
            diff = []  # g_snap - mu, zero where the snapshot and mu are both 0 (stale)
            for gsi, s, m in zip(gs, self.snap, self.mu):
                stale = (s == 0) & (m == 0)
                if stale.any():
                    self.max_stale_diff = max(
                        self.max_stale_diff, float((gsi - m)[stale].abs().max())
                    )
                diff.append(torch.where(stale, torch.zeros_like(gsi), gsi - m))
            if self.estimator == "grad-online":
                self.dot += sum(float((gi * d).sum()) for gi, d in zip(g, diff))
                self.sq += sum(float((d * d).sum()) for d in diff)
                self.count += 1
        for k, group in enumerate(self.groups):
            c = self.coef(group)
            for i in group["idx"]:
                v = g[i]
                if corrected:
                    v = g[i] - c * diff[i]  # = g + c * (mu - g_snap)
                    self.max_correction[k] = max(
                        self.max_correction[k], float((c * diff[i]).abs().max())
                    )
                if group["maximize"]:
                    v = -v
                v = v + group["weight_decay"] * self.w[i]
                mom = group["momentum"]
                if mom != 0:
                    if self.buf[i] is None:
                        self.buf[i] = v.clone()
                    else:
                        self.buf[i] = mom * self.buf[i] + (1 - group["dampening"]) * v
                    v = v + mom * self.buf[i] if group["nesterov"] else self.buf[i]
                self.w[i] = self.w[i] - group["lr"] * v
        return g

    def refresh(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        xs = torch.cat([b[0] for b in batches])
        ys = torch.cat([b[1] for b in batches])
        mu = _ref_grad(self.w, xs, ys)  # the mean gradient over every refresh example
        tau_now = math.nan
        if self.estimator == "loss-slope" and self.snap is not None:
            a = np.array([float(_ref_loss(self.w, xb, yb)) for xb, yb in batches])
            b = np.array([float(_ref_loss(self.snap, xb, yb)) for xb, yb in batches])
            tau_now = np.cov(a, b, ddof=1)[0, 1] / np.var(b, ddof=1)
        elif self.estimator == "grad-online" and self.count > 0:
            tau_now = self.dot / self.sq  # ratio of the sums = ratio of the means
        if math.isfinite(tau_now):
            self.tau_now = tau_now
            self.tau = (1 - ALPHA) * self.tau + ALPHA * tau_now
        self.snap = [t.clone() for t in self.w]
        self.mu = mu
        self.refreshes += 1
        self.dot, self.sq, self.count = 0.0, 0.0, 0


# --------------------------------------------------------------------------- the trajectory

# "prune": zero W0 and W2 at their pruned positions before the refresh that follows, and zero every
# state tensor shaped like the weight there right after it (what robust_agc.sparse's hooks do); the
# positions then regrow (nothing keeps them at 0), so until the next refresh they are stale.
SCHEDULE = [
    "step", "step",  # before any refresh: plain SGD
    "prune", "refresh", "step", "step", "step",  # first refresh: tau kept, stale positions
    "refresh", "step", "step",  # second refresh: tau_now, tau updated
    "step-no-snapshot",  # warns, v = g in every group
    "step", "refresh", "step", "step",
]  # fmt: skip


def _library_step(model, opt, xb, yb, *, snapshot: bool, expect_snapshot: bool) -> list:
    opt.zero_grad()
    _ce(model, xb, yb).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    if snapshot:
        loss = opt.snapshot_backward(model, lambda m: _ce(m, xb, yb))
        assert (loss is not None) == expect_snapshot
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g), "snapshot_backward changed p.grad"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a step with its snapshot gradient never warns
            opt.step()
    elif expect_snapshot:
        with pytest.warns(RuntimeWarning, match="snapshot_backward"):
            opt.step()
    else:
        opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g), "step changed p.grad"
    return grads


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("estimator", ["grad-online", "loss-slope"])
def test_step_matches_float64_reference_over_refreshes_and_param_groups(estimator, foreach):
    x, y = _data()
    model = _mlp()
    params = list(model.parameters())
    groups = [
        {k: v for k, v in g.items() if k != "idx"} | {"params": [params[i] for i in g["idx"]]}
        for g in GROUPS
    ]
    opt = AGC(groups, lr=0.1, alpha=ALPHA, tau_init=TAU_INIT, estimator=estimator, foreach=foreach)
    ref = _Reference([p.detach() for p in params], GROUPS, estimator)
    refresh_batches = [(x[:20], y[:20]), (x[20:36], y[20:36]), (x[36:], y[36:])]  # unequal sizes
    gen = torch.Generator().manual_seed(2)
    pruned = {i: torch.rand(params[i].shape, generator=gen) < 0.4 for i in PRUNED}
    assert all(0 < int(m.sum()) < m.numel() for m in pruned.values())
    names = ["W0", "b0", "W1", "b1", "W2", "b2"]
    tau_changes = []

    def check(event: str) -> None:
        for name, p, w in zip(names, params, ref.w):
            torch.testing.assert_close(
                p.detach(), w, rtol=1e-10, atol=1e-12, msg=f"{event}: {name}"
            )

    n_steps = 0
    for t, event in enumerate(SCHEDULE):
        label = f"event {t} ({event})"
        if event == "prune":
            for i, m in pruned.items():
                with torch.no_grad():
                    params[i].masked_fill_(m, 0)
                ref.w[i] = ref.w[i].masked_fill(m, 0)
            continue
        if event == "refresh":
            tau_before = ref.tau
            out = opt.refresh(model, refresh_batches, _ce)
            ref.refresh(refresh_batches)
            if SCHEDULE[t - 1] == "prune":
                for i, m in pruned.items():
                    for v in opt.state[params[i]].values():
                        if isinstance(v, torch.Tensor) and v.shape == m.shape:
                            v.masked_fill_(m, 0)
                    ref.mu[i] = ref.mu[i].masked_fill(m, 0)
                    ref.buf[i] = ref.buf[i].masked_fill(m, 0)
            assert opt.num_refreshes == ref.refreshes
            assert opt.tau == pytest.approx(ref.tau, rel=1e-9, abs=1e-12), label
            if math.isnan(ref.tau_now):
                assert math.isnan(opt.tau_now) and not out["agc_tau_updated"], label
            else:
                assert opt.tau_now == pytest.approx(ref.tau_now, rel=1e-9), label
                assert out["agc_tau_now"] == pytest.approx(ref.tau_now, rel=1e-9), label
                tau_changes.append(abs(ref.tau - tau_before))
            for group, rg in zip(opt.param_groups, GROUPS):
                assert opt.group_coefficient(group) == pytest.approx(ref.coef(rg), rel=1e-9), label
            for i, p in enumerate(params):
                st = opt.state[p]
                msg = f"{label}: {names[i]}"
                torch.testing.assert_close(
                    st["snapshot"], ref.snap[i], rtol=1e-10, atol=1e-12, msg=msg
                )
                torch.testing.assert_close(
                    st["full_grad"], ref.mu[i], rtol=1e-9, atol=1e-12, msg=msg
                )
            check(label)  # the refresh moves no weight
            continue
        xb, yb = x[(8 * n_steps) % 48 :][:8], y[(8 * n_steps) % 48 :][:8]
        n_steps += 1
        snapshot = event == "step"
        grads = _library_step(
            model, opt, xb, yb, snapshot=snapshot, expect_snapshot=opt.has_snapshot
        )
        g_ref = ref.step(xb, yb, snapshot=snapshot)
        for g, gr in zip(grads, g_ref):
            torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
        check(label)

    # The checks above can fail: every group got a correction far above the tolerance, the
    # stale positions had a correction to drop, and tau moved (for both estimators).
    assert min(ref.max_correction) > 1e-3, ref.max_correction
    assert ref.max_stale_diff > 1e-3
    assert len(tau_changes) == 2 and min(tau_changes) > 1e-3, tau_changes


# --------------------------------------------------------------------------- the stale rule


@pytest.mark.parametrize("foreach", [False, True])
def test_stale_positions_get_the_plain_gradient_and_all_others_the_correction(foreach):
    """v = g exactly where the snapshot and mu are both 0; v = g + c (mu - g_snap) everywhere else,
    including where only the snapshot or only mu is 0 (a weight that was 0 at the refresh, a
    gradient that is 0 by chance). lr = 1 and no momentum or decay: the update is -v."""
    x, y = _data()
    model = _mlp()
    w = model[0].weight
    cells = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(3))
    stale, snap_zero, mu_zero = cells == 1, cells == 2, cells == 3
    assert stale.any() and snap_zero.any() and mu_zero.any() and (cells == 0).any()
    opt = AGC(
        model.parameters(),
        lr=1.0,
        momentum=0.0,
        nesterov=False,
        coef="fixed",
        fixed_coef=0.5,
        foreach=foreach,
    )
    with torch.no_grad():
        w.masked_fill_(stale | snap_zero, 0)
    opt.refresh(model, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
    opt.state[w]["full_grad"].masked_fill_(stale | mu_zero, 0)
    snap = [opt.state[p]["snapshot"].clone() for p in model.parameters()]
    mu = [opt.state[p]["full_grad"].clone() for p in model.parameters()]
    with torch.no_grad():  # move away from the snapshot (the stale positions regrow)
        gen = torch.Generator().manual_seed(4)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = x[:8], y[:8]
    opt.zero_grad()
    _ce(model, xb, yb).backward()
    opt.snapshot_backward(model, lambda m: _ce(m, xb, yb))
    opt.step()
    g = _ref_grad(before, xb, yb)
    gs = _ref_grad(snap, xb, yb)
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        v = b - p.detach()
        expected = g[i] + 0.5 * (mu[i] - gs[i])
        if i == 0:
            assert float((mu[i] - gs[i])[stale].abs().min()) > 1e-6  # the rule changes v there
            assert float((mu[i] - gs[i])[snap_zero | mu_zero].abs().min()) > 1e-6
            expected = torch.where(stale, g[i], expected)
        torch.testing.assert_close(v, expected, rtol=1e-10, atol=1e-12, msg=f"param {i}")


def test_first_steps_are_bitwise_sgd_until_the_first_refresh():
    """Before any refresh there is no snapshot: snapshot_backward returns None and the step is
    torch.optim.SGD's, bit for bit, whatever the coefficient; after the refresh it is corrected."""
    x, y = _data()
    m_agc, m_sgd = _mlp(), _mlp()
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt = AGC(m_agc.parameters(), **kw, coef="fixed", fixed_coef=1.0)
    sgd = torch.optim.SGD(m_sgd.parameters(), **kw)
    for k in range(3):
        xb, yb = x[8 * k : 8 * k + 8], y[8 * k : 8 * k + 8]
        if k == 2:
            opt.refresh(m_agc, [(x[:24], y[:24]), (x[24:], y[24:])], _ce)
        for m, o in ((m_agc, opt), (m_sgd, sgd)):
            o.zero_grad()
            _ce(m, xb, yb).backward()
        ret = opt.snapshot_backward(m_agc, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        assert (ret is None) == (k < 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        sgd.step()
        same = [torch.equal(a, b) for a, b in zip(m_agc.parameters(), m_sgd.parameters())]
        assert all(same) if k < 2 else not any(same), (k, same)
