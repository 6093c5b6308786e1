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


ROOT = README.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_readme_and_docs_links_resolve():
    """Every relative markdown link of the README and of docs/ names a file of the repository."""
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    text = README.read_text()
    for doc in ("usage", "agc", "protocols", "architecture"):
        assert f"(docs/{doc}.md)" in text, doc


def test_doc_citations_name_existing_sections():
    """`docs/protocols.md section N` (or the older bare `protocols.md section N`) in the code names a
    numbered section that exists."""
    sections = {page.name: set(re.findall(r"^## (\d+)\.", page.read_text(), re.M)) for page in DOCS}
    cited = 0
    for folder in ("robust_agc", "attacks", "experiments", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for doc, number in re.findall(
                r"(?:docs/)?(\w+\.md)`*,? section (\d+)", path.read_text()
            ):
                cited += 1
                assert number in sections.get(doc, set()), f"{path}: {doc} section {number}"
    assert {"1", "2", "3"} <= sections["protocols.md"] and len(sections["agc.md"]) == 8
    assert cited >= 1  # eval.py and sparse/masks.py cite sections 1 and 3


def test_readme_commands_parse():
    """The README's set-up targets exist and its `robust-agc` commands are accepted by the parser."""
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    from robust_agc.cli import build_parser

    parser = build_parser()
    for section, expected in (
        ("## Train, evaluate, report", 4),
        ("## Pruning, smaller networks, security curves, fast training", 6),
    ):
        block = README.read_text().split(section, 1)[1].split("```bash\n", 1)[1]
        commands = block.split("```", 1)[0].replace("\\\n", " ").splitlines()
        parsed = 0
        for line in commands:
            argv = line.split("#", 1)[0].split()
            if argv and argv[0].endswith("robust-agc"):
                parser.parse_args(argv[1:])
                parsed += 1
        assert parsed == expected, section
