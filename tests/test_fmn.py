"""The ``fmn`` stage (foolbox's FMN, L2/L0 projections corrected): radii against closed-form minimal
radii of a linear model in all four norms, foolbox's own L2/L0 defects, pass counts, the model's
state, the security curve, the FMN/eps-attack disagreement, resume, plan validation and the CLI."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
from torch import nn

from robust_agc import eval as ev
from robust_agc.eval import fmn as fmn_mod
from robust_agc.eval.attackers import Attackers
from robust_agc.eval.plan import default_eps_grid

fb = pytest.importorskip("foolbox")

N, D, C = 40, 20, 3
EPS = 0.05


def _linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-class linear model on 20 features (inputs 1x4x5) and points in [0.3, 0.7]."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(C, D, generator=g) * 0.5
    b = torch.randn(C, generator=g) * 0.1
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C))
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(b)
    x = 0.3 + 0.4 * torch.rand(N, 1, 4, 5, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return model.eval(), x, y


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, q: float) -> list[float | None]:
    """Closed-form minimal radius per point (dual norm ``q``): 0 when misclassified; the distance
    to the nearest decision boundary ``margin / ||w_y - w_j||_q`` when the minimizing
    perturbation stays in [0, 1]; None when the box would cut it (not checked)."""
    w = model[1].weight.detach().double()
    with torch.no_grad():
        z = model(x).double()
    out: list[float | None] = []
    for i in range(x.shape[0]):
        yi = int(y[i])
        if int(z[i].argmax()) != yi:
            out.append(0.0)
            continue
        best = None
        for j in range(C):
            if j == yi:
                continue
            dw = w[yi] - w[j]
            r = float((z[i, yi] - z[i, j]) / dw.norm(p=q))
            if best is None or r < best[0]:
                best = (r, dw)
        r, dw = best
        step = -r * (dw.sign() if q == 1 else dw / dw.norm())
        xi = x[i].flatten().double() + step
        out.append(r if bool((xi >= 0).all() and (xi <= 1).all()) else None)
    return out


def _run(model, x, y, **kw):
    kw.setdefault("attacks", "clean,fmn")
    kw.setdefault("fmn_steps", 300)
    kw.setdefault("batch_size", 16)
    return ev.benchmark(model, x=x, y=y, eps=EPS, progress=False, run_checks=False, **kw)


@pytest.fixture(scope="module")
def linear():
    return _linear()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("threat", "q"), [("Linf", 1), ("L2", 2)])
def test_radii_match_closed_form_minimum(linear, threat, q):
    model, x, y = linear
    res = _run(model, x, y, threat_model=threat)
    exact = _exact(model, x, y, q)
    checked = 0
    for r, e in zip(res.radii, exact, strict=True):
        if e is None:
            continue
        if e == 0.0:
            assert r == 0.0
            continue
        checked += 1
        assert e - 1e-6 <= r <= e * 1.01 + 1e-6, (r, e)
    assert checked >= 10
    n_miss = sum(1 for e in exact if e == 0.0)
    assert 0 < n_miss < N
    assert sum(1 for r in res.radii if r == 0.0) == n_miss
    # eps-robust verdicts: a radius <= eps is broken (by fmn); the rest survive
    robust = [r > EPS for r in res.radii]
    assert res.robust_flags.tolist() == robust
    assert res.robust_acc == sum(robust) / N
    assert res.n_attacked["fmn"] == N - n_miss
    assert all(b == "fmn" for r, b in zip(res.radii, res.broken_by, strict=True) if 0 < r <= EPS)
    assert res.robust_acc_repredicted == res.robust_acc  # fmn's images re-predicted
    assert res.passes["fmn"]["backward"] > 0
    assert res.attack_config["fmn"]["steps"] == 300
    assert res.attack_config["fmn"]["norm"] == threat


def _exact_sparse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: int) -> list[float]:
    """Closed-form minimal L1 (``p=1``) or L0 (``p=0``) radius per point inside the box [0, 1]:
    per rival class ``j``, coordinate ``k`` can lower the margin by ``|dw_k|`` per unit up to its
    room to the box edge (``x_k`` or ``1 - x_k``); L1 fills the largest ``|dw_k|`` first (a
    fractional knapsack), L0 counts the fewest coordinates whose full moves exceed the margin."""
    w = model[1].weight.detach().double()
    with torch.no_grad():
        z = model(x).double()
    out = []
    for i in range(x.shape[0]):
        yi, xi = int(y[i]), x[i].flatten().double()
        if int(z[i].argmax()) != yi:
            out.append(0.0)
            continue
        best = math.inf
        for j in set(range(C)) - {yi}:
            dw, margin = w[yi] - w[j], float(z[i, yi] - z[i, j])
            room = torch.where(dw > 0, xi, 1 - xi)
            if p == 0:
                over = torch.sort(dw.abs() * room, descending=True).values.cumsum(0) > margin
                best = min(best, float(over.nonzero()[0, 0] + 1) if over.any() else math.inf)
                continue
            total, rest = 0.0, margin
            for k in torch.argsort(dw.abs(), descending=True).tolist():
                g, r = float(dw[k].abs()), float(room[k])
                if g * r >= rest:
                    total, rest = total + rest / g, 0.0
                    break
                total, rest = total + r, rest - g * r
            best = min(best, total if rest == 0.0 else math.inf)
        out.append(best)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("threat", "p"), [("L1", 1), ("L0", 0)])
def test_sparse_radii_match_closed_form_minimum(linear, threat, p):
    model, x, y = linear
    res = _run(model, x, y, threat_model=threat)
    exact = _exact_sparse(model, x, y, p)
    attacked = [(r, e) for r, e in zip(res.radii, exact, strict=True) if e > 0]
    assert len(attacked) >= 10 and all(math.isfinite(e) for _, e in attacked)
    assert [r == 0 for r in res.radii] == [e == 0 for e in exact]
    if p == 1:
        assert all(e - 1e-6 <= r <= e * 1.01 + 1e-6 for r, e in attacked), attacked
    else:  # counts: never below the minimum, at most one above, mostly exact
        assert all(e <= r <= e + 1 for r, e in attacked), attacked
        assert sum(r == e for r, e in attacked) >= 0.8 * len(attacked)
    assert res.attack_config["fmn"]["implementation"].startswith("foolbox.attacks.L")


def test_foolbox_own_l2_and_l0_projections_are_why_we_replace_them(linear):
    """foolbox 3.3.4 as shipped: L2 radii far above the closed-form minimum (its projection scales
    by 1), and L0 raising IndexError once its epsilon reaches the input size; ours do neither."""
    model, x, y = linear
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    adv = fb.attacks.L2FMNAttack(steps=100).run(fmodel, x, fb.criteria.Misclassification(y))
    exact = _exact(model, x, y, 2)
    radii = (adv - x).flatten(1).norm(dim=1).tolist()
    ratios = [r / e for r, e in zip(radii, exact, strict=True) if e]
    assert len(ratios) >= 10 and statistics.median(ratios) > 2
    ours = fmn_mod.fmn_attack(model, x, y, threat=ev.ThreatModel.L2, steps=100)
    ours_r = (ours - x).flatten(1).norm(dim=1).tolist()
    assert all(r <= e * 1.01 + 1e-6 for r, e in zip(ours_r, exact, strict=True) if e)

    class Robust(nn.Module):  # never misclassifies: FMN's L0 epsilon grows to the input size
        def forward(self, t):
            return t.flatten(1)[:, :3] * 0 + torch.tensor([5.0, 0.0, 0.0])

    xr, yr = x[:4], torch.zeros(4, dtype=torch.long)
    with pytest.raises(IndexError):
        fb.attacks.L0FMNAttack(steps=100).run(
            fb.PyTorchModel(Robust().eval(), bounds=(0, 1)), xr, fb.criteria.Misclassification(yr)
        )
    assert torch.equal(
        fmn_mod.fmn_attack(Robust().eval(), xr, yr, threat=ev.ThreatModel.L0, steps=100), xr
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_passes_one_forward_one_backward_per_step(linear):
    """Counted by the harness's hook: ``steps`` forward and backward passes per attacked point,
    plus the one forward that re-predicts FMN's image."""
    model, x, y = linear
    res = _run(model, x, y, fmn_steps=37)
    n = res.n_attacked["fmn"]
    assert res.passes["fmn"] == {"forward": 38 * n, "backward": 37 * n}


@pytest.mark.filterwarnings("ignore:The PyTorch model is in training mode:UserWarning")
def test_fmn_attack_leaves_the_model_as_it_was(linear):
    """Mode, requires_grad flags and .grad untouched; works inside torch.no_grad()."""
    model, x, y = linear
    model = copy.deepcopy(model).train()
    model[1].weight.requires_grad_(True)
    model[1].bias.requires_grad_(False)
    with torch.no_grad():
        adv = fmn_mod.fmn_attack(model.eval(), x, y, threat=ev.ThreatModel.Linf, steps=20)
    model.train()
    fmn_mod.fmn_attack(model, x[:4], y[:4], threat=ev.ThreatModel.Linf, steps=5)
    assert model.training and model[1].training
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert not adv.requires_grad and adv.shape == x.shape


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_curve_from_radii_and_record(linear):
    model, x, y = linear
    res = _run(model, x, y)
    grid = [e for e, _ in res.security_curve]
    accs = [a for _, a in res.security_curve]
    assert grid == list(default_eps_grid(EPS)) and len(grid) == 16
    assert accs[0] == res.clean_acc
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert accs[grid.index(EPS)] == res.robust_acc
    for e, a in res.security_curve:
        assert a == sum(1 for r in res.radii if r > e) / N
    assert res.fmn_disagree is None  # no eps-attack ran
    d = json.loads(json.dumps(res.to_dict()))
    assert d["fmn"]["security_curve"] == [list(p) for p in res.security_curve]
    assert [float(r) for r in d["fmn"]["radii"]] == res.radii
    assert "disagree" not in d["fmn"]
    assert [s["name"] for s in d["stages"]] == ["clean", "fmn"]


def test_security_curve_and_disagreement_functions():
    radii = [0.0, 0.02, 0.1, math.inf, 0.3]
    broken_by = ["clean", "fmn", "autoattack/apgd-ce", None, None]
    curve = fmn_mod.security_curve(
        radii, [0.0, 0.01, 0.05, 0.2, 0.5], eps=0.05, broken_by=broken_by
    )
    # point 2: radius 0.1 but broken at eps 0.05 by AutoAttack -> broken at every e >= 0.05
    assert curve == [(0.0, 0.8), (0.01, 0.8), (0.05, 0.4), (0.2, 0.4), (0.5, 0.2)]
    assert fmn_mod.security_curve(radii, [0.05], eps=0.05)[0] == (0.05, 0.6)  # FMN alone
    assert fmn_mod.disagreement(radii, broken_by, eps=0.05) == [
        None,
        "fmn_only",
        "eps_attack_only",
        None,
        None,
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_autoattack_fmn_disagreement_in_record(linear, monkeypatch):
    """A fake AutoAttack that breaks only the point with the largest finite radius (with a huge
    perturbation): it disagrees with FMN there (eps_attack_only) and on every point FMN broke
    within eps (fmn_only); the curve counts the AutoAttack break from eps on."""
    model, x, y = linear
    ref = _run(model, x, y)
    target = max(
        (i for i, r in enumerate(ref.radii) if math.isfinite(r)), key=ref.radii.__getitem__
    )
    assert ref.radii[target] > EPS
    real = Attackers.attack
    w = model[1].weight.detach()

    def fake(self, unit, xb, yb):
        if unit == "fmn":
            return real(self, unit, xb, yb)
        adv = xb.clone()
        for k in range(xb.shape[0]):
            if torch.equal(xb[k], x[target]):
                yi = int(yb[k])
                j = (yi + 1) % C
                adv[k] = (xb[k].flatten() - 10 * (w[yi] - w[j])).clamp(0, 1).view_as(xb[k])
        return adv

    monkeypatch.setattr(Attackers, "attack", fake)
    res = _run(model, x, y, attacks="clean,fmn,autoattack", version=["apgd-ce"])
    assert res.broken_by[target] == "autoattack/apgd-ce"
    assert res.radii == ref.radii  # fmn attacks every clean-correct point whatever broke it
    fmn_broken = [i for i, r in enumerate(ref.radii) if 0 < r <= EPS]
    assert fmn_broken
    assert res.fmn_disagree[target] == "eps_attack_only"
    assert all(res.fmn_disagree[i] == "fmn_only" for i in fmn_broken)
    assert sum(v is not None for v in res.fmn_disagree) == len(fmn_broken) + 1
    assert res.robust_acc == ref.robust_acc - 1 / N
    curve_ref, curve = dict(ref.security_curve), dict(res.security_curve)
    assert any(e >= ref.radii[target] for e in curve)  # the grid reaches past the radius
    for e in curve:
        lost = 1 if EPS <= e < ref.radii[target] else 0  # broken by AutoAttack, not yet by FMN
        assert round(curve[e] * N) == round(curve_ref[e] * N) - lost
    rec = res.to_dict()["fmn"]
    assert rec["n_disagree"] == {"eps_attack_only": 1, "fmn_only": len(fmn_broken)}
    assert rec["disagree"][target] == "eps_attack_only"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmn_slice", [None, (4, N)], ids=["all", "slice"])
def test_resume_gives_identical_radii(linear, tmp_path, monkeypatch, fmn_slice):
    """Interrupted inside the fmn stage after one chunk, a rerun resumes there (the first chunk
    is not attacked again) and gives the uninterrupted run's radii and curve (with a slice, the
    points outside it keep their ``None`` radius through the saved state)."""
    model, x, y = linear
    ref = _run(model, x, y, batch_size=8, fmn_slice=fmn_slice)
    st = tmp_path / "state.json"
    real = Attackers.attack
    calls = []

    def dying(self, unit, xb, yb):
        calls.append(unit)
        if unit == "fmn" and calls.count("fmn") == 2:
            raise KeyboardInterrupt
        return real(self, unit, xb, yb)

    monkeypatch.setattr(Attackers, "attack", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(model, x, y, batch_size=8, state_file=st, fmn_slice=fmn_slice)
    saved = json.loads(st.read_text())
    assert saved["current"]["unit"] == "fmn" and saved["current"]["batches_done"] == 1
    assert len(saved["radii"]) == N
    assert (None in saved["radii"]) == (fmn_slice is not None)
    calls.clear()
    res = _run(model, x, y, batch_size=8, state_file=st, fmn_slice=fmn_slice)
    n_chunks = math.ceil(ref.n_attacked["fmn"] / 8)
    assert calls.count("fmn") == n_chunks - 1
    assert res.radii == ref.radii
    assert res.security_curve == ref.security_curve
    assert res.robust_flags.tolist() == ref.robust_flags.tolist()
    assert res.passes["fmn"] == ref.passes["fmn"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attacks": "clean,fmm"}, "Invalid attacks value"),
        ({"fmn_steps": 0}, "Invalid fmn_steps value"),
        ({"fmn_steps": 2.5}, "Invalid fmn_steps value"),
        ({"eps_grid": []}, "Invalid eps_grid value"),
        ({"eps_grid": [0.1, 0.05]}, "strictly increasing"),
        ({"eps_grid": [0.0, 0.1, 0.1]}, "strictly increasing"),
        ({"eps_grid": [-0.1, 0.1]}, "Invalid eps_grid value"),
        ({"eps_grid": [0.0, math.inf]}, "Invalid eps_grid value"),
        ({"eps_grid": "0,0.1"}, "Invalid eps_grid value"),
    ],
)
def test_plan_rejects_bad_fmn_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ev.make_plan(eps=EPS, **kwargs)


@pytest.mark.parametrize("norm", ["L1", "l0"])
def test_plan_l1_l0_only_for_fmn_alone(norm):
    assert (
        ev.make_plan(eps=2.0, threat_model=norm, attacks="clean,fmn").threat.value == norm.upper()
    )
    for attacks in ("clean,autoattack,fmn", "clean,pgd", "clean,square,fmn"):
        with pytest.raises(ValueError, match=r"Invalid threat_model value: 'L[01]' with .*fmn"):
            ev.make_plan(eps=2.0, threat_model=norm, attacks=attacks)
    with pytest.raises(ValueError, match="Invalid threat_model value: 'L3' .*Linf, L2, L1, L0"):
        ev.make_plan(eps=2.0, threat_model="L3", attacks="clean,fmn")


def test_plan_fmn_last_and_defaults():
    plan = ev.make_plan(eps=0.1, attacks="fmn,autoattack")
    assert plan.stages == ("clean", "autoattack", "fmn") and plan.units[-1] == "fmn"
    assert plan.fmn_steps == 1000
    assert plan.eps_grid[0] == 0.0 and plan.eps_grid[5] == 0.1 and len(plan.eps_grid) == 16
    assert plan.eps_grid[-1] == pytest.approx(0.3)
    assert ev.make_plan(eps=0.1, eps_grid=[0, 0.2]).eps_grid == (0.0, 0.2)


def _cnn_state_dict(tmp_path):
    """An untrained, seeded small-cnn's state dict (the CLI does not need a trained model)."""
    from robust_agc.models import create_model

    torch.manual_seed(0)
    cnn = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()
    sd = tmp_path / "w.pt"
    torch.save(cnn.state_dict(), sd)
    return sd


def _cli(argv, capsys):
    from robust_agc.cli import main

    code = main(["eval", *argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fmn-steps", "0"], "Invalid fmn_steps value"),
        (["--eps-grid", "0,0.1,abc"], "Invalid eps_grid value"),
        (["--eps-grid", "0.2,0.1"], "Invalid eps_grid value"),
        (["--eps-grid", ","], "Invalid eps_grid value"),
        (["--eps-grid=-1,0"], "Invalid eps_grid value"),
    ],
)
def test_cli_bad_fmn_values_exit_2_one_line(tmp_path, capsys, extra, message):
    sd = _cnn_state_dict(tmp_path)
    out = tmp_path / "r.json"
    argv = ["--state-dict", str(sd), "--arch", "small-cnn", "--dataset", "fashion-mnist"]
    argv += ["--eps", "0.1", "--attacks", "clean,fmn", "--out", str(out), *extra]
    code, cap = _cli(argv, capsys)
    err = cap.err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_writes_radii_and_curve(tmp_path, capsys):
    sd = _cnn_state_dict(tmp_path)
    out = tmp_path / "r.json"
    argv = ["--state-dict", str(sd), "--arch", "small-cnn", "--dataset", "fashion-mnist"]
    argv += ["--eps", "0.1", "--attacks", "clean,pgd,fmn", "--pgd-steps", "5"]
    argv += ["--pgd-restarts", "1", "--fmn-steps", "20", "--eps-grid", "0,0.05,0.1,0.3"]
    argv += ["--n-examples", "6", "--no-progress", "--no-checks", "--out", str(out)]
    code, _ = _cli(argv, capsys)
    assert code == 0
    d = json.loads(out.read_text())
    assert [e for e, _ in d["fmn"]["security_curve"]] == [0.0, 0.05, 0.1, 0.3]
    assert d["fmn"]["security_curve"][0][1] == d["clean_acc"]
    assert d["fmn"]["security_curve"][2][1] == d["robust_acc"]
    assert len(d["fmn"]["radii"]) == 6 and len(d["fmn"]["disagree"]) == 6
    assert d["attack_config"]["fmn"]["steps"] == 20
    assert [s["name"] for s in d["stages"]] == ["clean", "pgd", "fmn"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fmn_slice_attacks_only_its_points_disagreement_on_the_intersection(linear, monkeypatch):
    """``fmn_slice=(10, 30)``: FMN attacks only the clean-correct points 10..29 (radii None
    elsewhere, equal to a full run's inside), the curve counts those 20 points, the eps-attack
    (a fake AutoAttack breaking every point with a huge step) still attacks all 40, and the
    disagreement is marked only on the slice."""
    model, x, y = linear
    ref = _run(model, x, y)
    real = Attackers.attack
    w = model[1].weight.detach()

    def fake(self, unit, xb, yb):
        if unit == "fmn":
            return real(self, unit, xb, yb)
        j = (yb + 1) % C
        return (xb.flatten(1) - 10 * (w[yb] - w[j])).clamp(0, 1).view_as(xb)

    monkeypatch.setattr(Attackers, "attack", fake)
    res = _run(model, x, y, attacks="clean,autoattack,fmn", version=["apgd-ce"], fmn_slice=(10, 30))
    assert res.radii[10:30] == ref.radii[10:30]
    assert all(r is None for r in res.radii[:10] + res.radii[30:])
    assert res.n_attacked["fmn"] == sum(1 for r in ref.radii[10:30] if r > 0)
    assert res.n_attacked["autoattack/apgd-ce"] == sum(1 for r in ref.radii if r > 0)
    inside = ref.radii[10:30]
    for e, a in res.security_curve:  # eps-attack broke every clean-correct point: 0 from eps on
        assert a == (0.0 if e >= EPS else sum(1 for r in inside if r > e) / 20)
    assert all(d is None for d in res.fmn_disagree[:10] + res.fmn_disagree[30:])
    assert res.fmn_disagree[10:30] == ["eps_attack_only" if r > EPS else None for r in inside]
    rec = res.to_dict()
    assert rec["fmn"]["slice"] == [10, 30] and rec["fmn"]["n_points"] == 20
    assert rec["attack_config"]["fmn"]["slice"] == [10, 30]
    assert json.loads(json.dumps(rec))["fmn"]["radii"][0] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmn_slice": (5, 5)}, "Invalid fmn_slice value"),
        ({"fmn_slice": (-1, 5)}, "Invalid fmn_slice value"),
        ({"fmn_slice": (0, 5), "attacks": "clean,pgd"}, "without the fmn stage"),
        ({"fmn_slice": (0, 50), "n_examples": 20}, "must lie within the n_examples=20"),
    ],
)
def test_plan_rejects_bad_fmn_slice(kwargs, match):
    kwargs.setdefault("attacks", "clean,fmn")
    with pytest.raises(ValueError, match=match):
        ev.make_plan(eps=EPS, **kwargs)
