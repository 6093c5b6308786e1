"""The evaluation's resumable state (``robust_agc.eval.state``), unit by unit: the file it writes,
what it takes back, what it refuses, and the fingerprint that ties it to one evaluation. The
resume path end to end (every saved state of a real evaluation, crashes inside a chunk, the
recount) is in ``tests/test_eval_resume.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robust_agc.errors import UserError
from robust_agc.eval.comm import Comm
from robust_agc.eval.state import STATE_FORMAT, EvalState, fingerprint, open_state, sha256_tensors

KEY = {"attack_config": {"eps": 0.1, "stages": ["clean", "pgd"]}, "n_examples": 3}


def _progressed(path: Path | None) -> EvalState:
    state = EvalState(path, KEY, 3)
    state.robust = [True, False, True]
    state.broken_by = [None, "pgd", None]
    state.done = ["clean"]
    state.current = {"unit": "pgd", "targets": [0, 1, 2], "chunks_done": 1}
    state.unit_acc = {"clean": 1.0}
    state.timings = {"clean": 0.5}
    state.n_attacked = {"clean": 3}
    state.n_broken = {"clean": 0}
    state.passes = {"clean": [3, 0]}
    state.radii = [0.25, math.inf, None]
    return state


def test_a_fresh_state_has_every_point_robust_and_nothing_done():
    state = EvalState(None, KEY, 4)
    assert state.robust == [True] * 4 and state.broken_by == [None] * 4
    assert state.done == [] and state.current is None and state.radii is None
    assert state.unit_acc == state.timings == state.n_attacked == state.n_broken == {}
    assert state.passes == {} and state.resumed is False
    assert state.snapshot() == {
        "robust": [True] * 4, "broken_by": [None] * 4, "done": [], "current": None,
        "unit_acc": {}, "timings": {}, "n_attacked": {}, "n_broken": {}, "passes": {},
    }  # fmt: skip


def test_save_writes_the_format_the_fingerprint_and_the_snapshot_and_load_takes_it_back(tmp_path):
    path = tmp_path / "state.json"
    saved = _progressed(path)
    saved.save()
    d = json.loads(path.read_text(encoding="utf-8"))
    assert d["format"] == STATE_FORMAT == "robust_agc.eval_state/1"
    assert d["fingerprint"] == KEY
    assert d["radii"] == [0.25, "inf", None]  # infinity as text: the file is strict JSON
    assert {k: v for k, v in d.items() if k not in ("format", "fingerprint")} == json.loads(
        json.dumps({**saved.snapshot(), "radii": [0.25, "inf", None]})
    )
    loaded = EvalState(path, KEY, 3)
    loaded.load()
    assert loaded.resumed
    for k in ("robust", "broken_by", "done", "current", "unit_acc", "timings", "n_attacked"):
        assert getattr(loaded, k) == getattr(saved, k), k
    assert loaded.n_broken == saved.n_broken and loaded.passes == {"clean": [3, 0]}
    assert loaded.radii == [0.25, math.inf, None]
    assert all(type(r) is float for r in loaded.radii[:2])


def test_without_a_path_save_and_load_do_nothing(tmp_path):
    state = _progressed(None)
    state.save()
    state.load()
    assert not state.resumed and list(tmp_path.iterdir()) == []
    missing = EvalState(tmp_path / "absent.json", KEY, 3)
    missing.load()
    assert not missing.resumed and missing.done == []


def test_restore_takes_copies_and_normalises_types():
    d: dict[str, Any] = _progressed(None).snapshot()
    d["robust"] = [1, 0, 1]
    d["passes"] = {"clean": [3.0, 0.0]}
    d["radii"] = ["inf", 0.5, None]
    state = EvalState(None, KEY, 3)
    state.restore(d)
    assert state.robust == [True, False, True] and all(type(v) is bool for v in state.robust)
    assert state.passes == {"clean": [3, 0]} and all(type(v) is int for v in state.passes["clean"])
    assert state.radii == [math.inf, 0.5, None]
    d["done"].append("pgd")
    d["broken_by"][0] = "x"
    d["unit_acc"]["pgd"] = 0.5
    assert state.done == ["clean"] and state.broken_by[0] is None and "pgd" not in state.unit_acc
    del d["radii"], d["passes"]
    state.restore(d)  # files written before the pass counts or the fmn stage
    assert state.passes == {} and state.radii is None


@pytest.mark.parametrize("key", ["robust", "done", "current", "n_broken"])
def test_restore_refuses_a_snapshot_missing_an_entry_with_the_whole_message(key):
    d = _progressed(None).snapshot()
    del d[key]
    state = EvalState(Path("s.json"), KEY, 3)
    with pytest.raises(UserError) as err:
        state.restore(d)
    assert str(err.value) == (
        f"evaluation state s.json lacks {key}; delete it or choose another --state file"
    )
    d2 = _progressed(None).snapshot()
    del d2["timings"], d2["unit_acc"]
    with pytest.raises(UserError, match=r"lacks unit_acc, timings;"):
        state.restore(d2)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "cannot read evaluation state {p}: Expecting property name"),
    ("[1, 2]", "{p} is not a robust_agc evaluation state file"),
    ('{"format": "robust_agc.eval_state/0"}', "{p} is not a robust_agc evaluation state file"),
])  # fmt: skip
def test_load_refuses_what_is_not_a_state_file_with_the_whole_message(tmp_path, content, message):
    path = tmp_path / "state.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        EvalState(path, KEY, 3).load()
    assert str(err.value).startswith(message.format(p=path))
    assert path.read_text(encoding="utf-8") == content


def test_load_refuses_another_evaluations_state_naming_what_differs(tmp_path):
    path = tmp_path / "state.json"
    _progressed(path).save()
    other = {**KEY, "attack_config": {"eps": 0.2, "stages": ["clean", "pgd"]}, "extra": 1}
    state = EvalState(path, other, 3)
    with pytest.raises(UserError) as err:
        state.load()
    assert str(err.value) == (
        f"state file {path} belongs to another evaluation (different attack_config, extra); "
        "delete it or choose another --state file"
    )
    assert not state.resumed and state.done == []
    tupled = EvalState(path, {**KEY, "attack_config": {"eps": 0.1, "stages": ("clean", "pgd")}}, 3)
    tupled.load()  # a fingerprint is compared as JSON: a tuple matches the list it was saved as
    assert tupled.resumed


def test_sha256_tensors_tells_names_shapes_dtypes_and_values_apart():
    x = torch.arange(6, dtype=torch.float32)
    base = sha256_tensors([("x", x)])
    assert base == sha256_tensors([("x", x.clone())]) and len(base) == 64
    others = [
        sha256_tensors([("y", x)]),
        sha256_tensors([("x", x.reshape(2, 3))]),
        sha256_tensors([("x", x.double())]),
        sha256_tensors([("x", x + 1)]),
        sha256_tensors([("x", x), ("x", x)]),
        sha256_tensors([]),
    ]
    assert len({base, *others}) == 7
    t = torch.arange(12.0).reshape(3, 4)
    assert sha256_tensors([("t", t.t())]) == sha256_tensors([("t", t.t().contiguous())])
    p = nn.Parameter(torch.ones(2))
    assert sha256_tensors([("p", p)]) == sha256_tensors([("p", torch.ones(2))])


def test_the_fingerprint_holds_the_configuration_the_count_and_the_hashes():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 0, 1, 1])
    fp = fingerprint({"eps": 0.1, "units": ("clean",)}, x, y, model)
    assert fp == {
        "attack_config": {"eps": 0.1, "units": ["clean"]},
        "n_examples": 5,
        "points_sha256": sha256_tensors([("x", x), ("y", y)]),
        "model_sha256": sha256_tensors(list(model.state_dict().items())),
    }
    with torch.no_grad():
        model.bias.add_(1e-3)
    assert fingerprint({"eps": 0.1}, x, y, model)["model_sha256"] != fp["model_sha256"]
    assert fingerprint({"eps": 0.1}, x, y.flip(0), model)["points_sha256"] != fp["points_sha256"]


def test_open_state_on_one_process_resumes_or_starts_fresh_and_refuses_as_load_does(tmp_path):
    path = tmp_path / "state.json"
    fresh = open_state(path, KEY, 3, Comm())
    assert not fresh.resumed and fresh.robust == [True] * 3 and fresh.path == path
    _progressed(path).save()
    state = open_state(path, KEY, 3, Comm())
    assert state.resumed and state.done == ["clean"] and state.broken_by == [None, "pgd", None]
    with pytest.raises(UserError, match="belongs to another evaluation"):
        open_state(path, {**KEY, "n_examples": 4}, 3, Comm())


class _Rank1(Comm):
    """Rank 1 of two: broadcast hands over what rank 0 sent."""

    def __init__(self, sent: tuple[Any, ...]) -> None:
        self.rank, self.world, self.sent = 1, 2, sent

    def broadcast(self, obj: Any) -> Any:
        return self.sent


def test_open_state_on_another_rank_copies_rank_zeros_state_and_its_error(tmp_path):
    path = tmp_path / "state.json"
    snap = _progressed(None).snapshot()
    state = open_state(path, KEY, 3, _Rank1((None, snap, True)))
    assert state.resumed and state.done == ["clean"] and state.radii == [0.25, math.inf, None]
    assert not path.exists()  # only rank 0 reads or writes the file
    with pytest.raises(UserError) as err:
        open_state(path, KEY, 3, _Rank1(("rank 0 could not resume", snap, False)))
    assert str(err.value) == "rank 0 could not resume"
    fresh = open_state(path, KEY, 3, _Rank1((None, EvalState(None, KEY, 3).snapshot(), False)))
    assert not fresh.resumed and fresh.done == []
