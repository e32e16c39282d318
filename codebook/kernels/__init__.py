"""Fused GPU kernels (Triton, an optional extra: ``pip install codebook[kernels]``).

Nothing here is imported by the CPU install: ``codebook.layer`` imports a kernel only when it
runs on a GPU with Triton present, and keeps its PyTorch path for the CPU and as the reference.
"""

from __future__ import annotations

import importlib.util
from functools import cache

FUSED_TOPK_MAX_K = 64  # the largest k codebook.kernels.fused_topk serves



@cache
def triton_available() -> bool:
    """True when Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None
