"""The gradient-masking checks (``robust_agc.eval.checks``) one by one, on their thresholds and
with their messages; ``tests/test_eval.py`` fires them inside real evaluations."""

from __future__ import annotations

import linecache
import logging
import warnings

import pytest
import torch
from torch import nn

from robust_agc.eval.checks import (
    FLAG_NAMES,
    CheckResult,
    GradientMaskingWarning,
    MaskingReport,
    check_count_agreement,
    check_deterministic,
    check_n_classes,
    check_pgd_steps,
    check_probability_output,
    check_square_beats_gradient,
    check_zero_gradients,
    run_model_checks,
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)  # the random points of every test, whatever ran before


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


class _Noisy(nn.Module):
    """Logits plus noise of a given size (fresh on every call)."""

    def __init__(self, inner: nn.Module, noise: float) -> None:
        super().__init__()
        self.inner, self.noise = inner, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + self.noise * torch.randn_like(out)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class _Flip(nn.Module):
    """Deterministic except that the third call swaps the logits' columns 0 and 1."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        return out[:, [1, 0, 2]] if self.calls == 3 else out


def test_the_report_keeps_the_last_result_per_name_and_warns_once_per_fired_flag():
    report = MaskingReport()
    report.add(CheckResult("a", True, "first"))
    kept = report.add(CheckResult("a", False, "second", {"n": 2}))
    assert kept.message == "second"
    report.add(CheckResult("b", True, "bad", {"k": 1}))
    assert report.flags == {"a": False, "b": True} and report.fired == ["b"]
    assert report.details == {"a": {"message": "second", "n": 2}, "b": {"message": "bad", "k": 1}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.warn()
    assert [str(w.message) for w in caught] == ["[b] bad"]
    assert caught[0].category is GradientMaskingWarning
    assert issubclass(GradientMaskingWarning, UserWarning)
    assert len(FLAG_NAMES) == 7 and len(set(FLAG_NAMES)) == 7


def test_the_report_warns_at_the_caller_of_the_function_that_calls_warn():
    """stacklevel 2 (the default) names the caller of the library function that calls warn()
    (deselected under mutmut, whose trampolines add a frame; checked by planting instead)."""
    report = MaskingReport()
    report.add(CheckResult("b", True, "bad"))

    def library_call() -> None:
        report.warn()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library_call()
    assert linecache.getline(caught[0].filename, caught[0].lineno).strip() == "library_call()"


def test_deterministic_logits_do_not_fire_and_noisy_or_flipping_ones_do():
    x = torch.randn(16, 4)
    model = _net()
    ok = check_deterministic(model, x)
    assert ok.name == "nondeterministic_logits" and not ok.fired
    assert ok.message == "logits are deterministic"
    assert ok.details == {"max_normalized_diff": 0.0, "prediction_changes": 0, "n": 16}
    assert not check_deterministic(_Noisy(model, 1e-7), x).fired  # below rtol 1e-4
    big = nn.Sequential(model, _Scale(1e6))
    assert not check_deterministic(_Noisy(big, 1e-3), x).fired  # rtol is relative to the row norm
    torch.manual_seed(1)
    noisy = check_deterministic(_Noisy(model, 1e-2), x, n_passes=3)
    assert noisy.fired and noisy.details["max_normalized_diff"] > 1e-4
    assert noisy.message.startswith("3 forward passes on the same 16 inputs differ (max normalized")
    assert noisy.message.endswith(
        "randomized defense or train-mode model; use version='rand' (EoT)"
    )
    flip = check_deterministic(_Flip(model), x, n_passes=3, rtol=10.0)
    assert flip.fired  # the third pass's predictions changed, although within rtol
    assert flip.details["prediction_changes"] == int((model(x).argmax(1) < 2).sum())
    with pytest.raises(ValueError, match=r"^Invalid n_passes value: 1$"):
        check_deterministic(model, x, n_passes=1)


def test_probability_output_fires_on_probability_rows_only():
    logits = torch.randn(6, 3)
    probs = logits.softmax(1)
    fired = check_probability_output(probs)
    assert fired.fired and fired.name == "probability_output"
    assert fired.message.startswith("model outputs look like probabilities (rows non-negative")
    assert fired.details["min_output"] == pytest.approx(float(probs.min()))
    assert fired.details["max_abs_row_sum_minus_1"] < 1e-6
    quiet = check_probability_output(logits)
    assert not quiet.fired and quiet.message == "outputs are not probability vectors"
    assert not check_probability_output(probs * 1.01).fired  # rows sum to 1.01
    shifted = probs.clone()
    shifted[0] = torch.tensor([-0.001, 0.5, 0.501])
    assert not check_probability_output(shifted).fired  # a negative entry beyond atol
    within = probs.clone()
    within[0] = torch.tensor([-5e-5, 0.5, 0.50005])
    assert check_probability_output(within).fired  # within atol 1e-4 on both tests
    with pytest.raises(
        ValueError, match=r"^Invalid logits value: expected shape \(N, C\), got \(6,\)$"
    ):
        check_probability_output(probs[:, 0])


class _DeadOn(nn.Module):
    """A network whose output does not depend on the input for the rows where ``x[:, 0] > 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x[:, :1] <= 0).float()
        return self.inner(x * keep)


def test_zero_gradients_counts_points_with_an_exactly_zero_input_gradient():
    x = torch.randn(40, 4)
    x[:, 0] = -1.0
    x[:3, 0] = 1.0  # 3 of 40 dead: 7.5% > 5%
    y = torch.zeros(40, dtype=torch.long)
    model = _DeadOn()
    res = check_zero_gradients(model, x, y)
    assert res.fired and res.name == "zero_gradients"
    assert res.details == {"n_zero": 3, "n": 40, "fraction": 3 / 40}
    assert res.message == (
        "the input gradient is exactly zero on 3 of 40 points (7.5%): gradient attacks cannot "
        "make progress there (masked or shattered gradients)"
    )
    x[2, 0] = -1.0  # 2 of 40: 5%, not more than 5%
    quiet = check_zero_gradients(model, x, y)
    assert not quiet.fired and quiet.message == "input gradients are non-zero (2 zero of 40)"
    assert check_zero_gradients(model, x, y, max_fraction=0.04).fired
    p = next(model.parameters())
    assert p.grad is None  # only the input's gradient is taken
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).requires_grad_(False)
    no_graph = check_zero_gradients(lambda t: frozen(t.detach()), x, y)  # noqa: ARG005
    assert no_graph.fired and no_graph.details["n_zero"] == 40
    unused = check_zero_gradients(lambda t: torch.zeros(len(t), 3, requires_grad=True), x, y)
    assert unused.fired and unused.details["n_zero"] == 40  # the input is not in the graph
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"^Invalid max_fraction value: {bad}$"):
            check_zero_gradients(model, x, y, max_fraction=bad)
    assert check_zero_gradients(model, x, y, max_fraction=0.0).fired  # 0 is valid: any zero fires


def test_n_classes_adapts_the_targets_and_says_when_dlr_lacks_classes():
    res, used = check_n_classes(10)
    assert (res.fired, used, res.name) == (False, 9, "too_few_classes")
    assert res.message == "10 classes allow 9 target classes"
    assert res.details == {"n_classes": 10, "requested": 9, "used": 9}
    res, used = check_n_classes(4, 3)
    assert (res.fired, used) == (False, 3) and res.message == "4 classes allow 3 target classes"
    res, used = check_n_classes(4)
    assert (res.fired, used) == (True, 3)
    assert res.message == "only 4 classes: targeted attacks run with 3 target classes instead of 9"
    res, used = check_n_classes(3)
    assert (res.fired, used) == (True, 2)
    assert res.message.endswith(
        "instead of 9; the (targeted) DLR loss needs at least 3 (4) classes"
    )
    res, used = check_n_classes(2, 1)
    assert (res.fired, used) == (False, 1) and res.message.endswith("needs at least 3 (4) classes")
    with pytest.raises(ValueError, match=r"^Invalid n_classes value: 1$"):
        check_n_classes(1)
    with pytest.raises(ValueError, match=r"^Invalid n_target_classes value: 0$"):
        check_n_classes(10, 0)


def test_square_beats_gradient_fires_above_two_per_mille_of_all_points():
    broken = ["clean"] * 100 + ["apgd-ce"] * 300 + [None] * 598 + ["autoattack/square"] * 2
    res = check_square_beats_gradient(broken)
    assert not res.fired and res.message == "Square broke 2 points the gradient attacks missed"
    assert res.details == {"n_broken_by_square": 2, "fraction": 0.002}
    broken[-3] = "square"
    res = check_square_beats_gradient(broken)
    assert res.fired and res.details["n_broken_by_square"] == 3
    assert res.message == (
        "the black-box Square attack broke 3 of 1000 points (0.3%) that the gradient attacks "
        "missed: gradients are probably masked"
    )
    assert not check_square_beats_gradient(broken, square_stages=("square",)).fired
    assert check_square_beats_gradient(["square"], max_fraction=0.5).fired
    assert check_square_beats_gradient([]).details == {"n_broken_by_square": 0, "fraction": 0.0}


def test_pgd_steps_fires_when_more_steps_leave_more_points_robust_beyond_the_tolerance():
    few = torch.tensor([True, False, False, True, False])
    many = torch.tensor([False, True, True, True, False])
    res = check_pgd_steps(few, many, steps=(10, 50))
    assert res.fired and res.name == "pgd_steps_nonmonotone"
    assert res.message == (
        "robust accuracy rose with more PGD steps (10 steps: 2/5, 50 steps: 3/5): the attack "
        "does not converge"
    )
    assert res.details == {
        "steps": [10, 50], "robust_few_steps": 2, "robust_many_steps": 3, "n": 5,
        "points_broken_only_by_fewer_steps": 2,
    }  # fmt: skip
    quiet = check_pgd_steps(few, many, steps=(10, 50), tolerance=1)
    assert not quiet.fired
    assert quiet.message == "robust accuracy does not rise with more PGD steps (2 -> 3 of 5)"
    assert not check_pgd_steps(many, few, steps=(10, 50)).fired
    assert not check_pgd_steps(few, few, steps=(10, 50)).fired
    with pytest.raises(ValueError, match=r"^Invalid robust_many value: shape \(4,\) != \(5,\)$"):
        check_pgd_steps(few, many[:4], steps=(10, 50))


def test_count_agreement_fires_on_any_disagreeing_point():
    flags = torch.tensor([True, True, False, True])
    res = check_count_agreement(flags, flags.clone())
    assert not res.fired and res.message == "flags and re-prediction agree"
    assert res.details == {"n_disagree": 0, "robust_from_flags": 3, "robust_repredicted": 3}
    res = check_count_agreement(flags, torch.tensor([1, 0, 1, 1]))
    assert res.fired and res.name == "count_disagreement"
    assert res.details == {"n_disagree": 2, "robust_from_flags": 3, "robust_repredicted": 3}
    assert res.message == (
        "robust accuracy counted twice disagrees on 2 points (flags 3, re-predicted 3): "
        "randomness or a train-mode model"
    )
    with pytest.raises(ValueError, match=r"^Invalid repredicted value: shape \(3,\) != \(4,\)$"):
        check_count_agreement(flags, flags[:3])


def test_run_model_checks_runs_the_four_model_checks_on_at_most_max_points(caplog):
    model = _net()
    x, y = torch.randn(300, 4), torch.zeros(300, dtype=torch.long)
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    with caplog.at_level(logging.DEBUG, logger="robust_agc.eval.checks"):
        report, n_targets = run_model_checks(model, x, y)
    assert list(report.results) == [
        "nondeterministic_logits", "probability_output", "zero_gradients", "too_few_classes",
    ]  # fmt: skip
    assert n_targets == 2 and report.fired == ["too_few_classes"]
    assert report.results["zero_gradients"].details["n"] == 256
    assert calls == [256, 64, 64, 256]  # the logits, the determinism passes, the gradient
    assert "check too_few_classes: only 3 classes" in caplog.text
    calls.clear()
    mine = MaskingReport()
    report, n_targets = run_model_checks(
        model, x, y, logits=model(x).detach(), n_target_classes=None, max_points=10, report=mine
    )
    assert report is mine and n_targets is None and "too_few_classes" not in report.results
    assert calls == [300, 10, 10, 10]  # my logits (all points), then the checks on 10
    asked, n = run_model_checks(model, x, y, n_target_classes=2)
    assert n == 2 and not asked.results["too_few_classes"].fired  # 2 targets fit 3 classes
    empty, n = run_model_checks(model, x[:0], y[:0], n_target_classes=5)
    assert empty.results == {} and n == 5


def test_run_model_checks_logs_non_finite_outputs(caplog):
    class Inf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(x), 10, requires_grad=x.requires_grad) + x.sum(1, keepdim=True)
            out = out.clone()
            out[0, 0] = float("inf")
            return out

    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.checks"):
        run_model_checks(Inf(), torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    assert "model outputs contain inf/nan" in caplog.text


class _FirstCallDiffers(nn.Module):
    """Returns ``first`` on its first call and ``later`` on every call after (whatever the input)."""

    def __init__(self, first: torch.Tensor, later: torch.Tensor) -> None:
        super().__init__()
        self.first, self.later, self.calls = first, later, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.first if self.calls == 1 else self.later).clone()


def test_determinism_compares_every_pass_with_the_first_row_by_row():
    x = torch.zeros(2, 4)
    # 1% of the small row's norm differs on the first pass only: each row is normalised by its
    # own norm, so the big row does not dilute it (by the batch's norm it would be 1e-5)
    first = torch.tensor([[0.0, 1000.0], [0.0, 1.0]], dtype=torch.float64)
    later = first.clone()
    later[1, 0] = 0.01
    res = check_deterministic(_FirstCallDiffers(first, later), x, n_passes=3)
    assert res.fired and res.details["prediction_changes"] == 0
    assert res.details["max_normalized_diff"] == pytest.approx(0.01, rel=1e-3)
    # a prediction that flips on the first pass only, by a difference far below rtol
    first = torch.tensor([[1.0, 1.0 + 1e-6], [2.0, 0.0]], dtype=torch.float64)
    later = first[:, [1, 0]].clone()
    later[1] = first[1]
    res = check_deterministic(_FirstCallDiffers(first, later), x, n_passes=3)
    assert res.fired and res.details["prediction_changes"] == 1
    assert res.details["max_normalized_diff"] < 1e-5
    # rtol bounds each row's difference, not the batch's: 100 rows just below it each
    first = torch.zeros(100, 2, dtype=torch.float64)
    first[:, 1] = 1.0
    later = first.clone()
    later[:, 0] = 5e-5
    res = check_deterministic(_FirstCallDiffers(first, later), torch.zeros(100, 4))
    assert not res.fired
    assert res.details["max_normalized_diff"] == pytest.approx(5e-5, rel=1e-3)


def test_probability_output_holds_on_both_edges_of_its_tolerance():
    edge = torch.tensor([[-0.5, 1.5], [0.25, 1.25]], dtype=torch.float64)  # min -atol, sum 1+atol
    res = check_probability_output(edge, atol=0.5)
    assert res.fired and res.message == (
        "model outputs look like probabilities (rows non-negative, summing to 1): attacks need "
        "logits, or their gradients vanish where the softmax saturates"
    )
    assert not check_probability_output(edge, atol=0.49).fired


def test_zero_gradients_on_a_single_point_is_its_whole_fraction():
    x = torch.randn(1, 4)
    x[0, 0] = 1.0  # dead
    res = check_zero_gradients(_DeadOn(), x, torch.zeros(1, dtype=torch.long))
    assert res.fired and res.details == {"n_zero": 1, "n": 1, "fraction": 1.0}


def test_run_model_checks_logs_fired_checks_as_warnings_and_the_others_as_debug(caplog):
    model = _net()
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    with caplog.at_level(logging.DEBUG, logger="robust_agc.eval.checks"):
        run_model_checks(model, x, y)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith("checks")]
    assert logged == [
        (logging.DEBUG, "check nondeterministic_logits: logits are deterministic"),
        (logging.DEBUG, "check probability_output: outputs are not probability vectors"),
        (logging.DEBUG, "check zero_gradients: input gradients are non-zero (0 zero of 8)"),
        (
            logging.WARNING,
            "check too_few_classes: only 3 classes: targeted attacks run with 2 target classes "
            "instead of 9; the (targeted) DLR loss needs at least 3 (4) classes",
        ),
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="robust_agc.eval.checks"):
        run_model_checks(model, x, y, logits=torch.full((8, 3), float("nan")))
    assert (logging.WARNING, "model outputs contain inf/nan") in [
        (r.levelno, r.getMessage()) for r in caplog.records
    ]
