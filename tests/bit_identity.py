"""Bit-identity check: the same configs run with the code of another commit and with this tree.

    python tests/bit_identity.py --ref REV [--only NAME ...] [--keep DIR]
    make bit-identity REF=REV

A restructuring must not change behaviour: on one machine, a fixed training config gives the same
weights and metrics before and after (timing fields aside), and a fixed evaluation the same record.
This script exports ``REV`` with ``git archive`` into a scratch folder, runs each case of
:data:`CASES` twice through the command line (``python -m robust_agc``, once with ``PYTHONPATH`` on
the exported tree, once on this one, one thread each), and compares what the runs wrote: every
tensor of ``last.pt`` bit for bit, ``metrics.jsonl`` and ``summary.json`` without timing, version
and machine fields, and the evaluation record without timing and provenance fields. Exit status 0
when every case agrees, 1 with the differing keys listed otherwise. Not collected by pytest (no
``test_`` prefix): it takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_COMMON = [
    "--dataset", "fashion-mnist", "--model", "small-cnn", "--train-subset", "384",
    "--val-size", "64", "--batch-size", "64", "--epochs", "2", "--eval-subset", "32",
    "--eval-steps", "3", "--attack-steps", "2", "--threads", "1", "--seed", "3",
]  # fmt: skip

CASES: dict[str, list[str]] = {
    "agc-rigl-pgdat": [
        "--optimizer", "agc", "--objective", "pgd-at", "--sparse-method", "rigl",
        "--sparsity", "0.8", "--update-interval", "3", "--eps", "0.1",
    ],
    "agc-bsr-trades": [
        "--optimizer", "agc", "--objective", "trades", "--sparse-method", "bsr",
        "--sparsity", "0.8", "--eps", "0.1", "--agc-estimator", "grad-online",
    ],
    "svrg-set-mart-bf16": [
        "--optimizer", "svrg", "--objective", "mart", "--sparse-method", "set",
        "--sparsity", "0.7", "--update-interval", "3", "--eps", "0.1", "--amp", "bf16",
        "--probe-variance-every", "1", "--probe-batches", "2",
    ],
    "sgd-itop-natural": [
        "--optimizer", "sgd", "--objective", "natural", "--sparse-method", "itop-rigl",
        "--sparsity", "0.5", "--update-interval", "2", "--train-subset", "1024", "--lr", "0.02",
    ],
}  # fmt: skip
"""Training cases: every optimizer, objective and sparse-method family, AMP and the probe."""

EVAL_CASE = "sgd-itop-natural"
"""The case whose checkpoint is also evaluated (the one trained to a useful clean accuracy)."""

EVAL_ARGS = [
    "--attacks", "clean,pgd,autoattack", "--n-examples", "8", "--batch-size", "4",
    "--pgd-steps", "3", "--pgd-restarts", "1", "--seed", "0", "--eps", "0.05",
]  # fmt: skip
"""The evaluation of :data:`EVAL_CASE`'s checkpoint: clean, PGD and the standard AutoAttack."""

_VOLATILE = {
    "epoch_time_s", "wall_time_s", "train_time_s", "cpu_time_s", "images_per_s",
    "refresh_time_s", "time_s", "seconds", "elapsed_s", "versions", "machine", "created",
    "started", "finished", "date", "host", "command", "out", "out_dir", "checkpoint",
    "timings", "path",
}  # fmt: skip
"""Keys left out of the comparison (timing, provenance and paths), at any depth."""


def _export(rev: str, dest: Path) -> None:
    data = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def _run(code: Path, args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "robust_agc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{code}: robust_agc {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tensors(path: Path) -> dict[str, Any]:
    import torch

    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return flat


def _bytes(t: Any) -> Any:
    """The tensor's raw bytes (bit identity, NaN payloads included)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _jsonl(path: Path) -> list[Any]:
    return [_strip(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _diff_json(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff_json(a.get(k), b.get(k), f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_json(x, y, f"{where}[{i}]", out)
    elif a != b and not (a != a and b != b):  # NaN == NaN here
        out.append(f"{where}: {a!r} != {b!r}")


def _compare_runs(a: Path, b: Path) -> list[str]:
    out: list[str] = []
    ta, tb = _tensors(a / "last.pt"), _tensors(b / "last.pt")
    for k in sorted(set(ta) | set(tb)):
        x, y = ta.get(k), tb.get(k)
        if x is None or y is None:
            out.append(f"last.pt{k}: only in {'new' if x is None else 'ref'}")
        elif x.dtype != y.dtype or x.shape != y.shape or not _bytes(x).equal(_bytes(y)):
            out.append(f"last.pt{k}: tensors differ")
    _diff_json(_jsonl(a / "metrics.jsonl"), _jsonl(b / "metrics.jsonl"), "metrics.jsonl", out)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    _diff_json(_strip(sa), _strip(sb), "summary.json", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="git revision to compare this tree with")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="training cases to run")
    parser.add_argument("--keep", type=Path, help="keep the runs in this folder")
    args = parser.parse_args(argv)
    scratch = Path(args.keep or tempfile.mkdtemp(prefix="bit-identity-"))
    ref = scratch / "ref-code"
    if not ref.exists():
        _export(args.ref, ref)
    failures = 0
    for name in args.only or CASES:
        runs = {}
        for side, code in (("ref", ref), ("new", ROOT)):
            out = scratch / side / name
            _run(code, ["train", *_COMMON, *CASES[name], "--out", str(out), "--overwrite"], scratch)
            runs[side] = out
            if name == EVAL_CASE:
                _run(code, ["eval", str(out / "last.pt"), *EVAL_ARGS,
                            "--out", str(out / "eval.json"), "--overwrite"], scratch)  # fmt: skip
        diffs = _compare_runs(runs["ref"], runs["new"])
        if name == EVAL_CASE:
            ea = json.loads((runs["ref"] / "eval.json").read_text())
            eb = json.loads((runs["new"] / "eval.json").read_text())
            _diff_json(_strip(ea), _strip(eb), "eval.json", diffs)
        print(f"{name}: {'identical' if not diffs else f'{len(diffs)} differences'}", flush=True)
        for d in diffs[:20]:
            print(f"  {d}")
        failures += bool(diffs)
    print(f"{'all identical' if not failures else f'{failures} case(s) differ'} (ref {args.ref})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
