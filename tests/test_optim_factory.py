"""The optimizer factory builds exactly the optimizer and hyperparameters it documents.

Every name's class (exact type, not a subclass), every default, every accepted keyword passed
through to the param group, and every refused keyword and bad value with its message.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust_agc.optim import AGC, create_optimizer, list_optimizers

CLASSES = {
    "sgd": torch.optim.SGD,
    "agc": AGC,
    "svrg": AGC,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# Keywords each optimizer accepts, with a value other than its default.
ACCEPTED = {
    "sgd": {"dampening": 0.0, "foreach": False, "maximize": True},
    "agc": {
        "dampening": 0.0,
        "gamma": 0.3,
        "alpha": 0.4,
        "tau_init": 0.2,
        "estimator": "loss-slope",
        "foreach": False,
        "maximize": True,
    },
    "svrg": {
        "dampening": 0.0,
        "gamma": 0.3,
        "alpha": 0.4,
        "tau_init": 0.2,
        "coef": "ramp",
        "fixed_coef": 0.5,
        "foreach": False,
        "maximize": True,
    },
    "adam": {"betas": (0.5, 0.9), "eps": 1e-6, "amsgrad": True, "foreach": False, "maximize": True},
    "adamw": {
        "betas": (0.5, 0.9),
        "eps": 1e-6,
        "amsgrad": True,
        "foreach": False,
        "maximize": True,
    },
}
ALL_KEYS = sorted(set().union(*ACCEPTED.values()) | {"coef", "fixed_coef"})


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3))]


def test_list_optimizers_names_every_optimizer_sorted():
    assert list_optimizers() == ["adam", "adamw", "agc", "sgd", "svrg"]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_name_builds_its_class_with_the_documented_defaults(name):
    group = (opt := create_optimizer(name, _params(), lr=0.05)).param_groups[0]
    assert type(opt) is CLASSES[name]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.0
    if name in ("adam", "adamw"):
        assert group["betas"] == (0.9, 0.999)  # beta1 = the default momentum
    else:
        assert group["momentum"] == 0.9 and group["nesterov"] is True
    if name == "agc":
        assert group["coef"] == "adaptive" and group["estimator"] == "grad-online"
    if name == "svrg":
        assert group["coef"] == "fixed" and group["fixed_coef"] == 0.1


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_common_arguments_reach_the_param_group(name):
    kw = dict(lr=0.2, momentum=0.7, weight_decay=1e-3)
    if name not in ("adam", "adamw"):
        kw["nesterov"] = False
    group = create_optimizer(name, _params(), **kw).param_groups[0]
    assert group["lr"] == 0.2 and group["weight_decay"] == 1e-3
    if name in ("adam", "adamw"):
        assert group["betas"] == (0.7, 0.999)
    else:
        assert group["momentum"] == 0.7 and group["nesterov"] is False


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_accepted_keyword_is_passed_through(name):
    group = create_optimizer(name, _params(), lr=0.1, **ACCEPTED[name]).param_groups[0]
    for key, value in ACCEPTED[name].items():
        assert group[key] == value, key


@pytest.mark.parametrize(
    "name, key",
    [(n, k) for n in sorted(CLASSES) for k in ALL_KEYS if k not in ACCEPTED[n]],
)
def test_every_other_keyword_is_refused_with_the_accepted_list(name, key):
    accepted = ", ".join(sorted(ACCEPTED[name]))
    with pytest.raises(ValueError) as err:
        create_optimizer(name, _params(), lr=0.1, **{key: 0.1})
    assert str(err.value) == (
        f"Invalid keyword value: {key} for optimizer {name!r} (accepted: {accepted})"
    )


def test_several_unknown_keywords_are_listed_sorted():
    with pytest.raises(ValueError, match=r"Invalid keyword value: gamma, tau_init for optimizer"):
        create_optimizer("sgd", _params(), lr=0.1, tau_init=0.1, gamma=0.1)


def test_names_are_case_insensitive():
    assert type(create_optimizer("AdamW", _params(), lr=0.1)) is torch.optim.AdamW
    assert create_optimizer("SVRG", _params(), lr=0.1).param_groups[0]["coef"] == "fixed"


@pytest.mark.parametrize("name", ["lion", "", 3, None])
def test_unknown_names_are_refused_with_the_list(name):
    with pytest.raises(ValueError) as err:
        create_optimizer(name, _params(), lr=0.1)  # type: ignore[arg-type]
    assert str(err.value) == (
        f"Invalid name value: {name!r} (available: adam, adamw, agc, sgd, svrg)"
    )


@pytest.mark.parametrize("lr", [-1.0, -1e-12, math.nan, math.inf, "0.1", None])
def test_bad_learning_rates_are_refused(lr):
    with pytest.raises(ValueError, match=r"^Invalid learning rate: "):
        create_optimizer("sgd", _params(), lr=lr)  # type: ignore[arg-type]


def test_zero_and_integer_learning_rates_are_accepted():
    assert create_optimizer("agc", _params(), lr=0).param_groups[0]["lr"] == 0
    assert create_optimizer("sgd", _params(), lr=1).param_groups[0]["lr"] == 1


@pytest.mark.parametrize("coef", ["adaptive", "linear"])
def test_svrg_takes_only_fixed_or_ramp(coef):
    with pytest.raises(ValueError) as err:
        create_optimizer("svrg", _params(), lr=0.1, coef=coef)
    assert str(err.value) == f"Invalid coef value: {coef!r} (svrg takes 'fixed' or 'ramp')"


# --------------------------------------------------------------------------- the registry


def test_the_factory_module_is_a_shim_of_the_registry():
    from robust_agc.optim import factory, registry

    assert factory.create_optimizer is registry.create_optimizer is create_optimizer
    assert factory.list_optimizers is registry.list_optimizers is list_optimizers
    assert list_optimizers() == ["adam", "adamw", "agc", "sgd", "svrg"]


def test_a_registered_optimizer_is_built_by_name_with_only_its_keywords(monkeypatch):
    from robust_agc.optim import registry
    from robust_agc.optim.registry import register_optimizer

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    @register_optimizer("rmsprop", keywords=("alpha",), from_config=lambda cfg: {"alpha": 0.5})
    def build(params, *, lr, momentum, nesterov, weight_decay, **kwargs):
        seen.update(nesterov=nesterov)
        return torch.optim.RMSprop(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs
        )

    assert "rmsprop" in list_optimizers()
    opt = create_optimizer("RMSprop", _params(), lr=0.1, momentum=0.5, alpha=0.9)
    assert type(opt) is torch.optim.RMSprop and seen == {"nesterov": True}
    assert opt.param_groups[0]["alpha"] == 0.9 and opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match=r"Invalid keyword value: eps for optimizer 'rmsprop'"):
        create_optimizer("rmsprop", _params(), lr=0.1, eps=1e-3)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("rmsprop")(build)
    with pytest.raises(ValueError, match="lower case"):
        register_optimizer("RMSprop")
    from robust_agc.config import TrainConfig

    cfg = TrainConfig(optimizer="sgd")
    object.__setattr__(cfg, "optimizer", "rmsprop")
    assert registry.optimizer_kwargs(cfg)["alpha"] == 0.5


def _trainer_kwargs(cfg) -> dict:
    """What robust_agc.train built before the registry did (its _build_optimizer at 5030c62)."""
    extra: dict = {}
    if cfg.optimizer == "agc":
        extra = dict(
            gamma=cfg.agc_gamma,
            alpha=cfg.agc_alpha,
            tau_init=cfg.agc_tau_init,
            estimator=cfg.agc_estimator,
        )
    elif cfg.optimizer == "svrg":
        extra = dict(
            coef="ramp" if cfg.svrg_schedule == "ramp" else "fixed", fixed_coef=cfg.svrg_coef
        )
    return dict(
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        **extra,
    )


@pytest.mark.parametrize(
    "fields",
    [
        dict(optimizer="sgd", lr=0.2, momentum=0.8, nesterov=False, weight_decay=1e-3),
        dict(optimizer="agc", agc_gamma=0.3, agc_alpha=0.5, agc_tau_init=0.2),
        dict(optimizer="agc", agc_estimator="loss-slope"),
        dict(optimizer="svrg", svrg_coef=0.4),
        dict(optimizer="svrg", svrg_schedule="ramp"),
    ],
)
def test_optimizer_kwargs_from_a_config_are_what_the_trainer_passed(fields):
    from robust_agc.config import TrainConfig
    from robust_agc.optim import optimizer_kwargs

    cfg = TrainConfig(**fields)
    kwargs = optimizer_kwargs(cfg)
    assert kwargs == _trainer_kwargs(cfg)
    opt = create_optimizer(cfg.optimizer, _params(), **kwargs)
    assert type(opt) is CLASSES[cfg.optimizer]


def test_optimizer_kwargs_refuses_an_unknown_name():
    from types import SimpleNamespace

    from robust_agc.optim import optimizer_kwargs

    with pytest.raises(ValueError, match=r"Invalid name value: 'lion' \(available: adam, "):
        optimizer_kwargs(SimpleNamespace(optimizer="lion"))
