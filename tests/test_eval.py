"""robust_agc.eval.benchmark: known answers, worst-case accounting, pyautoattack parity, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc import eval as ev
from robust_agc.errors import UserError
from robust_agc.eval import attackers
from robust_agc.eval.autoattack import AutoAttackRunner
from robust_agc.eval.checks import GradientMaskingWarning
from robust_agc.utils import machine_info

from .test_autoattack_parity import (
    _check_parity,
    _harness,
    _reference,
    shrink_harness_autoattack,
    shrunk_budgets,
)

CHEAP = ["apgd-ce", "apgd-t"]  # AutoAttack components for the default (fast) suite


# Small budgets on every pyautoattack.AutoAttack (same loop and objects, 10x cheaper).
_shrink = shrunk_budgets(n_iter=10, n_queries=300, apgd_restarts=1)


@pytest.fixture
def fast_aa(monkeypatch):
    """Shrink the budgets of every AutoAttack the harness builds (fast default suite)."""
    shrink_harness_autoattack(monkeypatch, _shrink)


class ConstantModel(nn.Module):
    """Always predicts class 0 (logits independent of the input)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("logits", torch.linspace(1.0, 0.0, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class MeanIntensityModel(nn.Module):
    """Class k <=> mean intensity near (k + 0.5) / 10: robust for eps well below 0.05."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centers = (torch.arange(10, dtype=x.dtype, device=x.device) + 0.5) / 10
        m = x.flatten(1).mean(1, keepdim=True)
        return -100.0 * (m - centers) ** 2


def _intensity_points(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 10
    x = ((y.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    return x, y


class TinyMLP(nn.Module):
    """784-64-10 MLP: cheap enough for 100-iteration AutoAttack in unit tests."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def mlp(fmnist_tiny) -> nn.Module:
    """TinyMLP trained briefly on the 2,000 real training images (about 75-80% test accuracy)."""
    x, y, _, _ = fmnist_tiny
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def test_mlp_fixture_is_trained(fmnist_tiny, mlp):
    _, _, xt, yt = fmnist_tiny
    with torch.no_grad():
        acc = (mlp(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.7


def _points(fmnist_tiny, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, xt, yt = fmnist_tiny
    return xt[:n], yt[:n]


# ------------------------------------------------------------------------ validation table

BAD_ARGS = [
    ({"eps": None}, ValueError, r"Invalid eps value: None"),
    ({"eps": -0.1}, ValueError, r"Invalid eps value: -0.1"),
    ({"eps": float("nan")}, ValueError, r"Invalid eps value: nan"),
    ({"threat_model": "L3"}, ValueError, r"Invalid threat_model value: 'L3'"),
    ({"n_examples": 0}, ValueError, r"Invalid n_examples value: 0"),
    ({"n_examples": 10_000}, ValueError, r"Invalid n_examples value: 10000"),
    ({"batch_size": 0}, ValueError, r"Invalid batch_size value: 0"),
    ({"seed": -1}, ValueError, r"Invalid seed value: -1"),
    ({"pgd_steps": 0}, ValueError, r"Invalid pgd_steps value: 0"),
    ({"pgd_restarts": 0}, ValueError, r"Invalid pgd_restarts value: 0"),
    ({"pgd_step_size": 0.0}, ValueError, r"Invalid pgd_step_size value: 0.0"),
    ({"attacks": ("clean", "cw")}, ValueError, r"Invalid attacks value: 'cw'"),
    ({"attacks": ()}, ValueError, r"Invalid attacks value"),
    ({"attacks": ("pgd", "pgd")}, ValueError, r"Invalid attacks value: .*duplicates"),
    ({"version": "strong"}, ValueError, r"Invalid version value: 'strong'"),
    ({"version": "custom"}, ValueError, r"Invalid version value: 'custom'"),
    ({"version": ["apgd-ce", "pgd"]}, ValueError, r"Invalid version value: 'pgd'"),
    ({"dataset": "fashion-mnist"}, ValueError, r"Invalid dataset value: give either"),
    ({"x": None}, ValueError, r"Invalid x value: give a dataset name"),
    ({"y": torch.zeros(3, dtype=torch.long)}, ValueError, r"Invalid y value"),
    ({"y": torch.zeros(4)}, ValueError, r"Invalid y value: expected integer labels"),
    ({"x": torch.full((4, 1, 28, 28), 255.0)}, ValueError, r"Invalid x value: inputs must lie"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_bad_arguments(kwargs, error, match):
    x, y = _intensity_points(4)
    base = {"x": x, "y": y, "eps": 0.01, "attacks": ("clean",), "progress": False}
    base.update(kwargs)
    with pytest.raises(error, match=match):
        ev.benchmark(MeanIntensityModel(), **base)


def test_eps_is_required():
    x, y = _intensity_points(4)
    with pytest.raises(TypeError, match="eps"):
        ev.benchmark(MeanIntensityModel(), x=x, y=y)  # type: ignore[call-arg]


def test_suspicious_eps_warns():
    x, y = _intensity_points(4)
    with pytest.warns(UserWarning, match="eps/255"):
        ev.benchmark(MeanIntensityModel(), x=x, y=y, eps=8.0, attacks="clean", progress=False)


def test_warnings_point_at_the_caller():
    """The eps warning and the gradient-masking warnings are attributed to benchmark's caller."""
    x, y = _intensity_points(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev.benchmark(ConstantModel(), x=x, y=y, eps=8.0, attacks="clean", progress=False)
    eps_warnings = [w for w in caught if "eps/255" in str(w.message)]
    masking = [w for w in caught if issubclass(w.category, GradientMaskingWarning)]
    assert eps_warnings and masking  # ConstantModel has zero input gradients
    assert {w.filename for w in eps_warnings + masking} == {__file__}


def test_make_plan_is_the_validation_of_benchmark():
    plan = ev.make_plan(eps=0.1, attacks="pgd,autoattack", version=["apgd-ce", "apgd-t"])
    assert isinstance(plan, ev.EvalPlan)
    assert plan.stages == ("clean", "pgd", "autoattack") and plan.aa_version == "custom"
    assert plan.units == ("clean", "pgd", "autoattack/apgd-ce", "autoattack/apgd-t")
    assert plan.aa_units == ("autoattack/apgd-ce", "autoattack/apgd-t")
    assert plan.pgd_step == pytest.approx(2.5 * 0.1 / 50)
    assert ev.make_plan(eps=0.1, pgd_step_size=0.01).pgd_step == 0.01
    assert (
        ev.make_plan(eps=0.1, version="standard").components == ev.AUTOATTACK_VERSIONS["standard"]
    )
    with pytest.raises(ValueError, match="Invalid batch_size value"):
        ev.make_plan(eps=0.1, batch_size=0)
    with pytest.raises(ValueError, match="Invalid eps value"):
        ev.make_plan(eps=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.eps = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(("value", "expected"), [("linf", "Linf"), ("L2", "L2"), ("l2", "L2")])
def test_threat_model_accepts_strings(value, expected):
    assert ev.ThreatModel.parse(value) is ev.ThreatModel(expected)


# ------------------------------------------------------------------------ known answers


def test_constant_model_known_answer(fmnist_tiny, fast_aa):
    x, y = _points(fmnist_tiny, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        res = ev.benchmark(ConstantModel(), x=x, y=y, eps=0.1, version=CHEAP, progress=False)
    expected = (y == 0).float().mean().item()
    assert 0 < expected < 1
    assert res.clean_acc == pytest.approx(expected)
    assert res.robust_acc == pytest.approx(expected)
    assert res.robust_flags.tolist() == (y == 0).tolist()
    assert res.robust_acc_repredicted == pytest.approx(expected)
    # an input-independent model has no input gradient: the check must say so
    assert res.flags["zero_gradients"] is True


def test_trivially_robust_model_standard_version(fast_aa):
    x, y = _intensity_points(5)
    res = ev.benchmark(MeanIntensityModel(), x=x, y=y, eps=0.01, version="standard", progress=False)
    assert res.clean_acc == 1.0
    assert res.robust_acc == 1.0
    assert list(res.component_acc) == [
        "clean",
        "autoattack/apgd-ce",
        "autoattack/apgd-t",
        "autoattack/fab-t",
        "autoattack/square",
    ]
    assert all(v == 1.0 for v in res.component_acc.values())
    assert not any(res.flags.values()), res.flag_details
    # the same model is easily broken at a radius larger than half the class spacing
    res2 = ev.benchmark(MeanIntensityModel(), x=x, y=y, eps=0.2, version=CHEAP, progress=False)
    assert res2.robust_acc == 0.0 and res2.clean_acc == 1.0


# ------------------------------------------------------------------------ worst case


def test_per_point_worst_case_and_clean_starts(fmnist_tiny, mlp, monkeypatch, fast_aa):
    x, y = _points(fmnist_tiny, 24)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    real_call = AutoAttackRunner.__call__

    def spy(self, name, xb, yb):
        seen.append((name, xb.clone(), yb.clone()))
        return real_call(self, name, xb, yb)

    monkeypatch.setattr(AutoAttackRunner, "__call__", spy)
    res = ev.benchmark(
        mlp,
        x=x,
        y=y,
        eps=0.02,
        attacks="clean,pgd,autoattack",
        version=CHEAP,
        pgd_steps=5,
        pgd_restarts=2,
        batch_size=8,
        progress=False,
    )
    with torch.no_grad():
        clean_ok = mlp(x).argmax(1) == y
    after_pgd = [i for i in range(len(y)) if clean_ok[i] and res.broken_by[i] != "pgd"]
    # AutoAttack only saw points robust after PGD, in order, from their clean images
    apgd_ce = [s for s in seen if s[0] == "apgd-ce"]
    xs = torch.cat([s[1] for s in apgd_ce]) if apgd_ce else torch.empty(0)
    assert res.n_attacked["autoattack/apgd-ce"] == len(after_pgd)
    if after_pgd:
        assert torch.equal(xs, x[after_pgd])
    # broken points are never attacked again, and the accounting is monotone
    assert res.n_attacked["pgd"] == int(clean_ok.sum())
    accs = list(res.component_acc.values())
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    for i, b in enumerate(res.broken_by):
        assert (b is None) == bool(res.robust_flags[i])
        if not clean_ok[i]:
            assert b == "clean"
    assert res.stage_acc["pgd"] >= res.stage_acc["autoattack"] == res.robust_acc
    assert res.n_broken["pgd"] > 0  # the test exercises a real hand-over between stages
    assert not res.flags["count_disagreement"]


# ------------------------------------------------------------------------ pyautoattack parity


def test_trained_network_parity_per_component(fmnist_tiny, mlp, fast_aa):
    """On a trained network and real images too, in chunks of 5: every chunk's returned images,
    which component broke each point, and per component the points attacked and the model passes
    spent, as in pyautoattack's own run_standard_evaluation (same budgets). Every component of
    every version, each one breaking points only it can: tests/test_autoattack_parity.py."""
    x, y = _points(fmnist_tiny, 12)
    ref = _reference(mlp, x, y, CHEAP, batch_size=5, budgets=_shrink, eps=0.02)
    run = _harness(mlp, x, y, CHEAP, batch_size=5, eps=0.02)
    _check_parity(run, ref, CHEAP, len(y))
    res = run[0]
    assert 0 < res.robust_acc < res.clean_acc  # some points broken, some robust: a real check
    assert res.n_attacked["autoattack/apgd-t"] > 0


# ------------------------------------------------------------------------ flags


class ProbabilityModel(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.base(x), dim=1)


class QuantizedInputModel(nn.Module):
    """Shattered gradients: the input is quantized to 5 levels (the input gradient is exactly 0)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * 4) / 4)


class NoisyModel(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + 3.0 * out.std() * torch.randn_like(out)


class FiveClassModel(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)[:, :5]


def test_flags_quiet_on_normal_model(fmnist_tiny, mlp, fast_aa):
    x, y = _points(fmnist_tiny, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        res = ev.benchmark(mlp, x=x, y=y, eps=0.02, version=CHEAP, progress=False)
    assert set(res.flags) >= {
        "nondeterministic_logits",
        "probability_output",
        "zero_gradients",
        "too_few_classes",
        "count_disagreement",
    }
    assert not any(res.flags.values()), res.flag_details


@pytest.mark.parametrize(
    ("wrapper", "flag"),
    [
        (ProbabilityModel, "probability_output"),
        (QuantizedInputModel, "zero_gradients"),
        (NoisyModel, "nondeterministic_logits"),
        (FiveClassModel, "too_few_classes"),
    ],
)
def test_flags_fire_on_masking_models(fmnist_tiny, mlp, wrapper, flag, fast_aa):
    x, y = _points(fmnist_tiny, 12)
    if wrapper is FiveClassModel:
        keep = y < 5
        x, y = x[keep], y[keep]
    torch.manual_seed(0)
    with pytest.warns(GradientMaskingWarning, match=flag):
        res = ev.benchmark(wrapper(mlp), x=x, y=y, eps=0.02, version=["apgd-ce"], progress=False)
    assert res.flags[flag] is True
    assert flag in res.to_dict()["flag_details"]


def test_too_few_classes_adapts_targets(fmnist_tiny, mlp, fast_aa):
    x, y = _points(fmnist_tiny, 20)
    keep = y < 5
    with pytest.warns(GradientMaskingWarning, match="too_few_classes"):
        res = ev.benchmark(
            FiveClassModel(mlp),
            x=x[keep],
            y=y[keep],
            eps=0.02,
            version=CHEAP,
            progress=False,
        )
    assert res.attack_config["autoattack"]["apgd_t"]["n_target_classes"] == 4
    assert res.flag_details["too_few_classes"]["used"] == 4


def test_square_beats_gradient_flag_on_masked_model(fmnist_tiny, mlp, fast_aa):
    x, y = _points(fmnist_tiny, 12)
    torch.manual_seed(0)
    with pytest.warns(GradientMaskingWarning):
        res = ev.benchmark(
            QuantizedInputModel(mlp),
            x=x,
            y=y,
            eps=0.1,
            attacks="clean,pgd,square",
            pgd_steps=5,
            pgd_restarts=1,
            progress=False,
        )
    assert res.n_broken["square"] > 0
    assert res.flags["square_beats_gradient"] is True
    assert res.flags["zero_gradients"] is True
    # the normal model at the same radius: PGD does the work, Square finds nothing left
    res_n = ev.benchmark(
        mlp,
        x=x,
        y=y,
        eps=0.1,
        attacks="clean,pgd,square",
        pgd_steps=20,
        pgd_restarts=1,
        progress=False,
    )
    assert res_n.flags["square_beats_gradient"] is False


def test_pgd_steps_flag_fires_when_more_steps_do_worse(fmnist_tiny, mlp, monkeypatch):
    x, y = _points(fmnist_tiny, 16)

    class FakePGD:
        """Breaks every point with few steps, none with many: robust accuracy rises with steps."""

        def __init__(self, model, *, steps, **kw):
            self.steps = steps

        def __call__(self, xb, yb):
            if self.steps < 50:
                return torch.zeros_like(xb)
            return xb

    monkeypatch.setattr(attackers, "make_pgd", lambda model, **kw: FakePGD(model, **kw))
    with pytest.warns(GradientMaskingWarning, match="pgd_steps_nonmonotone"):
        res = ev.benchmark(mlp, x=x, y=y, eps=0.05, attacks="clean,pgd", progress=False)
    assert res.flags["pgd_steps_nonmonotone"] is True
    assert res.flag_details["pgd_steps_nonmonotone"]["steps"] == [10, 50]


def test_count_disagreement_fires_on_random_model(fmnist_tiny, mlp, fast_aa):
    x, y = _points(fmnist_tiny, 30)
    torch.manual_seed(0)
    with pytest.warns(GradientMaskingWarning):
        res = ev.benchmark(NoisyModel(mlp), x=x, y=y, eps=0.02, version=["apgd-ce"], progress=False)
    assert res.flags["count_disagreement"] is True
    assert res.robust_acc_repredicted != res.robust_acc


# ------------------------------------------------------------------------ mode, RNG, record


class ModeRecorder(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.base(x)


def test_eval_mode_inside_and_modes_restored(fmnist_tiny, mlp, fast_aa):
    x, y = _points(fmnist_tiny, 8)
    m = ModeRecorder(mlp)
    m.train()
    mlp.eval()  # mixed modes must come back exactly
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    ev.benchmark(m, x=x, y=y, eps=0.02, version=["apgd-ce"], progress=False)
    after = torch.rand(3)
    assert m.modes and not any(m.modes)
    assert m.training is True and mlp.training is False
    assert torch.equal(before, after)  # the caller's RNG stream is untouched


class GradRecorder(nn.Module):
    """Records whether its parameters required grad at each call."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.frozen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.frozen.append(not any(p.requires_grad for p in self.parameters()))
        return self.base(x)


def test_parameters_frozen_inside_and_restored_without_grads(fmnist_tiny, mlp, fast_aa):
    """Input gradients only: FAB's backward() leaves no .grad on the caller's weights."""
    x, y = _points(fmnist_tiny, 8)
    m = GradRecorder(mlp)
    params = list(m.parameters())
    for p in params:
        p.grad = None  # (the fixture's training left gradients)
    params[0].requires_grad_(False)  # a mix of flags must come back exactly
    try:
        res = ev.benchmark(m, x=x, y=y, eps=0.02, version=["fab", "fab-t"], progress=False)
        assert m.frozen and all(m.frozen)
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
        assert all(p.grad is None for p in params)
        assert res.passes["autoattack/fab"]["backward"] > 0  # FAB did backpropagate
    finally:
        params[0].requires_grad_(True)


def test_json_record(fmnist_tiny, mlp, tmp_path, fast_aa):
    x, y = _points(fmnist_tiny, 10)
    res = ev.benchmark(
        mlp,
        x=x,
        y=y,
        eps=0.02,
        version=CHEAP,
        progress=False,
        model_info={"sparsity": 0.9, "optimizer": "agc"},
        architecture="small-cnn",
    )
    d = json.loads(json.dumps(res.to_dict()))
    for key in (
        "clean_acc",
        "autoattack_acc",
        "robust_acc",
        "eps",
        "threat_model",
        "dataset",
        "architecture",
        "n_examples",
        "additional_data",
        "number_forward_passes",
        "stages",
        "per_point_robust",
        "flags",
        "seed",
        "timings",
        "passes",
        "world_size",
        "attack_config",
        "versions",
        "model_info",
    ):
        assert key in d, key
    assert d["additional_data"] is False
    assert d["number_forward_passes"] == 1 and d["world_size"] == 1
    # provenance: what decides the CPU kernels (robust_agc.utils.machine_info)
    assert d["machine"] == json.loads(json.dumps(machine_info(world_size=1)))
    assert set(d["machine"]) == {"cpu", "cpu_capability", "cpu_flags", "threads", "world_size"}
    assert d["autoattack_acc"] == d["robust_acc"] == res.robust_acc
    assert d["n_examples"] == 10 and len(d["per_point_robust"]) == 10
    assert sum(d["per_point_robust"]) / 10 == pytest.approx(d["robust_acc"])
    assert [s["name"] for s in d["stages"]] == ["clean", "autoattack"]
    assert [c["name"] for c in d["stages"][1]["components"]] == [
        "autoattack/apgd-ce",
        "autoattack/apgd-t",
    ]
    # the record holds the attack objects' actual settings (shrunk by the fast_aa fixture)
    assert d["attack_config"]["autoattack"]["apgd"]["n_iter"] == 10
    assert d["attack_config"]["autoattack"]["apgd_t"]["n_target_classes"] == 9
    assert set(d["versions"]) >= {"robust_agc", "torch", "pyautoattack"}
    assert d["model_info"] == {"sparsity": 0.9, "optimizer": "agc"}
    assert all(isinstance(v, bool) for v in d["flags"].values())
    out = tmp_path / "r.json"
    res.save(out)
    with pytest.raises(UserError, match="exists"):
        res.save(out)
    res.save(out, overwrite=True)
    # no AutoAttack field when AutoAttack did not run
    res_c = ev.benchmark(mlp, x=x, y=y, eps=0.02, attacks="clean", progress=False)
    assert "autoattack_acc" not in res_c.to_dict()
    assert res_c.robust_acc == res_c.clean_acc


class AveragingWrapper(nn.Module):
    """Averages ``k`` passes of an inner network, looping or stacking the copies into one batch."""

    def __init__(self, inner: nn.Module, k: int, stacked: bool) -> None:
        super().__init__()
        self.inner, self.k, self.stacked = inner, k, stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            copies = x.repeat(self.k, *([1] * (x.dim() - 1)))
            return self.inner(copies).view(self.k, x.shape[0], -1).mean(0)
        return torch.stack([self.inner(x) for _ in range(self.k)]).mean(0)


class TwiceUsedLayer(nn.Module):
    """A plain network that applies one of its layers twice in a single pass."""

    def __init__(self, inner: TinyMLP) -> None:
        super().__init__()
        self.inner, self.square = inner, nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(self.square(self.inner(x)))


@pytest.mark.parametrize(
    ("wrap", "expected"),
    [
        (lambda m: m, 1),
        (lambda m: TwiceUsedLayer(m), 1),
        (lambda m: AveragingWrapper(m, 3, stacked=False), 3),
        (lambda m: AveragingWrapper(m, 2, stacked=True), 2),
    ],
)
def test_number_forward_passes_is_measured(fmnist_tiny, mlp, wrap, expected):
    """RobustBench's number_forward_passes: network passes per prediction, measured (not a constant)."""
    x, y = _points(fmnist_tiny, 6)
    res = ev.benchmark(wrap(mlp), x=x, y=y, eps=0.02, attacks="clean", progress=False, batch_size=4)
    assert res.number_forward_passes == expected
    assert res.to_dict()["number_forward_passes"] == expected


def test_passes_counted_per_unit():
    """Forward and backward passes in single examples, per unit, from a hook on the model."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)

    class Constant(ConstantModel):  # class 0 everywhere; a zero input gradient of full size
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(x.shape[0], -1) + 0.0 * (x * x).flatten(1).sum(1, True)

    res = ev.benchmark(
        Constant(),  # every point correct and never broken
        x=x,
        y=y,
        eps=0.05,
        attacks="clean,pgd",
        pgd_steps=3,
        pgd_restarts=1,
        batch_size=3,
        run_checks=False,
        progress=False,
    )
    assert res.passes["clean"] == {"forward": 8, "backward": 0}
    # 3 steps of forward+backward per point, then the forward that judges the chunk's images
    assert res.passes["pgd"] == {"forward": 8 * 4, "backward": 8 * 3}
    assert res.passes["recount"] == {"forward": 8, "backward": 0}
    assert res.passes["checks"] == {"forward": 0, "backward": 0}
    assert res.passes["total"] == {"forward": 8 + 32 + 8, "backward": 24}
    assert res.to_dict()["passes"] == res.passes


def test_passes_of_autoattack_components_add_up(fmnist_tiny, mlp, fast_aa):
    x, y = _points(fmnist_tiny, 10)
    res = ev.benchmark(mlp, x=x, y=y, eps=0.02, version=CHEAP, progress=False)
    comps = [res.passes[f"autoattack/{c}"] for c in CHEAP]
    assert all(c["backward"] > 0 for c in comps)
    for kind in ("forward", "backward"):
        assert res.passes["autoattack"][kind] == sum(c[kind] for c in comps)
        parts = [v[kind] for k, v in res.passes.items() if k not in ("autoattack", "total")]
        assert res.passes["total"][kind] == sum(parts)
    assert res.passes["checks"]["backward"] > 0  # the zero-gradient check


def test_standard_autoattack_configuration():
    """pyautoattack's standard settings, as recorded (nothing is run)."""
    runner = AutoAttackRunner(
        MeanIntensityModel(),
        version="standard",
        components=ev.AUTOATTACK_VERSIONS["standard"],
        threat=ev.ThreatModel.Linf,
        eps=0.1,
        seed=0,
        device=torch.device("cpu"),
        n_targets=9,
    )
    cfg = runner.config()
    # the record's attack_config, key for key: pyautoattack's standard settings
    aa = runner.aa
    assert cfg == {
        "implementation": "pyautoattack",
        "version": "standard",
        "components": ["apgd-ce", "apgd-t", "fab-t", "square"],
        "apgd": {"n_iter": 100, "n_restarts": 1, "eot_iter": 1, "rho": aa.apgd.thr_decr},
        "apgd_t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9},
        "fab": {"n_iter": aa.fab.n_iter, "n_restarts": aa.fab.n_restarts, "n_target_classes": 9},
        "square": {"n_queries": 5000, "p_init": 0.8},
    }
    assert aa.apgd.thr_decr == 0.75 and (aa.fab.n_iter, aa.fab.n_restarts) == (100, 1)
    assert runner.aa.epsilon == 0.1 and runner.aa.seed == 0 and runner.aa.norm == "Linf"
    assert runner.aa.device == torch.device("cpu") and runner.aa.apgd.device == torch.device("cpu")
    # pyautoattack's log lines go under our logger hierarchy
    ours = logging.getLogger("robust_agc.eval.autoattack")
    assert runner.aa.logger is ours and runner.aa.apgd.logger is ours
    assert runner.aa.apgd_targeted.logger is ours
    x, y = torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="Invalid attack value: 'apgd'"):
        runner("apgd", x, y)  # a component name pyautoattack does not dispatch
    l2 = AutoAttackRunner(
        MeanIntensityModel(), version="standard", components=ev.AUTOATTACK_VERSIONS["standard"],
        threat=ev.ThreatModel.L2, eps=0.5, seed=0, device=torch.device("cpu"), n_targets=9,
    )  # fmt: skip
    assert l2.aa.norm == "L2" and l2.aa.apgd.norm == "L2"


def test_an_autoattack_without_a_component_object_is_refused(monkeypatch):
    """A pyautoattack whose AutoAttack lacks one of the component attacks the runner dispatches
    to is refused by name (an unsupported version), not left to fail in the middle of a run."""
    import pyautoattack

    class Partial:
        def __init__(self, model, **kw):
            self.apgd = self.apgd_targeted = self.square = object()

    monkeypatch.setattr(pyautoattack, "AutoAttack", Partial)
    with pytest.raises(RuntimeError, match="no attribute 'fab': this pyautoattack version is not"):
        AutoAttackRunner(
            MeanIntensityModel(), version="standard", components=("apgd-ce",),
            threat=ev.ThreatModel.Linf, eps=0.1, seed=0, device=torch.device("cpu"), n_targets=9,
        )  # fmt: skip


def test_custom_autoattack_configuration():
    """A custom component list and an L2 threat reach pyautoattack as given (nothing is run)."""
    runner = AutoAttackRunner(
        MeanIntensityModel(),
        version="custom",
        components=("apgd-ce", "square"),
        threat=ev.ThreatModel.L2,
        eps=0.5,
        seed=3,
        device=torch.device("cpu"),
        n_targets=None,
    )
    aa = runner.aa
    assert aa.version == "custom" and aa.attacks_to_run == ["apgd-ce", "square"]
    assert aa.norm == "L2" and aa.apgd.norm == "L2" and aa.square.norm == "L2"
    assert aa.epsilon == 0.5 and aa.seed == 3 and aa.device == torch.device("cpu")
    assert aa.apgd.device == torch.device("cpu")


def test_dataset_by_name_uses_first_points(fmnist_tiny, mlp):
    _, _, xt, yt = fmnist_tiny
    res = ev.benchmark(
        mlp,
        dataset="fashion-mnist",
        n_examples=50,
        eps=0.1,
        attacks="clean",
        progress=False,
    )
    with torch.no_grad():
        expected = (mlp(xt[:50]).argmax(1) == yt[:50]).float().mean().item()
    assert res.clean_acc == pytest.approx(expected)
    assert res.dataset == "fashion-mnist" and res.n_examples == 50


# ------------------------------------------------------------------------ state file


class Interrupt(Exception):
    pass


def _interrupting(monkeypatch, at_name: str, at_call: int):
    """Make the AutoAttack runner raise on its ``at_call``-th call of component ``at_name``."""
    real_call = AutoAttackRunner.__call__
    calls: list[str] = []

    def spy(self, name, xb, yb):
        calls.append(name)
        if name == at_name and calls.count(name) == at_call:
            raise Interrupt
        return real_call(self, name, xb, yb)

    monkeypatch.setattr(AutoAttackRunner, "__call__", spy)
    return calls


@pytest.mark.parametrize(("at_name", "at_call"), [("apgd-t", 1), ("apgd-ce", 2)])
def test_state_file_resume(fmnist_tiny, mlp, tmp_path, monkeypatch, at_name, at_call, fast_aa):
    """Stopped before a known chunk, the file holds the chunks done; the rerun runs only the chunks
    left and returns the uninterrupted record, counts included (verdicts, accuracies, attacked and
    broken counts, model passes); the recount skips the points broken in the first session, says
    how many, and agrees. (Every saved state, crashes mid-chunk: tests/test_eval_resume.py.)"""
    x, y = _points(fmnist_tiny, 8)
    kw = {"x": x, "y": y, "eps": 0.02, "version": CHEAP, "batch_size": 3, "progress": False}
    ref = ev.benchmark(mlp, **kw)
    state = tmp_path / "state.json"
    with monkeypatch.context() as mp:
        _interrupting(mp, at_name, at_call)
        with pytest.raises(Interrupt):
            ev.benchmark(mlp, state_file=state, **kw)
    saved = json.loads(state.read_text())
    if at_name == "apgd-t":  # stopped before APGD-T's first chunk: APGD-CE finished
        assert saved["done"] == ["clean", "autoattack/apgd-ce"] and saved["current"] is None
    else:  # stopped before APGD-CE's second chunk: one chunk done
        assert saved["done"] == ["clean"]
        assert saved["current"]["unit"] == "autoattack/apgd-ce"
        assert saved["current"]["batches_done"] == at_call - 1
    n_past = sum(b not in (None, "clean") for b in saved["broken_by"])
    assert n_past == sum(saved["n_broken"].get(u, 0) for u in saved["n_broken"] if u != "clean")
    calls = _interrupting(monkeypatch, "none", 0)
    res = ev.benchmark(mlp, state_file=state, **kw)
    assert res.broken_by == ref.broken_by
    assert res.robust_flags.tolist() == ref.robust_flags.tolist()
    assert res.component_acc == ref.component_acc and res.stage_acc == ref.stage_acc
    assert res.n_attacked == ref.n_attacked and res.n_broken == ref.n_broken
    assert res.passes == ref.passes  # summed over the two sessions, nothing counted twice
    assert res.robust_acc_repredicted == ref.robust_acc_repredicted == res.robust_acc
    assert res.flags == ref.flags and res.flags["count_disagreement"] is False
    details = res.flag_details["count_disagreement"]
    assert details["n_disagree"] == 0 and details.get("n_not_repredicted", 0) == n_past
    assert "n_not_repredicted" not in ref.flag_details["count_disagreement"]
    assert any("resumed" in n for n in res.notes)
    n_ce_chunks = -(-ref.n_attacked["autoattack/apgd-ce"] // 3)
    n_t_chunks = -(-ref.n_attacked["autoattack/apgd-t"] // 3)
    assert calls.count("apgd-t") == n_t_chunks
    if at_name == "apgd-t":
        assert n_past > 0  # the recount really had points without an adversarial image
        assert "apgd-ce" not in calls  # the finished stage is not repeated
    else:
        assert calls.count("apgd-ce") == n_ce_chunks - 1  # only the unfinished chunks run


@pytest.mark.parametrize(
    "change",
    [
        {"eps": 0.03},
        {"attacks": "clean,pgd"},
        {"threat_model": "L2"},
        {"seed": 1},
        {"batch_size": 3},
        {"points": True},
    ],
)
def test_state_file_refuses_other_evaluation(fmnist_tiny, mlp, tmp_path, change):
    x, y = _points(fmnist_tiny, 6)
    kw = {"x": x, "y": y, "eps": 0.02, "attacks": "clean", "batch_size": 4, "progress": False}
    state = tmp_path / "s.json"
    first = ev.benchmark(mlp, state_file=state, **kw)
    text = state.read_text()
    kw2 = dict(kw)
    change = dict(change)
    if change.pop("points", False):
        kw2["x"] = x.flip(0)
    kw2.update(change)
    with pytest.raises(UserError, match="another evaluation"):
        ev.benchmark(mlp, state_file=state, **kw2)
    assert state.read_text() == text  # the refused run left the file alone
    again = ev.benchmark(mlp, state_file=state, **kw)  # the same evaluation resumes (finished)
    assert any("resumed" in n for n in again.notes)
    assert again.robust_flags.tolist() == first.robust_flags.tolist()
    assert again.clean_acc == first.clean_acc and again.passes == first.passes


def test_state_file_refuses_other_model(fmnist_tiny, mlp, tmp_path):
    x, y = _points(fmnist_tiny, 6)
    state = tmp_path / "s.json"
    ev.benchmark(mlp, x=x, y=y, eps=0.02, attacks="clean", state_file=state, progress=False)
    with pytest.raises(UserError, match="model_sha256"):
        ev.benchmark(
            ConstantModel(), x=x, y=y, eps=0.02, attacks="clean", state_file=state, progress=False
        )


def test_old_import_paths_keep_working():
    """The former module's public API comes from the package; robust_agc.checks is a shim."""
    import robust_agc.checks as old_checks
    from robust_agc.eval import checks as new_checks

    for name in (
        "ThreatModel",
        "EvalResult",
        "STAGES",
        "AUTOATTACK_COMPONENTS",
        "AUTOATTACK_VERSIONS",
        "benchmark",
        "load_model",
        "load_model_and_info",
    ):
        assert name in ev.__all__ and hasattr(ev, name), name
    for name in new_checks.__all__:
        assert getattr(old_checks, name) is getattr(new_checks, name)
