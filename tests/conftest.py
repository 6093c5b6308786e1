"""Shared fixtures: a small slice of real Fashion-MNIST and a briefly trained small CNN."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from robust_agc.data import load_dataset
from robust_agc.models import create_model

# Under pytest-xdist (`make test` runs 2 workers) each worker gets one thread, else up to 2.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `slow` tests unless RUN_SLOW=1 or the marker was selected with -m."""
    if os.environ.get("RUN_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with `make test-slow` (RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
    if os.environ.get("MUTANT_UNDER_TEST"):
        _fastest_first(config, items)


# Setup cost of the session fixtures, which mutmut's per-test durations (the call phase) leave out.
_FIXTURE_SECONDS = {"trained_cnn": 3.0, "fmnist_tiny": 0.5}


def _fastest_first(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (tests/mutation.py), run a mutant's tests cheapest first.

    mutmut stops at the first failure (`-x`) but hands over a mutant's tests in no particular
    order, so a mutant that the unit tests kill in milliseconds could first wait for a slow
    end-to-end test. The order changes which test fails first, never whether one does.
    """
    stats = Path(config.rootpath) / "mutmut-stats.json"
    if not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})

    def cost(item: pytest.Item) -> float:
        fixtures = getattr(item, "fixturenames", ())
        return seconds.get(item.nodeid, 0.0) + sum(
            s for name, s in _FIXTURE_SECONDS.items() if name in fixtures
        )

    items.sort(key=cost)


@pytest.fixture(scope="session")
def fmnist_tiny() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2,000 training and the first 500 test images of real Fashion-MNIST, floats in [0, 1]."""
    x, y = load_dataset("fashion-mnist", "train")
    xt, yt = load_dataset("fashion-mnist", "test")
    return x[:2000].clone(), y[:2000].clone(), xt[:500].clone(), yt[:500].clone()


@pytest.fixture(scope="session")
def trained_cnn(fmnist_tiny) -> torch.nn.Module:
    """`small-cnn` trained naturally for 3 epochs on the 2,000 images (about 75-80% test accuracy)."""
    x, y, _, _ = fmnist_tiny
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(3):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model
