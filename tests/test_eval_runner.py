"""The evaluation runner's bookkeeping (``robust_agc.eval.runner``) under a scripted attack.

The attacks are replaced by a script that breaks chosen points, so every number of the record is
known in advance: which chunks each unit attacks, the per-point verdicts, the per-stage accuracies
and counts, the model passes, the flags of the checks that read the verdicts, the resume after a
crash inside a unit, and the recount against the adversarial images. The real attacks are checked
in ``tests/test_eval.py``, ``tests/test_autoattack_parity.py`` and ``tests/test_eval_resume.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robust_agc.errors import UserError
from robust_agc.eval import runner
from robust_agc.eval.comm import Comm
from robust_agc.eval.passes import PassCounter
from robust_agc.eval.plan import make_plan
from robust_agc.eval.result import versions
from robust_agc.eval.runner import RecordInfo, Session, recount_phase, run_evaluation
from robust_agc.eval.state import EvalState
from robust_agc.utils import machine_info

pytestmark = pytest.mark.filterwarnings("ignore::robust_agc.eval.checks.GradientMaskingWarning")

N = 7
CLEAN_WRONG = {2}


def _model() -> nn.Module:
    """Logits = the first two features (the third is the point's id, ignored)."""
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    return lin.requires_grad_(False).eval()


def _points() -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    x = torch.zeros(N, 3)
    for i in range(N):
        right = int(y[i]) if i not in CLEAN_WRONG else 1 - int(y[i])
        x[i, right], x[i, 1 - right] = 2.0, -1.0
        x[i, 2] = float(i)
    return x, y


def _broken(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The image of each point that the model gets wrong: its first two features swapped."""
    adv = x.clone()
    adv[:, 0], adv[:, 1] = x[:, 1], x[:, 0]
    return adv


class Script:
    """Stands in for :class:`robust_agc.eval.attackers.Attackers`: unit ``u`` breaks the points
    in ``breaks[u]`` (by id) and leaves the others; ``crash_at`` = ``(unit, chunk)`` raises there."""

    def __init__(self, breaks: dict[str, set[int]], crash_at: tuple[str, int] | None = None):
        self.breaks, self.crash_at = breaks, crash_at
        self.calls: list[tuple[str, list[int]]] = []
        self.few_steps: list[int] = []

    def build(self, model: nn.Module, plan: Any, device: torch.device, n_targets: Any) -> Script:
        """Stands in for :func:`~robust_agc.eval.attackers.build_attackers` (records its call)."""
        self.built = (model, plan, device, n_targets)
        return self

    def attack(self, unit: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ids = [int(v) for v in x[:, 2]]
        assert y.tolist() == [int(_points()[1][i]) for i in ids], "labels of other points"
        if self.crash_at == (unit, sum(u == unit for u, _ in self.calls)):
            raise KeyboardInterrupt("crash inside the unit")
        self.calls.append((unit, ids))
        hit = torch.tensor([i in self.breaks.get(unit, set()) for i in ids])
        return torch.where(hit[:, None], _broken(x, y), x)

    def pgd_few_steps(self, steps: int) -> Any:
        assert isinstance(steps, int)
        self.few_steps.append(steps)
        return lambda x, y: self.attack("pgd-few", x, y)

    def config(self) -> dict[str, Any]:
        return {"script": {k: sorted(v) for k, v in sorted(self.breaks.items())}}


def _run(
    script: Script,
    monkeypatch: pytest.MonkeyPatch,
    *,
    attacks: tuple[str, ...] = ("clean", "pgd", "square"),
    state_file: Path | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
    model_info: dict[str, Any] | None = None,
    compression: dict[str, Any] | None = None,
    **plan_kw: Any,
):
    monkeypatch.setattr(runner, "build_attackers", script.build)
    kw = dict(eps=0.1, attacks=attacks, batch_size=2, pgd_steps=10, pgd_restarts=1)
    kw.update(plan_kw)
    plan = make_plan(**kw)
    x, y = _points()
    info = RecordInfo(
        "toy",
        "linear",
        model_info or {},
        ("a note",),
        state_file,
        progress,
        runner.time.perf_counter(),
        compression or {},
    )
    return run_evaluation(model or _model(), plan, x, y, torch.device("cpu"), info)


BREAKS = {"pgd": {1, 4}, "square": {5}, "pgd-few": {1, 4}}


def test_every_number_of_the_record_follows_from_the_verdicts(monkeypatch):
    script = Script(BREAKS)
    res = _run(script, monkeypatch)
    # pgd attacks the 6 clean-correct points in chunks of 2; square the 4 pgd left
    assert script.calls[:5] == [
        ("pgd", [0, 1]), ("pgd", [3, 4]), ("pgd", [5, 6]), ("square", [0, 3]), ("square", [5, 6]),
    ]  # fmt: skip
    assert script.calls[5:] == [("pgd-few", [0, 1, 3, 4, 5, 6])]  # the convergence check
    assert script.few_steps == [2]  # pgd_steps // 5
    assert res.broken_by == [None, "pgd", "clean", None, "pgd", "square", None]
    assert res.robust_flags.tolist() == [True, False, False, True, False, False, True]
    assert res.clean_acc == 6 / 7 and res.robust_acc == 3 / 7
    assert res.robust_acc_repredicted == 3 / 7
    assert res.stage_acc == {"clean": 6 / 7, "pgd": 4 / 7, "square": 3 / 7}
    assert res.component_acc == res.stage_acc
    assert res.n_attacked == {"clean": 7, "pgd": 6, "square": 4}
    assert res.n_broken == {"clean": 1, "pgd": 2, "square": 1}
    assert res.n_examples == 7 and res.eps == 0.1 and res.seed == 0
    assert res.dataset == "toy" and res.architecture == "linear" and res.notes == ["a note"]
    assert res.attack_config == script.config() and res.world_size == 1
    assert res.number_forward_passes == 1
    # one forward per clean point, per attacked point's re-prediction, per recounted point
    assert res.passes["clean"] == {"forward": 7, "backward": 0}
    assert res.passes["pgd"] == {"forward": 6, "backward": 0}
    assert res.passes["square"] == {"forward": 4, "backward": 0}
    assert res.passes["recount"] == {"forward": 7, "backward": 0}
    assert res.passes["checks"]["forward"] > 0
    parts = [v for k, v in res.passes.items() if k != "total"]
    assert res.passes["total"] == {
        "forward": sum(p["forward"] for p in parts),
        "backward": sum(p["backward"] for p in parts),
    }
    assert set(res.timings) == {"clean", "pgd", "square", "checks", "total"}
    assert res.timings["total"] >= res.timings["pgd"] >= 0
    # square broke 1 of 7 points the gradient attack missed; 2 classes: 1 target class
    assert res.flags["square_beats_gradient"] and res.flags["too_few_classes"]
    assert not res.flags["count_disagreement"] and not res.flags["pgd_steps_nonmonotone"]
    assert res.flag_details["square_beats_gradient"]["n_broken_by_square"] == 1
    # the check re-attacks PGD's 6 targets; pgd left 4 of them (square's point counts as robust)
    pgd_check = res.flag_details["pgd_steps_nonmonotone"]
    assert (pgd_check["robust_few_steps"], pgd_check["robust_many_steps"]) == (4, 4)
    assert not any(res.flags[k] for k in ("nondeterministic_logits", "probability_output"))
    assert res.flags["zero_gradients"] is False  # the model checks ran, on the 6 correct points
    assert res.flag_details["zero_gradients"]["n"] == 6


def test_more_pgd_steps_leaving_more_points_robust_fires_the_convergence_check(monkeypatch):
    script = Script({"pgd": {1}, "pgd-few": {1, 4, 5}})
    res = _run(script, monkeypatch, attacks=("clean", "pgd"))
    assert res.flags["pgd_steps_nonmonotone"]
    d = res.flag_details["pgd_steps_nonmonotone"]
    assert d["steps"] == [2, 10] and d["n"] == 6 and d["points_broken_only_by_fewer_steps"] == 2
    assert "square_beats_gradient" not in res.flags  # no gradient-free unit ran
    quiet = _run(Script({"pgd": {1}, "pgd-few": {1, 4}}), monkeypatch, attacks=("clean", "pgd"))
    assert not quiet.flags["pgd_steps_nonmonotone"]  # one point of slack (2% of 6, at least 1)


def test_without_checks_only_the_class_count_is_checked(monkeypatch):
    script = Script(BREAKS)
    res = _run(script, monkeypatch, run_checks=False)
    assert script.few_steps == []  # no convergence check
    assert res.flags["too_few_classes"] and "zero_gradients" not in res.flags
    assert res.passes["checks"] == {"forward": 0, "backward": 0}
    assert res.broken_by == [None, "pgd", "clean", None, "pgd", "square", None]


def test_a_crash_inside_a_unit_resumes_with_the_chunks_left_and_the_same_record(
    monkeypatch, tmp_path
):
    ref = _run(Script(BREAKS), monkeypatch)
    state_file = tmp_path / "state.json"
    crashing = Script(BREAKS, crash_at=("square", 1))
    with pytest.raises(KeyboardInterrupt):
        _run(crashing, monkeypatch, state_file=state_file)
    saved = json.loads(state_file.read_text())
    assert saved["done"] == ["clean", "pgd"]
    assert saved["current"] == {"unit": "square", "targets": [0, 3, 5, 6], "batches_done": 1}
    again = Script(BREAKS)
    res = _run(again, monkeypatch, state_file=state_file)
    assert again.calls == [("square", [5, 6]), ("pgd-few", [0, 1, 3, 4, 5, 6])]
    for k in ("broken_by", "clean_acc", "robust_acc", "stage_acc", "n_attacked", "n_broken"):
        assert getattr(res, k) == getattr(ref, k), k
    assert res.flags == ref.flags and res.robust_acc_repredicted == ref.robust_acc_repredicted
    assert res.passes["square"] == ref.passes["square"]  # both sessions' passes add up
    assert res.notes == ["a note", f"resumed from state file {state_file}"]
    # points broken in the first session have no image now: recounted from their verdicts
    assert res.flag_details["count_disagreement"]["n_not_repredicted"] == 2
    done = Script(BREAKS)
    final = _run(done, monkeypatch, state_file=state_file)  # a finished state: nothing to attack
    assert done.calls == [("pgd-few", [0, 1, 3, 4, 5, 6])] and final.broken_by == ref.broken_by


def test_a_state_with_other_clean_predictions_is_refused(monkeypatch, tmp_path):
    state_file = tmp_path / "state.json"
    _run(Script(BREAKS), monkeypatch, state_file=state_file)
    d = json.loads(state_file.read_text())
    d["broken_by"][0] = "clean"
    state_file.write_text(json.dumps(d))
    with pytest.raises(
        UserError, match="stored clean predictions differ from this model's; refusing to resume$"
    ):
        _run(Script(BREAKS), monkeypatch, state_file=state_file)


def _session(plan_kw: dict[str, Any] | None = None) -> Session:
    model = _model()
    x, y = _points()
    kw: dict[str, Any] = {"eps": 0.1, "attacks": ("clean", "pgd", "square"), "batch_size": 3}
    plan = make_plan(**{**kw, **(plan_kw or {})})
    return Session(model, plan, x, y, torch.device("cpu"), Comm(), PassCounter(model))


def test_session_cuts_the_points_into_batch_size_chunks():
    s = _session()
    assert s.n == 7 and s.point_chunks == [[0, 1, 2], [3, 4, 5], [6]]


def test_the_recount_compares_the_verdicts_with_a_re_prediction_on_the_known_images():
    s = _session()
    x, y = _points()
    state = EvalState(None, {}, N)
    state.robust = [True, False, False, True, False, False, True]
    state.broken_by = [None, "pgd", "clean", None, "pgd", "square", None]
    x_adv = x.clone()
    x_adv[[1, 4, 5]] = _broken(x, y)[[1, 4, 5]]
    known = torch.ones(N, dtype=torch.bool)
    n_robust, passes = recount_phase(s, state, x_adv, known)
    assert n_robust == 3 and passes == [7, 0]
    assert not s.report.results["count_disagreement"].fired
    assert s.report.results["square_beats_gradient"].fired
    x_adv[3] = _broken(x, y)[3]  # a point flagged robust whose image is wrong: disagreement
    n_robust, _ = recount_phase(s, state, x_adv, known)
    assert n_robust == 2
    res = s.report.results["count_disagreement"]
    assert res.fired and res.details["n_disagree"] == 1 and "n_not_repredicted" not in res.details
    known[[1, 3]] = False  # images lost with a past session: their verdicts count as they are
    n_robust, _ = recount_phase(s, state, x_adv, known)
    assert n_robust == 3
    res = s.report.results["count_disagreement"]
    assert not res.fired and res.details["n_not_repredicted"] == 2


def test_the_fmn_unit_records_radii_and_breaks_only_within_eps(monkeypatch):
    """fmn attacks every clean-correct point; a point counts as broken at eps only when its radius
    is at most eps and no earlier unit broke it."""
    s = _session({"eps": 0.5, "attacks": ("clean", "pgd", "fmn"), "version": "standard"})
    x, y = _points()

    class Fmn:
        def attack(self, unit: str, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            assert unit == "fmn"
            return _broken(xb, yb)  # every point misclassified, at the radius its id says

    _fmn_radii(monkeypatch, {0: 0.25, 1: 0.75, 3: 0.5, 4: 2.0, 5: 0.1, 6: 0.4}, "Linf")
    state = EvalState(None, {}, N)
    state.robust = [True, True, False, True, True, False, True]
    state.broken_by = [None, None, "clean", None, None, "pgd", None]
    x_adv = x.clone()
    runner.unit_phase(s, "fmn", state, Fmn(), x_adv, False)
    assert state.radii == [0.25, 0.75, 0.0, 0.5, 2.0, 0.1, 0.4]
    # broken within eps: 0, 3, 6; radius above eps: 1, 4; 5 was broken earlier and keeps its
    # verdict (its radius is recorded all the same)
    assert state.broken_by == ["fmn", None, "clean", "fmn", None, "pgd", "fmn"]
    assert state.robust == [False, True, False, False, True, False, False]
    assert state.n_attacked["fmn"] == 6 and state.n_broken["fmn"] == 3
    assert state.unit_acc["fmn"] == 2 / 7 and state.done == ["fmn"] and state.current is None
    assert state.passes["fmn"] == [6, 0]  # the re-prediction of each attacked point
    assert x_adv[[0, 3, 6]].equal(_broken(x, y)[[0, 3, 6]]) and x_adv[[1, 4, 5]].equal(x[[1, 4, 5]])


def test_autoattack_components_add_up_to_the_stage(monkeypatch):
    """The stage's accuracy is its last component's; attacked points are the first component's,
    broken points, times and passes the components' sums; the total counts each pass once."""
    _tick(monkeypatch)
    script = Script({"autoattack/apgd-ce": {0, 4}, "autoattack/apgd-t": {6}})
    res = _run(script, monkeypatch, attacks=("clean", "autoattack"), version=["apgd-ce", "apgd-t"])
    assert [u for u, _ in script.calls] == ["autoattack/apgd-ce"] * 3 + ["autoattack/apgd-t"] * 2
    assert res.stage_acc == {"clean": 6 / 7, "autoattack": 3 / 7}
    assert res.component_acc == {
        "clean": 6 / 7, "autoattack/apgd-ce": 4 / 7, "autoattack/apgd-t": 3 / 7,
    }  # fmt: skip
    assert res.n_attacked["autoattack"] == 6 and res.n_broken["autoattack"] == 3
    assert res.n_attacked["autoattack/apgd-t"] == 4 and res.n_broken["autoattack/apgd-t"] == 1
    # the fake clock ticks once per call: each chunk takes 1 s, each round of chunks adds 1 s
    assert res.timings["autoattack/apgd-ce"] == 3.0 and res.timings["autoattack/apgd-t"] == 2.0
    assert res.timings["autoattack"] == 5.0
    assert res.passes["autoattack"] == {"forward": 10, "backward": 0}
    per_unit = [v for k, v in res.passes.items() if k not in ("total", "autoattack")]
    assert res.passes["total"]["forward"] == sum(p["forward"] for p in per_unit)


class _FlipLater(nn.Module):
    """The toy model, whose prediction of point 0 flips once ``flip`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.flip = _model(), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.flip:
            out = torch.where((x[:, 2] == 0)[:, None], out.flip(1), out)
        return out


def test_a_model_that_changes_before_the_recount_is_caught_by_it(monkeypatch):
    model = _FlipLater()
    script = Script(BREAKS)
    few = script.pgd_few_steps

    def flip_then_few(steps: int) -> Any:  # the model changes just before the last checks
        model.flip = True
        return few(steps)

    script.pgd_few_steps = flip_then_few
    res = _run(script, monkeypatch, model=model)
    assert res.robust_acc == 3 / 7 and res.robust_acc_repredicted == 2 / 7
    assert res.flags["count_disagreement"]
    assert res.flag_details["count_disagreement"]["n_disagree"] == 1


def test_fmn_radii_start_at_zero_for_misclassified_points_and_inf_for_the_others():
    s = _session({"attacks": ("clean", "fmn"), "fmn_slice": (1, 6)})
    state = EvalState(None, {}, N)
    state.robust = [True, True, False, True, True, False, True]
    state.broken_by = [None, None, "clean", None, None, "pgd", None]
    chunks, done = runner._unit_chunks(s, "fmn", state)
    inf = float("inf")
    assert state.radii == [None, inf, 0.0, inf, inf, inf, None]  # outside the slice: None
    assert chunks == [[1, 3, 4], [5]] and done == 0  # point 5 broken earlier: attacked too
    assert state.current == {"unit": "fmn", "targets": [1, 3, 4, 5], "batches_done": 0}
    assert state.n_attacked["fmn"] == 4 and state.n_broken["fmn"] == 0
    assert state.timings["fmn"] == 0.0 and state.passes["fmn"] == [0, 0]


def _round(broken: list[bool], radii: list[float] | None = None) -> dict[str, Any]:
    x, y = _points()
    hit = [i for i, b in zip([0, 1, 3], broken, strict=False) if b]
    return {
        "broken": broken,
        "radii": radii,
        "adv": _broken(x, y)[hit],
        "time": 1.0,
        "passes": [len(broken), 0],
    }


def test_a_round_whose_verdicts_do_not_match_its_chunk_is_refused_not_cut():
    """A chunk of 3 targets with 2 verdicts (or 2 radii) is an error: zipping them would silently
    leave the third point robust."""
    s = _session()
    x, _ = _points()
    state = EvalState(None, {}, N)
    state.current = {"unit": "pgd", "targets": [0, 1, 3], "batches_done": 0}
    chunks = [[0, 1, 3]]
    with pytest.raises(ValueError, match="zip"):
        runner._record_round(s, "pgd", state, chunks, 0, [_round([False, True])], x.clone())
    state.radii = [float("inf")] * N
    state.current["unit"] = "fmn"
    with pytest.raises(ValueError, match="zip"):
        runner._record_round(
            s, "fmn", state, chunks, 0, [_round([False, True, False], [0.3, 0.2])], x.clone()
        )


def test_breaking_images_in_another_dtype_are_stored_in_the_points_dtype(monkeypatch):
    """An attack may return its images in float64 to a model that casts its input; the stored
    image, and so the recount, is in the points' dtype."""

    class Double(Script):
        def attack(self, unit: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return super().attack(unit, x, y).double()

    class Casting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.float())

    res = _run(Double(BREAKS), monkeypatch, model=Casting())
    assert res.broken_by == [None, "pgd", "clean", None, "pgd", "square", None]
    assert res.robust_acc_repredicted == res.robust_acc == 3 / 7
    assert not res.flags["count_disagreement"]


def _tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that advances 1 s at every reading (from 1000 s)."""
    clock = iter(range(1000, 10_000))
    monkeypatch.setattr(runner.time, "perf_counter", lambda: float(next(clock)))


def test_each_unit_logs_its_numbers_and_every_fired_check_is_logged(monkeypatch, caplog):
    _tick(monkeypatch)
    with caplog.at_level(logging.INFO, logger="robust_agc.eval.runner"):
        res = _run(Script(BREAKS), monkeypatch)
    lines = [r.getMessage() for r in caplog.records if r.name == "robust_agc.eval.runner"]
    # pgd: 3 chunks, 2 clock readings each (1 s per chunk) and 1 s per round between them
    assert lines[:2] == [
        "pgd: robust accuracy 57.14% (6 attacked, 2 broken, 3.0 s)",
        "square: robust accuracy 42.86% (4 attacked, 1 broken, 2.0 s)",
    ]
    assert sorted(k for k, v in res.flags.items() if v) == [
        "square_beats_gradient", "too_few_classes",
    ]  # fmt: skip
    assert lines[2:] == [  # the fired checks, in the order they ran
        "gradient-masking check too_few_classes: only 2 classes: targeted attacks run with 1 "
        "target classes instead of 9; the (targeted) DLR loss needs at least 3 (4) classes",
        "gradient-masking check square_beats_gradient: the black-box Square attack broke 1 of 7 "
        "points (14.3%) that the gradient attacks missed: gradients are probably masked",
    ]


class Bars:
    """Records every progress bar the runner opens (stands in for ``tqdm.auto.tqdm``)."""

    def __init__(self) -> None:
        self.bars: list[Bars.Bar] = []

    class Bar:
        def __init__(self, total: int, desc: str, unit: str, leave: bool) -> None:
            self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
            self.updates: list[int] = []
            self.postfix: list[dict[str, Any]] = []
            self.closed = False

        def update(self, n: int) -> None:
            self.updates.append(n)

        def set_postfix(self, **kw: Any) -> None:
            self.postfix.append(kw)

        def close(self) -> None:
            self.closed = True

    def __call__(self, **kw: Any) -> Bar:
        self.bars.append(Bars.Bar(**kw))
        return self.bars[-1]


def test_a_progress_bar_per_unit_counts_its_points_and_shows_the_robust_ones(monkeypatch, tmp_path):
    import tqdm.auto

    bars = Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    _run(Script(BREAKS), monkeypatch, progress=True)
    assert [(b.desc, b.total, b.unit, b.leave, b.closed) for b in bars.bars] == [
        ("pgd", 6, "pt", False, True), ("square", 4, "pt", False, True),
    ]  # fmt: skip
    pgd, square = bars.bars
    assert pgd.updates == [0, 2, 2, 2] and square.updates == [0, 2, 2]  # 0: no chunk done before
    assert pgd.postfix == [{"robust": 5}, {"robust": 4}, {"robust": 4}]
    assert square.postfix == [{"robust": 4}, {"robust": 3}]
    # a resumed unit starts its bar at the points of the chunks done before the crash
    state_file = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        _run(Script(BREAKS, crash_at=("square", 1)), monkeypatch, state_file=state_file)
    bars.bars.clear()
    _run(Script(BREAKS), monkeypatch, state_file=state_file, progress=True)
    assert [(b.desc, b.total, b.updates) for b in bars.bars] == [("square", 4, [2, 2])]
    # no bar without progress, or for a unit with nothing to attack
    bars.bars.clear()
    _run(Script(BREAKS), monkeypatch)
    _run(Script({"pgd": {0, 1, 3, 4, 5, 6}}), monkeypatch, progress=True)
    assert [b.desc for b in bars.bars] == ["pgd"]


def test_fewer_chunks_left_than_processes_is_warned_on_rank_0(caplog):
    s = _session({"batch_size": 2})
    state = EvalState(None, {}, N)
    s.comm.world = 4  # 4 chunks of the 7 points
    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.runner"):
        chunks, _ = runner._unit_chunks(s, "pgd", state)
    assert len(chunks) == 4 and not caplog.records
    s.comm.world = 5
    state.current = None
    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.runner"):
        runner._unit_chunks(s, "pgd", state)
    assert [r.getMessage() for r in caplog.records] == [
        "pgd: 4 chunk(s) of up to 2 points for 5 processes; some processes idle (a smaller "
        "batch_size spreads the work, at the same per-chunk semantics)"
    ]
    caplog.clear()
    state.current["batches_done"] = 1  # resumed: 3 chunks left for 4 processes
    s.comm.world = 4
    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.runner"):
        runner._unit_chunks(s, "pgd", state)
    assert [r.getMessage()[:44] for r in caplog.records] == [
        "pgd: 3 chunk(s) of up to 2 points for 4 proc"
    ]
    caplog.clear()
    s.comm.rank = 1  # only rank 0 warns
    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.runner"):
        runner._unit_chunks(s, "pgd", state)
    assert not caplog.records


def test_the_attacks_are_built_for_the_model_the_plan_and_the_classes(monkeypatch):
    model = _model()
    for run_checks in (True, False):
        script = Script(BREAKS)
        res = _run(script, monkeypatch, model=model, run_checks=run_checks)
        built_model, plan, device, n_targets = script.built
        assert built_model is model and device == torch.device("cpu")
        assert plan.units == ("clean", "pgd", "square") and plan.eps == 0.1 and plan.pgd_steps == 10
        assert n_targets == 1  # two classes: one target class for the targeted attacks
        assert res.flag_details["too_few_classes"] == {
            "message": "only 2 classes: targeted attacks run with 1 target classes instead of 9; "
            "the (targeted) DLR loss needs at least 3 (4) classes",
            "n_classes": 2,
            "requested": 9,
            "used": 1,
        }


def test_timings_and_check_passes_are_the_sums_of_their_parts(monkeypatch):
    _tick(monkeypatch)
    res = _run(Script(BREAKS), monkeypatch)
    # 1 s per chunk: 4 clean chunks, 3 of pgd, 2 of square; 1 s for the model checks and 1 s for
    # the PGD convergence check
    assert {k: v for k, v in res.timings.items() if k != "total"} == {
        "clean": 4.0, "pgd": 3.0, "square": 2.0, "checks": 2.0,
    }  # fmt: skip
    assert 11.0 <= res.timings["total"] < 100.0  # the session's span, not a sum of clock readings
    # the checks' passes: determinism 2 x 6 forwards, zero gradients 6 forwards and 6 backwards
    # (the probability and class-count checks reuse the clean logits), the PGD check 6 forwards
    assert res.passes["checks"] == {"forward": 24, "backward": 6}


def test_the_model_checks_run_on_the_clean_correct_points_or_on_all_when_none_is(monkeypatch):
    x, y = _points()
    for right, n in ((set(), N), ({3}, 1), ({0, 1, 3, 4}, 4)):
        flip = nn.Linear(3, 2, bias=False)
        with torch.no_grad():  # right on the points in `right`, wrong on the others
            flip.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))

        class Picky(nn.Module):
            def forward(self, xb: torch.Tensor, flip=flip, right=right) -> torch.Tensor:
                keep = torch.tensor([int(i) in right or int(i) == 2 for i in xb[:, 2]])
                return torch.where(keep[:, None], _model()(xb), 3 * flip(xb))

        res = _run(Script({}), monkeypatch, model=Picky(), attacks=("clean",))
        assert res.clean_acc == len(right) / N
        assert res.flag_details["zero_gradients"]["n"] == n, right
        assert res.flag_details["nondeterministic_logits"]["n"] == n
        # the probability check reads the clean logits of the same points (-3: a wrong point's)
        assert res.flag_details["probability_output"]["min_output"] == (-1.0 if right else -3.0)


def test_a_model_without_class_logits_is_refused_with_its_output_shape(monkeypatch):
    class Flat(nn.Module):
        def __init__(self, shape: tuple[int, ...]) -> None:
            super().__init__()
            self.shape = shape

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return xb[:, 0].reshape(xb.shape[0], *self.shape)

    for shape, got in (((), "(2,)"), ((1,), "(2, 1)"), ((1, 1), "(2, 1, 1)")):
        with pytest.raises(ValueError) as e:
            _run(Script(BREAKS), monkeypatch, model=Flat(shape))
        assert str(e.value) == f"Invalid model value: expected logits (N, C>=2), got {got}"


def test_the_convergence_check_uses_a_fifth_of_the_steps_and_is_skipped_below_two(monkeypatch):
    for steps, few in ((12, 2), (9, 1), (3, 1)):
        script = Script(BREAKS)
        res = _run(script, monkeypatch, pgd_steps=steps)
        assert script.few_steps == [few]
        assert res.flag_details["pgd_steps_nonmonotone"]["steps"] == [few, steps]
    script = Script(BREAKS)
    res = _run(script, monkeypatch, pgd_steps=1)  # one step: nothing fewer to compare with
    assert script.few_steps == [] and "pgd_steps_nonmonotone" not in res.flags


def test_a_state_file_of_another_attack_configuration_is_refused(monkeypatch, tmp_path):
    state_file = tmp_path / "state.json"
    _run(Script(BREAKS), monkeypatch, state_file=state_file)
    saved = json.loads(state_file.read_text())
    assert saved["fingerprint"]["attack_config"] == Script(BREAKS).config()
    other = Script({"pgd": {1}})  # another attack configuration
    with pytest.raises(
        UserError, match=r"belongs to another evaluation \(different attack_config\)"
    ):
        _run(other, monkeypatch, state_file=state_file)


def test_ranks_evaluating_different_things_are_refused():
    """Every rank's fingerprint (sorted JSON) must be rank 0's; a two-rank world is simulated."""
    s = _session()
    clean = runner.clean_phase(s)
    config = {"attack": 1}
    key = json.dumps(runner.fingerprint(config, s.x, s.y, s.model), sort_keys=True)
    s.comm.world = 2
    s.comm.broadcast = lambda obj: obj  # rank 0's state (none: no state file)
    s.comm.all_gather = lambda mine: [mine, key]  # the other rank evaluates the same thing
    state = runner.state_phase(s, config, clean, None)
    assert state.done == ["clean"]
    for other in (key.replace('"attack": 1', '"attack": 2'), "null"):
        s.comm.all_gather = lambda mine, other=other: [mine, other]
        with pytest.raises(RuntimeError) as e:
            runner.state_phase(s, config, clean, None)
        assert str(e.value) == (
            "distributed evaluation: the ranks differ in their points, model or attack "
            "configuration (every rank must call benchmark with the same arguments)"
        )


def _fmn_radii(monkeypatch: pytest.MonkeyPatch, radii_of: dict[int, float], threat: str) -> None:
    """Radii by point id; checks that the runner hands over the images, verdicts and threat."""

    def radii(xb, adv, broken, thr):
        assert adv.equal(_broken(xb, None)) and broken.tolist() == [True] * len(xb)
        assert thr.value == threat
        return [radii_of[int(i)] for i in xb[:, 2]]

    monkeypatch.setattr(runner, "perturbation_radii", radii)


FMN_BREAKS = {"pgd": {1, 4}, "fmn": {0, 1, 3, 4, 5, 6}, "pgd-few": {1, 4}}


def test_the_fmn_record_holds_radii_curve_and_disagreement_on_its_slice(monkeypatch):
    _fmn_radii(monkeypatch, {1: 0.25, 3: 0.75, 4: 0.75, 5: 0.5, 6: 2.0}, "Linf")
    script = Script(FMN_BREAKS)
    res = _run(
        script, monkeypatch, attacks=("clean", "pgd", "fmn"), eps=0.5, eps_grid=(0.0, 0.25, 0.5, 1.0),
        fmn_slice=(1, 7),
    )  # fmt: skip
    assert script.calls[3] == ("fmn", [1, 3]) and script.calls[5] == ("fmn", [6])
    assert res.radii == [None, 0.25, 0.0, 0.75, 0.75, 0.5, 2.0]  # 2: misclassified clean
    # point 5 is broken at eps (radius 0.5 <= 0.5); point 1 keeps pgd's verdict
    assert res.broken_by == [None, "pgd", "clean", None, "pgd", "fmn", None]
    assert res.eps_grid == [0.0, 0.25, 0.5, 1.0] and res.fmn_slice == [1, 7]
    # over the 6 points of the slice: radius > e, and from e = eps on not broken by pgd
    assert res.security_curve == [(0.0, 5 / 6), (0.25, 4 / 6), (0.5, 2 / 6), (1.0, 1 / 6)]
    # 4: pgd broke it, FMN's radius is above eps; 5: only FMN broke it within eps
    assert res.fmn_disagree == [None, None, None, None, "eps_attack_only", "fmn_only", None]


def test_without_eps_attacks_the_curve_is_fmn_s_alone_and_there_is_no_disagreement(monkeypatch):
    _fmn_radii(monkeypatch, {0: 0.1, 1: 0.25, 3: 0.75, 4: 0.75, 5: 0.5, 6: 2.0}, "L2")
    res = _run(
        Script(FMN_BREAKS), monkeypatch, attacks=("clean", "fmn"), eps=0.5, threat_model="L2",
        eps_grid=(0.0, 0.5, 1.0),
    )  # fmt: skip
    assert res.radii == [0.1, 0.25, 0.0, 0.75, 0.75, 0.5, 2.0] and res.fmn_slice is None
    assert res.security_curve == [(0.0, 6 / 7), (0.5, 3 / 7), (1.0, 1 / 7)]
    assert res.fmn_disagree is None
    no_fmn = _run(Script(BREAKS), monkeypatch)
    assert no_fmn.radii is None and no_fmn.security_curve is None and no_fmn.fmn_disagree is None


def test_radii_of_the_wrong_length_are_refused(monkeypatch):
    monkeypatch.setattr(runner, "perturbation_radii", lambda xb, adv, broken, thr: [0.1])
    with pytest.raises(ValueError, match="zip"):
        _run(Script(FMN_BREAKS), monkeypatch, attacks=("clean", "fmn"), eps=0.5)


def test_a_state_file_from_before_the_pass_counts_resumes_them_from_zero(monkeypatch, tmp_path):
    """Files written before 2026-11-28 have no ``passes``: a unit resumed from one counts this
    session's passes only, and AutoAttack's stage adds up the components that have any."""
    state_file = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        _run(Script(BREAKS, crash_at=("square", 1)), monkeypatch, state_file=state_file)
    d = json.loads(state_file.read_text())
    del d["passes"]
    state_file.write_text(json.dumps(d))
    res = _run(Script(BREAKS), monkeypatch, state_file=state_file)
    assert res.passes["square"] == {"forward": 2, "backward": 0}  # the last chunk's 2 points
    assert "clean" not in res.passes and "pgd" not in res.passes
    assert res.broken_by == [None, "pgd", "clean", None, "pgd", "square", None]
    aa = {"autoattack/apgd-ce": {0, 4}, "autoattack/apgd-t": {6}}
    state_file = tmp_path / "aa.json"
    with pytest.raises(KeyboardInterrupt):
        _run(
            Script(aa, crash_at=("autoattack/apgd-t", 1)), monkeypatch, state_file=state_file,
            attacks=("clean", "autoattack"), version=["apgd-ce", "apgd-t"],
        )  # fmt: skip
    d = json.loads(state_file.read_text())
    del d["passes"]
    state_file.write_text(json.dumps(d))
    res = _run(
        Script(aa), monkeypatch, state_file=state_file, attacks=("clean", "autoattack"),
        version=["apgd-ce", "apgd-t"],
    )  # fmt: skip
    # apgd-t's second chunk (2 points) in this session; apgd-ce ran in the first one only
    assert res.passes["autoattack"] == {"forward": 2, "backward": 0}
    assert res.n_attacked["autoattack"] == 6 and res.n_broken["autoattack"] == 3


def test_the_record_names_its_threat_model_model_and_provenance(monkeypatch):
    for threat in ("Linf", "L2"):
        res = _run(Script(BREAKS), monkeypatch, threat_model=threat, model_info={"params": 6})
        assert res.threat_model == threat and res.model_info == {"params": 6}
        assert res.versions == versions() and res.machine == machine_info(world_size=1)


class _Twice(nn.Module):
    """Averages two passes of the toy model (RobustBench's ``number_forward_passes`` is 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.inner(x) + self.inner(x)) / 2


def test_the_record_counts_the_passes_per_prediction_and_carries_the_compression(monkeypatch):
    squeeze = {"sparsity": 0.5, "structure": "unstructured", "footnote": "Compressed model"}
    res = _run(Script(BREAKS), monkeypatch, model=_Twice(), compression=squeeze)
    assert res.number_forward_passes == 2 and res.world_size == 1
    assert (res.sparsity, res.structure, res.footnote) == (0.5, "unstructured", "Compressed model")
    assert res.broken_by == [None, "pgd", "clean", None, "pgd", "square", None]


def test_one_process_is_never_warned_about_idle_processes(caplog):
    s = _session({"batch_size": 2})
    state = EvalState(None, {}, N)
    state.robust = [False] * N  # nothing left to attack: 0 chunks for the one process
    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.runner"):
        chunks, _ = runner._unit_chunks(s, "pgd", state)
    assert chunks == [] and not caplog.records
    s.comm.world = 2  # two processes, one chunk: warned
    state.robust[0] = True
    state.current = None
    with caplog.at_level(logging.WARNING, logger="robust_agc.eval.runner"):
        runner._unit_chunks(s, "pgd", state)
    assert [r.getMessage()[:33] for r in caplog.records] == ["pgd: 1 chunk(s) of up to 2 points"]
