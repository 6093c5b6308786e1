"""Data-parallel training with torchrun + DDP (gloo, CPU): equality with one process, masks across ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
# BatchNorm-free model, natural objective (no attack randomness), fixed global batch of 64.
BASE = [
    "--model", "small-cnn", "--objective", "natural", "--train-subset", "256", "--val-size", "64",
    "--eval-subset", "32", "--eval-steps", "1", "--batch-size", "64", "--epochs", "2", "--seed", "3", "--init", "default",
    "--threads", "1", "--no-progress",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*launcher: str, argv: list[str], timeout: int = 300) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "-m",
        "robust_agc",
        "train",
        *argv,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    "optimizer",
    [
        ["sgd"],
        # the default AGC: online sums all-reduced, the 25% refresh picks the same global batches
        ["agc"],
        # the release's variant: loss statistics gathered over ranks, every batch refreshed
        ["agc", "--agc-estimator", "loss-slope", "--agc-refresh-fraction", "1.0"],
    ],
    ids=["sgd", "agc", "agc-loss-slope"],
)
def test_two_processes_give_the_weights_of_one(tmp_path, optimizer):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [*BASE, "--optimizer", *optimizer]
    assert run_cli("train", *argv, "--out", str(one)) == 0
    port = _free_port()
    launcher = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    _finish(_torchrun(*launcher, argv=[*argv, "--out", str(two)]))
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ra = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb, strict=True):
        assert x["grad_evals"] == y["grad_evals"] and x["step"] == y["step"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["val_clean_acc"] == y["val_clean_acc"]  # partitioned evaluation, summed counts
        if optimizer[0] == "agc":  # tau is updated from the second refresh on
            assert x["agc_coef"] == pytest.approx(y["agc_coef"], rel=1e-4, abs=1e-9)
    if optimizer[0] == "agc":
        assert ra[-1]["agc_coef"] != ra[0]["agc_coef"]  # the coefficient really moved
    assert json.loads((two / "summary.json").read_text())["machine"]["world_size"] == 2


def test_two_nodes_through_c10d_rendezvous_with_rigl_and_agc(tmp_path):
    """Two 'nodes' on localhost (one process each) join through the c10d rendezvous; RigL masks
    are checked for equality across ranks after every topology update (the run fails otherwise)."""
    out = tmp_path / "run"
    port = _free_port()
    argv = [*BASE, "--objective", "pgd-at", "--attack-steps", "1", "--optimizer", "agc",
            "--sparse-method", "rigl", "--sparsity", "0.8", "--update-interval", "1", "--out", str(out)]  # fmt: skip
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "robust-agc-test"]  # fmt: skip
    procs = [_torchrun(*rdzv, argv=argv), _torchrun(*rdzv, argv=argv)]
    for p in procs:
        _finish(p)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]["torch_per_rank"]) == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["last_update"]["changed"] > 0  # the topology did change
    assert rows[-1]["density"] == pytest.approx(0.2, abs=0.01)
    # the checkpoint of a 2-process run resumes in one process (another world size)
    assert run_cli("train", *argv[:-2], "--out", str(out), "--epochs", "2", "--resume") == 0


def test_mask_buffers_are_the_ones_ddp_skips():
    """The trainer keeps exactly the masks (verified equal after every update) out of DDP's
    per-forward buffer broadcast; BatchNorm statistics stay in it."""
    from robust_agc.models import create_model
    from robust_agc.sparse import apply_masks
    from robust_agc.train import mask_buffer_names

    model = create_model("preact-resnet18", num_classes=10, in_channels=3, input_size=32)
    apply_masks(model, sparsity=0.9, distribution="erk", generator=0)
    names = mask_buffer_names(model)
    masked = [n for n, m in model.named_modules() if hasattr(m, "weight_mask")]
    assert sorted(names) == sorted(
        f"{n}.{b}" for n in masked for b in ("weight_mask", "weight_mask_ever")
    )
    assert not any("running" in n for n in names)
