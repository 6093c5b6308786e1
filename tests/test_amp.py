"""Mixed precision (--amp bf16|fp16) and channels_last in the trainer and in AGC's passes.

CPU autocast runs both dtypes here (float16 slowly: its runs are kept to a few dozen images).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc.checkpoint import load_checkpoint
from robust_agc.config import TrainConfig
from robust_agc.data import DataSplits, make_splits
from robust_agc.errors import UserError
from robust_agc.optim import AGC
from robust_agc.train import TIMING_FIELDS, Trainer

from .test_cli import SMALL, SPARSE_AGC, run_cli


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    return make_splits("fashion-mnist", train_subset=128, val_size=16, test_size=16)


def _small(splits: DataSplits, n: int) -> DataSplits:
    return dataclasses.replace(splits, x_train=splits.x_train[:n], y_train=splits.y_train[:n])


def _cfg(**kw) -> TrainConfig:
    base = dict(
        model="small-cnn", batch_size=32, epochs=2, attack_steps=2, eval_subset=16, eval_steps=1,
        val_size=16, seed=1, progress=False, threads=1,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


def _record_conv_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Output dtype of every call of the model's last convolution (plain and functional calls)."""
    seen: list[torch.dtype] = []
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def _finite_weights(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _metrics(run: Path) -> list[str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
        for r in rows
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "agc"])
def test_bf16_autocasts_every_training_pass_and_trains(splits, optimizer):
    """Attack, training forward, AGC's refresh and snapshot pass run in bfloat16; evaluation in
    float32; parameters and optimizer state stay float32; the loss is finite and the weights move."""
    trainer = Trainer(
        _cfg(
            amp="bf16",
            optimizer=optimizer,
            sparse_method="rigl",
            sparsity=0.8,
            agc_refresh_fraction=1.0,  # the refresh sees every batch: one forward each
        ),
        splits=splits,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    dtypes = _record_conv_dtypes(trainer.model)
    out = trainer.train_epoch()
    assert math.isfinite(out["train_loss"]) and "amp_skipped_steps" not in out
    n_steps = trainer.steps_per_epoch
    # per step: attack steps + training forward (+ snapshot forward); AGC: + the refresh's batches
    expected = n_steps * (2 + 1 + (optimizer == "agc")) + (n_steps if optimizer == "agc" else 0)
    assert len(dtypes) == expected and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    trainer.evaluate()
    assert dtypes and set(dtypes) == {torch.float32}
    assert _finite_weights(trainer.model)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    for p in trainer.model.parameters():
        assert p.dtype == torch.float32
        for v in trainer.optimizer.state[p].values():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert v.dtype == torch.float32
    if optimizer == "agc":
        assert trainer.optimizer.has_snapshot


def test_fp16_trains_agc_with_a_loss_scaler(splits):
    trainer = Trainer(
        _cfg(amp="fp16", optimizer="agc", objective="natural", epochs=1), splits=_small(splits, 32)
    )
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    dtypes = _record_conv_dtypes(trainer.model)
    out = trainer.train_epoch()
    assert set(dtypes) == {torch.float16}
    assert math.isfinite(out["train_loss"]) and _finite_weights(trainer.model)
    assert out["amp_skipped_steps"] == trainer.state.amp_skipped_steps < trainer.steps_per_epoch
    assert out["amp_loss_scale"] == trainer.scaler.get_scale() > 0
    assert all(
        torch.isfinite(trainer.optimizer.state[p]["full_grad"]).all()
        for p in trainer.model.parameters()
    )


def _scaled_grads(trainer: Trainer, value: float) -> None:
    """Give every parameter a gradient as the scaled backward pass would leave it."""
    scale = trainer._loss_scale_kwargs()["loss_scale"]  # also initialises the scaler's scale
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, value) * scale


def test_fp16_step_is_skipped_counted_and_backs_off_on_non_finite_gradients(splits, caplog):
    trainer = Trainer(_cfg(amp="fp16", objective="natural"), splits=_small(splits, 32))
    params = list(trainer.model.parameters())
    w0 = [p.detach().clone() for p in params]
    scale0 = trainer.scaler.get_scale()
    _scaled_grads(trainer, 1e-3)
    next(iter(params)).grad[0].fill_(float("inf"))
    assert trainer._optimizer_step() is False
    assert all(torch.equal(a, p) for a, p in zip(w0, params))
    assert trainer.state.amp_skipped_steps == 1 and "step skipped" in caplog.text
    assert trainer.scaler.get_scale() == scale0 * trainer.scaler.get_backoff_factor()
    _scaled_grads(trainer, 1e-3)
    assert trainer._optimizer_step() is True
    assert trainer.state.amp_skipped_steps == 1
    for a, p in zip(w0, params):  # the unscaled gradient 1e-3 (plus weight decay) moved them
        assert 0 < float((a - p).abs().max()) < 1e-3


def test_fp16_step_is_skipped_when_only_the_agc_snapshot_gradient_overflows(splits):
    """GradScaler only sees p.grad; the trainer also checks AGC's snapshot gradient."""
    trainer = Trainer(
        _cfg(amp="fp16", optimizer="agc", objective="natural"), splits=_small(splits, 32)
    )
    opt, params = trainer.optimizer, list(trainer.model.parameters())
    w0 = [p.detach().clone() for p in params]
    scale0 = trainer.scaler.get_scale()
    _scaled_grads(trainer, 1e-3)
    for p in params:
        opt.state[p]["snap_grad"] = torch.zeros_like(p)
    opt.state[params[-1]]["snap_grad"][0] = float("nan")
    assert trainer._optimizer_step() is False
    assert all(torch.equal(a, p) for a, p in zip(w0, params))
    assert trainer.scaler.get_scale() == scale0 * trainer.scaler.get_backoff_factor()
    assert trainer.state.amp_skipped_steps == 1


def test_fp16_skipped_steps_leave_the_topology_alone_and_weights_finite(splits):
    """A scale far beyond float16's range: the refresh retries at lower scales (finite mu), the
    training steps are skipped and backed off until finite; RigL counts only the steps taken."""
    trainer = Trainer(
        _cfg(
            amp="fp16",
            optimizer="agc",
            objective="natural",
            sparse_method="rigl",
            sparsity=0.8,
            batch_size=8,
        ),
        splits=_small(splits, 16),
    )
    # the true class's logit gradient, -0.9 / 8 at the start, overflows float16 at this scale
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    out = trainer.train_epoch()
    skipped = out["amp_skipped_steps"]
    assert skipped >= 1 and trainer.state.step == trainer.steps_per_epoch
    assert trainer.topology.step_count == trainer.state.step - skipped
    assert out["amp_loss_scale"] <= 2.0**20 * 0.5**skipped
    assert _finite_weights(trainer.model)
    for p in trainer.model.parameters():
        assert torch.isfinite(trainer.optimizer.state[p]["full_grad"]).all()


@pytest.mark.parametrize(
    "amp, kw",
    [
        ("bf16", dict(optimizer="agc", sparse_method="rigl", sparsity=0.8, update_interval=2)),
        ("fp16", dict(optimizer="agc", objective="natural", batch_size=8)),
    ],
)
def test_amp_resume_continues_bit_identically(splits, tmp_path, amp, kw):
    """On CPU, an interrupted mixed-precision run resumed from last.pt ends with the weights and
    metrics of an uninterrupted one; float16 restores the loss scaler's state; the per-epoch
    evaluation attack's generator continues where the interrupted run left it."""
    data = _small(splits, 64 if amp == "bf16" else 8)
    cfg = _cfg(amp=amp, **{"batch_size": 16, **kw})
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    uninterrupted = Trainer(cfg, splits=data)
    uninterrupted.fit(ref)
    first = Trainer(cfg, splits=data)
    first.cfg = dataclasses.replace(cfg, epochs=1)  # stops after the first epoch
    first.fit(cut)
    resumed = Trainer(cfg, splits=data)
    fresh_eval_rng = resumed.eval_attack.get_rng_state()
    ckpt = load_checkpoint(cut / "last.pt")
    resumed.load_state_dict(ckpt)
    # epoch 1's evaluation drew random starts: the restored state is that one, not a fresh one
    eval_rng = first.eval_attack.get_rng_state()
    assert not torch.equal(eval_rng, fresh_eval_rng)
    assert torch.equal(resumed.eval_attack.get_rng_state(), eval_rng)
    if amp == "fp16":
        assert ckpt["amp"]["scaler"] == first.scaler.state_dict()
        assert resumed.scaler.state_dict() == first.scaler.state_dict()
        assert first.scaler.state_dict() != torch.amp.GradScaler("cpu").state_dict()
    else:
        assert "amp" not in ckpt
    resumed.fit(cut)
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(ref) == _metrics(cut)
    if amp == "fp16":
        assert a["amp"] == b["amp"]
    assert torch.equal(
        resumed.eval_attack.get_rng_state(), uninterrupted.eval_attack.get_rng_state()
    )
    assert torch.equal(a["rng"]["eval_attack"], b["rng"]["eval_attack"])


def test_channels_last_matches_the_default_layout(splits):
    cfg = _cfg(objective="natural", optimizer="agc", sparse_method="rigl", sparsity=0.8, epochs=1)
    plain = Trainer(cfg, splits=splits)
    cl = Trainer(dataclasses.replace(cfg, channels_last=True), splits=splits)
    convs = [m for m in cl.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and all(
        m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
        for m in convs
    )
    a, b = plain.train_epoch(), cl.train_epoch()
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for p, q in zip(plain.model.parameters(), cl.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for (name, _, m), (_, _, n) in zip(plain.masks, cl.masks):
        assert torch.equal(m, n), name
    for p, q in zip(plain.model.parameters(), cl.model.parameters()):
        if p.dim() == 4 and p.shape[1] > 1:  # the optimizer state keeps the layout
            buf = cl.optimizer.state[q]["momentum_buffer"]
            assert buf.is_contiguous(memory_format=torch.channels_last)


def test_amp_off_is_the_default_and_adds_nothing(splits, tmp_path):
    """Flags explicitly off run the same code as the defaults: no autocast (float32 everywhere),
    no scaler, no amp fields in metrics or checkpoint, bit-identical results."""
    cfg = _cfg(optimizer="agc", sparse_method="rigl", sparsity=0.8, epochs=1)
    default = Trainer(cfg, splits=splits)  # one after the other: attacks use the global RNG
    dtypes = _record_conv_dtypes(default.model)
    assert default.scaler is None and default.amp_dtype is None
    a = default.train_epoch()
    explicit = Trainer(dataclasses.replace(cfg, amp="off", channels_last=False), splits=splits)
    b = explicit.train_epoch()
    assert set(dtypes) == {torch.float32}
    assert not any(k.startswith("amp_") for k in a)

    def canonical(r):
        return json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)

    assert canonical(a) == canonical(b)
    for p, q in zip(default.model.parameters(), explicit.model.parameters()):
        assert torch.equal(p, q)
    assert "amp" not in default.state_dict()


def test_amp_flags_on_the_command_line(tmp_path, capsys):
    assert run_cli("train", *SMALL, "--amp", "fp8", "--out", str(tmp_path / "x")) == 2
    assert "invalid choice" in capsys.readouterr().err
    out = tmp_path / "bf16"
    argv = [*SMALL, *SPARSE_AGC, "--train-subset", "128", "--epochs", "1", "--eval-subset", "16"]
    assert run_cli("train", *argv, "--amp", "bf16", "--channels-last", "--out", str(out)) == 0
    cfg = json.loads((out / "summary.json").read_text())["config"]
    assert cfg["amp"] == "bf16" and cfg["channels_last"] is True
    # a resume must keep the precision (it is part of the run's configuration)
    assert run_cli("train", *argv, "--out", str(out), "--resume") == 2
    assert "amp" in capsys.readouterr().err


def test_unavailable_autocast_is_a_one_line_user_error(splits, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(UserError, match=r"Invalid amp value: 'bf16' \(this torch build has no"):
        Trainer(_cfg(amp="bf16"), splits=splits)


# ----------------------------------------------------------------------- AGC's loss_scale argument
def _agc_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    return model, batches


def _loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def test_agc_loss_scale_gives_the_unscaled_gradients_in_float32():
    """A power-of-two loss scale is exact in float32: mu and g_B(ws) are bitwise the unscaled ones."""
    states = []
    for scale in (None, 2.0**12, torch.tensor(2.0**12)):
        model, batches = _agc_setup()
        opt = AGC(model.parameters(), lr=0.1)
        opt.refresh(model, batches, _loss, loss_scale=scale)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        opt.snapshot_backward(model, lambda m, b=batches[0]: _loss(m, *b), loss_scale=scale)
        states.append(
            [(opt.state[p]["full_grad"], opt.state[p]["snap_grad"]) for p in model.parameters()]
        )
    for other in states[1:]:
        for (mu, gs), (mu2, gs2) in zip(states[0], other):
            assert torch.equal(mu, mu2) and torch.equal(gs, gs2)


def test_agc_refresh_retries_an_overflowing_loss_scale_under_float16():
    model, batches = _agc_setup()
    ref = AGC(model.parameters(), lr=0.1)
    ref.refresh(model, batches, _loss)

    def fp16_loss(m, x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(m(x).float(), y)

    opt = AGC(model.parameters(), lr=0.1)
    opt.refresh(model, batches, fp16_loss, loss_scale=2.0**40)  # overflows float16 at first
    for p in model.parameters():
        mu = opt.state[p]["full_grad"]
        assert torch.isfinite(mu).all()
        torch.testing.assert_close(mu, ref.state[p]["full_grad"], rtol=0.05, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_amp_channels_last_epoch(splits, amp):
    """An epoch on CUDA in each precision with channels_last: finite loss and weights, the weights
    move; the evaluation (float32 whatever --amp) counts what a plain float32 forward pass of the
    trained model predicts; bfloat16's epoch loss stays close to float32's (no loss scaler: the
    same steps, within bfloat16's rounding; float16's scaler may skip its first steps)."""
    cfg = _cfg(device="cuda", amp=amp, channels_last=True, optimizer="agc", sparse_method="rigl")
    trainer = Trainer(cfg, splits=splits)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train_epoch()
    assert math.isfinite(out["train_loss"]) and _finite_weights(trainer.model)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    if amp == "fp16":
        assert out["amp_skipped_steps"] < trainer.steps_per_epoch
    ev = trainer.evaluate()
    n = cfg.eval_subset
    plain = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format).eval()
    for name, x, y in (("val", splits.x_val[:n], splits.y_val[:n]),
                       ("test", splits.x_test[:n], splits.y_test[:n])):  # fmt: skip
        with torch.no_grad():
            pred = plain(x.to("cuda")).argmax(1).cpu()
        assert ev[f"{name}_clean_acc"] == (pred == y).sum().item() / len(y), name
        robust = ev[f"{name}_robust_acc"]
        assert 0 <= robust <= 1 and (robust * len(y)).is_integer(), name
    if amp == "bf16":
        ref = Trainer(dataclasses.replace(cfg, amp="off"), splits=splits)
        assert out["train_loss"] == pytest.approx(ref.train_epoch()["train_loss"], rel=0.1)


def test_fp16_with_two_processes_skips_the_same_steps_on_every_rank(tmp_path):
    """DDP + AGC + RigL in float16: gradients are all-reduced before the finiteness check, so every
    rank skips the same steps (a disagreement would hang a collective or fail the mask check)."""
    from .test_distributed import _finish, _free_port, _torchrun

    out = tmp_path / "run"
    argv = [
        "--model", "small-cnn", "--objective", "pgd-at", "--attack-steps", "1", "--train-subset", "32",
        "--val-size", "8", "--eval-subset", "8", "--eval-steps", "1", "--batch-size", "8", "--epochs", "1",
        "--threads", "1", "--no-progress", "--optimizer", "agc", "--sparse-method", "rigl",
        "--sparsity", "0.8", "--update-interval", "1", "--amp", "fp16", "--channels-last", "--out", str(out),
    ]  # fmt: skip
    launcher = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    _finish(_torchrun(*launcher, "--master-port", str(_free_port()), argv=argv))
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["amp_skipped_steps"] >= 1 and math.isfinite(row["train_loss"])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["amp"]["skipped_steps"] == row["amp_skipped_steps"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
