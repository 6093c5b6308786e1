"""Runs of a study that differ only in the optimizer start from the same point.

``experiments/summarize.py`` pairs runs by seed (cell minus reference on the same seed); that is
only a paired design if the seed fixes the initial weights, the initial mask and the data order
whatever the optimizer, which is what these tests check.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robust_agc.config import TrainConfig
from robust_agc.data import DataSplits, make_splits
from robust_agc.train import Trainer


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    s = make_splits("fashion-mnist", train_subset=96, val_size=16, test_size=16)
    return dataclasses.replace(s, x_train=s.x_train[:96], y_train=s.y_train[:96])


def _trainer(splits: DataSplits, **kw) -> Trainer:
    cfg = TrainConfig(
        model="small-cnn", batch_size=32, epochs=1, attack_steps=1, eval_subset=16, eval_steps=1,
        val_size=16, progress=False, threads=1, **({"seed": 3} | kw),
    )  # fmt: skip
    return Trainer(cfg, splits=splits)


def _start(t: Trainer) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    state = {k: v.clone() for k, v in t.model.state_dict().items()}  # weights and weight_mask
    t.batches.set_epoch(0)
    return state, [y.clone() for _, y in t.batches]


@pytest.mark.parametrize("sparse", ["rigl", "static", "bsr"])
def test_same_seed_same_start_whatever_the_optimizer(splits, sparse):
    starts = [
        _start(_trainer(splits, sparse_method=sparse, sparsity=0.9, **opt))
        for opt in (
            {"optimizer": "sgd"},
            {"optimizer": "agc"},
            {"optimizer": "svrg", "svrg_schedule": "ramp"},
            {"optimizer": "agc", "agc_estimator": "grad-online", "agc_refresh_fraction": 0.25},
        )
    ]
    ref_state, ref_order = starts[0]
    assert any(k.endswith("weight_mask") for k in ref_state)
    for state, order in starts[1:]:
        assert state.keys() == ref_state.keys()
        for k in ref_state:
            assert torch.equal(state[k], ref_state[k]), k
        assert all(torch.equal(a, b) for a, b in zip(order, ref_order, strict=True))


def test_another_seed_starts_elsewhere(splits):
    """The check above can fail: another seed gives other weights, masks and data order."""
    (sa, oa), (sb, ob) = (
        _start(_trainer(splits, sparse_method="rigl", sparsity=0.9, seed=s)) for s in (3, 4)
    )
    masks = [k for k in sa if k.endswith("weight_mask")]
    weights = [k for k in sa if k.endswith("weight") and not k.endswith("weight_mask")]
    assert masks and weights
    assert not all(torch.equal(sa[k], sb[k]) for k in masks)
    assert not all(torch.equal(sa[k], sb[k]) for k in weights)
    assert not all(torch.equal(x, y) for x, y in zip(oa, ob, strict=True))
