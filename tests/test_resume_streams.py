"""Resume restores every random stream the trainer owns.

The streams of a :class:`~robust_agc.train.Trainer` (named and defined in
``robust_agc/train/seeds.py``):

- torch's global RNG: the training attack's random starts (``PGD``/``TRADES`` built with
  ``seed=None``); checkpointed as ``rng["torch"]`` (``rng["torch_per_rank"]`` under DDP, reseeded
  with ``seed + 7919 * epoch + 1_000_003 * rank`` when the world size changes);
- the data order and augmentation: a generator seeded ``seed * 1_000_003 + epoch`` for every epoch
  (``robust_agc.data.Batches``): restored through the epoch counter;
- the per-epoch evaluation attack's own generator (``seed + 1``): ``rng["eval_attack"]``;
- AGC's refresh-subset generator (``seed + 17``): ``rng["refresh"]``;
- the topology scheduler's generator (SET's regrowth, BSR-Net's signs, noise and re-activation;
  ``seed + 11``, salted): ``topology["generator_state"]``;
- the initial masks' generator (``seed + 7``): used once, in the constructor.

Python's ``random`` and numpy's global RNG are not used (checked below). Each test runs the first
epoch of a two-epoch run, checkpoints it through ``torch.save`` / ``torch.load(weights_only=True)``,
loads it into a new trainer and compares that trainer's streams with the uninterrupted trainer's.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
import types

import numpy as np
import pytest
import torch

from robust_agc.config import TrainConfig
from robust_agc.data import DataSplits, make_splits
from robust_agc.train import TIMING_FIELDS, Trainer


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    return make_splits("fashion-mnist", train_subset=64, val_size=8, test_size=8)


# Every configuration draws from every stream in both epochs: AGC refreshes a random half of the
# batches at each epoch start, the topology draws at every step of epoch 1 and some of epoch 2.
CONFIGS = {
    "set-pgd-at-crop-flip": dict(sparse_method="set", objective="pgd-at", augment="crop-flip"),
    "bsr-trades": dict(sparse_method="bsr", objective="trades", augment="crop"),
}


def _cfg(name: str) -> TrainConfig:
    return TrainConfig(
        model="small-cnn", batch_size=16, epochs=2, attack_steps=1, eval_subset=8, eval_steps=1,
        val_size=8, seed=5, progress=False, threads=1, optimizer="agc", agc_refresh_fraction=0.5,
        sparsity=0.8, update_interval=1, **CONFIGS[name],
    )  # fmt: skip


def _first_epoch(cfg: TrainConfig, splits: DataSplits) -> tuple[Trainer, dict]:
    """A trainer of the two-epoch run stopped after epoch 1, and its checkpoint (saved, reloaded)."""
    trainer = Trainer(cfg, splits=splits)
    trainer.cfg = dataclasses.replace(cfg, epochs=1)  # the schedule stays the two-epoch run's
    trainer.fit()
    trainer.cfg = cfg
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    buf.seek(0)
    return trainer, torch.load(buf, weights_only=True)


_OWNERS = ("robust_agc", "attacks", "torch")  # whose objects' attributes are walked
_NOT_WALKED = (type, types.ModuleType, types.FunctionType, types.MethodType)


def _generators(obj, path: str = "trainer", out=None, seen=None) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` reachable from ``obj`` through attributes, dicts and sequences,
    by access path (the trainer's components: attacks, masks, schedulers, optimizer, batches)."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None))) or id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Generator):
        out[path] = obj
    elif isinstance(obj, dict):
        for i, (k, v) in enumerate(obj.items()):
            _generators(v, f"{path}[{k if isinstance(k, (str, int)) else i}]", out, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _generators(v, f"{path}[{i}]", out, seen)
    elif type(obj).__module__.split(".")[0] in _OWNERS and not isinstance(obj, _NOT_WALKED):
        for k, v in getattr(obj, "__dict__", {}).items():
            _generators(v, f"{path}.{k}", out, seen)
    return out


def _next_draws(t: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each stream of ``t`` gives next, drawn through the code that uses it in training."""
    t.batches.set_epoch(t.state.epoch)  # as train_epoch does
    batches = list(t.batches)
    n_batches = len(batches)
    topology = t.topology.generator
    return {
        "data order and augmentation": torch.cat(
            [torch.cat([b.flatten(), c.float()]) for b, c in batches]
        ),
        "training attack (global RNG)": t.attack(x, y),
        "global RNG": torch.rand(64),
        "evaluation attack": t.eval_attack(x, y),
        "AGC refresh subset": torch.randperm(n_batches, generator=t._refresh_gen),
        "topology scheduler": torch.rand(64, generator=topology),
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_stream_draws_what_the_uninterrupted_run_draws_next(splits, name):
    cfg = _cfg(name)
    x, y = splits.x_test[:8], splits.y_test[:8]
    cut, ckpt = _first_epoch(cfg, splits)
    expected = _next_draws(cut, x, y)  # the uninterrupted trainer's next draws
    resumed = Trainer(cfg, splits=splits)
    not_restored = _next_draws(Trainer(cfg, splits=splits), x, y)
    resumed.load_state_dict(ckpt)
    got = _next_draws(resumed, x, y)
    assert got.keys() == expected.keys()
    for stream, draws in expected.items():
        assert torch.equal(got[stream], draws), stream
        # the check can fail: a stream left at its initial state draws something else
        assert not torch.equal(not_restored[stream], draws), stream


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_generator_the_trainer_holds_is_restored(splits, name):
    """Whatever generator the trainer holds (found by walking it, so a new one is checked too) has
    the uninterrupted trainer's state after ``load_state_dict``; so has torch's global RNG; and
    the first epoch leaves Python's and numpy's global RNGs alone."""
    cfg = _cfg(name)
    py_state, np_state = random.getstate(), np.random.get_state()
    cut, ckpt = _first_epoch(cfg, splits)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    global_rng = torch.get_rng_state()
    expected = _generators(cut)
    # the walk finds the trainer's own streams (and the initial-mask generator, if kept)
    assert {"trainer._refresh_gen", "trainer.eval_attack._generator"} <= expected.keys()
    assert any(g is cut.topology.generator for g in expected.values())
    fresh = _generators(Trainer(cfg, splits=splits))
    resumed = Trainer(cfg, splits=splits)
    resumed.load_state_dict(ckpt)
    assert torch.equal(torch.get_rng_state(), global_rng)
    got = _generators(resumed)
    assert got.keys() == expected.keys()
    moved = 0
    for path, g in expected.items():
        assert torch.equal(got[path].get_state(), g.get_state()), path
        moved += path not in fresh or not torch.equal(fresh[path].get_state(), g.get_state())
    assert moved >= 3  # refresh, evaluation attack and topology drew in epoch 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_run_ends_like_the_uninterrupted_one(splits, name):
    """Epoch 2 after the resume: the weights, metrics and final state of every stream are the
    uninterrupted run's."""
    cfg = _cfg(name)
    ref = Trainer(cfg, splits=splits)
    ref.fit()
    ref_rng = torch.get_rng_state()
    _, ckpt = _first_epoch(cfg, splits)
    resumed = Trainer(cfg, splits=splits)
    resumed.load_state_dict(ckpt)
    resumed.fit()
    assert torch.equal(torch.get_rng_state(), ref_rng)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k

    def canonical(t: Trainer) -> list[str]:
        return [
            json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS}, sort_keys=True)
            for r in t.state.metrics
        ]

    assert len(resumed.state.metrics) == 2 and canonical(resumed) == canonical(ref)
    a, b = _generators(ref), _generators(resumed)
    assert a.keys() == b.keys()
    for path in a:
        assert torch.equal(a[path].get_state(), b[path].get_state()), path


def test_resume_on_another_world_size_reseeds_the_global_rng_and_restores_the_rest(splits, caplog):
    """A checkpoint of a two-process run resumed on one process: torch's global RNG is seeded
    ``seed + 7919 * epoch`` (rank 0), the trainer's own generators are restored as saved."""
    cfg = _cfg("set-pgd-at-crop-flip")
    cut, ckpt = _first_epoch(cfg, splits)
    other = torch.Generator().manual_seed(123).get_state()
    ckpt["world_size"], ckpt["rng"]["torch_per_rank"] = 2, [ckpt["rng"]["torch"], other]
    resumed = Trainer(cfg, splits=splits)
    with caplog.at_level(logging.WARNING, logger="robust_agc.train"):
        resumed.load_state_dict(ckpt)
    assert "resuming a 2-process run on 1 processes" in caplog.text
    state = torch.get_rng_state()
    assert torch.equal(state, torch.Generator().manual_seed(cfg.seed + 7919 * 1).get_state())
    assert not torch.equal(state, ckpt["rng"]["torch"])
    expected, got = _generators(cut), _generators(resumed)
    assert got.keys() == expected.keys()
    for path, g in expected.items():
        assert torch.equal(got[path].get_state(), g.get_state()), path


def test_named_streams_keep_the_seeds_of_the_original_offsets():
    """One definition per stream, with exactly the values the trainer always used."""
    from robust_agc.data import epoch_seed
    from robust_agc.train import seeds

    assert {n: seeds.stream_seed(100, n) for n in seeds.STREAM_OFFSETS} == {
        "global": 100,
        "eval_attack": 101,
        "masks": 107,
        "topology": 111,
        "agc_refresh": 117,
        "grad_align": 123,
    }
    assert seeds.rank_seed(100, 2) == 100 + 2 * 1_000_003
    assert seeds.reseeded_rank_seed(100, 3, 2) == 100 + 3 * 7919 + 2 * 1_000_003
    assert epoch_seed(100, 4) == 100 * 1_000_003 + 4
    g = seeds.stream_generator(100, "masks")
    assert torch.equal(
        torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(107))
    )
    with pytest.raises(ValueError, match="Invalid name value: 'data'"):
        seeds.stream_seed(100, "data")
