"""Tests of robust_agc.utils.speed: counted FLOPs and interleaved inference timing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_agc.utils.speed import count_flops, inference_times, time_inference


def test_count_flops_of_known_layers_and_mode_restored() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    model.train()
    # conv: 4x4 outputs x 4 filters x (2*3*3) multiply-adds; linear: 64*5; 2 FLOPs each
    assert count_flops(model, (2, 4, 4)) == 2.0 * (16 * 4 * 18 + 64 * 5)
    assert model.training


def test_inference_times_interleave_warm_up_and_median() -> None:
    calls: list[str] = []

    class Tag(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.name)
            return x

    times = inference_times([Tag("a"), Tag("b")], torch.zeros(4, 1), repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5 and [len(t) for t in times] == [3, 3]
    ips = time_inference([Tag("a")], torch.zeros(8, 1), repeats=3)
    assert len(ips) == 1 and ips[0] > 0
    with pytest.raises(ValueError):
        inference_times([Tag("a")], torch.zeros(1, 1), repeats=0)
