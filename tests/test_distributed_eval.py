"""Distributed evaluation (torchrun, gloo, 2 CPU processes) gives the single-process result.

The chunks of every stage are shared out round-robin over the ranks; each chunk is the same points
with the same seed whichever process runs it, so per-point flags, accuracies and pass counts are
identical to one process with the same ``batch_size``, AutoAttack's randomness (APGD starts,
Square's sampled squares, FAB) included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from robust_agc.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

# Runs under torchrun: the evaluation on 2 processes, then (rank 0, after leaving the group) the
# same call in one process; small AutoAttack budgets (the same objects and loop, 10-50x cheaper).
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from robust_agc import eval as ev
    from robust_agc.eval.autoattack import AutoAttackRunner
    from robust_agc.data import load_dataset
    from robust_agc.models import create_model

    real_init = AutoAttackRunner.__init__
    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        aa = self.aa
        aa.apgd.n_iter, aa.apgd.n_restarts = 10, 1
        aa.apgd_targeted.n_iter, aa.fab.n_iter, aa.square.n_queries = 10, 10, 100
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 3
    AutoAttackRunner.__init__ = init

    weights, out = sys.argv[1], sys.argv[2]
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    model.load_state_dict(torch.load(weights, weights_only=True))
    x, y = load_dataset("fashion-mnist", "test")
    kw = dict(x=x[:40], y=y[:40], eps=0.05, attacks="clean,pgd,autoattack",
              version=["apgd-ce", "apgd-t", "fab-t", "square"], batch_size=4, seed=3,
              pgd_steps=1, pgd_restarts=2, progress=False)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = ev.benchmark(model, **kw)
    with open(f"{out}/two_rank{rank}.json", "w") as f:
        json.dump(res.to_dict(), f)
    dist.destroy_process_group()
    if rank == 0:
        with open(f"{out}/one.json", "w") as f:
            json.dump(ev.benchmark(model, **kw).to_dict(), f)
    """
)

SAME = [  # every field that must not depend on the number of processes
    "clean_acc", "autoattack_acc", "robust_acc", "robust_acc_repredicted", "per_point_robust",
    "per_point_broken_by", "flags", "passes", "number_forward_passes", "attack_config",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv: str, timeout: int = 240) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", port, *argv]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def _stages(d: dict) -> list[tuple]:
    out = []
    for s in d["stages"]:
        comps = [(c["name"], c["robust_acc"], c["n_attacked"], c["n_broken"]) for c in s.get("components", [])]  # fmt: skip
        out.append((s["name"], s["robust_acc"], s["n_attacked"], s["n_broken"], comps))
    return out


def test_two_processes_give_the_single_process_result_autoattack_included(tmp_path, trained_cnn):
    torch.save(trained_cnn.state_dict(), tmp_path / "w.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    _torchrun(str(worker), str(tmp_path / "w.pt"), str(tmp_path))
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "two_rank1.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert rank1 == two  # every rank returns rank 0's record
    for key in SAME:
        assert one[key] == two[key], key
    assert _stages(one) == _stages(two)
    # the check is not vacuous: every kind of outcome occurs, and several units broke points
    broken_by = set(one["per_point_broken_by"])
    assert {None, "clean", "pgd"} <= broken_by
    assert any(b is not None and b.startswith("autoattack/") for b in broken_by), broken_by
    assert one["passes"]["autoattack"]["backward"] > 0


def _cli_args(tmp_path: Path) -> list[str]:
    return ["eval", "--state-dict", str(tmp_path / "w.pt"), "--arch", "small-cnn",
            "--dataset", "fashion-mnist", "--eps", "0.03", "--n-examples", "40",
            "--attacks", "clean,pgd", "--pgd-steps", "5", "--pgd-restarts", "2",
            "--batch-size", "4", "--no-progress"]  # fmt: skip


def test_cli_under_torchrun_rank_zero_writes_and_prints(tmp_path, trained_cnn):
    torch.save(trained_cnn.state_dict(), tmp_path / "w.pt")
    two, state = tmp_path / "two.json", tmp_path / "state.json"
    log = _torchrun("-m", "robust_agc", *_cli_args(tmp_path), "--out", str(two), "--state", str(state))  # fmt: skip
    assert log.count("first 40 test points") == 1  # rank 0 prints, once
    assert "(2 processes)" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "two.json", "w.pt"]
    d2 = json.loads(two.read_text())
    assert d2["world_size"] == 2
    assert json.loads(state.read_text())["done"] == ["clean", "pgd"]
    # one process, same arguments, one thread like the torchrun workers
    one = tmp_path / "one.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main([*_cli_args(tmp_path), "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    d1 = json.loads(one.read_text())
    for key in ["clean_acc", "robust_acc", "per_point_robust", "per_point_broken_by", "passes"]:
        assert d1[key] == d2[key], key
    assert 0 < sum(d1["per_point_robust"]) < sum(b != "clean" for b in d1["per_point_broken_by"])


@pytest.mark.parametrize(("world", "start"), [(2, 0), (2, 3), (3, 2)])
def test_round_robin_schedule_covers_every_chunk_once(world, start):
    """Rank r runs chunks start + r, start + r + world, ...: each remaining chunk exactly once,
    whatever the world size (a resumed evaluation starts at ``start``)."""
    from robust_agc.eval.comm import Comm

    n_chunks = 8
    ran: list[list[int]] = []
    for rank in range(world):
        comm = Comm()
        comm.world, comm.rank = world, rank
        comm.all_gather = lambda obj: [obj]  # type: ignore[method-assign]  # local result only
        mine = [r for _, results in comm.rounds(n_chunks, start, lambda b: b) for r in results]
        assert mine == list(range(start + rank, n_chunks, world))
        ran.append(mine)
    assert sorted(b for mine in ran for b in mine) == list(range(start, n_chunks))
