"""BSR-Net scheduler: exact budget, fixed signs, zero state, noise scale, decay, resume, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from robust_agc.optim import AGC
from robust_agc.sparse.bsr import SIGN_BUFFER, BSRScheduler, create_bsr
from robust_agc.sparse.masks import apply_masks


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )  # fmt: skip


def _data(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _build(opt_name: str = "sgd", *, sparsity: float = 0.8, seed: int = 0, lr: float = 0.1, **kw):
    model = _model(seed)
    masks = apply_masks(model, sparsity=sparsity, distribution="uniform", generator=seed)
    if opt_name == "agc":
        opt = AGC(model.parameters(), lr=lr, momentum=0.9, estimator="grad-online")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    masks.attach(opt)
    kw.setdefault("total_steps", 100)
    kw.setdefault("n_train", 64)
    kw.setdefault("generator", seed + 1)
    sched = BSRScheduler(masks, optimizer=opt, **kw)
    return model, masks, opt, sched


def _train_step(model, opt, sched, x, y) -> None:
    loss_fn = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    opt.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    if isinstance(opt, AGC):
        opt.snapshot_backward(model, loss_fn)
    opt.step()
    sched.step()


def _check_invariants(masks, opt, sched, signs0) -> None:
    assert masks.num_active == sched.budget
    for (name, w, mask), s, s0 in zip(masks, sched.signs(), signs0):
        assert torch.equal(s, s0), f"{name}: signs changed"
        theta = w.detach() * s.to(w.dtype)
        assert bool((theta[mask] > 0).all()), f"{name}: active theta <= 0"
        assert bool((w.detach()[~mask] == 0).all()), f"{name}: inactive weight != 0"
        for key, v in opt.state[w].items():
            if isinstance(v, torch.Tensor) and v.shape == w.shape:
                assert bool((v[~mask] == 0).all()), f"{name}: state {key!r} != 0 at inactive"


@pytest.mark.parametrize("opt_name", ["sgd", "agc"])
def test_budget_signs_and_zero_state_every_step(opt_name):
    # Large noise and decay force many removals per step.
    model, masks, opt, sched = _build(opt_name, noise=30.0, weight_decay=0.5)
    signs0 = [s.clone() for s in sched.signs()]
    x, y = _data()
    rewired = 0
    for t in range(60):
        if opt_name == "agc" and t % 20 == 10:
            opt.refresh(
                model,
                [(x[:16], y[:16]), (x[16:], y[16:])],
                lambda m, a, b: F.cross_entropy(m(a), b),
            )
        _train_step(model, opt, sched, x, y)
        _check_invariants(masks, opt, sched, signs0)
        rewired += sched.last_update["reactivated"]
    assert rewired > 100  # the test exercised rewiring
    assert sched.total_reactivated == rewired
    if opt_name == "agc":
        assert opt.num_refreshes == 3 and all("snapshot" in opt.state[w] for w in masks.weights())


def test_signs_from_initial_weights_and_buffer():
    model = _model()
    w0 = [m.weight.detach().clone() for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = apply_masks(
        model, sparsity=0.5, distribution="uniform", generator=0, rescale_init=False
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = BSRScheduler(masks, optimizer=opt, total_steps=10, n_train=10, generator=0)
    for w, (_, _, mask), s, m in zip(w0, masks, sched.signs(), masks.modules):
        assert s.dtype == torch.int8 and set(s.unique().tolist()) == {-1, 1}
        assert torch.equal(s[mask], torch.sign(w)[mask].to(torch.int8))
        assert SIGN_BUFFER in dict(m.named_buffers()) and SIGN_BUFFER not in m.state_dict()
    # inactive signs are random, not all one value
    inactive = torch.cat([s[~mask] for s, (_, _, mask) in zip(sched.signs(), masks)])
    assert 0.35 < float((inactive > 0).float().mean()) < 0.65


def test_zero_initialised_active_weights_start_at_init_theta():
    model = _model()
    nn.init.zeros_(model[5].weight)
    masks = apply_masks(model, sparsity=0.5, distribution="uniform", generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    BSRScheduler(masks, optimizer=opt, total_steps=10, n_train=10, init_theta=1e-3)
    w, mask, s = model[5].weight, model[5].weight_mask, model[5].weight_sign
    assert torch.equal(w[mask], s[mask].float() * 1e-3)
    assert bool((w[~mask] == 0).all())


def test_noise_scale_langevin_and_milestone():
    lr, n_train, sigma = 0.1, 1000, 2.0
    model, masks, opt, sched = _build(
        sparsity=0.0, lr=lr, n_train=n_train, noise=sigma, total_steps=10, noise_milestone=0.5,
        noise_factor=4.0,
    )  # fmt: skip
    with torch.no_grad():  # theta = 1 everywhere: nothing can die
        for w, s in zip(masks.weights(), sched.signs()):
            w.copy_(s.float())
    expected = math.sqrt(2 * lr / n_train) * sigma
    for t in range(1, 11):
        before = [th.clone() for th in sched.thetas()]
        opt.step()  # no gradients: the weights only change through the scheduler
        sched.step()
        inc = torch.cat([(a - b).reshape(-1) for a, b in zip(sched.thetas(), before)])
        assert inc.numel() > 2000  # relative std error of the std ~1.4%
        factor = 1.0 if t <= 5 else 2.0  # temperature x4 -> std x2 after step 5
        assert abs(float(inc.std()) / (expected * factor) - 1) < 0.06, t
        assert abs(float(inc.mean())) < 4 * expected * factor / math.sqrt(inc.numel())
        assert sched.last_update["removed"] == 0
        assert sched.last_update["temperature"] == (1.0 if t <= 5 else 4.0)


def test_noise_scale_release_form():
    lr, sigma = 0.05, 0.3
    model, masks, opt, sched = _build(sparsity=0.0, lr=lr, noise=sigma, noise_form="release")
    with torch.no_grad():
        for w, s in zip(masks.weights(), sched.signs()):
            w.copy_(s.float() * 5)
    before = [th.clone() for th in sched.thetas()]
    opt.step()
    sched.step()
    inc = torch.cat([(a - b).reshape(-1) for a, b in zip(sched.thetas(), before)])
    assert abs(float(inc.std()) / (lr * sigma) - 1) < 0.06


def test_decoupled_decay_uses_the_steps_learning_rate():
    model, masks, opt, sched = _build(noise=0.0, weight_decay=0.2, lr=0.5)
    w0 = [w.detach().clone() for w in masks.weights()]
    opt.step()  # no gradients
    for g in opt.param_groups:  # e.g. an LR scheduler stepping before the topology scheduler
        g["lr"] = 0.01
    sched.step()
    for w, a in zip(masks.weights(), w0):
        assert torch.equal(w.detach(), a * (1 - 0.5 * 0.2))
    assert sched.last_update["removed"] == 0


def test_nonpositive_theta_removed_and_reactivated_at_init_theta_with_zero_state():
    # 90% dense: most re-activations land on just-removed positions (which had momentum).
    model, masks, opt, sched = _build(sparsity=0.1, noise=0.0, init_theta=1e-4)
    x, y = _data()
    _train_step(model, opt, sched, x, y)  # creates momentum buffers
    opt.zero_grad(set_to_none=True)
    before = [mask.clone() for mask in masks.masks()]
    g = torch.Generator().manual_seed(3)
    killed = []
    with torch.no_grad():
        for w, mask, s in zip(masks.weights(), masks.masks(), sched.signs()):
            k = mask & (torch.rand(w.shape, generator=g) < 0.5)
            k.view(-1)[0] = bool(mask.view(-1)[0])  # theta exactly 0 counts as removed too
            w[k] = -s[k].float() * 0.1
            w.view(-1)[0] = 0.0
            killed.append(k | (mask & (torch.arange(w.numel()).view(w.shape) == 0)))
    opt.step()  # no gradients: only the hooks run
    out = sched.step()
    n_killed = sum(int(k.sum()) for k in killed)
    assert out["removed"] == n_killed and out["reactivated"] == n_killed
    assert masks.num_active == sched.budget
    reborn = 0
    for w, mask, s, k, b in zip(masks.weights(), masks.masks(), sched.signs(), killed, before):
        new = mask & (k | ~b)  # active now, but removed this step or inactive before
        reborn += int((new & k).sum())
        assert torch.equal(w[new], s[new].float() * 1e-4)
        assert bool((w[k & ~mask] == 0).all())
        assert bool((opt.state[w]["momentum_buffer"][new] == 0).all())
        assert bool((opt.state[w]["momentum_buffer"][mask & ~new] != 0).any())
    assert reborn > 0


def test_reactivation_is_uniform_over_all_inactive_positions():
    model, masks, opt, sched = _build(sparsity=0.5, noise=0.0)
    counts = torch.zeros(len(masks))
    g = torch.Generator().manual_seed(5)
    inactive = torch.tensor([float((~mask).sum()) for mask in masks.masks()])
    for _ in range(40):
        with torch.no_grad():
            for w, mask in zip(masks.weights(), masks.masks()):
                w[mask & (torch.rand(w.shape, generator=g) < 0.1)] = 0.0
        opt.step()
        sched.step()
        counts += torch.tensor(
            [float(v["reactivated"]) for v in sched.last_update["per_layer"].values()]
        )
    # re-activations land in layers in proportion to their inactive positions (+1 for the removed)
    share = counts / counts.sum()
    ref = inactive / inactive.sum()
    assert torch.allclose(share, ref, atol=0.03), (share, ref)


@pytest.mark.filterwarnings("ignore:AGC.step\\(\\) without AGC.snapshot_backward")
def test_agc_no_correction_at_positions_reactivated_since_refresh():
    model, masks, opt, sched = _build("agc", sparsity=0.5, noise=0.0)
    x, y = _data()
    loss = lambda m, a, b: F.cross_entropy(m(a), b)  # noqa: E731
    opt.refresh(model, [(x[:16], y[:16]), (x[16:], y[16:])], loss)
    _train_step(model, opt, sched, x, y)
    with torch.no_grad():  # remove 10% so that the next step re-activates
        g = torch.Generator().manual_seed(1)
        for w, mask in zip(masks.weights(), masks.masks()):
            w[mask & (torch.rand(w.shape, generator=g) < 0.1)] = 0.0
    opt.zero_grad(set_to_none=True)
    opt.step()
    sched.step()
    fresh = [f.clone() for f in sched._fresh]
    assert sum(int(f.sum()) for f in fresh) > 0
    _train_step(model, opt, sched, x, y)
    for w, f, mask in zip(masks.weights(), fresh, masks.masks()):
        st = opt.state[w]
        on = f & mask
        assert bool((st["snap_grad"][on] == 0).all()) and bool((st["full_grad"][on] == 0).all())
        assert bool((st["snap_grad"][mask & ~f] != 0).any())
    opt.refresh(model, [(x[:16], y[:16]), (x[16:], y[16:])], loss)
    _train_step(model, opt, sched, x, y)
    # after the refresh the record restarts: only this step's re-activations are fresh
    assert sum(int(f.sum()) for f in sched._fresh) == sched.last_update["reactivated"]


@pytest.mark.parametrize("opt_name", ["sgd", "agc"])
def test_state_dict_round_trip_is_bit_identical(opt_name):
    x, y = _data()
    loss = lambda m, a, b: F.cross_entropy(m(a), b)  # noqa: E731

    def run(model, opt, sched, steps, start):
        for t in range(start, start + steps):
            if opt_name == "agc" and t % 6 == 3:
                opt.refresh(model, [(x[:16], y[:16]), (x[16:], y[16:])], loss)
            _train_step(model, opt, sched, x, y)

    kw = dict(noise=5.0, weight_decay=0.1, noise_milestone=0.1, noise_factor=2.0)
    model, masks, opt, sched = _build(opt_name, **kw)
    run(model, opt, sched, 8, 0)
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    run(model, opt, sched, 10, 8)

    model2, masks2, opt2, sched2 = _build(opt_name, seed=7, **kw)  # different init and seeds
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    masks2.sync_from_buffers()
    sched2.load_state_dict(ckpt["sched"])
    run(model2, opt2, sched2, 10, 8)
    for (_, w, m), (_, w2, m2) in zip(masks, masks2):
        assert torch.equal(m, m2) and torch.equal(w, w2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert sched.last_update == sched2.last_update
    assert sched.total_reactivated == sched2.total_reactivated > 0
    assert [torch.equal(a, b) for a, b in zip(sched.signs(), sched2.signs())] == [True] * 3


def test_load_state_dict_rejects_mismatches():
    model, masks, opt, sched = _build()
    sd = sched.state_dict()
    _, _, _, other = _build(seed=3)
    with pytest.raises(ValueError, match="signs disagree"):
        other.load_state_dict(sd)  # model weights not loaded
    bad = dict(sd)
    bad.pop("bsr")
    with pytest.raises(ValueError, match="no 'bsr' entry"):
        sched.load_state_dict(bad)


def test_history_report_and_last_update():
    model, masks, opt, sched = _build(noise=20.0, history_interval=5)
    x, y = _data()
    for _ in range(12):
        _train_step(model, opt, sched, x, y)
    assert len(sched.history) == 2 and sched.history[-1]["step"] == 10
    assert sched.history[0]["steps"] == 5
    rep = sched.report()
    assert rep["method"] == "bsr" and rep["steps"] == 12 and rep["budget"] == masks.num_active
    assert set(rep["layer_densities"]) == {"0", "3", "5"}
    # layer densities float, the global count does not
    assert sum(
        d * m.weight.numel() for d, m in zip(rep["layer_densities"].values(), masks.modules)
    ) == pytest.approx(sched.budget)
    assert rep["rewired_per_step"] == pytest.approx(rep["reactivated_total"] / 12)
    assert sched.last_update["step"] == 12 and sched.num_updates == 12
    assert masks.report(scheduler=sched)["last_update"] is sched.last_update
    assert masks.report()["last_update"] is None  # the masks hold no back-pointer


def test_create_bsr_from_model_and_from_masks():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_bsr(
        model, opt, total_steps=10, n_train=100, sparsity=0.9, mask_generator=0, noise=0.5
    )
    assert isinstance(sched, BSRScheduler) and sched.noise == 0.5
    assert sched.masks.density == pytest.approx(0.1, abs=0.01) and opt in sched.masks.optimizers
    model2 = _model()
    masks2 = apply_masks(model2, sparsity=0.5, generator=0)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    s2 = create_bsr(masks2, opt2, total_steps=10, n_train=100)
    assert s2.masks is masks2 and opt2 in masks2.optimizers
    with pytest.raises(ValueError, match="Invalid sparsity value"):
        create_bsr(masks2, opt2, total_steps=10, n_train=100, sparsity=0.5)
    with pytest.raises(ValueError, match="Invalid sparsity value"):
        create_bsr(_model(), opt2, total_steps=10, n_train=100)
    with pytest.raises(TypeError, match="Invalid model_or_masks value"):
        create_bsr("model", opt2, total_steps=10, n_train=100)  # type: ignore[arg-type]


INVALID = [
    ({"n_train": 0}, ValueError, r"Invalid n_train value: 0"),
    ({"n_train": 1.5}, TypeError, r"Invalid n_train value"),
    ({"n_train": True}, TypeError, r"Invalid n_train value"),
    ({"total_steps": 0}, ValueError, r"Invalid total_steps value: 0"),
    ({"noise": -1.0}, ValueError, r"Invalid noise value: -1.0"),
    ({"noise": float("nan")}, ValueError, r"Invalid noise value: nan"),
    ({"noise": "1"}, TypeError, r"Invalid noise value"),
    ({"noise_form": "gauss"}, ValueError, r"Invalid noise_form value: 'gauss'"),
    ({"noise_milestone": 1.5}, ValueError, r"Invalid noise_milestone value: 1.5"),
    ({"noise_milestone": -0.1}, ValueError, r"Invalid noise_milestone value: -0.1"),
    ({"noise_factor": -2.0}, ValueError, r"Invalid noise_factor value: -2.0"),
    ({"weight_decay": -1e-4}, ValueError, r"Invalid weight_decay value: -0.0001"),
    ({"weight_decay": 20.0}, ValueError, r"Invalid weight_decay value: 20.0 \(lr \* wd >= 1\)"),
    ({"init_theta": 0.0}, ValueError, r"Invalid init_theta value: 0.0"),
    ({"init_theta": float("inf")}, ValueError, r"Invalid init_theta value: inf"),
    ({"history_interval": 0}, ValueError, r"Invalid history_interval value: 0"),
    ({"generator": "seed"}, TypeError, r"Invalid generator value"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), INVALID)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _build(**kwargs)


def test_invalid_optimizer_and_masks():
    model = _model()
    masks = apply_masks(model, sparsity=0.5, generator=0)
    with pytest.raises(TypeError, match="Invalid optimizer value"):
        BSRScheduler(masks, optimizer="sgd", total_steps=10, n_train=10)  # type: ignore[arg-type]
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold the masked weight"):
        BSRScheduler(masks, optimizer=other, total_steps=10, n_train=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="Invalid masks value"):
        BSRScheduler(model, optimizer=opt, total_steps=10, n_train=10)  # type: ignore[arg-type]


def test_warnings_for_suspicious_settings():
    model = _model()
    masks = apply_masks(model, sparsity=0.5, generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    with pytest.warns(UserWarning, match="on top of BSR's decoupled decay"):
        BSRScheduler(masks, optimizer=opt, total_steps=10, n_train=10)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="noise_factor has no effect"):
        BSRScheduler(masks, optimizer=opt2, total_steps=10, n_train=10, noise_factor=3.0)
    sched = BSRScheduler(masks, optimizer=opt2, total_steps=10, n_train=10)
    with pytest.warns(UserWarning, match="without optimizer.step"):
        sched.step()


def test_channels_last_layout_gives_the_same_sampling():
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        masks = apply_masks(model, sparsity=0.5, distribution="uniform", generator=0)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        masks.attach(opt)
        sched = BSRScheduler(
            masks, optimizer=opt, total_steps=10, n_train=64, noise=40.0, weight_decay=0.1,
            generator=1,
        )  # fmt: skip
        for _ in range(5):
            opt.step()  # no gradients: only decay, noise, removal and re-activation
            sched.step()
        _check_invariants(masks, opt, sched, sched.signs())
        runs.append(([w.detach().clone() for w in masks.weights()], sched.total_reactivated))
    assert runs[0][1] == runs[1][1] > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


def test_bsr_is_a_registered_sparse_method():
    """create_scheduler("bsr", ...) builds the same scheduler as the class, and the old import
    path robust_agc.sparse.bsr still works."""
    from robust_agc.sparse import bsr as shim
    from robust_agc.sparse import create_scheduler, list_sparse_methods
    from robust_agc.sparse.schedulers import bsr as home

    assert "bsr" in list_sparse_methods() and shim.BSRScheduler is home.BSRScheduler
    x, y = _data()
    runs = []
    for registry in (False, True):
        model = _model()
        masks = apply_masks(model, sparsity=0.8, distribution="uniform", generator=0)
        opt = AGC(model.parameters(), lr=0.1, momentum=0.9, estimator="grad-online")
        masks.attach(opt)
        kw = dict(total_steps=100, n_train=64, generator=1, noise=2.0, weight_decay=1e-3)
        if registry:
            sched = create_scheduler("bsr", masks, optimizer=opt, **kw)
        else:
            sched = BSRScheduler(masks, optimizer=opt, **kw)
        assert sched.method == "bsr"
        opt.refresh(model, [(x, x, y)], lambda m, x, xa, y: F.cross_entropy(m(xa), y))
        for _ in range(5):
            _train_step(model, opt, sched, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
