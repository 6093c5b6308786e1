"""The pass counting behind an evaluation record's ``passes`` and ``number_forward_passes``
(``robust_agc.eval.passes``), unit by unit: the end-to-end figures are checked in
``tests/test_eval.py`` and against pyautoattack in ``tests/test_autoattack_parity.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_agc.eval.passes import PassCounter, add_passes, predict_measuring_passes

from .test_eval import AveragingWrapper  # k passes of an inner network, looped or stacked


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_the_counter_adds_a_batch_forward_and_one_backward_per_gradient_that_flows_back():
    model = _net()
    counter = PassCounter(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        model(x)
    assert counter.take() == [5, 0]
    assert counter.take() == [0, 0]  # take() resets
    out = model(x)
    out.sum().backward()
    assert counter.take() == [5, 5]
    out = model(x[:2])
    for k in range(3):  # FAB's per-class Jacobian rows: one backward pass each
        torch.autograd.grad(out[:, k].sum(), list(model.parameters()), retain_graph=True)
    assert counter.take() == [2, 6]
    counter.remove()
    model(x).sum().backward()
    assert counter.take() == [0, 0]  # removed: nothing counted any more


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


def test_a_scalar_output_counts_one_example_and_a_tuple_output_is_not_counted():
    scalar = _Scalar()
    counter = PassCounter(scalar)
    scalar(torch.ones(7)).backward()
    assert counter.take() == [1, 1]
    pair = _Pair()
    counter = PassCounter(pair)
    pair(torch.randn(5, 4))
    assert counter.take() == [0, 0]


class _Twice(nn.Module):
    """One pass that uses one layer twice, and an extra pass on half the batch."""

    def __init__(self, half: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b(self.a(self.a(x)))
        if self.half:
            n = len(x) // 2
            out = out + torch.cat([self.b(self.a(x[:n])), torch.zeros(len(x) - n, 3)])
        return out


@pytest.mark.parametrize(("make", "expected"), [
    (_net, 1),
    (lambda: AveragingWrapper(_net(), 3, stacked=False), 3),
    (lambda: AveragingWrapper(_net(), 3, stacked=True), 3),
    (lambda: _Twice(half=False), 1),
    (lambda: _Twice(half=True), 1.5),
    (lambda: nn.Sequential(nn.Flatten(), nn.ReLU()), 1),
])  # fmt: skip
def test_predict_measuring_passes_gives_the_whole_network_passes_per_example(make, expected):
    model = make()
    x = torch.randn(8, 4)
    out, passes = predict_measuring_passes(model, x)
    assert passes == expected and type(passes) is type(expected)
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    counter = PassCounter(model)  # the measuring hooks are gone: only this one counts
    with torch.no_grad():
        model(x)
    assert counter.take()[0] == 8


def test_predict_measuring_passes_rounds_a_fraction_to_three_places_and_drops_its_hooks_on_error():
    class Third(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.lin(x), self.lin(x[:1])])[: len(x)]

    _, passes = predict_measuring_passes(Third(), torch.randn(3, 4))
    assert passes == 1.333
    broken = _net()
    with pytest.raises(RuntimeError):
        predict_measuring_passes(broken, torch.randn(2, 5))  # wrong width: the forward fails
    assert all(not m._forward_pre_hooks for m in broken.modules())


def test_a_module_fed_a_scalar_first_input_is_not_counted():
    class ScaledBy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(3.0))

        def forward(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.w * s * x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale, self.lin = ScaledBy(), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.scale(torch.tensor(2.0), x))

    _, passes = predict_measuring_passes(Net(), torch.randn(6, 4))
    assert passes == 1  # ScaledBy saw a 0-dim first input: only the Linear's 6 count


def test_add_passes_sums_pairs_element_wise():
    assert add_passes() == [0, 0]
    assert add_passes([3, 1]) == [3, 1]
    assert add_passes([3, 1], (2, 5), [0, 4]) == [5, 10]


def test_a_one_dimensional_output_counts_its_length():
    class Scores(nn.Module):  # one score per example
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)[:, 0]

    model = Scores()
    counter = PassCounter(model)
    model(torch.randn(5, 4))
    assert counter.take() == [5, 0]


def test_passes_are_measured_on_modules_fed_indices_or_only_keywords():
    class Net(nn.Module):
        """An embedding fed a 1-D batch of indices once, a linear layer called three times (the
        last by keyword only, which no hook can count): the embedding's count, the fewest, says
        the network runs once per example."""

        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 4)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            h = self.emb(idx)
            return self.lin(input=self.lin(self.lin(h)))

    out, passes = predict_measuring_passes(Net(), torch.tensor([1, 2, 3]))
    assert out.shape == (3, 4) and passes == 1
