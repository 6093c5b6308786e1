"""Export (fold_masks, sparse state dicts) and the AGC optimizer under masks and RigL."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robust_agc.models import create_model
from robust_agc.optim import AGC
from robust_agc.sparse import (
    apply_masks,
    create_scheduler,
    densify_state_dict,
    fold_masks,
    state_dict_nbytes,
    to_sparse_state_dict,
)
from tests.test_sparse_helpers import TinyNet, _one_thread, make_data, train_steps  # noqa: F401


def _trained_masked(sparsity: float = 0.9) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=sparsity, distribution="uniform", generator=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masks.attach(opt)
    sched = create_scheduler("rigl", masks, total_steps=30, update_interval=4, optimizer=opt)
    x, y = make_data()
    train_steps(model, opt, sched, x, y, 12)
    model.eval()
    return model, masks


def test_fold_masks_gives_plain_module_with_same_outputs() -> None:
    model, masks = _trained_masked()
    folded = fold_masks(model)
    assert list(folded.state_dict()) == list(TinyNet().state_dict())
    assert not any("mask" in name for name, _ in folded.named_buffers())
    x, _ = make_data()
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
    # The source keeps its masks; the folded copy loads into an unmasked model strictly.
    assert hasattr(model.fc1, "weight_mask") and masks.density == pytest.approx(0.1, abs=0.01)
    plain = TinyNet()
    plain.load_state_dict(folded.state_dict(), strict=True)
    assert torch.count_nonzero(plain.fc1.weight) == torch.count_nonzero(model.fc1.weight)
    assert torch.count_nonzero(plain.fc1.weight) <= int(model.fc1.weight_mask.sum())


def test_fold_masks_replaces_nan_at_pruned_positions() -> None:
    model, _ = _trained_masked()
    with torch.no_grad():
        model.fc1.weight[~model.fc1.weight_mask] = float("nan")
    folded = fold_masks(model)
    assert torch.isfinite(folded.fc1.weight).all()
    assert torch.all(folded.fc1.weight[~model.fc1.weight_mask] == 0)


@pytest.mark.slow  # the session fixture trains a CNN (~10-70 s on the shared 2-core box)
def test_fold_masks_on_trained_cnn_keeps_accuracy(trained_cnn, fmnist_tiny) -> None:
    _, _, xt, yt = fmnist_tiny
    model = copy.deepcopy(trained_cnn)
    apply_masks(model, sparsity=0.3, distribution="uniform", rescale_init=False, generator=0)
    folded = fold_masks(model)
    ref_keys = list(create_model("small-cnn", in_channels=1, input_size=28).state_dict())
    assert list(folded.state_dict()) == ref_keys
    with torch.no_grad():
        pred_masked = model(xt).argmax(1)
        pred_folded = folded(xt).argmax(1)
        pred_dense = trained_cnn(xt).argmax(1)
    assert torch.equal(pred_masked, pred_folded)
    # 30% random pruning of a trained net changes its function (the masks really act).
    assert not torch.equal(pred_dense, pred_folded)


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_state_dict_round_trip_and_size(layout: str) -> None:
    model, masks = _trained_masked(0.9)
    sd = to_sparse_state_dict(model, layout=layout)
    assert list(sd) == list(TinyNet().state_dict())
    for name, w, m in masks:
        t = sd[f"{name}.weight"]
        assert t.layout == (torch.sparse_csr if layout == "csr" else torch.sparse_coo)
        assert t._nnz() <= int(m.sum())  # an active weight may be exactly zero (just regrown)
        assert t._nnz() >= int(m.sum()) - int((w[m] == 0).sum())
    assert sd["fc1.bias"].layout == torch.strided and sd["bn.running_mean"].layout == torch.strided
    plain = TinyNet()
    plain.load_state_dict(densify_state_dict(sd, plain), strict=True)
    plain.eval()
    x, _ = make_data()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_state_dict_is_smaller_on_disk(layout: str) -> None:
    model = create_model("small-cnn", num_classes=10, in_channels=1, input_size=28)
    masks = apply_masks(model, sparsity=0.9, distribution="erk", generator=0)
    dense_size = state_dict_nbytes(fold_masks(model).state_dict())
    sparse_size = state_dict_nbytes(to_sparse_state_dict(model, layout=layout))
    # Bytes per active weight: csr 4 (value) + 4 (int32 column index); coo 4 + 8 * ndim (int64
    # indices); dense 4 per weight. Plus row pointers and pickling overhead (a few %).
    dense_part = 4 * (sum(p.numel() for p in model.parameters()) - masks.num_maskable)
    per_nnz = [8 if layout == "csr" else 4 + 8 * w.dim() for w in masks.weights()]
    expected = dense_part + sum(k * int(m.sum()) for k, m in zip(per_nnz, masks.masks()))
    assert sparse_size < dense_size
    assert sparse_size == pytest.approx(expected, rel=0.1)
    if layout == "csr":
        assert sparse_size < 0.5 * dense_size


def test_state_dict_nbytes_matches_torch_save(tmp_path) -> None:
    sd = {"a": torch.zeros(1000), "b": torch.ones(3, 3)}
    # torch.save names the zip's root folder after the file; a BytesIO gets "archive".
    torch.save(sd, tmp_path / "archive.pt")
    assert state_dict_nbytes(sd) == (tmp_path / "archive.pt").stat().st_size
    one, two = (
        state_dict_nbytes({"a": torch.zeros(1000)}),
        state_dict_nbytes({"a": torch.zeros(2000)}),
    )
    assert 4000 <= two - one <= 4000 + 64  # 4 bytes per float32, storage records 64-byte aligned


def test_invalid_layout() -> None:
    model, _ = _trained_masked()
    with pytest.raises(ValueError, match="Invalid layout value: 'bsr'"):
        to_sparse_state_dict(model, layout="bsr")


# --------------------------------------------------------------------- AGC under masks
def test_agc_with_rigl_keeps_zero_invariants_and_uses_dense_gradient() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masks = apply_masks(model, sparsity=0.8, distribution="erk", generator=0)
    opt = AGC(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, gamma=0.5)
    masks.attach(opt)
    sched = create_scheduler("rigl", masks, total_steps=40, update_interval=4, optimizer=opt)
    x, y = make_data(64)

    def ce(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(xb), yb)

    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    opt.refresh(model, batches, ce)
    for t in range(20):
        xb, yb = batches[t % 4]
        opt.zero_grad()
        ce(model, xb, yb).backward()
        opt.snapshot_backward(model, lambda m, xb=xb, yb=yb: ce(m, xb, yb))
        opt.step()
        sched.step()
        for _, w, m in masks:
            assert torch.count_nonzero(w[~m]) == 0
            for key, v in opt.state[w].items():
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    assert torch.count_nonzero(v[~m]) == 0, (t, key)
        if t % 8 == 7:
            # refresh() writes a dense full_grad outside step(): the next pre-hook zeroes it, or
            # the trainer calls masks.zero_optimizer_state_(opt) right away.
            opt.refresh(model, batches, ce)
            masks.zero_optimizer_state_(opt)
            for _, w, m in masks:
                assert torch.count_nonzero(opt.state[w]["full_grad"][~m]) == 0
    assert sched.num_updates == 5  # steps 4, 8, 12, 16, 20
    assert sum(h["changed"] for h in sched.history) > 0
    assert masks.exploration_rate > masks.density
