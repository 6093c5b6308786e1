"""SIGKILL and ``--resume`` of a training run against the same run never interrupted (``make
gpu-smoke``; any device, made for CUDA).

``python tests/gpu_resume.py --out DIR -- <robust-agc train arguments>`` trains ``DIR/ref`` and
``DIR/ref2`` in one go each, then the same configuration in ``DIR/resumed``, SIGKILLed
(tests/_sigkill_driver.py) at the fifth step of epoch 2, after epoch 1's checkpoint, and resumed
with ``--resume``. It prints whether the final weights are bit-identical to ``ref`` and, if not, the
largest absolute difference of any weight next to the difference between the two uninterrupted
runs (the device's own run-to-run noise), and whether the per-epoch metrics (timings left out)
agree. Exit status 1 when the kill did not happen
at that step or the resumed run ended at another epoch, step or gradient-evaluation count, and,
with ``--deterministic`` among the arguments, when any of the three runs' weights differ. Without
it, differing weights are reported, not failed: CUDA kernels such as cuDNN's convolution backward
are not bit-reproducible unless deterministic algorithms are forced (on the CPU the check is exact
either way: tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time", "_s", "per_s")


def _train(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "robust_agc", "train", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _largest_difference(a: dict, b: dict) -> tuple[str, float]:
    diffs = {
        k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    }
    worst = max(diffs, key=diffs.get)
    return worst, diffs[worst]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    ref, ref2, cut = args.out / "ref", args.out / "ref2", args.out / "resumed"
    for run in (ref, ref2):
        res = _train(*train_args, "--out", str(run), "--overwrite")
        if res.returncode:
            print(res.stderr[-3000:])
            return 1
    per_epoch = _metrics(ref)[0]["step"]
    marker = args.out / "killed-at"
    cmd = [sys.executable, "-m", "tests._sigkill_driver", str(per_epoch + 5), str(marker),
           "train", *train_args, "--out", str(cut), "--overwrite"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    at = json.loads(Path(f"{marker}.0").read_text()) if Path(f"{marker}.0").is_file() else None
    print(f"killed: return code {res.returncode}, at {at}")
    if res.returncode != -signal.SIGKILL or not at or not at["last_pt_existed"]:
        print(res.stderr[-3000:])
        return 1
    res = _train(*train_args, "--out", str(cut), "--resume")
    if res.returncode:
        print(res.stderr[-3000:])
        return 1
    a, a2, b = (
        torch.load(d / "last.pt", weights_only=True, map_location="cpu") for d in (ref, ref2, cut)
    )
    same_counts = all(a[k] == b[k] for k in ("epoch", "step", "grad_evals"))
    print(f"ref: epoch {a['epoch']} step {a['step']}; resumed: epoch {b['epoch']} step {b['step']}")
    all_identical = True
    for label, other in (("two uninterrupted runs", a2), ("uninterrupted and resumed", b)):
        worst, diff = _largest_difference(a["model"], other["model"])
        identical = all(torch.equal(a["model"][k], other["model"][k]) for k in a["model"])
        all_identical &= identical
        print(
            f"{label}: weights bit-identical {identical}; largest difference {diff:.3g} ({worst})"
        )
    ma, mb = _metrics(ref), _metrics(cut)
    print(f"metrics (timings left out) identical: {ma == mb}")
    if ma != mb:
        for ra, rb in zip(ma, mb):
            print("  ref     ", json.dumps(ra))
            print("  resumed ", json.dumps(rb))
    if "--deterministic" in train_args and not all_identical:
        return 1
    return 0 if same_counts else 1


if __name__ == "__main__":
    sys.exit(main())
