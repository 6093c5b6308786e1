"""Cross-check of the ``fmn`` stage (adv-lib's FMN, ``robust_agc.eval.fmn``) against the other
maintained implementation, foolbox 3.3.4's ``LInfFMNAttack``/``L2FMNAttack`` (the same algorithm,
Pintor et al. 2021), on a briefly trained MLP and the first 64 Fashion-MNIST test points.

Criterion. Both radii are upper bounds on each point's true minimal radius, so the question is
whether ours is systematically *larger* (weaker). Per clean-correct point, ours is "worse" when its
radius exceeds foolbox's by more than a relative ``TOL`` (or it found no adversarial example and
foolbox did) and "better" in the mirror case; ties within ``TOL`` carry no information. Under "equally
strong" the worse/better split of the untied points is Binomial(m, 1/2); the test fails when the
one-sided sign-test p-value of the worse count is below ``ALPHA`` (ours significantly weaker), and
when the median ratio ours/foolbox over the points both broke exceeds ``1 + TOL``. A sign test
makes no assumption on the distribution of the radii (heavy-tailed here) and pairs the points.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_agc import eval as ev

fb = pytest.importorskip("foolbox")
pytest.importorskip("adv_lib")

N, STEPS, TOL, ALPHA = 64, 100, 1e-3, 0.01


@pytest.fixture(scope="module")
def mlp(fmnist_tiny) -> nn.Module:
    """A 784-64-10 MLP trained 3 epochs (Adam) on the 2,000 training images (~75% accuracy)."""
    x, y, _, _ = fmnist_tiny
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def _foolbox_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> list[float]:
    """foolbox's FMN radii in our convention: 0 misclassified clean, inf where none was found."""
    attack = fb.attacks.LInfFMNAttack if norm == "Linf" else fb.attacks.L2FMNAttack
    _, adv, _ = attack(steps=STEPS)(fb.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
    p = math.inf if norm == "Linf" else 2.0
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        broken = model(adv).argmax(1) != y
    norms = (adv - x).flatten(1).norm(p=p, dim=1)
    return [
        0.0 if not c else (float(r) if b else math.inf)
        for c, b, r in zip(clean_ok.tolist(), broken.tolist(), norms.tolist(), strict=True)
    ]


def sign_test(ours: list[float], ref: list[float]) -> tuple[int, int, float]:
    """``(worse, untied, p)``: points where ours is larger beyond ``TOL``, points that differ
    beyond ``TOL`` either way, and the one-sided p-value P(Binomial(untied, 1/2) >= worse)."""
    worse = better = 0
    for a, b in zip(ours, ref, strict=True):
        if a > b * (1 + TOL) + 1e-9:
            worse += 1
        elif b > a * (1 + TOL) + 1e-9:
            better += 1
    m = worse + better
    p = sum(math.comb(m, k) for k in range(worse, m + 1)) / 2**m
    return worse, m, p


def test_sign_test_detects_a_weaker_attack():
    ref = [0.1 * (i + 1) for i in range(20)]
    assert sign_test(ref, ref) == (0, 0, 1.0)
    assert sign_test([r * 1.1 for r in ref], ref)[2] < ALPHA  # 20 of 20 worse
    mixed = [r * (1.1 if i % 2 else 0.9) for i, r in enumerate(ref)]
    assert sign_test(mixed, ref)[2] > 0.5  # 10 worse, 10 better: no evidence


def _compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str):
    res = ev.benchmark(
        model, x=x, y=y, eps=0.05, threat_model=norm, attacks="clean,fmn", fmn_steps=STEPS,
        batch_size=N, progress=False, run_checks=False,
    )  # fmt: skip
    ref = _foolbox_radii(model, x, y, norm)
    assert [r == 0 for r in res.radii] == [r == 0 for r in ref]  # same clean verdicts
    return res.radii, ref


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_linf_radii_no_larger_than_foolbox(mlp, fmnist_tiny):
    x, y = fmnist_tiny[2][:N], fmnist_tiny[3][:N]
    ours, ref = _compare(mlp, x, y, "Linf")
    attacked = [i for i, r in enumerate(ref) if r > 0]
    assert len(attacked) >= 30
    worse, untied, p = sign_test(ours, ref)
    assert p >= ALPHA, f"ours larger on {worse} of {untied} untied points (p={p:.2g})"
    both = [ours[i] / ref[i] for i in attacked if math.isfinite(ours[i] * ref[i])]
    assert len(both) >= 0.9 * len(attacked) and statistics.median(both) <= 1 + TOL


@pytest.mark.xfail(
    strict=True,
    reason="adv-lib 0.2.8's L2 FMN stalls below the decision boundary on this MLP: it finds no "
    "adversarial example for most clean-correct points, where foolbox's L2FMNAttack finds one "
    "for every point (same steps); the fmn stage's L2 radii are not trustworthy yet",
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_l2_radii_no_larger_than_foolbox(mlp, fmnist_tiny):
    x, y = fmnist_tiny[2][:N], fmnist_tiny[3][:N]
    ours, ref = _compare(mlp, x, y, "L2")
    worse, untied, p = sign_test(ours, ref)
    assert p >= ALPHA, f"ours larger on {worse} of {untied} untied points (p={p:.2g})"
