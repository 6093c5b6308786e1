"""Topology schedulers: schedule, drop/grow mechanics, RigL's dense gradient, seeding, state_dict."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from robust_agc.sparse import (
    SPARSE_METHOD_DEFAULTS,
    RigLScheduler,
    SETScheduler,
    StaticScheduler,
    apply_masks,
    create_scheduler,
    list_sparse_methods,
    register_sparse_method,
)
from tests.test_sparse_helpers import TinyNet, _one_thread, make_data, train_steps  # noqa: F401


def _setup(method: str, *, opt: str = "sgd", seed: int = 0, sparsity: float = 0.8, **kw):
    torch.manual_seed(seed)
    model = TinyNet()
    masks = apply_masks(model, sparsity=sparsity, distribution="erk", generator=seed)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks.attach(optimizer)
    kw.setdefault("total_steps", 60)
    kw.setdefault("update_interval", 5)
    sched = create_scheduler(method, masks, optimizer=optimizer, generator=seed, **kw)
    return model, masks, optimizer, sched


# --------------------------------------------------------------------- registry and schedule
def test_registry_and_defaults() -> None:
    assert list_sparse_methods() == ["static", "set", "rigl", "itop-set", "itop-rigl", "bsr"]
    masks = apply_masks(TinyNet(), sparsity=0.5, generator=0)
    s = create_scheduler("itop-set", masks, total_steps=10_000)
    assert (s.update_interval, s.drop_fraction, s.update_end) == (1500, 0.5, 1.0)
    assert isinstance(s, SETScheduler)
    s = create_scheduler("itop-rigl", masks, total_steps=10_000)
    assert (s.update_interval, s.drop_fraction, s.update_end) == (4000, 0.5, 1.0)
    assert isinstance(s, RigLScheduler)
    s = create_scheduler("rigl", masks, total_steps=10_000, update_interval=50, drop_fraction=0.1)
    assert (s.update_interval, s.drop_fraction, s.update_end) == (50, 0.1, 0.75)
    assert isinstance(create_scheduler("static", masks, total_steps=10), StaticScheduler)
    assert SPARSE_METHOD_DEFAULTS["set"] == {
        "update_interval": 100,
        "drop_fraction": 0.3,
        "update_end": 0.75,
    }


def test_update_steps_and_cosine_drop_fraction() -> None:
    masks = apply_masks(TinyNet(), sparsity=0.5, generator=0)
    s = create_scheduler("set", masks, total_steps=100, update_interval=10, drop_fraction=0.3)
    # Updates at 10, 20, ..., 70 (strictly before 0.75 * 100 = 75); never at step 0.
    assert [t for t in range(0, 101) if s.is_update_step(t)] == [10, 20, 30, 40, 50, 60, 70]
    for t in (10, 40, 70):
        assert s.drop_fraction_at(t) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 75)))
    assert s.drop_fraction_at(0) == pytest.approx(0.3)
    assert s.drop_fraction_at(75) == pytest.approx(0.0)
    static = create_scheduler("static", masks, total_steps=100, update_interval=10)
    assert not any(static.is_update_step(t) for t in range(101))


def test_static_never_changes_masks() -> None:
    model, masks, opt, sched = _setup("static")
    before = [m.clone() for m in masks.masks()]
    x, y = make_data()
    out = train_steps(model, opt, sched, x, y, 30)
    assert out == [None] * 30 and sched.step_count == 30 and sched.num_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, masks.masks()))


# --------------------------------------------------------------------- drop and grow
@pytest.mark.parametrize("method", ["set", "rigl", "itop-set", "itop-rigl"])
def test_drop_equals_grow_and_density_constant(method: str) -> None:
    kw = {} if method.startswith("itop") else {"update_end": 0.75}
    model, masks, opt, sched = _setup(method, total_steps=40, update_interval=4, **kw)
    counts = [int(m.sum()) for m in masks.masks()]
    x, y = make_data()
    summaries = [s for s in train_steps(model, opt, sched, x, y, 40) if s is not None]
    expected_updates = 7 if method in ("set", "rigl") else 9  # 4..28 < 30; 4..36 < 40
    assert len(summaries) == expected_updates
    for s in summaries:
        assert s["dropped"] == s["grown"]
        for name, layer in s["per_layer"].items():
            assert layer["dropped"] == layer["grown"], name
        assert s["changed"] <= s["dropped"]
    assert sum(s["changed"] for s in summaries) > 0
    assert [int(m.sum()) for m in masks.masks()] == counts
    # k = floor(f_t * n_active) per layer; dense (ERK) layers are left alone.
    first = summaries[0]
    f = first["drop_fraction"]
    for (name, _, m), n_active in zip(masks, counts):
        expected = 0 if n_active == m.numel() else int(f * n_active)
        assert first["per_layer"][name]["dropped"] == expected


def test_regrown_weights_and_state_start_at_zero() -> None:
    model, masks, opt, sched = _setup("set", total_steps=40, update_interval=5)
    x, y = make_data()
    train_steps(model, opt, sched, x, y, 4)
    old = [m.clone() for m in masks.masks()]
    before = [w.detach().clone() for w in masks.weights()]
    summary = train_steps(model, opt, sched, x, y, 1)[0]
    assert summary is not None and summary["changed"] > 0
    for (_, w, m), o, b in zip(masks, old, before):
        grown = m & ~o
        dropped = o & ~m
        assert torch.all(w[grown] == 0)
        assert torch.all(opt.state[w]["momentum_buffer"][grown] == 0)
        assert torch.all(w[dropped] == 0)
        assert torch.all(opt.state[w]["momentum_buffer"][dropped] == 0)
        assert torch.all(b[grown] == 0)  # they were pruned (zero) before the step too


def test_drop_removes_smallest_magnitudes() -> None:
    model, masks, opt, sched = _setup("set", total_steps=40, update_interval=5, drop_fraction=0.5)
    x, y = make_data()
    train_steps(model, opt, sched, x, y, 4)
    # Step 5 by hand to see the weights right after the optimizer step.
    loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
    opt.zero_grad()
    loss.backward()
    opt.step()
    w_opt = [w.detach().clone() for w in masks.weights()]
    old = [m.clone() for m in masks.masks()]
    summary = sched.step()
    for (name, _, m), w, o in zip(masks, w_opt, old):
        k = summary["per_layer"][name]["dropped"]
        if k == 0:
            continue
        active_abs = w[o].abs()
        threshold = torch.sort(active_abs).values[k - 1]
        dropped_now = o & ~m
        # Every weight that left the mask was among the k smallest.
        assert torch.all(w[dropped_now].abs() <= threshold)


def test_rigl_grows_where_dense_gradient_is_largest() -> None:
    """A constructed case: known |w| for the drop, known dense gradient for the growth."""
    model = nn.Linear(4, 5, bias=False)
    masks = apply_masks(
        model, sparsity=0.5, distribution="uniform", generator=0, rescale_init=False
    )
    mask = model.weight_mask.reshape(-1)
    active = mask.nonzero().flatten()
    inactive = (~mask).nonzero().flatten()
    assert len(active) == 10 and len(inactive) == 10
    with torch.no_grad():
        w = torch.zeros(20)
        w[active] = torch.arange(1.0, 11.0)  # |w| = 1..10: the three smallest are active[0:3]
        model.weight.copy_(w.view(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    masks.attach(opt)
    # drop_fraction 0.35 at t=1 of 100: 0.175 * (1 + cos(pi/100)) * 10 = 3.499 -> k = 3.
    sched = create_scheduler(
        "rigl", masks, total_steps=100, update_interval=1, drop_fraction=0.35, update_end=1.0
    )
    grad = torch.zeros(20)
    grad[active] = 100.0  # large on active positions: must not matter (they stay or are dropped)
    grad[active[:3]] = 0.0  # the dropped ones have no gradient
    grad[inactive] = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.4, 4.0, 0.5, -0.6, 0.7])
    model.weight.grad = grad.view(5, 4).clone()
    opt.step()
    # The pre-hook masked p.grad, so the growth below can only come from the stashed dense copy.
    assert torch.all(model.weight.grad.reshape(-1)[inactive] == 0)
    summary = sched.step()
    assert summary["per_layer"][""]["dropped"] == 3
    expected = mask.clone()
    expected[active[:3]] = False
    expected[inactive[[1, 6, 3]]] = True  # |g| = 5, 4, 3: the largest at inactive positions
    assert torch.equal(model.weight_mask.reshape(-1), expected)
    assert torch.all(model.weight.reshape(-1)[inactive[[1, 6, 3]]] == 0)


def test_rigl_without_attach_uses_raw_grad_and_with_attach_needs_the_stash() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.8, generator=0)
    sched = create_scheduler("rigl", masks, total_steps=100, update_interval=1)
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    summary = sched.step()  # not attached: p.grad is still dense
    assert summary is not None and summary["changed"] > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    with pytest.raises(RuntimeError, match="no dense gradient"):
        sched.step()  # attached but no optimizer.step() ran since the last update


def test_no_optimizer_step_is_skipped_on_update_steps() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.8, generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    sched = create_scheduler("rigl", masks, total_steps=100, update_interval=3, optimizer=opt)
    x, y = make_data()
    checked = 0
    for _ in range(1, 13):
        w_before = [w.detach().clone() for w in masks.weights()]
        old = [m.clone() for m in masks.masks()]
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        w_opt = [w.detach().clone() for w in masks.weights()]
        grads = [w.grad.clone() for w in masks.weights()]
        summary = sched.step()
        for wb, wo, g, o in zip(w_before, w_opt, grads, old):
            assert torch.allclose(
                wo, torch.where(o, wb - 0.1 * g, torch.zeros(())), rtol=1e-6, atol=1e-9
            )
        if summary is not None:
            checked += 1
            for (name, w, m), wo, o in zip(masks, w_opt, old):
                kept = o & m
                moved = w[kept] != wo[kept]
                assert torch.all(w[kept][moved] == 0)  # only dropped-and-regrown reset to zero
                assert int(moved.sum()) <= summary["per_layer"][name]["dropped"]
    assert checked == 4 and sched.num_updates == 4


def test_adam_step_count_matches_training_steps() -> None:
    model, masks, opt, sched = _setup("rigl", opt="adam", total_steps=40, update_interval=3)
    x, y = make_data()
    train_steps(model, opt, sched, x, y, 25)
    for w in masks.weights():
        assert int(opt.state[w]["step"]) == 25


def test_exploration_rate_tracks_ever_active() -> None:
    model, masks, opt, sched = _setup("set", total_steps=60, update_interval=3, drop_fraction=0.5)
    x, y = make_data()
    rates = [masks.exploration_rate]
    assert rates[0] == pytest.approx(masks.density)
    for _ in range(10):
        train_steps(model, opt, sched, x, y, 3)
        rates.append(masks.exploration_rate)
        for e, m in zip(masks.ever_masks(), masks.masks()):
            assert torch.all(e[m])
    assert all(b >= a for a, b in zip(rates, rates[1:]))
    assert rates[-1] > rates[0] + 0.05
    n_ever = sum(int(e.sum()) for e in masks.ever_masks())
    assert masks.exploration_rate == n_ever / masks.num_maskable
    assert masks.report()["exploration_rate"] == rates[-1]
    assert sched.last_update["exploration_rate"] == rates[-1]


# --------------------------------------------------------------------- seeding and state_dict
def test_set_growth_is_seeded() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = TinyNet()
        masks = apply_masks(model, sparsity=0.8, generator=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        masks.attach(opt)
        sched = create_scheduler("set", masks, total_steps=30, update_interval=5, generator=seed)
        x, y = make_data()
        train_steps(model, opt, sched, x, y, 12)
        return [m.clone() for m in masks.masks()]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_state_dict_round_trip_continues_identically(method: str) -> None:
    x, y = make_data(64)
    model, masks, opt, sched = _setup(method, total_steps=60, update_interval=5)
    train_steps(model, opt, sched, x, y, 17)
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    train_steps(model, opt, sched, x, y, 20)

    # Fresh objects built differently (other init, other seeds), then restored.
    model2, masks2, opt2, sched2 = _setup(method, seed=7, total_steps=60, update_interval=5)
    model2.load_state_dict(ckpt["model"])
    masks2.sync_from_buffers()
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.step_count == 17 and sched2.num_updates == 3
    assert masks2.exploration_rate == pytest.approx(
        sum(int(e.sum()) for e in ckpt["sched"]["ever"]) / masks2.num_maskable
    )
    # Continue with the same 20 batches (train_steps restarts its data cycle at 0).
    train_steps(model2, opt2, sched2, x, y, 20)
    assert sched2.num_updates == sched.num_updates == 7
    for a, b in zip(masks.masks(), masks2.masks()):
        assert torch.equal(a, b)
    for a, b in zip(masks.ever_masks(), masks2.ever_masks()):
        assert torch.equal(a, b)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_set_trajectory_depends_on_the_generator_state() -> None:
    """Guards the round-trip test: without the restored generator state, SET diverges."""
    x, y = make_data(64)
    model_a, masks_a, opt_a, sched_a = _setup("set", seed=0, update_interval=5)
    train_steps(model_a, opt_a, sched_a, x, y, 10)
    model_b, masks_b, opt_b, sched_b = _setup("set", seed=0, update_interval=5)
    sched_b.generator.manual_seed(99)
    train_steps(model_b, opt_b, sched_b, x, y, 10)
    assert any(not torch.equal(a, b) for a, b in zip(masks_a.masks(), masks_b.masks()))


def test_load_state_dict_rejects_mismatches() -> None:
    _, masks, _, sched = _setup("set")
    sd = sched.state_dict()
    other = create_scheduler("rigl", masks, total_steps=60, update_interval=5)
    with pytest.raises(ValueError, match="Invalid state_dict value: method 'set'"):
        other.load_state_dict(sd)
    bad = dict(sd, ever=sd["ever"][:-1])
    with pytest.raises(ValueError, match="ever-active masks for"):
        sched.load_state_dict(bad)
    bad = dict(sd, ever=[e[..., :1] for e in sd["ever"]])
    with pytest.raises(ValueError, match="ever mask shape"):
        sched.load_state_dict(bad)


# --------------------------------------------------------------------- validation and warnings
BAD_SCHEDULER = [
    ({"method": "gmp"}, ValueError, "Invalid method value: 'gmp'"),
    ({"total_steps": 0}, ValueError, "Invalid total_steps value: 0"),
    ({"total_steps": 10.0}, TypeError, "Invalid total_steps value: 10.0"),
    ({"total_steps": True}, TypeError, "Invalid total_steps value: True"),
    ({"update_interval": 0}, ValueError, "Invalid update_interval value: 0"),
    ({"update_interval": -5}, ValueError, "Invalid update_interval value: -5"),
    ({"drop_fraction": 0.0}, ValueError, "Invalid drop_fraction value: 0.0"),
    ({"drop_fraction": 1.5}, ValueError, "Invalid drop_fraction value: 1.5"),
    ({"update_end": 0.0}, ValueError, "Invalid update_end value: 0.0"),
    ({"update_end": 1.01}, ValueError, "Invalid update_end value: 1.01"),
    ({"generator": "x"}, TypeError, "Invalid generator value"),
    ({"optimizer": "sgd"}, TypeError, "Invalid optimizer value: str"),
    ({"masks": "masks"}, TypeError, "Invalid masks value: str"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_SCHEDULER)
def test_create_scheduler_invalid_arguments(kwargs, error, message) -> None:
    args = {"method": "set", "masks": apply_masks(TinyNet(), sparsity=0.5, generator=0)}
    args["total_steps"] = 1000
    args.update(kwargs)
    method, masks = args.pop("method"), args.pop("masks")
    with pytest.raises(error, match=message):
        create_scheduler(method, masks, **args)


def test_scheduler_warnings() -> None:
    masks = apply_masks(TinyNet(), sparsity=0.5, distribution="uniform", generator=0)
    with pytest.warns(UserWarning, match="topology never changes") as rec:
        create_scheduler("set", masks, total_steps=100, update_interval=100)
    with pytest.warns(UserWarning, match="defined with ERK masks") as rec2:
        create_scheduler("itop-set", masks, total_steps=100_000)
    for r in (*rec, *rec2):  # each points at the line that called create_scheduler
        assert r.filename == __file__, (str(r.message), r.filename)


def test_distributed_helpers_without_a_process_group() -> None:
    """Without torch.distributed initialised: every 'rank' agrees, and broadcast_ changes nothing."""
    masks = apply_masks(TinyNet(), sparsity=0.5, generator=0)
    before = [m.clone() for m in masks.masks()]
    assert masks.masks_equal_across_ranks()
    masks.broadcast_(src=1)
    assert all(torch.equal(a, b) for a, b in zip(before, masks.masks()))


def _ddp_worker(rank: int, store: str, out: str) -> None:
    """Two gloo ranks with different weights and masks: broadcast from rank 0, a one-position
    disagreement, then a broadcast from rank 1 (results saved for the parent to check)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different weights per rank
        masks = apply_masks(TinyNet(), sparsity=0.8, generator=rank)  # different masks per rank
        res = {"before": masks.masks_equal_across_ranks()}
        res["weights_before"] = [w.detach().clone() for _, w, _ in masks]
        masks.broadcast_(src=0)
        res["after"] = masks.masks_equal_across_ranks()
        res["masks"] = [m.clone() for m in masks.masks()]
        res["weights"] = [w.detach().clone() for _, w, _ in masks]
        last = masks.masks()[-1].view(-1)
        if rank == 1:  # one position differs on one rank: every rank sees it
            last[0] = not bool(last[0])
        res["one_differs"] = masks.masks_equal_across_ranks()
        if rank == 1:
            last[0] = not bool(last[0])
        res["restored"] = masks.masks_equal_across_ranks()
        other = apply_masks(TinyNet(), sparsity=0.5, generator=10 + rank)
        other.broadcast_(src=1)
        res["from_rank_1"] = [m.clone() for m in other.masks()]
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_broadcast_and_equality_across_two_ranks(tmp_path) -> None:
    """A real two-process group (gloo, file:// rendezvous; about 5 s): after ``broadcast_(src)``
    every rank holds rank ``src``'s masks and its own weights zeroed where they are off;
    ``masks_equal_across_ranks`` is False on every rank while a single position differs."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    out = str(tmp_path / "res")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    res = [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]
    rank0 = apply_masks(TinyNet(), sparsity=0.8, generator=0).masks()
    rank1 = apply_masks(TinyNet(), sparsity=0.8, generator=1).masks()
    assert not all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # the ranks start apart
    from_rank_1 = apply_masks(TinyNet(), sparsity=0.5, generator=11).masks()
    for rank, r in enumerate(res):
        assert (r["before"], r["after"], r["one_differs"], r["restored"]) == (
            False, True, False, True
        ), rank  # fmt: skip
        for m, m0, w, w0 in zip(r["masks"], rank0, r["weights"], r["weights_before"]):
            assert torch.equal(m, m0), rank
            assert torch.equal(w, torch.where(m, w0, torch.zeros_like(w0))), rank
        assert all(torch.equal(m, m1) for m, m1 in zip(r["from_rank_1"], from_rank_1)), rank
    # the ranks' weights differed too: the masked-weights check above is no identity
    assert not torch.equal(res[0]["weights_before"][0], res[1]["weights_before"][0])


def test_register_sparse_method_refuses_a_taken_name_and_the_helpers_are_public() -> None:
    from robust_agc.sparse.masks import check_generator, fill_state

    with pytest.raises(ValueError, match="already registered"):
        register_sparse_method("rigl", lambda masks, **kw: None)  # type: ignore[arg-type,return-value]
    g = torch.Generator().manual_seed(3)
    assert check_generator(g) is g
    assert torch.equal(
        torch.rand(2, generator=check_generator(5)),
        torch.rand(2, generator=torch.Generator().manual_seed(5)),
    )
    state = {"a": torch.ones(2, 2), "b": torch.ones(3), "step": 4}
    fill_state(state, torch.Size([2, 2]), torch.tensor([[True, False], [False, True]]))
    assert state["a"].tolist() == [[0.0, 1.0], [1.0, 0.0]] and state["b"].tolist() == [1.0] * 3
