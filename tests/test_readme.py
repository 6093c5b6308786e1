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


# The headline sentence quotes figures of the generated lines under it (render_readme.py rewrites
# those lines, not the sentence): both must say the same, to the sentence's one decimal.
_LINE = re.compile(
    r"^- `agc-online-frac` vs `sgd`, .*? final evaluation \([^)]*\) (?P<d>[-+]\d+\.\d+) ± \S+ points "
    r"\(95% CI (?P<lo>[-+]\d+\.\d+) to (?P<hi>[-+]\d+\.\d+): [^)]*\) at (?P<r>\d+\.\d+) ± \S+x the "
    r"training CPU time; at equal training CPU time \([^)]*\) (?P<td>[-+]\d+\.\d+) ± \S+ points "
    r"\(95% CI (?P<tlo>[-+]\d+\.\d+) to (?P<thi>[-+]\d+\.\d+)",
    re.M,
)
_SENTENCE = re.compile(
    r"default variant \(`agc-online-frac`\) ends (?P<a_d>\S+) points of PGD-50 robust accuracy from "
    r"SGD \(95% CI (?P<a_lo>\S+)\s+to (?P<a_hi>\S+)\) at (?P<a_r>\S+)x SGD's training CPU time, and "
    r"(?P<a_td>\S+) points \(CI (?P<a_tlo>\S+) to (?P<a_thi>\S+)\) at SGD's time; in\s+standard "
    r"training (?P<s_d>\S+) points of clean accuracy \(CI (?P<s_lo>\S+) to (?P<s_hi>\S+)\) at "
    r"(?P<s_r>\S+)x the time, and (?P<s_td>\S+) points\s+\(CI (?P<s_tlo>\S+) to (?P<s_thi>\S+)\)",
)


def test_headline_sentence_matches_the_generated_lines():
    text = README.read_text()
    sentence = _SENTENCE.search(text)
    assert sentence, "the headline sentence changed shape: update this test with it"
    lines = _LINE.findall(text)
    assert len(lines) == 2, "expected one generated agc-online-frac line per study"
    names = ("d", "lo", "hi", "r", "td", "tlo", "thi")
    for prefix, values in zip(("a", "s"), lines):
        for name, value in zip(names, values):
            quoted = sentence.group(f"{prefix}_{name}")
            # the lines print two decimals; the sentence rounds those to one (half away from 0)
            assert abs(float(quoted) - float(value)) <= 0.05 + 1e-9, (prefix, name, quoted, value)
