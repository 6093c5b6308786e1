"""Topology schedulers: the interface and registry (:mod:`.base`), the drop-and-grow methods
static, SET, RigL and ITOP (:mod:`.dst`), and BSR-Net (:mod:`.bsr`).

Every method is built by name with :func:`create_scheduler`; :func:`list_sparse_methods` lists
them.
"""

from .base import (
    SPARSE_METHOD_DEFAULTS,
    SchedulerBuilder,
    TopologyScheduler,
    create_scheduler,
    list_sparse_methods,
    register_sparse_method,
    structured_methods,
)
from .dst import RigLScheduler, SETScheduler, StaticScheduler

from .structured import StructuredRigLScheduler  # isort: skip (after dst)

from .bsr import NOISE_FORMS, SIGN_BUFFER, BSRScheduler, create_bsr  # isort: skip (after dst)

__all__ = [
    "BSRScheduler",
    "NOISE_FORMS",
    "RigLScheduler",
    "SETScheduler",
    "SIGN_BUFFER",
    "SPARSE_METHOD_DEFAULTS",
    "SchedulerBuilder",
    "StaticScheduler",
    "StructuredRigLScheduler",
    "TopologyScheduler",
    "create_bsr",
    "create_scheduler",
    "list_sparse_methods",
    "register_sparse_method",
    "structured_methods",
]
