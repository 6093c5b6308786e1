"""The CUDA path against the CPU path: AGC's multi-tensor kernel, the mask invariants of sparse
training, resume, the evaluation harness and a CUDA checkpoint evaluated on the CPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest -m gpu`` (or
``make gpu-smoke``'s companion ``make gpu-verify``). CUDA float32 and CPU float32 differ in the
last bits (other reduction orders, TF32 off by default for convolutions only in some releases), so
the CPU comparisons use stated tolerances; what must be exact (mask counts, zeros at pruned
positions, clean predictions of a trained model) is compared exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_agc.checkpoint import load_checkpoint
from robust_agc.config import TrainConfig
from robust_agc.data import DataSplits, make_splits
from robust_agc.eval import benchmark, load_model
from robust_agc.optim import AGC, agc
from robust_agc.train import Trainer
from robust_agc.train.build import use_deterministic_kernels

from .test_optim import _ce, _data, _net, spy_kernels

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    return make_splits("fashion-mnist", train_subset=256, val_size=64, test_size=64)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        model="small-cnn", batch_size=32, epochs=2, attack_steps=2, eval_subset=32, eval_steps=2,
        val_size=64, seed=1, progress=False, threads=1, device="cuda", optimizer="agc",
        sparse_method="rigl", sparsity=0.8, update_interval=2,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


def _agc_steps(device: str) -> list[torch.Tensor]:
    """Refresh, four corrected steps with the snapshot gradient, refresh, two more steps: the
    weights after them, on ``device`` (CUDA takes torch's foreach path, the CPU the loop)."""
    model = _net(bn=False).to(device)
    x, y = _data(48)
    batches = [(x[i : i + 16].to(device), y[i : i + 16].to(device)) for i in range(0, 48, 16)]
    opt = AGC(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for k in range(6):
        if k in (0, 4):
            opt.refresh(model, batches, _ce)
        xb, yb = batches[k % 3]
        opt.zero_grad()
        _ce(model, xb, yb).backward()
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        opt.step()
    assert opt.coefficient != 0  # the correction was applied
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_functional_update_defaults_to_the_multi_tensor_kernel(monkeypatch) -> None:
    """``foreach=None`` takes torch's choice for CUDA tensors (as ``torch.optim.sgd``): the
    multi-tensor kernel, the one the CPU never picks by itself."""
    called = spy_kernels(monkeypatch)
    p = [torch.zeros(3, device="cuda")]
    agc(p, [torch.ones(3, device="cuda")], [None], [None], [None], coef=0.0, lr=0.1,
        weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False)  # fmt: skip
    assert called == ["_multi_tensor_agc"]
    assert torch.equal(p[0].cpu(), torch.full((3,), -0.1))


@pytest.mark.gpu
@needs_cuda
def test_agc_on_cuda_matches_the_cpu() -> None:
    cuda, cpu = _agc_steps("cuda"), _agc_steps("cpu")
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_sparse_training_on_cuda_keeps_the_exact_masks(splits) -> None:
    """RigL + AGC + PGD-AT on CUDA: every layer's count is exact after the topology updates, and
    the weights, the gradients and every optimizer-state tensor are zero at pruned positions."""
    trainer = Trainer(_cfg(epochs=1), splits=splits)
    counts = {name: int(mask.sum()) for name, _, mask in trainer.masks}
    trainer.train_epoch()
    assert trainer.topology.step_count > 0
    for name, param, mask in trainer.masks:
        assert param.is_cuda and mask.is_cuda
        assert int(mask.sum()) == counts[name], name
        off = ~mask.bool()
        assert not param.detach()[off].any(), name
        if param.grad is not None:
            assert not param.grad[off].any(), name
        for key, value in trainer.optimizer.state[param].items():
            if torch.is_tensor(value) and value.shape == param.shape:
                assert not value[off].any(), (name, key)


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    )


@pytest.mark.gpu
@needs_cuda
def test_cuda_resume_continues_the_run(splits, tmp_path) -> None:
    """One epoch, then a resume from ``last.pt`` loaded onto the GPU (as ``--resume`` loads it),
    against two uninterrupted runs: the resumed run is bit-identical to them when they are
    bit-identical to each other, and otherwise no farther from them than they are from each other
    (CUDA kernels such as cuDNN's convolution backward need not be bit-reproducible, and the
    trainer does not force deterministic algorithms). The CPU random streams are restored exactly."""
    cfg = _cfg()
    ref, ref2, cut = tmp_path / "ref", tmp_path / "ref2", tmp_path / "cut"
    for d in (ref, ref2, cut):
        d.mkdir()
    Trainer(cfg, splits=splits).fit(ref)
    Trainer(cfg, splits=splits).fit(ref2)
    first = Trainer(cfg, splits=splits)
    first.cfg = dataclasses.replace(cfg, epochs=1)
    first.fit(cut)
    resumed = Trainer(cfg, splits=splits)
    resumed.load_state_dict(load_checkpoint(cut / "last.pt", map_location=resumed.device))
    resumed.fit(cut)
    a, a2, b = (
        torch.load(d / "last.pt", weights_only=True, map_location="cpu") for d in (ref, ref2, cut)
    )
    noise = _largest_difference(a["model"], a2["model"])
    off = _largest_difference(a["model"], b["model"])
    if noise == 0:
        assert off == 0
    else:
        assert off <= max(4 * noise, 1e-4), (off, noise)
    assert (a["epoch"], a["step"], a["grad_evals"]) == (b["epoch"], b["step"], b["grad_evals"])
    for k in ("torch", "refresh", "eval_attack"):
        assert torch.equal(a["rng"][k], b["rng"][k]), k


@pytest.mark.gpu
@needs_cuda
def test_evaluation_on_cuda_agrees_with_the_cpu(splits) -> None:
    """Clean, PGD and AutoAttack (APGD-CE and APGD-T, short budgets) of one trained model on CUDA
    and on the CPU: clean verdicts identical; the robust verdicts may differ only where float
    rounding moves an attack across the boundary (at most 2 of 64 points here)."""
    trainer = Trainer(_cfg(epochs=1, sparse_method="static"), splits=splits)
    trainer.train_epoch()
    model = trainer.model.eval()
    kw = dict(
        x=splits.x_test, y=splits.y_test, eps=0.1, attacks=("clean", "pgd", "autoattack"),
        version="apgd-ce,apgd-t", pgd_steps=10, pgd_restarts=1, batch_size=64, seed=0,
        progress=False, run_checks=False,
    )  # fmt: skip
    on_cuda = benchmark(model, device="cuda", **kw)
    on_cpu = benchmark(copy.deepcopy(model).cpu(), device="cpu", **kw)
    assert on_cuda.clean_acc == on_cpu.clean_acc
    differ = int((on_cuda.robust_flags != on_cpu.robust_flags).sum())
    assert differ <= 2, (on_cuda.robust_acc, on_cpu.robust_acc)
    assert on_cuda.robust_acc < on_cuda.clean_acc  # the attacks broke points on the GPU too


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_checkpoint_evaluates_on_the_cpu(splits, tmp_path) -> None:
    """best.pt of a CUDA run loads with weights_only on a CPU and predicts what the CUDA model
    predicts (clean verdicts of the test points equal)."""
    trainer = Trainer(_cfg(epochs=1), splits=splits)
    trainer.fit(tmp_path)
    model = load_model(tmp_path / "best.pt")  # map_location="cpu" is the default
    assert all(p.device.type == "cpu" for p in model.parameters())
    best = load_model(tmp_path / "best.pt", map_location="cuda").cuda()
    with torch.no_grad():
        a = model(splits.x_test).argmax(1)
        b = best(splits.x_test.cuda()).argmax(1).cpu()
    assert (a == b).float().mean() >= 0.98


TINY = [
    "--train-subset", "256", "--val-size", "64", "--eval-subset", "32", "--eval-steps", "2",
    "--batch-size", "64", "--attack-steps", "2", "--epochs", "2", "--seed", "1", "--no-progress",
    "--optimizer", "agc", "--sparse-method", "rigl", "--sparsity", "0.8", "--update-interval", "2",
]  # fmt: skip


def _train(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "robust_agc", "train", *TINY, *extra, "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out / "last.pt", weights_only=True, map_location="cpu")


@pytest.mark.gpu
@needs_cuda
def test_deterministic_cuda_runs_are_bit_identical(tmp_path) -> None:
    """``--deterministic`` on CUDA: two runs of one configuration (fresh processes, so cuBLAS
    reads its workspace setting at start) end with bit-identical weights."""
    a = _train(tmp_path / "a", "--device", "cuda", "--deterministic")
    b = _train(tmp_path / "b", "--device", "cuda", "--deterministic")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic = before[1]
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_deterministic_kernels_are_switched_on_and_change_nothing_on_the_cpu(
    tmp_path, restore_determinism
) -> None:
    """``--deterministic`` on the CPU: the switches are on for the process and the run's weights
    are those of the same run without it (the CPU kernels are deterministic already)."""
    use_deterministic_kernels()
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    a = _train(tmp_path / "a", "--threads", "1", "--deterministic")
    b = _train(tmp_path / "b", "--threads", "1")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.gpu
@needs_cuda
def test_a_cpu_state_dict_loads_into_an_optimizer_on_cuda() -> None:
    """AGC's state saved on the CPU (grad-online sums included) loads into an optimizer whose
    parameters live on CUDA: every state tensor, the online sums too, moves to the GPU, and the
    next corrected step runs."""
    x, y = _data(32)
    cpu_model = _net(bn=False)
    opt = AGC(cpu_model.parameters(), lr=0.1, estimator="grad-online")
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    opt.refresh(cpu_model, batches, _ce)
    for xb, yb in batches:
        opt.zero_grad()
        _ce(cpu_model, xb, yb).backward()
        opt.snapshot_backward(cpu_model, lambda m, xb=xb, yb=yb: _ce(m, xb, yb))
        opt.step()
    state = opt.state_dict()
    model = copy.deepcopy(cpu_model).cuda()
    loaded = AGC(model.parameters(), lr=0.1, estimator="grad-online")
    loaded.load_state_dict(state)
    assert all(t.is_cuda for t in loaded._online.values()) and loaded._online
    xb, yb = x[:16].cuda(), y[:16].cuda()
    loaded.zero_grad()
    _ce(model, xb, yb).backward()
    loaded.snapshot_backward(model, lambda m: _ce(m, xb, yb))
    loaded.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
