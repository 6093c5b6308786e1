"""Shared helpers of the sparse-training tests (tiny local models, a tensor-state optimizer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv(1->4, 3x3) + BN + Linear(144->16) + BN1d + Linear(16->3) on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(144, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.bn1(self.fc1(h))))


class TensorStateSGD(torch.optim.Optimizer):
    """A dummy optimizer with AGC-like tensor state that deliberately writes every position.

    State per parameter: ``momentum_buffer``, ``snapshot`` (both shaped like ``p``), ``norms``
    (a differently shaped tensor that masking must leave alone) and ``count`` (a scalar tensor).
    """

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - test double
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                    st["snapshot"] = torch.zeros_like(p)
                    st["norms"] = torch.zeros(p.shape[0] + 1)
                    st["count"] = torch.zeros(())
                # Leaks on purpose: a constant added everywhere, pruned positions included.
                st["momentum_buffer"].mul_(0.9).add_(p.grad).add_(0.01)
                st["snapshot"].copy_(p).add_(1.0)
                st["norms"].add_(1.0)
                st["count"].add_(1.0)
                p.add_(st["momentum_buffer"], alpha=-group["lr"])
        return None


def make_data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 1x8x8 inputs and 3-class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_steps(model, opt, sched, x, y, steps: int, batch: int = 16) -> list:
    """Run ``steps`` natural training steps cycling over (x, y); returns the scheduler summaries."""
    out = []
    n = x.shape[0]
    for t in range(steps):
        i = (t * batch) % n
        loss = nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            out.append(sched.step())
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP oversubscription on the shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
