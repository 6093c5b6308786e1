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

Filter/channel sparsity: :func:`apply_structured_masks` (or :func:`l1_filter_masks` for a trained
source), the same schedulers (``static``, ``rigl``), and :func:`export_structured` for a
physically smaller network::

    masks = apply_structured_masks(model, sparsity=0.5, structure="filter", input_shape=(3, 32, 32))
    small, widths = export_structured(model, (3, 32, 32))

:func:`input_activity` tells which units of a (pruned) network still carry information about
the input, when a sparse model predicts one class.
"""

from .activity import ActivityReport, LayerActivity, input_activity
from .distributions import DISTRIBUTIONS, layer_counts, layer_densities
from .export import (
    densify_state_dict,
    export_structured,
    fold_masks,
    layer_widths,
    removable_channels,
    state_dict_nbytes,
    to_sparse_state_dict,
)
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
    StructuredRigLScheduler,
    TopologyScheduler,
    create_bsr,
    create_scheduler,
    list_sparse_methods,
    register_sparse_method,
    structured_methods,
)
from .structured import (
    NORM_TYPES,
    STRUCTURES,
    ChannelGroup,
    StructuredMasks,
    apply_structured_masks,
    coupled_groups,
    filter_l1_norms,
    group_keep_counts,
    l1_filter_masks,
)

__all__ = [
    "ActivityReport",
    "LayerActivity",
    "input_activity",
    "NORM_TYPES",
    "STRUCTURES",
    "ChannelGroup",
    "filter_l1_norms",
    "group_keep_counts",
    "StructuredMasks",
    "StructuredRigLScheduler",
    "apply_structured_masks",
    "coupled_groups",
    "export_structured",
    "l1_filter_masks",
    "layer_widths",
    "removable_channels",
    "structured_methods",
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
