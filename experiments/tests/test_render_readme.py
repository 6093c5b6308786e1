"""Tests of experiments/render_readme.py: directives become the commands' verbatim output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from render_readme import HEADER, RenderError, main, render, run_command

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
    assert main(["--template", str(tpl), "--out", str(out)]) == 1
    assert out.read_text() == "old\n"


def test_write_then_check(tmp_path: Path) -> None:
    tpl = tmp_path / "in.md"
    out = tmp_path / "out.md"
    tpl.write_text(f"x\n<!-- sh: {PY} -c 'print(42)' -->\n")
    assert main(["--template", str(tpl), "--out", str(out), "--check"]) == 1  # not written yet
    assert main(["--template", str(tpl), "--out", str(out)]) == 0
    assert "$ " in out.read_text() and "\n42\n" in out.read_text()
    assert main(["--template", str(tpl), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert main(["--template", str(tpl), "--out", str(out), "--check"]) == 1
    assert main(["--template", str(tmp_path / "missing.md"), "--out", str(out)]) == 2
