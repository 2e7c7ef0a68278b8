"""lsce's cache of freed CPU gradients (see csrc/binding.cpp, ``Pool``).

A training step's N×K gradient (and lsce.linear's chunk buffer) is new memory each time, and its first write
takes a page fault per 4 KiB page, which on the machines measured costs 3-4×
the kernel itself. The CPU kernels therefore write large gradients into
buffers from a small cache: a buffer goes back to the cache only when the last
tensor that uses its memory is gone (torch.frombuffer's storage holds it), so
a gradient still in use is never handed out twice. Between steps the cache
holds at most two freed gradients and at most ``limit`` bytes (4 GiB unless
``LSCE_GRAD_CACHE_MB`` says otherwise; 0 turns it off), as PyTorch's CUDA
caching allocator holds freed blocks on the GPU.
"""

from __future__ import annotations

import math
import os

import torch

_MIN_BYTES = 1 << 20  # smaller gradients come from torch.empty: their faults are few
_configured = False


def _c():
    global _configured
    from . import _C

    if not _configured:
        _configured = True
        mb = os.environ.get("LSCE_GRAD_CACHE_MB")
        if mb is not None:
            _C.set_cache_limit(int(float(mb) * (1 << 20)))
    return _C


def empty(shape, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """An uninitialised contiguous tensor for a gradient (or lsce.linear's chunk
    buffer): on the CPU from the cache when large, elsewhere from torch.empty."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(_c().Buffer(nbytes), dtype=dtype, count=count).view(shape)


def set_limit(nbytes: int) -> int:
    """Keeps at most ``nbytes`` of freed gradients (0: none, and frees what is cached); returns the old limit."""
    if nbytes < 0:
        raise ValueError(f"lsce: cache limit must be >= 0 bytes, got {nbytes}")
    return _c().set_cache_limit(int(nbytes))


def cached_bytes() -> int:
    """Bytes held now by freed gradients waiting for reuse."""
    return _c().cached_bytes()


def empty_cache() -> None:
    """Frees every cached gradient (buffers in use are not affected)."""
    _c().empty_cache()
