"""The library's structure rules (docs/architecture.md), checked on the source itself.

- no function longer than :data:`MAX_LINES` lines (docstring included);
- no module imports a private name (leading underscore) of another module;
- no import cycle between the library's modules (imports inside functions included: a lazy import
  that dodges a cycle at import time is still a cycle in the design);
- no module outside ``robust_agc/optim`` reads AGC's state by its key names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("robust_agc", "attacks")
MAX_LINES = 80
AGC_STATE_KEYS = ("snapshot", "full_grad", "snap_grad")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append(
                    (sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno)
                )
    return out


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over the limit:\n" + "\n".join(long)


def test_no_module_imports_a_private_name_of_another() -> None:
    bad = []
    for module in MODULES:
        for target, name, line in _imports(module):
            last = name or target.rsplit(".", 1)[-1]
            private = last.startswith("_") and not (last.startswith("__") and last.endswith("__"))
            if target.split(".")[0] in PACKAGES and private:
                bad.append(f"{module}:{line} imports {target}{'.' + name if name else ''}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_module_import_graph_has_no_cycle() -> None:
    graph = {
        m: {t for t, _, _ in _imports(m) if t in MODULES and t != m and not m.startswith(t + ".")}
        for m in MODULES
    }
    # a package's __init__ re-exporting its own modules is not a dependency of those modules on it
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_optimizer_reads_agc_state_by_its_key_names() -> None:
    """Outside ``robust_agc/optim`` no code uses AGC's state keys (as a string in code, not
    prose): other parts go through :class:`robust_agc.optim.CorrectedOptimizer`."""
    bad = []
    for module, path in MODULES.items():
        if module.startswith("robust_agc.optim"):
            continue
        tree = ast.parse(path.read_text())
        prose = {
            id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)
        }  # docstrings and bare strings
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and n.value in AGC_STATE_KEYS and id(n) not in prose:
                bad.append(f"{path.relative_to(ROOT)}:{n.lineno} {n.value!r}")
    assert not bad, "AGC state keys used outside robust_agc/optim:\n" + "\n".join(bad)
