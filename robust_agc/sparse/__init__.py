"""Sparse training: masks (uniform/ER/ERK), optimizer-hook enforcement, topology schedulers
(static, SET, RigL, ITOP, BSR-Net; all built by :func:`create_scheduler`), FLOPs reports and
export.

Typical use::

    masks = apply_masks(model, sparsity=0.9, distribution="erk", generator=0)
    masks.attach(optimizer)
    scheduler = create_scheduler("rigl", masks, total_steps=steps, optimizer=optimizer)
    ...  # loss.backward(); optimizer.step(); scheduler.step()
    report = masks.report(input_shape=(3, 32, 32), scheduler=scheduler)
    dense_model = fold_masks(model)
"""

from .distributions import DISTRIBUTIONS, layer_counts, layer_densities
from .export import densify_state_dict, fold_masks, state_dict_nbytes, to_sparse_state_dict
from .masks import (
    EVER_BUFFER,
    MASK_BUFFER,
    MASKABLE_TYPES,
    SparseMasks,
    apply_masks,
    maskable_modules,
    training_flops_ratio,
)
from .schedulers import (
    NOISE_FORMS,
    SIGN_BUFFER,
    SPARSE_METHOD_DEFAULTS,
    BSRScheduler,
    RigLScheduler,
    SETScheduler,
    StaticScheduler,
    TopologyScheduler,
    create_bsr,
    create_scheduler,
    list_sparse_methods,
    register_sparse_method,
)

__all__ = [
    "BSRScheduler",
    "NOISE_FORMS",
    "SIGN_BUFFER",
    "create_bsr",
    "DISTRIBUTIONS",
    "EVER_BUFFER",
    "MASK_BUFFER",
    "MASKABLE_TYPES",
    "SPARSE_METHOD_DEFAULTS",
    "RigLScheduler",
    "SETScheduler",
    "SparseMasks",
    "StaticScheduler",
    "TopologyScheduler",
    "apply_masks",
    "create_scheduler",
    "densify_state_dict",
    "fold_masks",
    "layer_counts",
    "layer_densities",
    "list_sparse_methods",
    "register_sparse_method",
    "maskable_modules",
    "state_dict_nbytes",
    "to_sparse_state_dict",
    "training_flops_ratio",
]
