"""Driving pyautoattack's attack objects one component and one chunk at a time.

:class:`AutoAttackRunner` holds the APGD, APGD-T, FAB and Square objects that
``pyautoattack.AutoAttack`` builds and configures for a version, and runs one of them on one chunk
exactly as AutoAttack's own loop does, so the per-point outcomes equal
``AutoAttack.run_standard_evaluation``'s (tested in ``tests/test_autoattack_parity.py``), while the
evaluation gets per-component accuracies, timings and a resumable state after every chunk.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from .plan import ThreatModel

__all__ = ["AutoAttackRunner"]

logger = logging.getLogger(__name__)
"""AutoAttack's own log output (its checks warn there), routed under ``robust_agc.eval``."""


class AutoAttackRunner:
    """pyautoattack's configured attack objects, run with AutoAttack's own per-chunk semantics.

    Built like ``pyautoattack.AutoAttack(model, ..., version=version)`` (``version="custom"`` with
    the component list), so every setting is pyautoattack's own; ``n_targets`` caps the targeted
    attacks' target classes (a model with fewer classes). Call it as ``runner(name, x, y)`` for one
    chunk of one component.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        version: str,
        components: tuple[str, ...],
        threat: ThreatModel,
        eps: float,
        seed: int,
        device: torch.device,
        n_targets: int | None,
    ) -> None:
        from pyautoattack import AutoAttack

        if version == "custom":
            aa = AutoAttack(
                model,
                attacks=list(components),
                device=device,
                eps=eps,
                norm=threat.value,
                seed=seed,
                version="custom",
            )
        else:
            aa = AutoAttack(
                model, device=device, eps=eps, norm=threat.value, seed=seed, version=version
            )
        for attr in ("apgd", "apgd_targeted", "fab", "square"):
            if not hasattr(aa, attr):
                raise RuntimeError(
                    f"pyautoattack.AutoAttack has no attribute {attr!r}: this pyautoattack version "
                    "is not supported by robust_agc.eval"
                )
        # Route AutoAttack's log output (its checks warn there) under our logger hierarchy.
        aa.logger = logger
        aa.apgd.logger = logger
        aa.apgd_targeted.logger = logger
        if n_targets is not None:
            aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_targets)
            aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_targets)
        self.aa = aa
        self.components = components

    def config(self) -> dict[str, Any]:
        """The attack settings in effect, for the record's ``attack_config``."""
        aa = self.aa
        return {
            "implementation": "pyautoattack",
            "version": aa.version,
            "components": list(self.components),
            "apgd": {
                "n_iter": aa.apgd.n_iter,
                "n_restarts": aa.apgd.n_restarts,
                "eot_iter": aa.apgd.eot_iter,
                "rho": aa.apgd.thr_decr,
            },
            "apgd_t": {
                "n_iter": aa.apgd_targeted.n_iter,
                "n_restarts": aa.apgd_targeted.n_restarts,
                "n_target_classes": aa.apgd_targeted.n_target_classes,
            },
            "fab": {
                "n_iter": aa.fab.n_iter,
                "n_restarts": aa.fab.n_restarts,
                "n_target_classes": aa.fab.n_target_classes,
            },
            "square": {"n_queries": aa.square.n_queries, "p_init": aa.square.p_init},
        }

    def __call__(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """Run component ``name`` on one chunk and return the adversarial images.

        Exactly the dispatch of ``AutoAttack.run_standard_evaluation`` for one chunk. pyautoattack
        has no public call for one component on one chunk (``run_standard_evaluation`` also runs
        its checks and a clean pass, which would add model passes), so this mirrors the
        ``# run attack`` if/elif block of ``AutoAttack.run_standard_evaluation`` in
        ``pyautoattack/autoattack.py``: the same attribute settings and the same re-seeding with
        ``get_seed()`` before every chunk. Keep it in step with that block when pyautoattack
        changes (``tests/test_autoattack_parity.py`` compares the two chunk by chunk).
        """
        aa = self.aa
        with torch.no_grad():
            if name == "apgd-ce":
                aa.apgd.loss = "ce"
                aa.apgd.seed = aa.get_seed()
                return aa.apgd.perturb(x, y)
            if name == "apgd-dlr":
                aa.apgd.loss = "dlr"
                aa.apgd.seed = aa.get_seed()
                return aa.apgd.perturb(x, y)
            if name == "fab":
                aa.fab.targeted = False
                aa.fab.seed = aa.get_seed()
                return aa.fab.perturb(x, y)
            if name == "square":
                aa.square.seed = aa.get_seed()
                return aa.square.perturb(x, y)
            if name == "apgd-t":
                aa.apgd_targeted.seed = aa.get_seed()
                return aa.apgd_targeted.perturb(x, y)
            if name == "fab-t":
                aa.fab.targeted = True
                aa.fab.n_restarts = 1
                aa.fab.seed = aa.get_seed()
                return aa.fab.perturb(x, y)
        raise ValueError(f"Invalid attack value: {name!r}")
