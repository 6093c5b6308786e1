"""Data-parallel training with torchrun + DDP (gloo, CPU): equality with one process, masks across
ranks, SIGKILL and a bit-identical resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_agc.train import TIMING_FIELDS

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


def _torchrun(
    *launcher: str, argv: list[str], timeout: int = 300, entry: tuple[str, ...] = ("robust_agc",)
) -> subprocess.Popen:
    """``torchrun <launcher> -m <entry> train <argv>`` (``entry``: a module and its arguments)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", *entry, "train", *argv]
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
        # free adversarial training: each rank carries its shard's perturbation, which moves by
        # the sign of the input gradient (the same in one process), with no random draw
        ["sgd", "--objective", "pgd-at", "--free-replays", "2", "--on-collapse", "off"],
    ],
    ids=["sgd", "agc", "agc-loss-slope", "free-replays"],
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


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _canonical(rows: list[dict]) -> list[str]:
    """Each epoch's record without the timing fields, as canonical JSON (NaN compares equal)."""
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
        for r in rows
    ]


def test_two_nodes_then_a_sigkilled_two_process_run_resumes_bit_identically(tmp_path, caplog):
    """RigL + AGC + PGD-AT on two processes, three launches (each about 8 s of start-up, the
    reason this test takes about half a minute):

    1. two 'nodes' on localhost (one process each) join through the c10d rendezvous and train two
       epochs uninterrupted; RigL masks are checked equal across ranks after every topology update
       (the run fails otherwise);
    2. the same run, launched with ``--nproc-per-node 2``, is SIGKILLed on both ranks at a fixed
       step of epoch 2, after epoch 1's checkpoint (tests/_sigkill_driver.py);
    3. ``--resume`` on two processes trains epoch 2 and ends with the weights and metrics of (1),
       bit for bit (per-rank attack random starts, AGC's refresh subset, RigL restored).

    The epoch-1 checkpoint also resumes on one process (another world size, not bit-identical)."""
    ref, run, single = tmp_path / "ref", tmp_path / "run", tmp_path / "single"
    argv = [*BASE, "--objective", "pgd-at", "--attack-steps", "1", "--optimizer", "agc",
            "--sparse-method", "rigl", "--sparsity", "0.8", "--update-interval", "1"]  # fmt: skip
    port = _free_port()
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "robust-agc-test"]  # fmt: skip
    procs = [_torchrun(*rdzv, argv=[*argv, "--out", str(ref)]) for _ in range(2)]
    for p in procs:
        _finish(p)
    a = torch.load(ref / "last.pt", weights_only=True)
    assert a["world_size"] == 2 and len(a["rng"]["torch_per_rank"]) == 2
    rows = _rows(ref)
    assert rows[-1]["last_update"]["changed"] > 0  # the topology did change
    assert rows[-1]["density"] == pytest.approx(0.2, abs=0.01)
    per_epoch = rows[0]["step"]
    assert a["step"] == 2 * per_epoch

    # (2) killed at the second step of epoch 2, on both ranks (after a barrier in the driver)
    kill_step, marker = per_epoch + 1, tmp_path / "killed-at"
    launcher = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    killed = _torchrun(
        *launcher,
        "--master-port",
        str(_free_port()),
        argv=[*argv, "--out", str(run)],
        entry=("tests._sigkill_driver", str(kill_step), str(marker)),
    )
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode != 0 and "SIGKILL" in out, out[-3000:]
    for rank in (0, 1):
        at = json.loads(Path(f"{marker}.{rank}").read_text())
        assert at == {"epoch": 1, "step": kill_step, "last_pt_existed": True}, rank
    cut = torch.load(run / "last.pt", weights_only=True)
    assert (cut["epoch"], cut["step"], cut["world_size"]) == (1, per_epoch, 2)
    assert _canonical(_rows(run)) == _canonical(rows[:1])
    shutil.copytree(run, single)

    # (3) resumed on two processes with the CLI: epoch 2 is trained, bit-identical to (1)
    _finish(
        _torchrun(
            *launcher,
            "--master-port",
            str(_free_port()),
            argv=[*argv, "--out", str(run), "--resume"],
        )
    )
    b = torch.load(run / "last.pt", weights_only=True)
    assert (b["epoch"], b["step"], b["grad_evals"]) == (2, 2 * per_epoch, a["grad_evals"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _canonical(_rows(run)) == _canonical(rows)
    assert any(not torch.equal(cut["model"][k], b["model"][k]) for k in b["model"])

    # the checkpoint of a 2-process run resumes in one process (another world size): epoch 2 is
    # trained, with reseeded attack starts (so not bit for bit)
    with caplog.at_level(logging.WARNING, logger="robust_agc.train"):
        assert run_cli("train", *argv, "--out", str(single), "--resume") == 0
    assert "resuming a 2-process run on 1 processes" in caplog.text
    c = torch.load(single / "last.pt", weights_only=True)
    assert (c["epoch"], c["step"], c["world_size"]) == (2, 2 * per_epoch, 1)
    assert [r["epoch"] for r in _rows(single)] == [1, 2]
    assert any(not torch.equal(cut["model"][k], c["model"][k]) for k in c["model"])


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


def test_grad_align_under_torchrun_gives_the_weights_of_one_process(tmp_path):
    """GradAlign's double backward through the DDP-wrapped model on two processes: each rank
    draws the global batch's noise and takes its rows, so every example gets the noise of one
    process, and the weights, losses and pass counts are those of one process (float tolerance:
    the per-rank penalty means are averaged by DDP)."""
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [*BASE, "--objective", "pgd-at", "--train-attack", "fgsm", "--grad-align", "0.2",
            "--on-collapse", "off", "--epochs", "1"]  # fmt: skip
    assert run_cli("train", *argv, "--out", str(one)) == 0
    port = _free_port()
    launcher = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    _finish(_torchrun(*launcher, argv=[*argv, "--out", str(two)]))
    ra, rb = _rows(one), _rows(two)
    assert [r["grad_evals"] for r in ra] == [r["grad_evals"] for r in rb]
    assert all(r["train_loss"] == pytest.approx(q["train_loss"], rel=1e-4) for r, q in zip(ra, rb))
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
