"""Small helpers the rest of the library shares, each in one place.

- :mod:`~robust_agc.utils.dist`: rank and world size, joining a ``torchrun`` process group.
- :mod:`~robust_agc.utils.tensors`: finiteness checks and module mode / ``requires_grad`` guards.
- :mod:`~robust_agc.utils.validation`: number checks with one clear error.
- :mod:`~robust_agc.utils.machine`: what decides the CPU kernels (model, torch CPU capability).
- :mod:`~robust_agc.utils.speed`: counted FLOPs and measured inference speed of plain modules.
"""

from .dist import comm_device, dist_info, init_distributed
from .machine import cpu_capability, cpu_flags, cpu_model, machine_info
from .speed import count_flops, inference_times, time_inference
from .tensors import all_finite, eval_mode, frozen_parameters
from .validation import check_int, check_real

__all__ = [
    "all_finite",
    "check_int",
    "check_real",
    "comm_device",
    "count_flops",
    "cpu_capability",
    "cpu_flags",
    "cpu_model",
    "dist_info",
    "eval_mode",
    "frozen_parameters",
    "inference_times",
    "init_distributed",
    "machine_info",
    "time_inference",
]
