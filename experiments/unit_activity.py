"""Which units of a model still carry information about the input (:func:`robust_agc.sparse.input_activity`).

For a sparse model that predicts one class: the table says, layer by layer, how many of the units
each ``Conv2d``/``Linear`` layer reads are nonzero on some test point and how many differ between
points, and whether the logits depend on the input at all. ``--mask-from FILE`` first zeroes the
model's weights wherever FILE's are zero: a dense source pruned by a pipeline's final mask, i.e.
the network its fine-tuning started from.

Usage::

    python experiments/unit_activity.py RUN/best.pt [MODEL.pt ...] [--mask-from PRUNED/model.pt]
    python experiments/unit_activity.py weights.pt --arch small-cnn --dataset fashion-mnist

Models: our checkpoints or plain state dicts (``--arch``/``--dataset``), as ``robust-agc eval``
loads them; points: the first ``--n-examples`` test points of the dataset. Prints one markdown
table per model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from robust_agc.data import load_dataset  # noqa: E402
from robust_agc.errors import UserError  # noqa: E402
from robust_agc.eval.loading import load_model_and_info  # noqa: E402
from robust_agc.sparse import input_activity  # noqa: E402


def _masked_by(model: torch.nn.Module, mask_model: torch.nn.Module) -> int:
    """Zero ``model``'s conv/linear weights where ``mask_model``'s are zero; the weights zeroed."""
    theirs = dict(mask_model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or not name.endswith("weight"):
                continue
            q = theirs.get(name)
            if q is None or q.shape != p.shape:
                raise UserError(f"--mask-from: no weight {name} of shape {tuple(p.shape)} there")
            zero = q == 0
            n += int((zero & (p != 0)).sum())
            p.masked_fill_(zero, 0.0)
    return n


def main(argv: list[str] | None = None) -> int:
    """Print the activity table of each model; 2 with one line on bad input."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoints or plain state dicts")
    ap.add_argument("--arch", help="architecture of plain state dicts")
    ap.add_argument("--dataset", help="dataset (default: the checkpoint's)")
    ap.add_argument("--mask-from", help="zero the weights where this model's weights are zero")
    ap.add_argument("--n-examples", type=int, default=500, help="first test points (default 500)")
    ap.add_argument("--data-dir", help="folder holding the data")
    args = ap.parse_args(argv)
    try:
        if args.n_examples < 2:
            raise UserError(f"Invalid --n-examples value: {args.n_examples} (need at least 2)")
        mask_model = None
        if args.mask_from:
            mask_model, _ = load_model_and_info(
                args.mask_from, arch=args.arch, dataset=args.dataset
            )
        for path in args.models:
            model, info = load_model_and_info(path, arch=args.arch, dataset=args.dataset)
            dataset = args.dataset or info["dataset"]
            x, _ = load_dataset(dataset, "test", data_dir=args.data_dir)
            note = ""
            if mask_model is not None:
                n = _masked_by(model, mask_model)
                note = f", weights zeroed where {args.mask_from}'s are zero ({n} zeroed)"
            rep = input_activity(model, x[: args.n_examples])
            print(f"**{path}**{note}: first {rep.n_points} {dataset} test points\n")
            print(rep.to_markdown() + "\n")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
