"""Model registry: shapes, finite outputs, gradients reach every parameter, [0, 1] inputs."""

from __future__ import annotations

import pytest
import torch

from robust_agc.errors import UserError
from robust_agc.models import create_model, list_models

SHAPES = [(1, 28), (3, 32)]


def test_registry_lists_the_required_architectures():
    assert {"small-cnn", "mnist-cnn", "preact-resnet18", "vgg16", "wrn-28-4"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels,size", SHAPES)
def test_forward_backward(name, channels, size):
    torch.manual_seed(0)
    # PyTorch's init: with the default He init the head is zero and hidden layers get no gradient
    # on the very first step (by design, see test_he_init_scale)
    model = create_model(name, num_classes=7, in_channels=channels, input_size=size, init="default")
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} receives no gradient"


def test_normalization_lives_inside_the_model():
    a = create_model("small-cnn", in_channels=1, input_size=28, mean=(0.5,), std=(0.25,))
    b = create_model("small-cnn", in_channels=1, input_size=28)
    b.load_state_dict(
        {k: v for k, v in a.state_dict().items() if not k.startswith("normalize.")}, strict=False
    )
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(a(x), b((x - 0.5) / 0.25))
    assert "normalize.mean" in a.state_dict()


def test_he_init_scale():
    torch.manual_seed(0)
    m = create_model("mnist-cnn", in_channels=1, input_size=28)
    w = m.classifier[1].weight  # fc-1024 with fan-in 3136
    assert abs(w.std().item() - (2 / w.shape[1]) ** 0.5) < 0.05 * (2 / w.shape[1]) ** 0.5
    assert m.classifier[1].bias.abs().sum() == 0
    # the head starts at zero: the initial loss is exactly log(C) (see layers.init_weights)
    assert m.classifier[-1].weight.abs().sum() == 0
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(m(x), y)
    assert abs(loss.item() - torch.log(torch.tensor(10.0)).item()) < 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet-9000"}, "Invalid model value"),
        ({"name": "small-cnn", "num_classes": 1}, "Invalid num_classes value"),
        ({"name": "small-cnn", "in_channels": 0}, "Invalid in_channels value"),
        ({"name": "small-cnn", "input_size": 4}, "Invalid input_size value"),
        ({"name": "small-cnn", "init": "xavier"}, "Invalid init value"),
        ({"name": "small-cnn", "in_channels": 3, "mean": (0.5,)}, "mean/std need 3 values"),
    ],
)
def test_bad_arguments(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(UserError, match=message):
        create_model(name, **kwargs)
