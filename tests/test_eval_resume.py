"""Evaluation resume (`benchmark(..., state_file=...)`): an evaluation stopped at any saved chunk,
or killed in the middle of one, resumes to the record an uninterrupted run gives (per-point verdicts,
accuracies, attacked/broken counts, model passes, flags); the recount and its `count_disagreement`
flag after a resume; and state files of another evaluation are refused, leaving them untouched.

The record's contract (`robust_agc.eval`): the state is saved after every chunk; a resumed session
redoes the unfinished chunk and nothing else; passes are "summed over resumed sessions; a resumed
session's recomputed clean predictions are not counted"; points broken in an earlier session have no
adversarial image, so the recount skips them and says how many in
``flag_details["count_disagreement"]["n_not_repredicted"]``.

The model is the synthetic `RoutedModel` of `test_autoattack_parity` (components break different
points), with tiny attack budgets: the attacks only need to be deterministic here.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch

from robust_agc import eval as ev
from robust_agc.errors import UserError
from robust_agc.eval.autoattack import AutoAttackRunner
from robust_agc.eval.checks import GradientMaskingWarning
from robust_agc.eval.state import EvalState

from .test_autoattack_parity import (  # noqa: F401 (one_thread: an autouse fixture)
    EPS,
    LABELS,
    POINTS,
    RoutedModel,
    _points,
    one_thread,
)

BATCH = 2
KW: dict[str, Any] = {"eps": EPS, "attacks": "clean,autoattack", "batch_size": BATCH}
UNITS = [f"autoattack/{c}" for c in ev.AUTOATTACK_VERSIONS["standard"]]


def _tiny_budgets(aa: Any) -> None:
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = 5
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 3
    aa.square.n_queries = 100


@pytest.fixture(scope="module", autouse=True)
def tiny_budgets():
    real_init = AutoAttackRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _tiny_budgets(self.aa)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoAttackRunner, "__init__", init)
        yield


@pytest.fixture(scope="module")
def routed() -> tuple[RoutedModel, torch.Tensor, torch.Tensor]:
    x, y = _points()
    return RoutedModel(POINTS, LABELS, eps=EPS).eval(), x, y


def _run(model, x, y, **kw: Any) -> ev.EvalResult:
    args = {**KW, "progress": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        return ev.benchmark(model, x=x, y=y, **args)


class Calls:
    """Counts the AutoAttack runner's chunk calls per component."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = AutoAttackRunner.__call__

        def spy(runner, name, xb, yb):
            self.names.append(name)
            return real(runner, name, xb, yb)

        monkeypatch.setattr(AutoAttackRunner, "__call__", spy)

    def per_unit(self) -> dict[str, int]:
        return {u: self.names.count(u.split("/", 1)[1]) for u in UNITS}


def _record(res: ev.EvalResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record less what legitimately differs across sessions (timings, notes, versions), and the
    count-agreement details apart."""
    d = res.to_dict()
    for key in ("timings", "notes", "versions"):
        del d[key]
    for stage in d["stages"]:
        del stage["time_s"]
        for comp in stage.get("components", []):
            del comp["time_s"]
    details = dict(d["flag_details"])
    count = details.pop("count_disagreement")
    d["flag_details"] = details
    return d, count


def _progress(text: str) -> dict[str, Any]:
    """A saved state less its timings."""
    d = json.loads(text)
    del d["timings"]
    return d


def _chunks(n: int) -> int:
    return -(-n // BATCH)


@pytest.fixture(scope="module")
def uninterrupted(routed, tmp_path_factory):
    """One uninterrupted run with a state file, and every state it saved, in order."""
    model, x, y = routed
    state = tmp_path_factory.mktemp("ref") / "state.json"
    saved: list[str] = []
    real_save = EvalState.save

    def save(self):
        real_save(self)
        saved.append(self.path.read_text(encoding="utf-8"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EvalState, "save", save)
        res = _run(model, x, y, state_file=state)
    return res, saved


def test_state_file_does_not_change_the_record(routed, uninterrupted):
    """Keeping a state file changes nothing in the record; it is saved once after the clean stage,
    after every chunk and at the end of every unit; the evaluation has several breaking units."""
    model, x, y = routed
    res, saved = uninterrupted
    plain = _run(model, x, y)
    assert _record(plain) == _record(res)
    assert not any("resumed" in n for n in res.notes)
    # the evaluation is worth resuming: several components break points, some points survive
    breakers = {b for b in res.broken_by if b not in (None, "clean")}
    assert len(breakers) >= 3, res.broken_by
    assert None in res.broken_by and "clean" in res.broken_by
    # one save after the clean stage, one per chunk, one at the end of each unit
    n_chunks = sum(_chunks(res.n_attacked[u]) for u in UNITS)
    assert len(saved) == 1 + n_chunks + len(UNITS)


def test_resume_from_every_saved_state(routed, uninterrupted, tmp_path, monkeypatch):
    """Resumed from each state the run saved (after every chunk and every unit), the evaluation
    runs exactly the chunks left and returns the uninterrupted record; the recount skips the points
    broken in the earlier session, says how many, and still agrees."""
    model, x, y = routed
    ref, saved = uninterrupted
    ref_record, ref_count = _record(ref)
    assert ref_count["n_disagree"] == 0 and "n_not_repredicted" not in ref_count
    calls = Calls(monkeypatch)
    for k, text in enumerate(saved):
        snap = json.loads(text)
        state = tmp_path / f"state{k}.json"
        state.write_text(text, encoding="utf-8")
        calls.names.clear()
        res = _run(model, x, y, state_file=state)
        record, count = _record(res)
        assert record == ref_record, f"resumed from save {k}"
        # exactly the chunks left: none of a finished unit, the rest of the current one, all later
        expected = {}
        for u in UNITS:
            if u in snap["done"]:
                expected[u] = 0
            elif snap["current"] is not None and snap["current"]["unit"] == u:
                expected[u] = _chunks(ref.n_attacked[u]) - snap["current"]["batches_done"]
            else:
                expected[u] = _chunks(ref.n_attacked[u])
        assert calls.per_unit() == expected, f"resumed from save {k}"
        # the recount: earlier-session breaks are not re-predicted, the flag stays down
        n_past = sum(b not in (None, "clean") for b in snap["broken_by"])
        assert count == ref_count | ({"n_not_repredicted": n_past} if n_past else {}), k
        assert res.flags["count_disagreement"] is False
        assert any("resumed" in n for n in res.notes)
        # the file ends complete, as the uninterrupted run left it (timings aside)
        assert _progress(state.read_text(encoding="utf-8")) == _progress(saved[-1]), k


@pytest.mark.parametrize(
    ("unit", "chunk"), [(UNITS[0], 1), (UNITS[0], 3), (UNITS[1], 2), (UNITS[2], 1)]
)
def test_interrupted_state_is_the_known_chunk(
    routed, uninterrupted, tmp_path, monkeypatch, unit, chunk
):
    """Stopped before chunk ``chunk`` of ``unit``, the file holds exactly the finished chunks."""
    model, x, y = routed
    ref, _ = uninterrupted
    state = tmp_path / "state.json"

    class Stop(Exception):
        pass

    real = AutoAttackRunner.__call__
    seen: list[str] = []

    def stop(runner, name, xb, yb):
        seen.append(name)
        if f"autoattack/{name}" == unit and seen.count(name) == chunk:
            raise Stop
        return real(runner, name, xb, yb)

    with monkeypatch.context() as mp:
        mp.setattr(AutoAttackRunner, "__call__", stop)
        with pytest.raises(Stop):
            _run(model, x, y, state_file=state)
    snap = json.loads(state.read_text(encoding="utf-8"))
    order = ["clean", *UNITS]
    before = order[: order.index(unit)]
    assert snap["done"] == before
    targets = [i for i, b in enumerate(ref.broken_by) if b is None or b not in before]
    finished = targets[: (chunk - 1) * BATCH]
    broken_now = [i for i in finished if ref.broken_by[i] == unit]
    if chunk == 1:  # nothing of this unit saved yet
        assert snap["current"] is None and unit not in snap["n_broken"]
    else:
        assert snap["current"] == {"unit": unit, "targets": targets, "batches_done": chunk - 1}
        assert snap["n_broken"][unit] == len(broken_now)
    expect_by = [b if b in before or i in broken_now else None for i, b in enumerate(ref.broken_by)]
    assert snap["broken_by"] == expect_by
    assert snap["robust"] == [b is None for b in expect_by]
    res = _run(model, x, y, state_file=state)
    assert _record(res)[0] == _record(ref)[0]


def test_crash_inside_a_chunk_resumes_to_the_same_record(routed, uninterrupted, tmp_path):
    """The model raising anywhere (the first clean chunk, inside attack chunks, the last recount):
    the file keeps only whole chunks (a state the uninterrupted run also saved), the pass counter
    leaves the model, and the rerun gives the uninterrupted record."""
    model, x, y = routed
    ref, saved = uninterrupted
    progress = [_progress(t) for t in saved]
    n_calls = [0]

    def count(module, inputs):
        n_calls[0] += 1

    handle = model.register_forward_pre_hook(count)
    try:
        _run(model, x, y)
    finally:
        handle.remove()
    total = n_calls[0]

    class Crash(Exception):
        pass

    for at in (1, total // 3, (2 * total) // 3, total):
        state = tmp_path / f"state{at}.json"
        n_calls[0] = 0

        def crash(module, inputs, at=at):
            n_calls[0] += 1
            if n_calls[0] == at:
                raise Crash

        handle = model.register_forward_pre_hook(crash)
        try:
            with pytest.raises(Crash):
                _run(model, x, y, state_file=state)
        finally:
            handle.remove()
        assert not model._forward_hooks  # the pass counter's hook is gone
        if at == 1:  # before the clean stage finished: nothing saved
            assert not state.exists()
        else:
            kept = _progress(state.read_text(encoding="utf-8"))
            assert kept in progress, f"crash at model call {at}: a half-done chunk was saved"
            assert (kept == progress[-1]) is (at == total)
        res = _run(model, x, y, state_file=state)
        assert _record(res)[0] == _record(ref)[0], f"crash at model call {at} of {total}"
        assert res.flags["count_disagreement"] is False


class HealingModel(RoutedModel):
    """After ``heal`` is set, points in ``healed`` are classified correctly on any perturbed image:
    the recount then disagrees with the attack's verdict on exactly those broken points."""

    healed: frozenset[int] = frozenset()
    heal = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.heal:
            return out
        flat = x.reshape(x.shape[0], -1)
        pid = flat[:, :16].argmax(1)
        perturbed = (flat[:, 16:] - 0.5).abs().amax(1) > 0
        fix = perturbed & torch.tensor([int(p) in self.healed for p in pid])
        good = torch.nn.functional.one_hot(self.label[pid], 10).float() * 1e6
        return torch.where(fix[:, None], good, out)


@pytest.mark.parametrize("resume", [False, True])
def test_count_disagreement_fires_exactly_on_disagreeing_points(
    uninterrupted, tmp_path, monkeypatch, resume
):
    """The recount flag counts the broken points whose adversarial image the model now classifies
    correctly, among the points broken in this session only, and fires iff there is one."""
    ref, saved = uninterrupted
    x, y = _points()
    model = HealingModel(POINTS, LABELS, eps=EPS).eval()
    broken = [i for i, b in enumerate(ref.broken_by) if b not in (None, "clean")]
    # the first chunk of APGD-T broke at least one point: resume from the save after it
    snap_text = next(t for t in saved if json.loads(t)["n_broken"].get(UNITS[1], 0) > 0)
    past = {i for i, b in enumerate(json.loads(snap_text)["broken_by"]) if b not in (None, "clean")}
    now = [i for i in broken if i not in past] if resume else broken
    assert past and now and (set(now) < set(broken) if resume else now == broken)
    real_save = EvalState.save

    def save(self):  # the model changes once every unit is done: before the recount
        real_save(self)
        if set(UNITS) <= set(self.done):
            model.heal = True

    monkeypatch.setattr(EvalState, "save", save)
    state = tmp_path / "state.json"
    for healed, expect in [(set(), 0), ({now[0]}, 1), (set(broken), len(now))]:
        if resume:
            state.write_text(snap_text, encoding="utf-8")
        elif state.exists():
            state.unlink()
        model.heal, model.healed = False, frozenset(healed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradientMaskingWarning)
            res = ev.benchmark(model, x=x, y=y, state_file=state, progress=False, **KW)
        assert res.broken_by == ref.broken_by
        details = res.flag_details["count_disagreement"]
        assert details["n_disagree"] == expect, healed
        assert res.flags["count_disagreement"] is (expect > 0)
        assert details.get("n_not_repredicted", 0) == (len(past) if resume else 0)
        robust = ref.robust_flags.sum().item()
        assert res.robust_acc_repredicted == (robust + expect) / len(POINTS)


@pytest.mark.parametrize(
    "change",
    [
        {"eps": EPS * 1.5},
        {"seed": 1},
        {"batch_size": BATCH + 1},
        {"version": ["apgd-ce", "apgd-t", "fab-t"]},
        {"attacks": "clean,pgd,autoattack"},
        {"threat_model": "L2"},
        {"points": "labels"},
        {"points": "fewer"},
        {"points": "pixel"},
        {"model": "other"},
        {"budget": "square"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_state_of_another_evaluation_is_refused_untouched(
    routed, uninterrupted, tmp_path, monkeypatch, change
):
    """Any change of model, points, labels, eps, seed, chunking, components or attack budgets is
    refused with a UserError naming what differs, and the state file is left byte for byte."""
    model, x, y = routed
    _, saved = uninterrupted
    text = saved[len(saved) // 2]  # an evaluation in the middle of AutoAttack
    state = tmp_path / "state.json"
    state.write_text(text, encoding="utf-8")
    kw = dict(change)
    which = {"eps": "attack_config", "seed": "attack_config", "batch_size": "attack_config"}
    which |= {
        "version": "attack_config",
        "attacks": "attack_config",
        "threat_model": "attack_config",
    }
    key = which.get(next(iter(change)))
    points = kw.pop("points", None)
    if points == "labels":
        y = (y + 1) % 10
        key = "points_sha256"
    elif points == "fewer":
        x, y = x[:-1], y[:-1]
        key = "n_examples"
    elif points == "pixel":
        x = x.clone()
        x[0, 0, -1, -1] += 0.01
        key = "points_sha256"
    if kw.pop("model", None):
        model = RoutedModel(list(reversed(POINTS)), LABELS, eps=EPS).eval()
        key = "model_sha256"
    if kw.pop("budget", None):
        real_init = AutoAttackRunner.__init__

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            self.aa.square.n_queries += 1

        monkeypatch.setattr(AutoAttackRunner, "__init__", init)
        key = "attack_config"
    calls = Calls(monkeypatch)
    with pytest.raises(UserError, match=rf"another evaluation \(different [a-z_0-9, ]*{key}"):
        _run(model, x, y, state_file=state, **kw)
    assert calls.names == []
    assert state.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot read evaluation state"),
        (json.dumps({"format": "something/else"}), "not a robust_agc evaluation state file"),
        (json.dumps([1, 2]), "not a robust_agc evaluation state file"),
    ],
)
def test_unreadable_state_is_refused(routed, tmp_path, content, match):
    model, x, y = routed
    state = tmp_path / "state.json"
    state.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        _run(model, x, y, state_file=state)
    assert state.read_text(encoding="utf-8") == content


def test_state_with_other_clean_predictions_is_refused(routed, uninterrupted, tmp_path):
    """Same fingerprint, but the stored clean verdicts are not this model's: refused, not mixed."""
    model, x, y = routed
    _, saved = uninterrupted
    snap = json.loads(saved[0])
    i = snap["broken_by"].index(None)
    snap["broken_by"][i], snap["robust"][i] = "clean", False
    state = tmp_path / "state.json"
    state.write_text(json.dumps(snap), encoding="utf-8")
    with pytest.raises(UserError, match="stored clean predictions differ"):
        _run(model, x, y, state_file=state)


def test_resume_keeps_the_earlier_sessions_timings(routed, uninterrupted, tmp_path):
    """Timings are summed over sessions: resumed from a state, a finished unit keeps the seconds
    the earlier session spent on it, and the unit in progress adds its new seconds to them."""
    model, x, y = routed
    ref, saved = uninterrupted
    checked = 0
    for k, text in enumerate(saved):
        snap = json.loads(text)
        if not snap["done"] or snap["current"] is None:
            continue
        state = tmp_path / f"state{k}.json"
        state.write_text(text, encoding="utf-8")
        res = _run(model, x, y, state_file=state)
        for unit in snap["done"]:
            assert res.timings[unit] == snap["timings"][unit], (k, unit)
        cur = snap["current"]["unit"]
        if snap["current"]["batches_done"] < _chunks(ref.n_attacked[cur]):  # chunks left
            assert res.timings[cur] > snap["timings"][cur] > 0, (k, cur)
            checked += 1
        else:
            assert res.timings[cur] == snap["timings"][cur], (k, cur)
    assert checked >= 2


@pytest.mark.parametrize(
    "keys",
    [["unit_acc"], ["timings"], ["n_attacked"], ["n_broken"], ["current"], ["unit_acc", "timings"]],
)
def test_state_missing_an_entry_is_refused_untouched(routed, uninterrupted, tmp_path, keys):
    """A state that lacks an entry every snapshot writes (truncated or hand-edited) is refused by
    name, not resumed with that entry empty (a finished unit would lose its accuracy or time)."""
    model, x, y = routed
    _, saved = uninterrupted
    snap = json.loads(saved[len(saved) // 2])
    for key in keys:
        del snap[key]
    state = tmp_path / "state.json"
    text = json.dumps(snap)
    state.write_text(text, encoding="utf-8")
    match = rf"lacks {', '.join(keys)}; delete it or choose another --state file$"
    with pytest.raises(UserError, match=match):
        _run(model, x, y, state_file=state)
    assert state.read_text(encoding="utf-8") == text


def test_state_without_pass_counts_resumes(routed, uninterrupted, tmp_path):
    """A state written before the pass counts existed (no ``passes``) still resumes, to the same
    verdicts; the pass counts then cover only the resumed session."""
    model, x, y = routed
    ref, saved = uninterrupted
    snap = json.loads(saved[len(saved) // 2])
    del snap["passes"]
    state = tmp_path / "state.json"
    state.write_text(json.dumps(snap), encoding="utf-8")
    res = _run(model, x, y, state_file=state)
    assert res.broken_by == ref.broken_by and res.robust_acc == ref.robust_acc


class _Stop(Exception):
    """Raised by a patched method to interrupt an evaluation at a known point."""


def _stopped_then_resumed(
    routed, tmp_path, monkeypatch, kw: dict[str, Any], owner: type, name: str, patched: Any
) -> ev.EvalResult:
    """Run with ``owner.name`` replaced by ``patched`` (which raises :class:`_Stop`), then rerun
    on the same state file unpatched; returns the resumed record."""
    model, x, y = routed
    state = tmp_path / "state.json"
    with monkeypatch.context() as mp:
        mp.setattr(owner, name, patched)
        with pytest.raises(_Stop):
            _run(model, x, y, state_file=state, **kw)
    return _run(model, x, y, state_file=state, **kw)


def test_resume_inside_pgd_stage(routed, tmp_path, monkeypatch):
    """PGD chunks resume like AutoAttack's: stopped in the middle of the PGD stage, the rerun
    attacks only the unfinished PGD chunks and returns the uninterrupted record."""
    model, x, y = routed
    kw = {"attacks": "clean,pgd,autoattack", "pgd_steps": 10, "pgd_restarts": 1}
    ref = _run(model, x, y, **kw)
    assert ref.n_broken["pgd"] > 0 and _chunks(ref.n_attacked["pgd"]) >= 3
    real_save = EvalState.save

    def save(self):
        real_save(self)
        if (self.current or {}).get("unit") == "pgd" and self.current["batches_done"] == 2:
            raise _Stop

    res = _stopped_then_resumed(routed, tmp_path, monkeypatch, kw, EvalState, "save", save)
    assert _record(res)[0] == _record(ref)[0]


def test_resume_after_pgd_stage_keeps_the_pgd_check(routed, tmp_path, monkeypatch):
    model, x, y = routed
    kw = {"attacks": "clean,pgd,autoattack", "pgd_steps": 10, "pgd_restarts": 1}
    ref = _run(model, x, y, **kw)
    assert "pgd_steps_nonmonotone" in ref.flags

    def stop(runner, name, xb, yb):
        raise _Stop

    res = _stopped_then_resumed(
        routed, tmp_path, monkeypatch, kw, AutoAttackRunner, "__call__", stop
    )
    assert res.flags == ref.flags
    assert res.passes == ref.passes
