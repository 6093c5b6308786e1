"""benchmarks/scaling.py: its byte counts against a hand count and against AGC's real collectives."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from robust_agc.optim import AGC

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 3), nn.BatchNorm1d(3))


def test_comm_bytes_match_a_hand_count(scaling):
    # Linear(10, 3): 30 + 3 parameters; BatchNorm1d(3): 3 + 3 parameters, buffers running_mean and
    # running_var (3 float32 each) and num_batches_tracked (one int64).
    grad = (30 + 3 + 3 + 3) * 4
    sgd = scaling.comm_bytes(_tiny(), optimizer="sgd")
    assert sgd == {
        "grad_allreduce": grad,
        "grad_allreduce_calls": 1,
        "buffer_broadcast": 3 * 4 + 3 * 4 + 8,
        "snapshot_allreduce": 0,
        "snapshot_allreduce_calls": 0,
        "refresh_allreduce": 0,
        "refresh_gather": 0,
    }
    agc = scaling.comm_bytes(
        _tiny(), optimizer="agc", forwards_per_step=2, refresh_batches_per_rank=5
    )
    assert agc["buffer_broadcast"] == 2 * (3 * 4 + 3 * 4 + 8)
    assert agc["snapshot_allreduce"] == grad and agc["snapshot_allreduce_calls"] == 1
    assert agc["refresh_allreduce"] == grad + 8 + 8  # + example count (f64), step count (i64)
    online = scaling.comm_bytes(_tiny(), optimizer="agc", estimator="grad-online")
    assert online["refresh_allreduce"] == grad + 8 + 8 + 2 * 8  # + the two online sums (f64)
    losses = [0.25 + i for i in range(5)]
    assert agc["refresh_gather"] == len(pickle.dumps((losses, [x + 1 for x in losses])))
    # masks are not broadcast by the trainer's DDP: a masked model sends only its other buffers
    from robust_agc.sparse import apply_masks

    masked = _tiny()
    apply_masks(masked, sparsity=0.5, distribution="uniform", generator=0)
    assert any("weight_mask" in n for n, _ in masked.named_buffers())
    assert scaling.comm_bytes(masked, optimizer="sgd")["buffer_broadcast"] == 3 * 4 + 3 * 4 + 8
    assert scaling.ring_allreduce_per_rank(1000, 2) == 1000
    assert scaling.ring_allreduce_per_rank(1000, 64) == pytest.approx(2 * 63 / 64 * 1000)


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_comm_bytes_are_what_agc_all_reduces(scaling, one_process_group, monkeypatch):
    """Count the bytes AGC really hands to dist.all_reduce (a one-process gloo group)."""
    sent: list[int] = []
    real = dist.all_reduce

    def counting(t, *args, **kwargs):
        sent.append(t.numel() * t.element_size())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    torch.manual_seed(0)
    model = _tiny()
    opt = AGC(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 10), torch.randint(0, 3, (12,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]

    def loss(m, xb, yb):
        return F.cross_entropy(m(xb), yb)

    opt.refresh(model, batches, loss, distributed=True)
    expected = scaling.comm_bytes(model, optimizer="agc", refresh_batches_per_rank=2)
    assert sum(sent) == expected["refresh_allreduce"]
    sent.clear()
    opt.snapshot_backward(model, lambda m: loss(m, *batches[0]), distributed=True)
    assert sum(sent) == expected["snapshot_allreduce"]
    assert len(sent) == expected["snapshot_allreduce_calls"]


def test_help_and_projection_run():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--projection-only" in out.stdout
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--projection-only", "--ranks", "2,8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("preact-resnet18")]
    assert len(rows) == 3  # the per-model row and N = 2, 8
    # AGC's snapshot gradient doubles the per-step all-reduce: AGC/SGD just above 2 per epoch
    assert 2.0 < float(rows[0][-1]) < 2.01
