"""AutoAttack parity, component by component: `robust_agc.eval.benchmark` against pyautoattack's own
`AutoAttack.run_standard_evaluation` on the same points, seed, chunking and budgets.

Why a synthetic model. On a trained network the first component (APGD-CE) breaks nearly every point
that can be broken at all, so the later components get nothing to do and a bug in their dispatch
(a skipped, swapped or misconfigured component) changes no verdict. `RoutedModel` gives every point
its own logit landscape, each built on the mechanism that makes exactly one component succeed
where the earlier ones fail (the reasons AutoAttack has these components).

Along a fixed direction u the target class's logit is ``f = <u, delta>/eps - margin`` (within eps
when margin < 48, the number of feature pixels); the true class's logit is 0.

===============  ================================================  ========  ========  ========
route            landscape                                         standard  plus      rand
===============  ================================================  ========  ========  ========
linear           one linear boundary, logits at a moderate scale   apgd-ce   apgd-ce   apgd-ce
saturated        the same, logits x50: the softmax saturates, the  apgd-t    apgd-dlr  apgd-dlr
                 cross-entropy input gradient is exactly 0 (DLR is
                 scale-invariant)
tied3            saturated, three classes share the target's       fab-t     fab       robust
                 logit: the DLR and targeted-DLR losses are
                 constant (gradient exactly 0); FAB linearises
                 z_t - z_y and projects onto it
staircase        saturated, f rises in steps (zero gradient         square    square    robust
                 everywhere): only Square's queries see it rise
decoy            saturated, a decoy class above the target with a  apgd-t    apgd-t    robust
                 steep bounded sawtooth logit: it drives the
                 untargeted losses (DLR, FAB's closest boundary)
                 and Square's margin; the targeted DLR towards the
                 target is clean
tied3_decoy      the decoy and three tied classes: every targeted  fab-t     fab-t     robust
                 DLR loss is constant or driven by the decoy;
                 FAB-T's second target is the tied class
far, far_linear  the boundary beyond eps (saturated, moderate)     robust    robust    robust
misclassified    wrong on the clean point                          clean     clean     clean
===============  ================================================  ========  ========  ========

Each point carries its id one-hot in its first 16 pixels (0.1 / 0.9: no eps-perturbation changes
which is largest); the other 48 pixels hold the features, 0.5 on the clean point. The reference run
watches pyautoattack's own loop through its attack objects (`perturb` wrappers that only observe)
and records which component broke each point and the model passes each component spent; the harness
must agree on every point and every count. Expected outcomes per version are written out in
`EXPECTED` below, so the test shows that each component breaks points the earlier ones did not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack_targeted
from torch import nn

from robust_agc import eval as ev
from robust_agc.eval.autoattack import AutoAttackRunner
from robust_agc.eval.checks import GradientMaskingWarning
from robust_agc.eval.passes import PassCounter

EPS = 0.05
N_MARK = 16  # one-hot point id: the first two rows of the 8x8 image
N_FEAT = 48  # feature pixels: the last six rows

# per-route landscape: logit scale, margin (in eps units along the route's direction u: the boundary
# is within eps when margin < 48, every feature pixel moved by eps along u), number of classes
# sharing the target's logit, decoy class, staircase landscape
ROUTES: dict[str, dict[str, Any]] = {
    "linear": {"scale": 0.2, "margin": 30.5},
    "saturated": {"scale": 50.0, "margin": 30.5},
    "tied3": {"scale": 50.0, "margin": 30.5, "tie": 3},
    "staircase": {"scale": 50.0, "margin": 16.5, "staircase": True},
    "decoy": {"scale": 50.0, "margin": 40.5, "decoy": True},
    "tied3_decoy": {"scale": 50.0, "margin": 40.5, "tie": 3, "decoy": True},
    "far": {"scale": 50.0, "margin": 60.5},
    "far_linear": {"scale": 0.2, "margin": 60.5},
    "misclassified": {"scale": 1.0, "margin": -5.0},
}
# the points, routes interleaved so that chunks mix them
POINTS = [
    "saturated",
    "linear",
    "tied3_decoy",
    "far",
    "staircase",
    "tied3",
    "misclassified",
    "decoy",
    "far_linear",
]
LABELS = [(3 * i + 1) % 10 for i in range(len(POINTS))]

# which component breaks each route, per version (None: robust, "clean": misclassified)
EXPECTED: dict[str, dict[str, str | None]] = {
    "standard": {
        "linear": "apgd-ce",
        "saturated": "apgd-t",
        "tied3": "fab-t",
        "staircase": "square",
        "decoy": "apgd-t",
        "tied3_decoy": "fab-t",
        "far": None,
        "far_linear": None,
        "misclassified": "clean",
    },
    "plus": {
        "linear": "apgd-ce",
        "saturated": "apgd-dlr",
        "tied3": "fab",
        "staircase": "square",
        "decoy": "apgd-t",
        "tied3_decoy": "fab-t",
        "far": None,
        "far_linear": None,
        "misclassified": "clean",
    },
    "rand": {
        "linear": "apgd-ce",
        "saturated": "apgd-dlr",
        "tied3": None,
        "staircase": None,
        "decoy": None,
        "tied3_decoy": None,
        "far": None,
        "far_linear": None,
        "misclassified": "clean",
    },
}


def _sawtooth(t: torch.Tensor) -> torch.Tensor:
    """Triangle wave in [0, 1] with slope +-1 everywhere (never flat, never large)."""
    return (t - 2 * torch.floor(t / 2) - 1).abs()


class RoutedModel(nn.Module):
    """Ten-class model with one logit landscape per point (see the module docstring); no parameters.

    With ``d`` the perturbation of the feature pixels in units of eps and ``s = <u, d>`` (``u`` a
    fixed +-1 pattern per point, all ones for the staircase), the canonical logits are: the true
    class 0; the target ``f = s - margin`` (``floor(s) - margin`` for the staircase); classes 2 and
    3 equal to ``f`` when tied, else constants; constants; class 9 the decoy
    ``-3 + 2 * sawtooth(100 <u', d>)`` (second largest on the clean point, bounded below 0, steep
    everywhere) or a constant. They are scaled by the route's scale and rolled so that class 0 lands
    on the point's label.
    """

    def __init__(self, points: Sequence[str], labels: Sequence[int], *, eps: float) -> None:
        super().__init__()
        base = {"scale": 1.0, "margin": 30.5, "tie": 1, "decoy": False, "staircase": False}
        cfg = [base | ROUTES[r] for r in points]

        def col(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor([c[key] for c in cfg], dtype=dtype)

        g = torch.Generator().manual_seed(0)
        n = len(points)
        u = torch.randint(0, 2, (n, N_FEAT), generator=g).float() * 2 - 1
        u[col("staircase", torch.bool)] = 1.0  # Square's patches share one sign
        self.register_buffer("u", u)
        self.register_buffer(
            "u_decoy", torch.randint(0, 2, (n, N_FEAT), generator=g).float() * 2 - 1
        )
        self.register_buffer("scale", col("scale"))
        self.register_buffer("margin", col("margin"))
        self.register_buffer("tie", col("tie", torch.long))
        self.register_buffer("decoy", col("decoy", torch.bool))
        self.register_buffer("staircase", col("staircase", torch.bool))
        self.register_buffer("label", torch.as_tensor(list(labels), dtype=torch.long))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        pid = flat[:, :N_MARK].argmax(1)  # the point's id (no gradient flows through it)
        d = (flat[:, N_MARK:] - 0.5) / self.eps
        s = (d * self.u[pid]).sum(1)
        f = torch.where(self.staircase[pid], torch.floor(s), s) - self.margin[pid]
        tie = self.tie[pid]

        def const(v: float) -> torch.Tensor:
            return torch.full_like(f, -v)

        decoy = -3.0 + 2.0 * _sawtooth(100.0 * (d * self.u_decoy[pid]).sum(1))
        z = torch.stack(
            [
                torch.zeros_like(f),
                f,
                torch.where(tie >= 2, f, const(100.0)),
                torch.where(tie >= 3, f, const(105.0)),
                const(110.0),
                const(115.0),
                const(120.0),
                const(125.0),
                const(130.0),
                torch.where(self.decoy[pid], decoy, const(135.0)),
            ],
            1,
        )
        z = z * self.scale[pid, None]
        idx = (torch.arange(10, device=x.device)[None, :] - self.label[pid, None]) % 10
        return z.gather(1, idx)


def _points(points: Sequence[str] = POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(points)
    x = torch.full((n, 1, 8, 8), 0.5)
    flat = x.view(n, -1)
    flat[:, :N_MARK] = 0.1
    flat[torch.arange(n), torch.arange(n)] = 0.9
    return x, torch.tensor(LABELS[:n])


@dataclass
class Reference:
    """pyautoattack's own run, observed: per point the component that broke it, per component the
    points it attacked and the passes it spent (its perturb calls plus the judging forward), and
    every chunk in order: ``(component, point ids, the images the attack returned)``."""

    broken_by: list[str | None]
    robust: list[bool]
    attacked: dict[str, list[int]]
    passes: dict[str, dict[str, int]]
    chunks: list[tuple[str, list[int], torch.Tensor]]


def _point_index(x: torch.Tensor) -> Callable[[torch.Tensor], list[int]]:
    """The ids of a chunk of clean points (by content: the points must be distinct)."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(x.cpu())}
    assert len(index) == len(x), "the points must be distinct"
    return lambda xb: [index[row.numpy().tobytes()] for row in xb.cpu()]


def _reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    version: str | list[str],
    *,
    batch_size: int,
    budgets: Callable[[Any], None] | None = None,
    eps: float = EPS,
) -> Reference:
    if isinstance(version, str):
        aa = AutoAttack(model, version=version, eps=eps, norm="Linf", seed=0)
    else:
        aa = AutoAttack(
            model, attacks=list(version), version="custom", eps=eps, norm="Linf", seed=0
        )
    if budgets is not None:
        budgets(aa)
    ids_of = _point_index(x)
    counter = PassCounter(model)
    broken: dict[int, str] = {}
    attacked: dict[str, list[int]] = {}
    passes: dict[str, dict[str, int]] = {}
    chunks: list[tuple[str, list[int], torch.Tensor]] = []

    def observe(obj: Any, name_of: Callable[[], str]) -> None:
        real = obj.perturb

        def perturb(xb: torch.Tensor, yb: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            name = name_of()
            counter.take()
            adv = real(xb, yb, *args, **kwargs)
            fwd, bwd = counter.take()
            p = passes.setdefault(name, {"forward": 0, "backward": 0})
            p["forward"] += fwd + xb.shape[0]  # + the forward pyautoattack judges the chunk with
            p["backward"] += bwd
            with torch.no_grad():
                hit = (model(adv).max(dim=1)[1] != yb).tolist()  # pyautoattack's own judgement
            counter.take()
            ids = ids_of(xb)
            chunks.append((name, ids, adv.detach().clone()))
            for i, h in zip(ids, hit, strict=True):
                assert i not in broken, (
                    f"pyautoattack attacked point {i} after {broken[i]} broke it"
                )
                attacked.setdefault(name, []).append(i)
                if h:
                    broken[i] = name
            return adv

        obj.perturb = perturb

    observe(aa.apgd, lambda: f"apgd-{aa.apgd.loss}")
    observe(aa.apgd_targeted, lambda: "apgd-t")
    observe(aa.fab, lambda: "fab-t" if aa.fab.targeted else "fab")
    observe(aa.square, lambda: "square")
    try:
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        counter.remove()
    with torch.no_grad():
        clean_ok = (model(x).max(dim=1)[1] == y).tolist()
    broken_by = [broken.get(i) if ok else "clean" for i, ok in enumerate(clean_ok)]
    robust = (y_adv == y).tolist()
    assert robust == [b is None for b in broken_by]  # the observation agrees with pyautoattack
    return Reference(broken_by, robust, attacked, passes, chunks)


def _harness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    version: str | list[str],
    *,
    batch_size: int,
    eps: float = EPS,
) -> tuple[ev.EvalResult, list[tuple[str, list[int], torch.Tensor]]]:
    """``benchmark``'s record, and every AutoAttack chunk it ran as in :class:`Reference`."""
    ids_of = _point_index(x)
    chunks: list[tuple[str, list[int], torch.Tensor]] = []
    real_call = AutoAttackRunner.__call__

    def call(runner: Any, name: str, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        adv = real_call(runner, name, xb, yb)
        chunks.append((name, ids_of(xb), adv.detach().clone()))
        return adv

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore", GradientMaskingWarning)
        mp.setattr(AutoAttackRunner, "__call__", call)
        res = ev.benchmark(
            model, x=x, y=y, eps=eps, version=version, batch_size=batch_size, progress=False
        )
    return res, chunks


def _parity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    version: str | Sequence[str],
    expected: dict[str, str],
    components: Sequence[str],
    *,
    batch_size: int,
    budgets: Callable[[Any], None] | None = None,
) -> tuple[ev.EvalResult, list[tuple[str, list[int], torch.Tensor]]]:
    """pyautoattack's own run (checked against the landscape design) and the harness's on the
    routed points; asserts their parity and returns the harness's run."""
    ref = _reference(model, x, y, version, batch_size=batch_size, budgets=budgets)
    _check_design(ref, expected, components)
    run = _harness(model, x, y, version, batch_size=batch_size)
    _check_parity(run, ref, components, len(POINTS))
    return run


def shrunk_budgets(
    *, n_iter: int, n_queries: int, apgd_restarts: int | None = None
) -> Callable[[Any], None]:
    """A function that lowers a ``pyautoattack.AutoAttack``'s budgets in place (same loop and
    objects): iterations of APGD, APGD-T and FAB, Square's queries and, if given, APGD's restarts;
    targets and EoT samples as configured."""

    def shrink(aa: Any) -> None:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = n_iter
        aa.square.n_queries = n_queries
        if apgd_restarts is not None:
            aa.apgd.n_restarts = apgd_restarts

    return shrink


def shrink_harness_autoattack(
    monkeypatch: pytest.MonkeyPatch, shrink: Callable[[Any], None]
) -> None:
    """Apply ``shrink`` to every AutoAttack the harness builds."""
    real_init = AutoAttackRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        shrink(self.aa)

    monkeypatch.setattr(AutoAttackRunner, "__init__", init)


_small_budgets = shrunk_budgets(n_iter=20, n_queries=1000)


@pytest.fixture
def small_budgets(monkeypatch):
    shrink_harness_autoattack(monkeypatch, _small_budgets)
    return _small_budgets


def _check_parity(
    run: tuple[ev.EvalResult, list[tuple[str, list[int], torch.Tensor]]],
    ref: Reference,
    components: Sequence[str],
    n: int,
) -> None:
    """Every chunk (component, points, returned images, bit for bit), per-point verdict,
    per-component count and accuracy of the harness equals pyautoattack's."""
    res, chunks = run
    assert [c[:2] for c in chunks] == [c[:2] for c in ref.chunks]
    for (name, ids, adv), (_, _, ref_adv) in zip(chunks, ref.chunks, strict=True):
        assert torch.equal(adv, ref_adv), f"{name} on points {ids}"
    unit = {c: f"autoattack/{c}" for c in components}
    assert res.broken_by == [unit.get(b, b) if b else b for b in ref.broken_by]
    assert res.robust_flags.tolist() == ref.robust
    assert list(res.component_acc) == ["clean", *unit.values()]  # the version's order
    robust = sum(b != "clean" for b in ref.broken_by)
    assert res.component_acc["clean"] == robust / n
    for c in components:
        robust -= ref.broken_by.count(c)
        assert res.component_acc[unit[c]] == robust / n, c
        assert res.n_attacked[unit[c]] == len(ref.attacked.get(c, [])), c
        assert res.n_broken[unit[c]] == ref.broken_by.count(c), c
        assert res.passes[unit[c]] == ref.passes.get(c, {"forward": 0, "backward": 0}), c
    assert res.robust_acc == res.stage_acc["autoattack"] == robust / n
    assert res.robust_acc_repredicted == res.robust_acc
    assert res.n_attacked["autoattack"] == res.n_attacked[unit[components[0]]]
    assert res.n_broken["autoattack"] == sum(res.n_broken[u] for u in unit.values())
    assert not res.flags["count_disagreement"]


def _check_design(
    ref: Reference, expected: dict[str, str | None], components: Sequence[str]
) -> None:
    """The model does what it was built for: each component breaks the points it alone can."""
    assert dict(zip(POINTS, ref.broken_by, strict=True)) == {p: expected[p] for p in POINTS}
    for c in components:  # every component breaks a point that every earlier one missed
        assert c in ref.broken_by, f"{c} breaks no point: its dispatch would go untested"
    assert None in ref.broken_by and "clean" in ref.broken_by


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the model's tensors are tiny, and on a loaded 2-core machine a second
    spinning OpenMP thread makes every small op ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def routed() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = _points()
    return RoutedModel(POINTS, LABELS, eps=EPS).eval(), x, y


# clean points where the cross-entropy / DLR / targeted-DLR (towards the first class sharing the
# target's logit) input gradient is exactly zero: the gradient attacks cannot start there
CE_ZERO = {"saturated", "tied3", "staircase", "far"}
DLR_ZERO = {"tied3", "staircase"}
DLR_T_ZERO = {"tied3", "tied3_decoy", "staircase"}


def test_routed_model_landscapes(routed):
    """The clean points are what the routes were built for: one misclassified, the decoy second
    largest, tied logits exactly equal, and exactly zero input gradients of pyautoattack's own
    losses where the table says so (and nowhere else)."""
    model, x, y = routed
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    assert (logits.argmax(1) == y).tolist() == [p != "misclassified" for p in POINTS]
    order = logits.sort(1, descending=True)
    correct = [i for i, p in enumerate(POINTS) if p != "misclassified"]
    first_tied = []
    for i in correct:
        route = ROUTES[POINTS[i]]
        first = 2 if route.get("decoy") else 1
        if route.get("decoy"):
            assert order.indices[i, 1] == (9 + LABELS[i]) % 10 and order.values[i, 1] < 0
        tied = order.values[i, first : first + route.get("tie", 1)]
        assert (tied == tied[0]).all() and order.values[i, first + len(tied)] < tied[0]
        first_tied.append(int(order.indices[i, first]))

    def zero_grad(loss: torch.Tensor) -> set[str]:
        (g,) = torch.autograd.grad(loss.sum(), xg, retain_graph=True)
        return {POINTS[i] for i in correct if g[i].abs().sum() == 0}

    apgd_t = APGDAttack_targeted(model, eps=EPS, norm="Linf", device="cpu")
    apgd_t.y_target = torch.tensor(first_tied)
    lc, yc = logits[correct], y[correct]
    assert zero_grad(F.cross_entropy(lc, yc, reduction="none")) == CE_ZERO
    assert zero_grad(apgd_t.dlr_loss(lc, yc)) == DLR_ZERO
    assert zero_grad(apgd_t.dlr_loss_targeted(lc, yc)) == DLR_T_ZERO


def _check_standard(res: ev.EvalResult, components: Sequence[str]) -> None:
    cfg = res.attack_config["autoattack"]
    assert cfg["version"] == "standard" and cfg["components"] == list(components)
    assert (cfg["apgd"]["n_restarts"], cfg["apgd_t"]["n_target_classes"]) == (1, 9)
    assert (cfg["fab"]["n_restarts"], cfg["fab"]["n_target_classes"]) == (1, 9)
    # the gradient-masking flags see what the model was built to do
    assert res.flags["square_beats_gradient"] is True
    assert res.flag_details["square_beats_gradient"]["n_broken_by_square"] == 1
    assert res.flags["zero_gradients"] is True
    assert res.flag_details["zero_gradients"]["n_zero"] == len(CE_ZERO)


def test_standard_parity_every_component(routed, small_budgets):
    """AutoAttack standard (1 restart, 9 targets; 20 iterations and 1000 queries on both sides),
    chunks of 4: every component breaks points only it can break, and the harness agrees with
    pyautoattack on every chunk, point and count."""
    model, x, y = routed
    components = ev.AUTOATTACK_VERSIONS["standard"]
    assert components == ("apgd-ce", "apgd-t", "fab-t", "square")
    run = _parity(
        model,
        x,
        y,
        "standard",
        EXPECTED["standard"],
        components,
        batch_size=4,
        budgets=small_budgets,
    )
    _check_standard(run[0], components)


@pytest.mark.slow
def test_standard_parity_full_budgets(routed):
    """The same with pyautoattack's standard budgets (100 iterations, 5000 queries)."""
    model, x, y = routed
    components = ev.AUTOATTACK_VERSIONS["standard"]
    run = _parity(model, x, y, "standard", EXPECTED["standard"], components, batch_size=4)
    _check_standard(run[0], components)
    cfg = run[0].attack_config["autoattack"]
    assert (cfg["apgd"]["n_iter"], cfg["fab"]["n_iter"], cfg["square"]["n_queries"]) == (
        100,
        100,
        5000,
    )


def test_rand_parity_every_component(routed, small_budgets):
    """AutoAttack rand (APGD-CE then APGD-DLR, 20 EoT samples), fewer iterations on both sides."""
    model, x, y = routed
    components = ev.AUTOATTACK_VERSIONS["rand"]
    assert components == ("apgd-ce", "apgd-dlr")
    run = _parity(
        model, x, y, "rand", EXPECTED["rand"], components, batch_size=4, budgets=small_budgets
    )
    assert run[0].attack_config["autoattack"]["apgd"]["eot_iter"] == 20
    assert "square_beats_gradient" not in run[0].flags  # no Square in this version


def test_custom_order_parity_every_component(routed, small_budgets):
    """A component list (pyautoattack's version="custom": its constructor settings, 5 restarts for
    APGD and FAB) runs in the order given, not the canonical one."""
    model, x, y = routed
    components = ["apgd-dlr", "fab", "apgd-t", "fab-t", "square"]
    expected = EXPECTED["plus"] | {"linear": "apgd-dlr"}
    run = _parity(
        model, x, y, components, expected, components, batch_size=5, budgets=small_budgets
    )
    cfg = run[0].attack_config["autoattack"]
    assert cfg["version"] == "custom" and cfg["components"] == components
    assert (cfg["apgd"]["n_restarts"], cfg["fab"]["n_restarts"]) == (5, 5)


@pytest.mark.slow
def test_plus_parity_every_component(routed):
    """AutoAttack plus with pyautoattack's full budgets: six components, each one needed."""
    model, x, y = routed
    components = ev.AUTOATTACK_VERSIONS["plus"]
    assert components == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    _parity(model, x, y, "plus", EXPECTED["plus"], components, batch_size=5)


@pytest.mark.slow
def test_rand_parity_full_budgets(routed):
    model, x, y = routed
    components = ev.AUTOATTACK_VERSIONS["rand"]
    _parity(model, x, y, "rand", EXPECTED["rand"], components, batch_size=4)
