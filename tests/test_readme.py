"""The README's custom-loop example runs exactly as printed."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## AGC in your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_custom_loop_example_runs_and_corrects():
    code = _example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 20
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    opt, model = ns["opt"], ns["model"]
    assert opt.num_refreshes == 2 and opt.has_snapshot
    assert opt.coefficient != 0.0  # the correction was active in the second epoch
    for p in model.parameters():
        st = opt.state[p]
        assert {"snapshot", "full_grad", "snap_grad", "momentum_buffer"} <= set(st)
        assert p.grad is not None and torch.isfinite(p).all()
