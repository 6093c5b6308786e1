"""The verdict bookkeeping of ``tests/mutation.py`` (the mutation-testing driver): what a fast
pass on the unit tests may carry into a group's verdicts, and which functions count as changed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mutmut", reason="mutation extras: pip install -e '.[mutation]'")

_spec = importlib.util.spec_from_file_location(
    "mutation_tool", Path(__file__).with_name("mutation.py")
)
assert _spec is not None and _spec.loader is not None
mutation = importlib.util.module_from_spec(_spec)
sys.modules["mutation_tool"] = mutation  # its dataclasses look their module up
_spec.loader.exec_module(mutation)

KILLED, SURVIVED = 1, 0
M = "pkg.mod.x_f__mutmut_"
G = "pkg.mod.x_g__mutmut_"


def _meta(path: Path, codes: dict[str, int | None], hashes: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": hashes}))
    return path


def _codes(path: Path) -> dict[str, int | None]:
    return json.loads(path.read_text())["exit_code_by_key"]


def test_only_kills_are_carried_and_only_where_the_group_has_no_verdict(tmp_path):
    src, dst = tmp_path / "fast", tmp_path / "group"
    hashes = {"x_f": "aaa", "x_g": "bbb"}
    codes = {M + "1": KILLED, M + "2": SURVIVED, M + "3": KILLED, G + "1": None}
    _meta(src / "pkg/mod.py.meta", codes, hashes)
    before = {M + "1": None, M + "2": None, M + "3": SURVIVED, G + "1": KILLED}
    target = _meta(dst / "pkg/mod.py.meta", before, hashes)
    assert mutation._take_kills(src, dst) == 1
    # 1: killed by the unit tests; 2: their survivor stays for the whole selection; 3 and g: the
    # group's own verdicts stand
    assert _codes(target) == {M + "1": KILLED, M + "2": None, M + "3": SURVIVED, G + "1": KILLED}


def test_a_changed_function_loses_its_old_verdicts_and_takes_the_new_mutants(tmp_path):
    src, dst = tmp_path / "fast", tmp_path / "group"
    _meta(
        src / "pkg/mod.py.meta",
        {M + "1": KILLED, M + "2": SURVIVED, G + "1": None},
        {"x_f": "new", "x_g": "bbb"},
    )
    target = _meta(
        dst / "pkg/mod.py.meta",
        {M + "1": SURVIVED, M + "2": KILLED, M + "3": KILLED, G + "1": SURVIVED},
        {"x_f": "old", "x_g": "bbb"},
    )
    assert mutation._take_kills(src, dst) == 1
    d = json.loads(target.read_text())
    # f's verdicts are the new run's (3 no longer exists); g, unchanged, keeps its own
    assert d["exit_code_by_key"] == {G + "1": SURVIVED, M + "1": KILLED, M + "2": None}
    assert d["hash_by_function_name"] == {"x_f": "new", "x_g": "bbb"}


def test_a_group_without_verdicts_starts_from_the_kills(tmp_path):
    src, dst = tmp_path / "fast", tmp_path / "group"
    _meta(src / "pkg/mod.py.meta", {M + "1": KILLED, M + "2": SURVIVED}, {"x_f": "aaa"})
    assert mutation._take_kills(src, dst) == 1
    assert _codes(dst / "pkg/mod.py.meta") == {M + "1": KILLED, M + "2": None}


def test_function_names_and_changed_functions(tmp_path, monkeypatch):
    assert mutation._function_of("robust_agc.optim.agc.xǁAGCǁstep__mutmut_12") == "xǁAGCǁstep"
    assert mutation._function_of(M + "7") == "x_f"
    from mutmut.mutation.file_mutation import compute_function_hashes

    root, work = tmp_path / "root", tmp_path / "work"
    source = "def f(a):\n    return a + 1\n\n\ndef g(a):\n    return a\n"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg/mod.py").write_text(source.replace("a + 1", "a + 2"))  # f changed since
    _meta(
        work / "grp/mutants/pkg/mod.py.meta",
        {M + "1": KILLED, G + "1": KILLED},
        compute_function_hashes(source),
    )
    monkeypatch.setattr(mutation, "ROOT", root)
    monkeypatch.setattr(mutation, "WORK", work)
    assert mutation._stale("grp") == {"pkg.mod.x_f__mutmut_*"}
