"""lsce's cache of freed CPU gradients (csrc/grad_cache.cpp).

A new N×K gradient pays a page fault per 4 KiB on its first write, 3-4× the
kernel itself on the machines measured; so large CPU gradients come from a
small cache, as PyTorch's CUDA allocator caches freed blocks on the GPU. A
buffer goes back to it only when the last tensor using its memory is gone
(torch.frombuffer's storage holds it). Between steps it keeps at most two
freed gradients and ``limit`` bytes (4 GiB; ``LSCE_GRAD_CACHE_MB``, in MiB,
says otherwise; 0 turns it off). Such a gradient's storage cannot be
``resize_``d larger (as for any torch.frombuffer tensor): ``.clone()`` it first.
"""

from __future__ import annotations

import math
import os

import torch

_MIN_BYTES = 1 << 20  # smaller gradients come from torch.empty: their faults are few


def _limit_from_environment():
    """``LSCE_GRAD_CACHE_MB`` in bytes (None when unset), read and checked when
    lsce is imported: a bad value fails there, not at the first large gradient
    in the middle of a training run."""
    mb = os.environ.get("LSCE_GRAD_CACHE_MB")
    if mb is None:
        return None
    try:
        limit = float(mb)
    except ValueError:
        limit = math.nan
    if not 0 <= limit < math.inf:  # NaN and inf too: a byte count is finite
        raise ValueError(f"lsce: the environment variable LSCE_GRAD_CACHE_MB must be a finite number of MiB >= 0 "
                         f"(0 turns the gradient cache off), got {mb!r}")
    return int(limit * (1 << 20))


_env_limit = _limit_from_environment()
_configured = False


def _c():
    global _configured
    from . import _C

    if not _configured:
        if _env_limit is not None:
            _C.set_cache_limit(_env_limit)
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
