"""Fast adversarial training: N-FGSM, GradAlign, free adversarial training (replays) and the
catastrophic-overfitting guard, each checked on its defining property (docs/usage.md, "Fast
adversarial training")."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import NFGSM, create_attack
from robust_agc.cli import main
from robust_agc.config import TrainConfig
from robust_agc.data import DataSplits, make_splits
from robust_agc.errors import UserError
from robust_agc.losses import grad_align_penalty
from robust_agc.train import TIMING_FIELDS, Trainer
from robust_agc.train.fast_at import CollapseGuard, FreePerturbation, detect_collapse

EPS = 0.1


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    return make_splits("fashion-mnist", train_subset=48, val_size=8, test_size=8)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        model="small-cnn", batch_size=16, epochs=2, attack_steps=1, eval_subset=8, eval_steps=1,
        val_size=8, seed=3, progress=False, threads=1, eps=EPS,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


class _Linear(nn.Module):
    """``logits = flatten(x) @ W``: its input gradient's sign is known in closed form."""

    def __init__(self, d: int = 12, k: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, k, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


class _Flat(nn.Module):
    """Logits that do not depend on the input (zero input gradient): N-FGSM adds only its noise."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * 0.0).sum(1, keepdim=True) + self.b


def _x(n: int = 64, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((n, d), 0.5, dtype=torch.float64)
    return x, torch.arange(n) % 3


# ------------------------------------------------------------------------------------------ N-FGSM
def test_nfgsm_noise_spans_k_eps_and_is_the_seeded_uniform_draw():
    x, y = _x(256)
    x_adv = NFGSM(_Flat(), EPS, noise=2.0, seed=7)(x, y)  # zero gradient: x_adv = x + eta
    eta = x_adv - x
    radius = 2.0 * EPS
    assert float(eta.abs().max()) <= radius + 1e-12
    assert float(eta.max()) > 0.99 * radius and float(eta.min()) < -0.99 * radius
    expected = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    torch.testing.assert_close(eta, expected * 2 * radius - radius, rtol=0, atol=1e-12)
    assert torch.equal(NFGSM(_Flat(), EPS, noise=0.0, seed=7)(x, y), x)  # k = 0: no noise


def test_nfgsm_step_is_alpha_sign_grad_from_the_noisy_point_without_projection():
    model, (x, y) = _Linear(), _x()
    attack = NFGSM(model, EPS, noise=2.0, seed=1)
    assert attack.alpha == EPS and attack.cost_per_example == 1  # the paper's defaults
    x_adv = attack(x, y)
    eta = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    x0 = (x + eta * 4 * EPS - 2 * EPS).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    torch.testing.assert_close(x_adv, x0.detach() + EPS * g.sign(), rtol=0, atol=1e-12)
    reach = (x_adv - x).abs().amax()
    assert EPS * 1.5 < float(reach) <= 3 * EPS + 1e-12  # beyond the eps-ball, within (k+1) eps
    # no noise, a step of 3 eps: every coordinate moves by exactly 3 eps (an FGSM would clip it)
    x_big = NFGSM(model, EPS, alpha=3 * EPS, noise=0.0)(x, y)
    torch.testing.assert_close((x_big - x).abs(), torch.full_like(x, 3 * EPS), rtol=0, atol=1e-12)


def test_nfgsm_through_the_trainer_gets_its_noise_and_the_papers_step(splits):
    t = Trainer(_cfg(train_attack="n-fgsm", nfgsm_noise=1.5), splits=splits)
    assert isinstance(t.attack, NFGSM) and (t.attack.noise, t.attack.alpha) == (1.5, EPS)
    rs = Trainer(_cfg(train_attack="fgsm-rs"), splits=splits).attack
    assert rs is not None and rs.alpha == pytest.approx(1.25 * EPS)
    assert isinstance(create_attack("n-fgsm", _Flat(), eps=EPS), NFGSM)


# --------------------------------------------------------------------------------------- GradAlign
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _direct_penalty(model: nn.Module, x, y, eta) -> torch.Tensor:
    """``1 - mean_i cos(grad CE_i(x_i), grad CE_i(x_i + eta_i))``, one example at a time."""
    cos = []
    for i in range(x.shape[0]):
        a = x[i : i + 1].clone().requires_grad_(True)
        b = (x[i : i + 1] + eta[i : i + 1]).requires_grad_(True)
        (ga,) = torch.autograd.grad(F.cross_entropy(model(a), y[i : i + 1]), a)
        (gb,) = torch.autograd.grad(F.cross_entropy(model(b), y[i : i + 1]), b, create_graph=True)
        cos.append(F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0))
    return 1.0 - torch.stack(cos).mean()


def test_grad_align_penalty_equals_a_direct_computation_and_its_weight_gradient():
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    eta = (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * 0.5
    ours = grad_align_penalty(model, x, y, eta)
    ref = _direct_penalty(model, x, y, eta)
    assert 1e-3 < float(ref.detach()) < 2.0  # the noise really misaligns the gradients
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # double backprop: the penalty's weight gradient is the direct computation's, and nonzero
    params = list(model.parameters())
    g_ours = torch.autograd.grad(ours, params)
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert sum(float(a.abs().sum()) for a in g_ours) > 1e-6
    # eta = 0: aligned by construction
    assert abs(float(grad_align_penalty(model, x, y, torch.zeros_like(x)).detach())) < 1e-12


def test_grad_align_in_training_counts_three_passes_and_moves_the_weights(splits):
    base = _cfg(epochs=1, train_attack="fgsm")
    plain = Trainer(base, splits=splits)
    plain.train_epoch()
    ga = Trainer(dataclasses.replace(base, grad_align=2.0), splits=splits)
    ga.train_epoch()
    n = splits.x_train.shape[0]
    assert ga.state.grad_evals == plain.state.grad_evals + 3 * n
    diff = sum(
        float((a - b).detach().abs().sum())
        for a, b in zip(plain.model.parameters(), ga.model.parameters())
    )
    assert diff > 0  # the penalty reached the weights
    assert "grad_align" in ga.state_dict()["rng"] and "grad_align" not in plain.state_dict()["rng"]


# ---------------------------------------------------------------------------- free adversarial AT
def test_free_replays_reuse_and_carry_one_perturbation(splits, monkeypatch):
    m = 3
    cfg = _cfg(epochs=1, free_replays=m, sparse_method="rigl", sparsity=0.5, update_interval=1,
               attack_step_size=EPS / 4)  # fmt: skip
    t = Trainer(cfg, splits=splits)
    assert t.attack is None and t.step_size == EPS / 4
    assert Trainer(_cfg(free_replays=2), splits=splits).step_size == EPS  # Shafahi et al.'s
    seen: list[tuple] = []  # (perturbation a replay used, the carried one after its step)
    start, step_ = FreePerturbation.start, FreePerturbation.step_

    def spy_start(self, x):
        fresh = self.delta is None
        x_adv = start(self, x)
        used = self._leaf.detach().clone()  # the perturbation this replay trains on
        assert torch.equal(x_adv.detach(), (x + used).clamp(0, 1))
        seen.append((None if fresh else used, None))
        return x_adv

    def spy_step(self, **kw):
        used, grad = self._leaf.detach().clone(), self._leaf.grad.clone()
        step_(self, **kw)
        expected = (used + kw["alpha"] * grad.sign()).clamp(-kw["eps"], kw["eps"])
        assert torch.equal(self.delta[: used.shape[0]], expected)  # one signed step, clipped
        seen[-1] = (seen[-1][0], self.delta.clone())

    monkeypatch.setattr(FreePerturbation, "start", spy_start)
    monkeypatch.setattr(FreePerturbation, "step_", spy_step)
    steps = []
    t.optimizer.register_step_post_hook(lambda *a: steps.append(1))
    t.train_epoch()
    n_batches = len(t.batches)
    assert len(seen) == n_batches * m and len(steps) == n_batches * m == t.state.step
    assert t.topology.step_count == n_batches * m and t.total_steps == n_batches * m
    n = splits.x_train.shape[0]
    assert t.state.grad_evals == m * n  # one forward+backward per replay, no attack passes
    assert seen[0][0] is None  # created (zero) at the start of training
    for (_, after), (before, _) in zip(seen, seen[1:]):  # the next replay (or batch) starts
        assert torch.equal(before, after[: before.shape[0]])  # where the last one left it
    moved = [not torch.equal(a, b) for (_, a), (_, b) in zip(seen, seen[1:])]
    assert all(moved)  # each replay moves it: one signed step each
    assert all(float(after.abs().max()) <= EPS + 1e-7 for _, after in seen)
    assert float(seen[-1][1].abs().max()) > EPS / 4 + 1e-6  # steps accumulate across replays


def test_free_replays_with_agc_count_the_snapshot_pass_per_optimizer_step(splits):
    cfg = _cfg(epochs=1, free_replays=2, optimizer="agc", agc_refresh="1s")
    t = Trainer(cfg, splits=splits)
    refreshes = []
    refresh = t._refresh
    t._refresh = lambda: (refreshes.append(t.state.step), refresh())[1]
    t.train_epoch()
    assert refreshes == list(range(t.state.step))  # a step-period refresh fires between replays
    n = splits.x_train.shape[0]
    assert t.state.step == 2 * len(t.batches)
    # two replays of (objective + snapshot pass) per example, plus every refresh's passes
    assert t.state.grad_evals > 2 * 2 * n


def _fit_first_epoch(cfg: TrainConfig, splits: DataSplits) -> dict:
    trainer = Trainer(cfg, splits=splits)
    trainer.cfg = dataclasses.replace(cfg, epochs=1)  # the schedule stays the two-epoch run's
    trainer.fit()
    trainer.cfg = cfg
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _canonical(t: Trainer) -> list[str]:
    return [
        json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
        for r in t.state.metrics
    ]


def test_resume_with_free_replays_grad_align_and_the_guard_is_bit_identical(splits):
    cfg = _cfg(free_replays=2, grad_align=0.5, sparse_method="set", update_interval=2)
    ref = Trainer(cfg, splits=splits)
    ref.fit()
    ckpt = _fit_first_epoch(cfg, splits)
    assert float(ckpt["free_at"]["delta"].abs().max()) > 0  # a carried perturbation to restore
    assert {"grad_align"} <= ckpt["rng"].keys() and "collapse_guard" in ckpt
    resumed = Trainer(cfg, splits=splits)
    resumed.load_state_dict(ckpt)
    resumed.fit()
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert _canonical(resumed) == _canonical(ref) and "val_fgsm_acc" in ref.state.metrics[-1]
    # the check can fail: the same resume without the carried perturbation ends elsewhere
    ckpt["free_at"]["delta"] = torch.zeros_like(ckpt["free_at"]["delta"])
    broken = Trainer(cfg, splits=splits)
    broken.load_state_dict(ckpt)
    broken.fit()
    assert any(
        not torch.equal(a, b) for a, b in zip(ref.model.parameters(), broken.model.parameters())
    )


# ------------------------------------------------------------ torchattacks as the training attack
def test_torchattacks_training_attack_gets_the_settings_warm_up_and_bn_mode(splits):
    import torchattacks

    from attacks import TorchattacksAdapter

    cfg = _cfg(train_attack="torchattacks:PGD", attack_steps=2, eps_warmup_epochs=1,
               attack_bn_mode="train")  # fmt: skip
    t = Trainer(cfg, splits=splits)
    assert isinstance(t.attack, TorchattacksAdapter) and type(t.attack.attack) is torchattacks.PGD
    assert t.attack.bn_mode == "train"
    ta = t.attack.attack
    assert (ta.eps, ta.steps) == (EPS, 2) and ta.alpha == pytest.approx(2.5 * EPS / 2)
    seen = []
    real = torchattacks.PGD.forward

    def spy(self, x, y):
        seen.append((self.eps, self.alpha))
        return real(self, x, y)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchattacks.PGD, "forward", spy)
        t.fit()
    # the radius warm-up reaches the wrapped attack: eps and the step grow over epoch 1's 3 steps
    assert [round(e / EPS, 6) for e, _ in seen[:3]] == [round(k / 3, 6) for k in (1, 2, 3)]
    assert all(a == pytest.approx(e * 2.5 / 2) for e, a in seen)
    # 1 training pass + 2 attack steps per example and epoch
    assert t.state.grad_evals == 2 * 48 * (1 + 2)


def test_attack_bn_mode_reaches_our_training_attacks(splits):
    for name in ("fgsm", "fgsm-rs", "n-fgsm", "pgd"):
        t = Trainer(_cfg(train_attack=name, attack_bn_mode="train"), splits=splits)
        assert t.attack.bn_mode == "train", name
        assert Trainer(_cfg(train_attack=name), splits=splits).attack.bn_mode == "eval", name


def test_resume_with_a_torchattacks_training_attack_is_bit_identical(splits):
    cfg = _cfg(train_attack="torchattacks:PGD", attack_steps=2)  # random start: global RNG
    ref = Trainer(cfg, splits=splits)
    ref.fit()
    resumed = Trainer(cfg, splits=splits)
    resumed.load_state_dict(_fit_first_epoch(cfg, splits))
    resumed.fit()
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


# -------------------------------------------------------------------------------------- the guard
def test_detector_flags_a_gap_and_a_drop_on_a_synthetic_sequence():
    assert detect_collapse(0.5, 0.4, None, gap=0.3, drop=0.2) == []
    assert detect_collapse(0.8, 0.45, None, gap=0.3, drop=0.2) == ["gap"]
    assert detect_collapse(0.5, 0.25, 0.5, gap=0.3, drop=0.2) == ["drop"]
    assert detect_collapse(0.9, 0.01, 0.5, gap=0.3, drop=0.2) == ["gap", "drop"]
    assert detect_collapse(float("nan"), float("nan"), 0.5, gap=0.3, drop=0.2) == []
    guard = CollapseGuard("warn", gap=0.3, drop=0.2)
    pgd = [0.20, 0.30, 0.35, 0.02, 0.30, 0.14, 0.33]
    fgsm = [0.25, 0.36, 0.42, 0.70, 0.36, 0.20, 0.40]
    flags = []
    for e, (p, f) in enumerate(zip(pgd, fgsm), start=1):
        rec = {"epoch": e, "val_robust_acc": p, "val_fgsm_acc": f}
        flags.append(bool(guard.check(rec)))
        assert rec["collapse"] == flags[-1]
    # epoch 4: gap and drop; epoch 6: 0.35 - 0.14 > 0.2 (the best good epoch's, not epoch 5's)
    assert flags == [False, False, False, True, False, True, False]
    assert guard.flagged == [4, 6] and guard.last_good_epoch == 7 and guard.best_robust == 0.35


def test_detector_flags_non_finite_weights_as_diverged():
    # at chance, no gap, no best epoch yet: only the weights tell
    assert detect_collapse(0.1, 0.1, None, gap=0.3, drop=0.2, finite=False) == ["diverged"]
    guard = CollapseGuard("warn", gap=0.3, drop=0.2)
    rec = {"epoch": 1, "val_robust_acc": 0.1, "val_fgsm_acc": 0.1, "nonfinite_weights": True}
    assert guard.check(rec) == ["diverged"] and rec["collapse"] and guard.flagged == [1]
    assert guard.last_good_epoch == 0 and guard.best_robust is None


def test_a_run_whose_weights_become_nan_is_flagged_diverged(splits, caplog):
    # The fast_at study's bsr90_gradalign cell, found diverging at its third step: BSR-Net starts
    # the zero classifier head at theta = 1e-12, where GradAlign's scale-invariant cosine has a
    # weight gradient of order 1 / theta. The epoch is flagged and the log says why.
    cfg = _cfg(
        epochs=1, train_attack="fgsm", grad_align=0.2, sparse_method="bsr", sparsity=0.9, lr=0.05
    )
    t = Trainer(cfg, splits=splits)
    with caplog.at_level(logging.WARNING, logger="robust_agc.train"):
        t.fit()
    rec = t.state.metrics[0]
    assert not all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    assert rec["nonfinite_weights"] is True
    assert rec["collapse"] and "diverged" in rec["collapse_reasons"]
    assert "training diverged" in caplog.text
    # the same run without GradAlign stays finite and records nothing new
    t = Trainer(dataclasses.replace(cfg, grad_align=0.0), splits=splits)
    t.fit()
    assert "nonfinite_weights" not in t.state.metrics[0]
    assert not t.state.metrics[0]["collapse"]


def _scripted(monkeypatch, pgd: list[float], fgsm: list[float]) -> None:
    """Per-epoch evaluation replaced by a script (epoch e gets index e - 1): a forced collapse."""

    def evaluate(self):
        e = self.state.epoch
        return {"val_clean_acc": 0.9, "val_robust_acc": pgd[e], "test_clean_acc": 0.9,
                "test_robust_acc": pgd[e], "val_fgsm_acc": fgsm[e]}  # fmt: skip

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def test_guard_warns_and_continues_or_stops(splits, monkeypatch, caplog, tmp_path):
    _scripted(monkeypatch, [0.4, 0.05, 0.4], [0.45, 0.8, 0.45])
    t = Trainer(_cfg(epochs=3, train_attack="fgsm"), splits=splits)  # auto: warn
    assert t.guard is not None and t.guard.action == "warn"
    with caplog.at_level(logging.WARNING, logger="robust_agc.train"):
        t.fit()
    assert "catastrophic overfitting suspected" in caplog.text
    assert [r["collapse"] for r in t.state.metrics] == [False, True, False]
    s = Trainer(_cfg(epochs=3, train_attack="fgsm", on_collapse="stop"), splits=splits)
    summary = s.fit(tmp_path)
    assert [r["collapse"] for r in s.state.metrics] == [False, True] and s.state.epoch == 2
    assert summary["collapse_guard"]["stopped"] and summary["final"]["epoch"] == 2
    # a stopped run resumed stays stopped
    again = Trainer(_cfg(epochs=3, train_attack="fgsm", on_collapse="stop"), splits=splits)
    again.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True))
    again.fit()
    assert again.state.epoch == 2


def _same(a, b) -> bool:
    """Equal nested checkpoint content, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def test_guard_rolls_back_to_the_last_good_checkpoint(splits, monkeypatch, tmp_path):
    _scripted(monkeypatch, [0.4, 0.42, 0.02], [0.45, 0.5, 0.9])
    cfg = _cfg(epochs=3, free_replays=2, on_collapse="rollback", sparse_method="set",
               update_interval=2)  # fmt: skip
    good = Trainer(dataclasses.replace(cfg, on_collapse="warn"), splits=splits)
    good.cfg = dataclasses.replace(good.cfg, epochs=2)
    good.fit()  # the same run, stopped after epoch 2 (the last good one)
    good_ckpt = good.state_dict()
    with pytest.raises(UserError, match="needs a run folder"):  # before any training
        Trainer(cfg, splits=splits).fit()
    t = Trainer(cfg, splits=splits)
    summary = t.fit(tmp_path)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    for k, v in good_ckpt["model"].items():
        assert torch.equal(t.model.state_dict()[k], v), k  # in memory, as on disk:
    for key in ("model", "optimizer", "lr_scheduler", "topology", "free_at", "epoch", "step"):
        assert _same(saved[key], good_ckpt[key]), key
    assert _same(saved["rng"]["torch"], good_ckpt["rng"]["torch"])
    assert saved["epoch"] == 2
    assert t.state.grad_evals > good.state.grad_evals  # the undone epoch's compute is counted
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["collapse"], r.get("rolled_back", False)) for r in rows] == [
        (1, False, False), (2, False, False), (3, True, True),
    ]  # fmt: skip
    assert summary["final"]["epoch"] == 2 and summary["collapse_guard"]["rolled_back_to"] == 2


def test_defaults_add_no_state_and_no_evaluation_pass(splits):
    t = Trainer(_cfg(epochs=1), splits=splits)
    assert t.free is None and t.guard is None and t._grad_align_gen is None
    ckpt = t.state_dict()
    assert not {"free_at", "collapse_guard"} & ckpt.keys() and "grad_align" not in ckpt["rng"]
    assert "val_fgsm_acc" not in t.evaluate()
    assert _cfg(train_attack="pgd").collapse_action() == "off"
    assert _cfg(train_attack="n-fgsm", val_size=0).collapse_action() == "off"
    assert _cfg(free_replays=2).collapse_action() == "warn"


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--free-replays", "0"], "Invalid free_replays value: 0"),
        (["--grad-align", "-0.5"], "Invalid grad_align value: -0.5"),
        (["--train-attack", "n-fgsm", "--nfgsm-noise", "-1"], "Invalid nfgsm_noise value: -1"),
        (["--nfgsm-noise", "2"], "--nfgsm-noise applies to --train-attack n-fgsm only"),
        (["--free-replays", "2", "--train-attack", "pgd"], "drop --train-attack"),
        (["--train-attack", "pdg"], "Invalid train_attack value: 'pdg' (choose from"),
        (["--train-attack", "torchattacks:PDG"], "no such attack in torchattacks"),
        (["--train-attack", "torchattacks:MultiAttack"], "not built from a model"),
        (["--train-attack", "torchattacks:LGV"], "needs trainloader"),
        (["--free-replays", "2", "--objective", "natural"], "needs an adversarial objective"),
        (["--on-collapse", "rollback", "--val-size", "0"], "needs validation points"),
        (["--grad-align", "1", "--amp", "fp16"], "not loss-scaled"),
        (["--collapse-gap", "1.5"], "Invalid collapse_gap value: 1.5"),
        (["--on-collapse", "never"], "invalid choice"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(argv, message, capsys, tmp_path):
    out = tmp_path / "r"
    try:
        code = main(["train", "--train-subset", "32", *argv, "--out", str(out)])
    except SystemExit as e:  # argparse usage errors
        code = int(e.code)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
