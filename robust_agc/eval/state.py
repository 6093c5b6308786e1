"""The resumable state of an evaluation: per-point verdicts and progress, as a JSON file.

:class:`EvalState` is saved after every chunk (every round of chunks when distributed; only rank 0
reads and writes it). Its fingerprint (:func:`fingerprint`: the attack configuration and hashes of
the points and the model) must match for a rerun to resume; :func:`open_state` loads it on rank 0
and shares it with the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import atomic_write_bytes
from ..errors import UserError
from .comm import Comm
from .result import jsonable

__all__ = ["STATE_FORMAT", "EvalState", "fingerprint", "open_state", "sha256_tensors"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "robust_agc.eval_state/1"
# what every snapshot has had since the first format-1 file (``passes`` and ``radii`` came later)
_REQUIRED = (
    "robust", "broken_by", "done", "current", "unit_acc", "timings", "n_attacked", "n_broken"
)  # fmt: skip
"""The ``format`` field of a state file."""


class EvalState:
    """Per-point flags and progress, saved as JSON (atomic) after every chunk.

    Attributes:
        robust, broken_by: per point, whether it survived so far and the unit that broke it.
        done: the finished units in order; ``current``: the unit in progress (its targets and
            finished chunks), or None.
        unit_acc, timings, n_attacked, n_broken, passes: per unit, as in :class:`~robust_agc.eval.EvalResult`
            (``passes`` as ``[forward, backward]``).
        radii: per point, the ``fmn`` stage's radius (0 misclassified clean, ``inf`` none
            found or not yet attacked; None outside the plan's ``fmn_slice``), or None before that
            stage starts.
        resumed: whether :meth:`load` found a state to resume from.
    """

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], n: int) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.robust = [True] * n
        self.broken_by: list[str | None] = [None] * n
        self.done: list[str] = []
        self.current: dict[str, Any] | None = None
        self.unit_acc: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.n_attacked: dict[str, int] = {}
        self.n_broken: dict[str, int] = {}
        self.passes: dict[str, list[int]] = {}
        self.radii: list[float | None] | None = None
        self.resumed = False

    def load(self) -> None:
        """Resume from :attr:`path` when it exists (sets :attr:`resumed`).

        Raises:
            UserError: unreadable, not a state file, or another evaluation's (fingerprint differs).
        """
        if self.path is None or not self.path.exists():
            return
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read evaluation state {self.path}: {e}") from None
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise UserError(f"{self.path} is not a robust_agc evaluation state file")
        if d.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            old, new = d.get("fingerprint") or {}, self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(
                f"state file {self.path} belongs to another evaluation (different "
                f"{', '.join(diff)}); delete it or choose another --state file"
            )
        self.restore(d)
        self.resumed = True
        logger.info("resuming evaluation from %s (done: %s)", self.path, ", ".join(self.done))

    def snapshot(self) -> dict[str, Any]:
        """The progress as a JSON-friendly dict (what :meth:`save` writes, less the header)."""
        snap: dict[str, Any] = {
            "robust": self.robust,
            "broken_by": self.broken_by,
            "done": self.done,
            "current": self.current,
            "unit_acc": self.unit_acc,
            "timings": self.timings,
            "n_attacked": self.n_attacked,
            "n_broken": self.n_broken,
            "passes": self.passes,
        }
        if self.radii is not None:
            snap["radii"] = list(self.radii)
        return snap

    def restore(self, d: dict[str, Any]) -> None:
        """Take the progress from a :meth:`snapshot` (or a saved file).

        Raises:
            UserError: an entry every snapshot has is missing (a truncated or hand-edited file:
                resuming without it would lose a finished unit's accuracy or time). ``passes``
                may be absent (files written before the pass counts, 2026-11-28): they start at
                zero.
        """
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise UserError(
                f"evaluation state {self.path} lacks {', '.join(missing)}; delete it or choose "
                "another --state file"
            )
        self.robust = [bool(v) for v in d["robust"]]
        self.broken_by = list(d["broken_by"])
        self.done = list(d["done"])
        self.current = d["current"]
        self.unit_acc = dict(d["unit_acc"])
        self.timings = dict(d["timings"])
        self.n_attacked = dict(d["n_attacked"])
        self.n_broken = dict(d["n_broken"])
        self.passes = {k: [int(v[0]), int(v[1])] for k, v in d.get("passes", {}).items()}
        radii = d.get("radii")  # saved through jsonable: inf as "inf"
        self.radii = None if radii is None else [None if r is None else float(r) for r in radii]

    def save(self) -> None:
        """Write the fingerprint and :meth:`snapshot` to :attr:`path` atomically (no-op without)."""
        if self.path is None:
            return
        d = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, **self.snapshot()}
        atomic_write_bytes(self.path, json.dumps(jsonable(d)).encode("utf-8"))


def sha256_tensors(tensors: Sequence[tuple[str, Tensor]]) -> str:
    """SHA-256 of named tensors: each name, shape, dtype and raw bytes, in order."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(
    attack_config: dict[str, Any], x: Tensor, y: Tensor, model: nn.Module
) -> dict[str, Any]:
    """What a state file must match to be resumed: the attack configuration, the number of
    points and SHA-256 hashes of the points and of the model's state dict."""
    return {
        "attack_config": jsonable(attack_config),
        "n_examples": x.shape[0],
        "points_sha256": sha256_tensors([("x", x), ("y", y)]),
        "model_sha256": sha256_tensors(list(model.state_dict().items())),
    }


def open_state(path: Path | None, key: dict[str, Any], n: int, comm: Comm) -> EvalState:
    """The state of ``n`` points on every rank: rank 0 loads ``path`` (if any; ``key`` is the
    :func:`fingerprint` it must match), the others copy it.

    Raises:
        UserError: on every rank, when rank 0 cannot resume from ``path`` (see
            :meth:`EvalState.load`).
    """
    state = EvalState(path, key, n)
    error = None
    if comm.main:
        try:
            state.load()
        except UserError as e:
            error = str(e)
    error, snap, resumed = comm.broadcast((error, state.snapshot(), state.resumed))
    if error is not None:
        raise UserError(error)
    if not comm.main:
        state.restore(snap)
        state.resumed = resumed
    return state
