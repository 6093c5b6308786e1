"""input_activity: which units still carry information about the input (robust_agc.sparse.activity)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.sparse import apply_masks, fold_masks, input_activity


def _mlp() -> nn.Sequential:
    """2 -> 3 -> 2. Hidden unit 0 reads the input; unit 1 is its bias alone (+1, constant);
    unit 2 is dead (bias -1, no weights); the head reads units 0 and 1."""
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        m[0].bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
        m[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, 2.0, 0.0]]))
        m[2].bias.zero_()
    return m


def test_counts_of_a_hand_built_network():
    x = torch.rand(50, 2) + 0.1  # unit 0 = x[:, 0] > 0 varies
    rep = input_activity(_mlp(), x, batch_size=7)
    assert [(a.name, a.units, a.nonzero, a.varying) for a in rep.layers] == [
        ("0", 2, 2, 2),
        ("2", 3, 2, 1),  # unit 1 nonzero but constant, unit 2 dead
    ]
    assert rep.logit_std > 0 and rep.n_points == 50
    # the head stops reading the one informative unit: constant logits, same hidden counts
    m = _mlp()
    with torch.no_grad():
        m[2].weight[:, 0] = 0.0
    rep = input_activity(m, x)
    assert rep.logit_std == 0.0
    assert [(a.nonzero, a.varying) for a in rep.layers] == [(2, 2), (2, 1)]
    assert "| 2 | 3 | 2 | 1 |" in rep.to_markdown()


class _Functional(nn.Module):
    """A conv net whose activations are F.relu calls (no nn.ReLU module to hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.tensor([1.0, 0.5, 1.0, 0.0]).view(4, 1, 1, 1).expand(4, 1, 3, 3)
            )
            # channel 2: bias -100, always 0; channel 3: bias 0, no weights, always 0
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -100.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_conv_channels_through_functional_relu_and_flatten():
    torch.manual_seed(0)
    m = _Functional()
    x = torch.rand(32, 1, 4, 4) + 0.01
    rep = input_activity(m, x)
    conv, fc = rep.layers
    assert (conv.name, conv.units, conv.nonzero, conv.varying) == ("conv", 1, 1, 1)
    # channels 2 (bias -100) and 3 (nothing) are zero at all 16 positions of each point
    assert (fc.name, fc.units, fc.nonzero, fc.varying) == ("fc", 64, 32, 32)


def test_mode_is_restored_and_a_masked_model_reads_its_masks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).train()
    x = torch.rand(20, 8)
    dense = input_activity(m, x)
    apply_masks(m, sparsity=0.5, distribution="uniform", generator=0)
    attached = input_activity(m, x)
    assert m.training
    # the masked network is measured (half its weights gone: other logits), the same as folded
    assert attached.logit_std != dense.logit_std
    assert input_activity(fold_masks(m), x) == attached


@pytest.mark.parametrize(
    ("x", "kw", "match"),
    [
        (torch.rand(1, 2), {}, "at least 2"),
        (torch.rand(4, 2), {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(x, kw, match):
    with pytest.raises(ValueError, match=match):
        input_activity(_mlp(), x, **kw)
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        input_activity(nn.Sequential(nn.ReLU()), torch.rand(4, 2))
