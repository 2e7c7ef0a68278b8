"""lsce's cache of freed CPU gradients (see csrc/binding.cpp, ``Pool``).

A training step's N×K gradient is new memory each time, and its first write
takes a page fault per 4 KiB page, which on the machines measured costs 3-4×
the kernel itself. The CPU kernels therefore write large gradients into
buffers from a small cache: a buffer goes back to the cache only when the last
tensor that uses its memory is gone (torch.frombuffer's storage holds it), so
a gradient still in use is never handed out twice. Between steps the cache
holds at most two freed gradients and at most ``limit`` bytes (4 GiB unless
``LSCE_GRAD_CACHE_MB`` says otherwise; 0 turns it off), as PyTorch's CUDA
caching allocator holds freed blocks on the GPU. (lsce.linear's chunk buffer
does not use it: a cached chunk buffer would stay resident while a bf16 step
rounds its fp32 weight-gradient sum, its peak, and the chunk's matmuls cost
far more than its page faults.)

Such a gradient is an ordinary tensor except that its storage cannot be
resized (``resize_`` to a larger size raises), as for any tensor made by
``torch.frombuffer``; copy it (``.clone()``) first if that is needed.
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
        mb = os.environ.get("LSCE_GRAD_CACHE_MB")
        if mb is not None:
            try:
                limit = float(mb)
            except ValueError:
                limit = -1.0
            if not limit >= 0:
                raise ValueError(f"lsce: LSCE_GRAD_CACHE_MB must be a number of MiB >= 0, got {mb!r}")
            _C.set_cache_limit(int(limit * (1 << 20)))
        _configured = True
    return _C


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor for a gradient, from the cache when large."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
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
