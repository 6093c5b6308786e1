"""The gradient-variance probe: known answers, no side effects, and the trainer's probe leaves the
training trajectory unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.config import TrainConfig
from robust_agc.optim import create_optimizer
from robust_agc.probe import gradient_variance
from robust_agc.train import TIMING_FIELDS, train


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()


def _batches(k: int = 5, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(k)
    ]


def _loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def _manual_grads(model: nn.Module, batches) -> list[list[torch.Tensor]]:
    out = []
    for x, y in batches:
        m = copy.deepcopy(model)  # a reference with plain backward (buffers on a copy)
        m.zero_grad()
        _loss(m, x, y).backward()
        out.append([p.grad.clone() for p in m.parameters()])
    return out


def _variance(rows: list[list[torch.Tensor]]) -> float:
    means = [torch.stack(col).mean(0) for col in zip(*rows)]
    return sum(float(sum(((t - m) ** 2).sum() for t, m in zip(r, means))) for r in rows) / len(rows)


def test_plain_variance_matches_a_reference() -> None:
    model, batches = _net().train(), _batches()
    stats = gradient_variance(model, _loss, batches)
    ref = _variance(_manual_grads(model, batches))
    assert stats["var_plain"] == pytest.approx(ref, rel=1e-10)
    assert "var_corrected" not in stats  # no optimizer: plain only
    assert stats["n_batches"] == 5.0


def test_corrected_variance_matches_the_formula_and_has_no_side_effects() -> None:
    model, batches = _net().train(), _batches()
    opt = create_optimizer("svrg", model.parameters(), lr=0.1, fixed_coef=0.4)
    before_refresh = gradient_variance(model, _loss, batches, optimizer=opt)
    assert "var_corrected" not in before_refresh  # no snapshot yet
    opt.refresh(model, batches, _loss)
    snap = copy.deepcopy(model)
    # take two steps so that w != ws
    for x, y in batches[:2]:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.snapshot_backward(model, lambda m, x=x, y=y: _loss(m, x, y))
        opt.step()
    grads_before = [p.grad.clone() for p in model.parameters()]
    buffers_before = [b.clone() for b in model.buffers()]
    state_before = copy.deepcopy(opt.state_dict())
    stats = gradient_variance(model, _loss, batches, optimizer=opt)

    mus = [opt.full_gradient_of(p) for p in model.parameters()]
    g = _manual_grads(model, batches)
    s = _manual_grads(snap, batches)
    v = [[gi + 0.4 * (mu - si) for gi, si, mu in zip(gb, sb, mus)] for gb, sb in zip(g, s)]
    assert stats["var_plain"] == pytest.approx(_variance(g), rel=1e-10)
    assert stats["var_corrected"] == pytest.approx(_variance(v), rel=1e-10)
    assert stats["ratio"] == pytest.approx(_variance(v) / _variance(g), rel=1e-10)
    assert stats["coef"] == 0.4
    # nothing changed: gradients, BatchNorm statistics, optimizer state
    assert all(torch.equal(a, p.grad) for a, p in zip(grads_before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers_before, model.buffers()))
    after = opt.state_dict()
    for k, st in state_before["state"].items():
        for name, t in st.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, after["state"][k][name]), name


def test_full_correction_at_the_snapshot_has_zero_variance() -> None:
    """Right after a refresh w == ws, so with c = 1 every corrected gradient equals mu."""
    model, batches = _net().train(), _batches()
    opt = create_optimizer("svrg", model.parameters(), lr=0.1, fixed_coef=1.0)
    opt.refresh(model, batches, _loss)
    stats = gradient_variance(model, _loss, batches, optimizer=opt)
    assert stats["var_plain"] > 1e-4
    assert stats["var_corrected"] == pytest.approx(0.0, abs=1e-20)
    assert stats["mean_dist"] == pytest.approx(0.0, abs=1e-10)


def test_masks_restrict_to_active_positions() -> None:
    model, batches = _net().train(), _batches()
    w = model[0].weight
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:, :2] = True
    stats = gradient_variance(model, _loss, batches, masks={id(w): mask})
    rows = _manual_grads(model, batches)
    for r in rows:
        r[0] = r[0] * mask
    assert stats["var_plain"] == pytest.approx(_variance(rows), rel=1e-10)


def test_needs_two_batches() -> None:
    with pytest.raises(ValueError, match="at least 2 probe batches"):
        gradient_variance(_net(), _loss, _batches(k=1))


@pytest.mark.parametrize("optimizer", ["sgd", "agc"])
def test_trainer_probe_leaves_the_trajectory_unchanged(tmp_path, optimizer: str) -> None:
    common = dict(
        train_subset=192,
        val_size=32,
        batch_size=32,
        epochs=2,
        attack_steps=2,
        eval_subset=16,
        eval_steps=2,
        sparse_method="rigl",
        sparsity=0.9,
        update_interval=2,
        optimizer=optimizer,
        threads=1,
        progress=False,
        lr=0.05,
    )
    train(TrainConfig(out=str(tmp_path / "plain"), **common))
    train(
        TrainConfig(out=str(tmp_path / "probe"), probe_variance_every=3, probe_batches=3, **common)
    )
    timing = {*TIMING_FIELDS, "grad_var"}

    def rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    plain, probed = rows("plain"), rows("probe")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in probed]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in plain]
    probes = [p for r in probed for p in r["grad_var"]]
    assert [p["step"] for p in probes] == [3, 6, 9, 12]  # 6 steps per epoch
    assert all(p["var_plain"] > 0 for p in probes)
    if optimizer == "agc":  # the first refresh is at the start of epoch 1: all corrected
        assert all(p["var_corrected"] > 0 and p["coef"] > 0 for p in probes)
    else:
        assert all("var_corrected" not in p for p in probes)


def test_trainer_rejects_a_probe_larger_than_the_training_set(tmp_path) -> None:
    from robust_agc.errors import UserError
    from robust_agc.train import Trainer

    cfg = TrainConfig(
        train_subset=64, val_size=0, batch_size=32, probe_variance_every=1, probe_batches=3
    )
    with pytest.raises(UserError, match="Invalid probe_batches value: 3 batches of 32"):
        Trainer(cfg)


def test_the_probe_lives_with_the_optimizer_and_the_old_path_still_works() -> None:
    import robust_agc.optim
    import robust_agc.optim.probe
    import robust_agc.probe

    assert robust_agc.probe.gradient_variance is robust_agc.optim.probe.gradient_variance
    assert robust_agc.optim.gradient_variance is gradient_variance


def test_an_optimizer_without_the_corrected_interface_gives_the_plain_variance_only() -> None:
    model, batches = _net().train(), _batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:  # a momentum buffer in the state: still no correction
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    stats = gradient_variance(model, _loss, batches, optimizer=opt)
    assert "var_corrected" not in stats and stats["var_plain"] > 0


def test_a_parameter_the_loss_does_not_use_counts_as_a_zero_gradient() -> None:
    """A parameter outside the loss's graph (an unused head) has gradient zero on every batch: the
    probe reports the variance of the used ones, as if the unused one were absent."""

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _net()
            self.unused = nn.Linear(3, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = WithUnused()
    batches = _batches()
    stats = gradient_variance(model, _loss, batches)
    ref = gradient_variance(model.body, _loss, batches)
    assert stats["var_plain"] == pytest.approx(ref["var_plain"], rel=1e-12)
    assert stats["mean_sq_plain"] == pytest.approx(ref["mean_sq_plain"], rel=1e-12)
