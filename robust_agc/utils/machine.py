"""What decides the CPU kernels, for records and for comparing runs.

A CPU's model name ("AMD EPYC", "Intel Xeon Processor") names several generations with different
vector units, and torch picks its CPU kernels by the vector unit, so two machines with the same
name can round differently. Runs record :func:`cpu_capability` (torch's own choice: ``AVX512``,
``AVX2``, ``DEFAULT``...) and :func:`cpu_flags` (the instruction-set flags that decide it); two runs
are expected to agree bit for bit only on the same capability and flags.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["KERNEL_FLAGS", "cpu_capability", "cpu_flags", "cpu_model", "machine_info"]

KERNEL_FLAGS: tuple[str, ...] = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
"""The ``/proc/cpuinfo`` flags that select torch's and oneDNN's CPU kernels."""


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the platform's processor string."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """torch's CPU kernel level on this machine (``torch.backends.cpu.get_cpu_capability()``)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_flags() -> list[str]:
    """Which of :data:`KERNEL_FLAGS` this CPU has (empty where ``/proc/cpuinfo`` is missing)."""
    for line in _cpuinfo():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in KERNEL_FLAGS if f in have]
    return []


def machine_info(*, world_size: int = 1) -> dict[str, Any]:
    """The ``machine`` block of a record: CPU model, capability and kernel flags, threads,
    world size."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
    }
