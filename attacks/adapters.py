"""Interoperability with torchattacks, in both directions.

Both libraries' attacks are callables ``attack(x, y) -> x_adv`` bound to a model at construction,
so they can already stand in for each other in plain code. The adapters add what the other side
relies on: :class:`TorchattacksAdapter` gives a torchattacks attack this package's mode handling,
seeding, projection and ``cost_per_example``; :func:`as_torchattacks` gives one of ours the
``torchattacks.Attack`` base (for ``torchattacks.MultiAttack``, ``.save()``, ``isinstance``).
torchattacks is imported only when :func:`as_torchattacks` is called.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from .base import Attack
from .validation import check_int

__all__ = [
    "TORCHATTACKS_PREFIX",
    "TorchattacksAdapter",
    "as_torchattacks",
    "check_torchattacks_name",
    "torchattacks_attack",
]

#: ``"torchattacks:NAME"`` names torchattacks' class ``NAME`` where an attack name is expected.
TORCHATTACKS_PREFIX = "torchattacks:"

# the settings a trainer passes by name: a class is usable when its other arguments have defaults
_SETTINGS = ("eps", "alpha", "steps")


class TorchattacksAdapter(Attack):
    """Wrap a torchattacks attack (e.g. ``torchattacks.PGD``, ``torchattacks.TPGD``) as an
    :class:`~attacks.base.Attack`.

    The wrapped attack's ``forward`` runs inside this package's mode handling (``bn_mode``; the
    torchattacks mode switch is bypassed so that ``bn_mode="train"`` is honoured), and its result is
    projected onto the eps-ball (the wrapped attack's ``eps``, when it has one) and [0, 1].

    Args:
        ta_attack: a torchattacks attack (any object with ``.model`` and ``.forward(x, y)``).
        bn_mode: ``"eval"`` or ``"train"``. (Default: "eval")
        seed: ``None`` (torchattacks draws from the global RNG) or an int: each call then runs with
            the global RNG forked and seeded from the adapter's own generator, leaving the global
            state untouched. (Default: None)
        eps: the budget to project onto. (Default: ``None`` = the wrapped attack's ``eps``
            attribute, or no eps-ball when it has none)
        norm: ``"Linf"`` or ``"L2"``. (Default: ``None`` = ``"L2"`` if the class name contains
            "L2", else ``"Linf"``)
        cost_per_example: override the cost. (Default: ``None`` = ``steps * n_restarts`` from the
            wrapped attack's attributes, each 1 when absent)

    Examples::
        >>> import torchattacks
        >>> attack = TorchattacksAdapter(torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=10))
        >>> x_adv = attack(x, y)
    """

    def __init__(
        self,
        ta_attack: Any,
        *,
        bn_mode: str = "eval",
        seed: int | None = None,
        eps: float | None = None,
        norm: str | None = None,
        cost_per_example: int | None = None,
    ) -> None:
        model = getattr(ta_attack, "model", None)
        if not callable(getattr(ta_attack, "forward", None)) or not isinstance(
            model, torch.nn.Module
        ):
            raise TypeError(
                f"Invalid ta_attack value: expected a torchattacks attack, got "
                f"{type(ta_attack).__name__}"
            )
        if eps is None:
            ta_eps = getattr(ta_attack, "eps", None)
            eps = ta_eps if isinstance(ta_eps, numbers.Real) else None
        if norm is None:
            norm = "L2" if "L2" in type(ta_attack).__name__ else "Linf"
        super().__init__(model, eps=eps, norm=norm, bn_mode=bn_mode, seed=seed)
        self.attack = ta_attack
        if cost_per_example is None:
            steps = getattr(ta_attack, "steps", 1)
            restarts = getattr(ta_attack, "n_restarts", 1)
            steps = steps if isinstance(steps, numbers.Integral) else 1
            restarts = restarts if isinstance(restarts, numbers.Integral) else 1
            cost_per_example = max(1, int(steps)) * max(1, int(restarts))
        self._cost = check_int("cost_per_example", cost_per_example, minimum=1)

    @property
    def cost_per_example(self) -> int:
        """From the wrapped attack's ``steps`` (and ``n_restarts``), or the override."""
        return self._cost

    # A budget or step size set on the adapter after construction (a trainer's radius warm-up)
    # reaches the wrapped attack too, when it has that attribute; at construction the wrapped
    # attack keeps its own (``eps`` may then only override the projection).
    @property
    def eps(self) -> float | None:
        """The budget projected onto; setting it also sets the wrapped attack's ``eps``."""
        return self._eps

    @eps.setter
    def eps(self, value: float | None) -> None:
        self._eps = value
        wrapped = getattr(self, "attack", None)
        if wrapped is not None and value is not None and hasattr(wrapped, "eps"):
            wrapped.eps = value

    @property
    def alpha(self) -> float | None:
        """The wrapped attack's step size (``None`` when it has none); settable."""
        return getattr(self.attack, "alpha", None)

    @alpha.setter
    def alpha(self, value: float) -> None:
        if hasattr(self.attack, "alpha"):
            self.attack.alpha = value

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        g = self._get_generator()
        if g is None:
            out = self.attack.forward(x, y)
        else:
            seed = int(torch.randint(2**62, (1,), generator=g).item())
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.attack.forward(x, y)
        if isinstance(out, tuple):  # a few torchattacks attacks also return their targets
            out = out[0]
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise RuntimeError(
                f"{type(self.attack).__name__}.forward returned "
                f"{type(out).__name__ if not isinstance(out, Tensor) else tuple(out.shape)}, "
                f"expected a tensor of shape {tuple(x.shape)}"
            )
        return out

    def _repr_fields(self) -> dict[str, Any]:
        return {"attack": repr(self.attack), **super()._repr_fields()}


def as_torchattacks(attack: Attack) -> Any:
    """Present one of this package's attacks as a ``torchattacks.Attack``.

    The result passes ``isinstance(..., torchattacks.Attack)`` and works in torchattacks
    containers (``MultiAttack``) and helpers (``save``); torchattacks' own mode switch runs
    first (model to eval), then ours applies ``bn_mode`` and restores. The threat-model
    attributes (``eps``, ``alpha``, ``steps``) are copied for code that reads them.

    Raises:
        ImportError: torchattacks is not installed.
        TypeError: ``attack`` is not an :class:`~attacks.base.Attack`.
    """
    if not isinstance(attack, Attack):
        raise TypeError(f"Invalid attack value: expected an attacks.Attack, got {type(attack)}")
    import torchattacks

    class _Wrapped(torchattacks.attack.Attack):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(type(attack).__name__, attack.model)
            self.eps = attack.eps
            for name in ("alpha", "steps"):
                if hasattr(attack, name):
                    setattr(self, name, getattr(attack, name))
            self.wrapped = attack

        def forward(self, images: Tensor, labels: Tensor) -> Tensor:
            return attack(images, labels)

    return _Wrapped()


def _torchattacks_class(name: str) -> tuple[type, list[str]]:
    """torchattacks' attack class ``name`` and which of ``eps``/``alpha``/``steps`` it takes."""
    import inspect

    import torchattacks

    cls = getattr(torchattacks, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchattacks.attack.Attack)):
        raise ValueError(
            f"Invalid attack value: {TORCHATTACKS_PREFIX}{name} (no such attack in torchattacks)"
        )
    params = list(inspect.signature(cls).parameters.values())
    if not params or params[0].name != "model":
        raise ValueError(
            f"Invalid attack value: {TORCHATTACKS_PREFIX}{name} (not built from a model)"
        )
    missing = [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in _SETTINGS
    ]
    if missing:
        raise ValueError(
            f"Invalid attack value: {TORCHATTACKS_PREFIX}{name} (needs {', '.join(missing)}, "
            "which only eps, alpha and steps can be given here)"
        )
    return cls, [p.name for p in params if p.name in _SETTINGS]


def torchattacks_attack(
    name: str,
    model: torch.nn.Module,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int | None = None,
    bn_mode: str = "eval",
    seed: int | None = None,
) -> TorchattacksAdapter:
    """Build torchattacks' ``name`` (``"PGD"`` or ``"torchattacks:PGD"``) on ``model`` with the
    given ``eps``, ``alpha`` and ``steps`` (each passed only when the class takes it), wrapped in
    a :class:`TorchattacksAdapter`.

    Raises:
        ValueError: no such attack class, or one with a required argument other than these.
    """
    name = name.removeprefix(TORCHATTACKS_PREFIX)
    cls, takes = _torchattacks_class(name)
    given = {"eps": eps, "alpha": alpha, "steps": steps}
    kwargs = {k: given[k] for k in takes if given[k] is not None}
    return TorchattacksAdapter(cls(model, **kwargs), bn_mode=bn_mode, seed=seed)


def check_torchattacks_name(name: str) -> None:
    """Raise :class:`ValueError` unless ``name`` (``"torchattacks:NAME"`` or ``"NAME"``) is an
    attack class that :func:`torchattacks_attack` can build."""
    _torchattacks_class(name.removeprefix(TORCHATTACKS_PREFIX))
