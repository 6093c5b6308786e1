"""Tests of experiments/render_readme.py: directives become the commands' verbatim output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from render_readme import HEADER, RenderError, main, render, render_regions, run_command

PY = sys.executable


def test_directives_expand_to_command_output() -> None:
    calls: list[str] = []

    def fake(cmd: str) -> str:
        calls.append(cmd)
        return {
            "table": "| a |\n| - |\n| 1 |\n",
            "status": "3 runs remain",
            "plot": "wrote x.png\n",
        }[cmd]

    tpl = "# T\n<!-- md: table -->\ntext\n<!-- sh: status -->\n<!-- do: plot -->\nend\n"
    out = render(tpl, runner=fake)
    assert calls == ["table", "status", "plot"]  # every directive runs, in order
    assert (
        out == HEADER + "# T\n| a |\n| - |\n| 1 |\ntext\n```\n$ status\n3 runs remain\n```\nend\n"
    )


def test_lines_that_only_look_like_directives_stay() -> None:
    tpl = "see `<!-- md: x -->` inline\n<!-- note: not a directive -->\n"
    assert render(tpl, runner=lambda c: pytest.fail(f"ran {c}")) == HEADER + tpl


def test_real_command_runs_from_repo_root() -> None:
    assert (
        run_command(f"{PY} -c \"import pathlib; print(pathlib.Path('experiments').is_dir())\"")
        == "True\n"
    )


def test_failing_command_raises_and_leaves_readme_untouched(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="exit 3|failed \\(3\\)"):
        run_command(f"{PY} -c 'import sys; sys.exit(3)'")
    tpl = tmp_path / "in.md"
    out = tmp_path / "out.md"
    out.write_text("old\n")
    tpl.write_text(f"<!-- md: {PY} -c 'import sys; sys.exit(3)' -->\n")
    assert main(["--template", str(tpl), "--out", str(out), "--regions"]) == 1
    assert out.read_text() == "old\n"


def test_write_then_check(tmp_path: Path) -> None:
    tpl = tmp_path / "in.md"
    out = tmp_path / "out.md"
    tpl.write_text(f"x\n<!-- sh: {PY} -c 'print(42)' -->\n")
    page = tmp_path / "page.md"
    page.write_text(f"intro\n<!-- begin md: {PY} -c 'print(7)' -->\nold 6\n<!-- end -->\nrest\n")
    argv = ["--template", str(tpl), "--out", str(out), "--regions", str(page)]
    assert main([*argv, "--check"]) == 1  # not written yet
    assert main(argv) == 0
    assert "$ " in out.read_text() and "\n42\n" in out.read_text()
    assert page.read_text().splitlines()[1:4] == [
        f"<!-- begin md: {PY} -c 'print(7)' -->",
        "7",
        "<!-- end -->",
    ]
    assert main([*argv, "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert main([*argv, "--check"]) == 1
    assert main(["--template", str(tmp_path / "missing.md"), "--out", str(out)]) == 2


def test_regions_replace_only_their_content() -> None:
    calls: list[str] = []

    def fake(cmd: str) -> str:
        calls.append(cmd)
        return {"a": "new a", "b": "new b\n"}[cmd]

    text = (
        "keep 1\n<!-- begin md: a -->\nold a\nmore old a\n<!-- end -->\nkeep 2\n"
        "<!-- begin sh: b -->\n<!-- end -->\nkeep 3 <!-- end --> inline\n"
    )
    assert render_regions(text, runner=fake) == (
        "keep 1\n<!-- begin md: a -->\nnew a\n<!-- end -->\nkeep 2\n"
        "<!-- begin sh: b -->\n```\n$ b\nnew b\n```\n<!-- end -->\nkeep 3 <!-- end --> inline\n"
    )
    assert calls == ["a", "b"]
    assert render_regions("plain\n", runner=fake) == "plain\n"
    for bad, msg in [
        ("<!-- begin md: a -->\nx\n", "has no <!-- end --> line"),
        ("x\n<!-- end -->\n", "without a begin"),
        ("<!-- begin md: a -->\n<!-- begin md: b -->\n<!-- end -->\n", "begins inside"),
    ]:
        with pytest.raises(RenderError, match=msg):
            render_regions(bad, runner=fake)
