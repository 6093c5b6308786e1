"""Model registry: architectures built by name, taking inputs in [0, 1] and normalizing inside.

>>> from robust_agc.models import create_model, list_models
>>> model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
"""

from __future__ import annotations

from . import cnn as _cnn  # noqa: F401  (registers the architectures)
from . import resnet as _resnet  # noqa: F401
from . import vgg as _vgg  # noqa: F401
from .layers import Normalize
from .registry import INITS, create_model, list_models, model_from_config, register_model

__all__ = [
    "INITS",
    "create_model",
    "list_models",
    "model_from_config",
    "register_model",
    "Normalize",
]
