"""Mutation testing of the core modules with mutmut, one module group at a time.

    python tests/mutation.py run [GROUP ...] [--jobs N]   # mutate and test (resumable)
    python tests/mutation.py save [GROUP ...]             # keep the verdicts so far (committed)
    python tests/mutation.py report [--list STATUS ...]   # per-module table from the last runs

``make mutation`` runs both. Each group (see :data:`GROUPS`) is mutated in its own scratch copy of
the repository under ``.mutation/<group>/``, whose ``pyproject.toml`` gets the group's
``only_mutate`` and test files added to the shared ``[tool.mutmut]`` table: mutmut takes one test
selection per run, and a surviving mutant is run against every selected test that covers it, so a
group's own unit tests keep a survivor's cost to seconds instead of the whole suite's minutes.
A run that is stopped resumes where it was (mutmut keeps each verdict in ``.meta`` files); the
sources and tests are copied in again at every run, the map of tests to functions is collected
anew, and mutants of a changed function are tested again (``--only`` re-tests chosen ones).

The verdicts outlive the scratch copy: ``run`` saves each group's ``.meta`` files (mutmut's
verdicts, with the hash of every mutated function) to ``tests/mutation_state/<group>/`` when it
ends, ``save`` does so at any time (for a run still going), and a ``run`` on a machine without the
scratch copy starts from the saved files, so mutmut tests only the mutants not yet judged and those
of functions changed since (it compares the hashes). ``report`` reads the scratch copy, or the
saved files where there is none.

Left out of every selection: tests that drive the library only through subprocesses (the CLI,
``torchrun``, the README's commands): mutmut maps tests to functions by in-process tracing, so they
would never be chosen. Their mutants are covered there by the multi-process tests of the default
suite; ``tests/MUTATION.md`` lists them. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
STATE = ROOT / "tests" / "mutation_state"
COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "not checked")


@dataclass(frozen=True)
class Group:
    """Modules mutated together and the test files that judge their mutants."""

    modules: tuple[str, ...]
    tests: tuple[str, ...]
    deselect: tuple[str, ...] = ()
    fast: tuple[str, ...] = ()
    """Of ``tests``, the unit-test files that ``run --fast`` tries every mutant on first."""

    def fast_group(self) -> Group:
        """The group judged by its fast tests only (the deselections that apply to them kept)."""
        keep = tuple(d for d in self.deselect if d.split("::")[0] in self.fast)
        return Group(self.modules, self.fast, keep)


GROUPS: dict[str, Group] = {
    "optim": Group(
        ("robust_agc/optim/*",),
        (
            "test_optim.py",
            "test_optim_agc_defects.py",
            "test_optim_step.py",
            "test_optim_factory.py",
            "test_optim_passes.py",
            "test_probe.py",
            "test_utils.py",
            "test_optim_state.py",
            "test_sparse_export.py",
            "test_sparse_bsr.py",
        ),
        (
            # checks a warning's stacklevel, which mutmut's trampolines shift by one frame (its
            # mutants are checked by planting instead, tests/MUTATION.md)
            "test_optim_state.py::test_a_missing_snapshot_gradient_warns_once_at_the_callers_line",
            "test_optim_state.py::test_the_refresh_warnings_point_at_the_callers_line",
            "test_optim_state.py::test_the_hyperparameter_warnings_point_at_the_callers_line",
            # spawns two processes for every refresh mutant (slow enough to time out); the
            # distributed helpers it judges are invisible to mutmut anyway (tests/MUTATION.md)
            "test_optim.py::test_distributed_reductions_over_two_processes_match_one_process",
        ),
    ),
    "masks": Group(
        ("robust_agc/sparse/masks.py",),
        (
            "test_sparse_masks.py",
            "test_sparse_helpers.py",
            "test_sparse_export.py",
            "test_sparse_bsr.py",
            "test_sparse_schedulers.py",
            "test_masks_contract.py",
        ),
        # check warnings' stacklevel, which mutmut's trampolines shift by one frame
        (
            "test_sparse_masks.py::test_extreme_sparsity_warns",
            "test_masks_contract.py::test_attach_warnings_point_at_the_caller",
        ),
    ),
    "pgd": Group(
        ("attacks/pgd.py",),
        ("test_attacks.py", "test_attack_random_starts.py", "test_losses.py"),
    ),
    "checkpoint": Group(
        ("robust_agc/checkpoint.py",),
        ("test_checkpoint.py", "test_resume_streams.py", "test_eval_cli.py"),
        fast=("test_checkpoint.py",),
    ),
    "eval": Group(
        ("robust_agc/eval/*",),
        (
            "test_eval.py",
            "test_eval_resume.py",
            "test_autoattack_parity.py",
            "test_eval_cli.py",
            "test_fmn.py",  # the security-curve stage: radii, their resume
            "test_eval_passes.py",  # the pass counting, unit by unit
            "test_eval_state.py",  # the resumable state, unit by unit
            "test_eval_checks.py",  # the gradient-masking checks, unit by unit
            "test_eval_runner.py",  # the runner's bookkeeping under a scripted attack
        ),
        # checks a warning's stacklevel, which mutmut's trampolines shift by one frame
        (
            "test_eval.py::test_warnings_point_at_the_caller",
            "test_eval_checks.py::test_the_report_warns_at_the_caller_of_the_function_that_calls_warn",
        ),
        # a survivor costs a minute of the evaluation tests above; these take a second
        (
            "test_eval_passes.py",
            "test_eval_state.py",
            "test_eval_checks.py",
            "test_eval_runner.py",
        ),
    ),
}


def _mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit("mutmut is not installed: pip install -e '.[mutation]'")
    return str(exe)


def _prepare(name: str, group: Group) -> Path:
    """Copy the repository into ``.mutation/<name>`` and write the group's mutmut config."""
    dest = WORK / name
    skip = {
        ".git",
        ".venv",
        "runs",
        "data",
        ".mutation",
        "mutants",
        "__pycache__",
        "mutation_state",
    }
    # the datasets' folder only at the top: tests/data holds the tests' own fixtures
    nested = skip - {"data"}
    dest.mkdir(parents=True, exist_ok=True)
    for item in ROOT.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(
                item, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*nested, "*.pyc")
            )
        else:
            shutil.copy2(item, target)
    # mutmut keeps its map of tests to functions across runs and does not redo it for a changed
    # function or test: collect it anew every run (a minute), verdicts of unchanged code are kept.
    (dest / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    selection = [f"tests/{t}" for t in group.tests]
    selection += [f"--deselect=tests/{d}" for d in group.deselect]
    with open(dest / "pyproject.toml", "a") as f:
        f.write(f"only_mutate = {json.dumps(list(group.modules))}\n")
        f.write(f"pytest_add_cli_args_test_selection = {json.dumps(selection)}\n")
    return dest


def run(
    names: list[str],
    jobs: int,
    only: list[str] | None = None,
    unchecked: bool = False,
    fast: bool = False,
) -> None:
    """Run mutmut for each named group (all groups when none are named); ``only``: mutant name
    patterns (``fnmatch``, e.g. ``"*AGCǁstep*"``) to (re)run, whatever their verdict;
    ``unchecked``: of those (or of all), only the mutants not run yet (a group's modules in the
    order of the patterns, resumable); ``fast``: first try those mutants on the group's fast
    unit tests alone (:func:`run_fast`), so the whole selection runs only the ones they miss."""
    for name in names or list(GROUPS):
        if name not in GROUPS:
            raise SystemExit(f"unknown group {name!r}: one of {', '.join(GROUPS)}")
        dest = _prepare(name, GROUPS[name])
        restored = _restore(name, dest)
        print(f"== {name}: {', '.join(GROUPS[name].modules)} in {dest}", flush=True)
        if restored:
            print(f"== {name}: verdicts of {restored} files taken from {STATE / name}", flush=True)
        if fast and GROUPS[name].fast:
            patterns = list(only or ["*"])
            run_fast(name, jobs, _unchecked(name, patterns) if load([name]) else patterns)
        selected = list(only or [])
        if (unchecked or fast) and load([name]):  # (no verdicts yet: mutmut runs every mutant)
            selected = _unchecked(name, selected or ["*"])
            if not selected:
                print(f"== {name}: no unchecked mutant matches", flush=True)
                continue
        cmd = [_mutmut(), "run", "--max-children", str(jobs), *selected]
        try:
            subprocess.run(cmd, cwd=dest, check=False)
        finally:
            save([name])


def _unchecked(name: str, patterns: list[str]) -> list[str]:
    """The mutants of group ``name`` that match ``patterns`` (in pattern order) and are not run
    yet, or whose function changed since its verdicts (mutmut resets those when it next runs)."""
    stale = _stale(name)
    status = {m: st for mod in load([name]).values() for m, st in mod.items()}
    selected = [
        m
        for p in patterns
        for m, st in status.items()
        if st == "not checked" and fnmatch.fnmatch(m, p)
    ]
    # a changed function may have other mutants now: all of them, by pattern
    selected += [f for p in patterns for f in sorted(stale) if fnmatch.fnmatch(f, p)]
    return list(dict.fromkeys(selected))


def _function_of(mutant: str) -> str:
    """The mangled function name of a mutant (``x_foo`` or ``xǁClassǁmethod``)."""
    return mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]


def _stale(name: str) -> set[str]:
    """Name patterns of the mutants of group ``name`` whose function's source differs from the
    verdicts' (the AST hash mutmut keeps per function in each ``.meta`` file)."""
    from mutmut.mutation.file_mutation import compute_function_hashes  # mutmut's own hash

    base = WORK / name / "mutants"
    if not base.is_dir():
        base = STATE / name
    stale: set[str] = set()  # "module.function__mutmut_*" patterns
    for meta in sorted(base.rglob("*.py.meta")):
        source = ROOT / str(meta.relative_to(base))[: -len(".meta")]
        if not source.exists():
            continue
        d = json.loads(meta.read_text())
        now = compute_function_hashes(source.read_text())
        changed = {f for f, h in d["hash_by_function_name"].items() if now.get(f) != h}
        stale |= {
            m.rsplit("__mutmut_", 1)[0] + "__mutmut_*"
            for m in d["exit_code_by_key"]
            if _function_of(m) in changed
        }
    return stale


def run_fast(name: str, jobs: int, mutants: list[str]) -> None:
    """Try ``mutants`` of group ``name`` on the group's fast tests alone, in the scratch copy
    ``.mutation/<name>-fast``, and take every mutant they kill into the group's verdicts.

    A mutant that a subset of the group's tests kills is killed by the group's selection too
    (mutmut stops at the first failing test), so the verdict carries over; survivors and mutants
    no fast test reaches stay unchecked for the whole selection. Only verdicts of functions whose
    source hash is the same in both copies are taken.
    """
    if not mutants:
        return
    dest = _prepare(f"{name}-fast", GROUPS[name].fast_group())
    print(f"== {name}: {len(mutants)} mutants on the fast tests first, in {dest}", flush=True)
    subprocess.run([_mutmut(), "run", "--max-children", str(jobs), *mutants], cwd=dest, check=False)
    taken = _take_kills(dest / "mutants", WORK / name / "mutants")
    print(f"== {name}: {taken} mutants killed by the fast tests", flush=True)


def _take_kills(src: Path, dst: Path) -> int:
    """Copy the killed verdicts of ``src``'s ``.meta`` files (the fast pass, on the current
    source) into ``dst``'s where ``dst`` has no verdict (or no file yet); a function whose hash differs in ``dst``
    first loses all its verdicts there and takes the new hash (what mutmut itself would do on
    its next run). Returns how many verdicts were taken."""
    from mutmut.stats import status_by_exit_code

    taken = 0
    for meta in sorted(src.rglob("*.py.meta")):
        target = dst / meta.relative_to(src)
        a = json.loads(meta.read_text())
        if target.exists():
            b = json.loads(target.read_text())
        else:  # the group's first run: its verdicts start from the fast pass's kills
            target.parent.mkdir(parents=True, exist_ok=True)
            b = {**a, "exit_code_by_key": dict.fromkeys(a["exit_code_by_key"])}
        changed = {
            f
            for f, h in a["hash_by_function_name"].items()
            if b["hash_by_function_name"].get(f) != h
        }
        codes = {m: c for m, c in b["exit_code_by_key"].items() if _function_of(m) not in changed}
        codes.update({m: None for m in a["exit_code_by_key"] if _function_of(m) in changed})
        b["exit_code_by_key"] = codes
        for f in changed:
            b["hash_by_function_name"][f] = a["hash_by_function_name"][f]
        for mutant, code in a["exit_code_by_key"].items():
            if (
                code is not None
                and status_by_exit_code[code] == "killed"
                and b["exit_code_by_key"].get(mutant) is None
            ):
                b["exit_code_by_key"][mutant] = code
                taken += 1
        target.write_text(json.dumps(b, indent=4))
    return taken


def _restore(name: str, dest: Path) -> int:
    """Copy the saved ``.meta`` files of group ``name`` into its scratch copy where it has none
    (a fresh machine); mutmut then keeps their verdicts for unchanged functions. Returns how many
    were copied."""
    copied = 0
    for meta in sorted((STATE / name).rglob("*.py.meta")):
        target = dest / "mutants" / meta.relative_to(STATE / name)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(meta, target)
            copied += 1
    return copied


def save(names: list[str] | None = None) -> None:
    """Copy each group's ``.meta`` files from its scratch copy to ``tests/mutation_state/``."""
    for name in names or list(GROUPS):
        base = WORK / name / "mutants"
        for meta in sorted(base.rglob("*.py.meta")):
            target = STATE / name / meta.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(meta, target)


def load(groups: list[str] | None = None) -> dict[str, dict[str, str]]:
    """``{module path: {mutant name: status}}`` from the ``.meta`` files of ``groups`` (all): a
    group's scratch copy, or its saved files where there is no scratch copy."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, dict[str, str]] = {}
    for name in groups or list(GROUPS):
        base = WORK / name / "mutants"
        if not base.is_dir():
            base = STATE / name
        for meta in sorted(base.rglob("*.py.meta")):
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            if codes:
                module = str(meta.relative_to(base))[: -len(".meta")]
                out[module] = {m: status_by_exit_code[code] for m, code in codes.items()}
    return out


def table(results: dict[str, dict[str, str]]) -> str:
    """A markdown table: one row per module and a total row. ``killed %`` = killed / checked;
    ``caught %`` = (killed + timeout) / checked (checked: every mutant but those not run yet; "no
    tests" counts as not caught). A timeout is a mutant that never ended within mutmut's limit:
    a real endless loop, or a mutant whose tests ran too slowly on a loaded machine, so ``caught %``
    is an upper bound until the timeouts are rerun with a larger limit."""
    lines = [
        "| module | mutants | " + " | ".join(COLUMNS) + " | killed % | caught % |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    total: Counter[str] = Counter()
    for module, statuses in results.items():
        counts = Counter(statuses.values())
        total.update(counts)
        lines.append(_row(module, counts))
    lines.append(_row("**all**", total))
    return "\n".join(lines)


def _row(name: str, counts: Counter[str]) -> str:
    n = sum(counts.values())
    checked = n - counts["not checked"]

    def pct(k: int) -> str:
        return f"{100 * k / checked:.1f}%" if checked else "-"

    caught = counts["killed"] + counts["timeout"]
    return (
        f"| {name} | {n} | "
        + " | ".join(str(counts[c]) for c in COLUMNS)
        + f" | {pct(counts['killed'])} | {pct(caught)} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mutation testing of the core modules.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="mutate and test (resumable)")
    p_run.add_argument("groups", nargs="*", help=f"groups to run (default: all of {list(GROUPS)})")
    p_run.add_argument("--jobs", type=int, default=2, help="parallel mutant workers")
    p_run.add_argument("--only", nargs="+", metavar="PATTERN", help="mutant name patterns only")
    p_run.add_argument(
        "--fast",
        action="store_true",
        help="the unchecked mutants on the group's fast tests first (implies --unchecked)",
    )
    p_run.add_argument(
        "--unchecked",
        action="store_true",
        help="only the mutants not run yet (of --only's patterns, in their order)",
    )
    p_save = sub.add_parser("save", help="copy the verdicts so far to tests/mutation_state/")
    p_save.add_argument("groups", nargs="*", help="groups to save (default: all)")
    p_rep = sub.add_parser("report", help="per-module table")
    p_rep.add_argument("--list", nargs="*", default=[], metavar="STATUS", help="statuses to list")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.groups, args.jobs, args.only, args.unchecked, args.fast)
        return 0
    if args.command == "save":
        save(args.groups)
        return 0
    results = load()
    if not results:
        print("no mutmut results under .mutation/ or tests/mutation_state/: run `make mutation`")
        return 1
    print(table(results))
    for status in args.list:
        names = [m for s in results.values() for m, st in s.items() if st == status]
        print(f"\n{status} ({len(names)}):")
        for m in names:
            print(f"  {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
