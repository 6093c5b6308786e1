"""The shared helpers of robust_agc.utils and attacks.validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust_agc.utils import (
    all_finite,
    check_int,
    check_real,
    cpu_capability,
    cpu_flags,
    dist_info,
    eval_mode,
    init_distributed,
    machine_info,
)
from robust_agc.utils.machine import KERNEL_FLAGS


def test_check_int_accepts_integers_at_the_minimum_and_refuses_the_rest() -> None:
    assert check_int("n", 3, minimum=3) == 3
    for bad in (2, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="Invalid n value"):
            check_int("n", bad, minimum=3)
    with pytest.raises(TypeError, match="expected an int"):
        check_int("n", 3.0, minimum=0, type_error=True)
    with pytest.raises(ValueError):  # a wrong value stays a ValueError with type_error
        check_int("n", -1, minimum=0, type_error=True)


def test_check_real_bounds_and_types() -> None:
    assert check_real("x", 0, minimum=0.0) == 0.0
    assert isinstance(check_real("x", 1, minimum=0.0), float)
    with pytest.raises(ValueError):
        check_real("x", 0.0, minimum=0.0, open_minimum=True)
    for bad in (-0.1, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError):
            check_real("x", bad)
    with pytest.raises(TypeError, match="expected a float"):
        check_real("x", "1", type_error=True)


def test_all_finite_sees_one_bad_element_in_any_tensor() -> None:
    ok = [torch.ones(3), torch.zeros(2, 2)]
    assert all_finite(ok) and all_finite([])
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.zeros(2, 2)
        t[1, 0] = bad
        assert not all_finite([*ok, t])


def test_eval_mode_restores_each_submodule_mode_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # mixed modes
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_single_process_distributed_helpers() -> None:
    assert dist_info() == (0, 1)
    assert init_distributed("cpu") == (0, 0, 1)


def test_machine_info_names_what_decides_the_kernels() -> None:
    info = machine_info(world_size=3)
    assert info["cpu_capability"] == cpu_capability() == torch.backends.cpu.get_cpu_capability()
    assert set(cpu_flags()) <= set(KERNEL_FLAGS)
    assert info["world_size"] == 3 and info["threads"] == torch.get_num_threads()


def test_agc_public_interface_matches_its_state() -> None:
    """The CorrectedOptimizer methods report exactly the state AGC's step uses."""
    from robust_agc.optim import AGC, CorrectedOptimizer, is_corrected

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = AGC(model.parameters(), lr=0.1)
    assert is_corrected(opt) and isinstance(opt, CorrectedOptimizer)
    assert not is_corrected(torch.optim.SGD(model.parameters(), lr=0.1))
    w = model.weight
    assert opt.snapshot_of(w) is None and opt.stale_positions(w) is None
    assert opt.snapshot_gradients() == []
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.refresh(model, [(x, y)], lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb))
    assert opt.coefficient == opt.group_coefficient(opt.param_groups[0]) == 0.1 * opt.tau
    assert torch.equal(opt.snapshot_of(w), w)
    with torch.no_grad():  # a position pruned at the refresh: snapshot and mu zero there
        opt.snapshot_of(w)[0, 1] = 0
        opt.full_gradient_of(w)[0, 1] = 0
    stale = opt.stale_positions(w)
    assert stale is not None and stale.sum() == 1 and stale[0, 1]
    opt.snapshot_backward(model, lambda m: nn.functional.cross_entropy(m(x), y))
    snaps = opt.snapshot_gradients()
    assert len(snaps) == 2 and snaps[0].shape == w.shape and snaps[0][0, 1] == 0
    where = torch.zeros_like(w, dtype=torch.bool)
    where[2, 3] = True
    assert snaps[0][2, 3] != 0 and opt.full_gradient_of(w)[2, 3] != 0
    opt.drop_correction_(w, where)
    assert snaps[0][2, 3] == 0 and opt.full_gradient_of(w)[2, 3] == 0
