"""The C++/OpenMP backend (lsce._C) of the per-row kernel interface (lsce/interface.py).

Marshalling only: the kernels take data pointers, sizes, strides and a dtype
code, and run without the GIL. Large gradients come from lsce's cache of freed
gradients (lsce/cache.py): a fresh N×K buffer pays a page fault per 4 KiB.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cache
from .interface import (Coefficients, RowOptions, acc_dtype, check_rows, check_soft_rows, grad_buffer,
                        soft_target_grad_buffer)

__all__ = ["forward", "backward", "soft_forward", "soft_backward"]

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _args(logits: Tensor, target: Tensor, coef: Coefficients, opts: RowOptions) -> dict:
    """The keywords that lsce._C.forward and .backward share."""
    check_rows(logits, target)
    N, K = logits.shape
    return dict(
        dtype=_DTYPE_CODE[logits.dtype], logits=_ptr(logits), N=N, K=K, row_stride=logits.stride(0),
        target=_ptr(target), ignore_index=opts.ignore_index, weight=_ptr(coef.weight), c=_ptr(coef.c),
        C=float(coef.C), uniform_over=coef.uniform_over, eps=opts.label_smoothing, z_loss=opts.z_loss,
        softcap=opts.softcap, nthreads=torch.get_num_threads(),
    )


def forward(logits: Tensor, target: Tensor, coef: Coefficients, opts: RowOptions, grad: Optional[Tensor] = None,
            upstream: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, m, log_s)`` (lsce.interface.RowKernels). With ``grad`` ((N, K)
    contiguous), the same pass also writes there the gradient for the upstream
    ``upstream`` (a 1-element tensor) of every row's loss: the fused training step."""
    from . import _C

    acc = acc_dtype(logits.dtype)
    loss, m, log_s = (torch.empty(logits.shape[0], dtype=acc) for _ in range(3))
    fused = {} if grad is None else dict(grad=_ptr(grad), grad_loss=_ptr(upstream), grad_loss_stride=0)
    _C.forward(**_args(logits, target, coef, opts), loss=_ptr(loss), m=_ptr(m), log_s=_ptr(log_s), **fused)
    return loss, m, log_s


def backward(grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor, coef: Coefficients,
             opts: RowOptions, m: Tensor, log_s: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The logits' gradient, in ``out`` or a new (cached) tensor; see lsce.interface.RowKernels."""
    from . import _C

    grad = grad_buffer(logits, out) if out is not None else cache.empty(logits.shape, logits.dtype)
    _C.backward(**_args(logits, target, coef, opts), m=_ptr(m), log_s=_ptr(log_s), grad_loss=_ptr(grad_loss),
                grad_loss_stride=grad_loss.stride(0), grad_lse=_ptr(grad_lse),
                grad_lse_stride=0 if grad_lse is None else grad_lse.stride(0), grad=_ptr(grad))
    return grad


def _soft_args(logits: Tensor, target: Tensor, weight: Optional[Tensor], opts: RowOptions) -> dict:
    """The keywords that lsce._C.soft_forward and .soft_backward share."""
    check_soft_rows(logits, target)
    N, K = logits.shape
    return dict(
        dtype=_DTYPE_CODE[logits.dtype], target_dtype=_DTYPE_CODE[target.dtype], logits=_ptr(logits), N=N, K=K,
        row_stride=logits.stride(0), target=_ptr(target), target_row_stride=target.stride(0), weight=_ptr(weight),
        eps=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap, nthreads=torch.get_num_threads(),
    )


def soft_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], opts: RowOptions,
                 grad: Optional[Tensor] = None, upstream: Optional[Tensor] = None):
    """Per-row ``(loss, m, log_s, A)`` of probability targets
    (lsce.interface.RowKernels.soft_forward). With ``grad`` ((N, K)
    contiguous), the same pass also writes there the logits' gradient for the
    upstream ``upstream`` (a 1-element tensor) of every row's loss: the fused step."""
    from . import _C

    acc = acc_dtype(logits.dtype)
    loss, m, log_s, mass = (torch.empty(logits.shape[0], dtype=acc) for _ in range(4))
    fused = {} if grad is None else dict(grad=_ptr(grad), grad_loss=_ptr(upstream), grad_loss_stride=0)
    _C.soft_forward(**_soft_args(logits, target, weight, opts), loss=_ptr(loss), m=_ptr(m), log_s=_ptr(log_s),
                    mass=_ptr(mass), **fused)
    return loss, m, log_s, mass


def soft_backward(grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
                  weight: Optional[Tensor], opts: RowOptions, m: Tensor, log_s: Tensor, mass: Tensor,
                  out: Optional[Tensor] = None, target_grad: bool = False):
    """``(∂/∂logits, ∂/∂target or None)`` of probability targets; see
    lsce.interface.RowKernels.soft_backward. The logits' gradient in ``out``
    or a new (cached) tensor."""
    from . import _C

    grad = grad_buffer(logits, out) if out is not None else cache.empty(logits.shape, logits.dtype)
    grad_t = soft_target_grad_buffer(target) if target_grad else None
    _C.soft_backward(**_soft_args(logits, target, weight, opts), m=_ptr(m), log_s=_ptr(log_s), mass=_ptr(mass),
                     grad_loss=_ptr(grad_loss), grad_loss_stride=grad_loss.stride(0), grad_lse=_ptr(grad_lse),
                     grad_lse_stride=0 if grad_lse is None else grad_lse.stride(0), grad=_ptr(grad),
                     grad_target=_ptr(grad_t))
    return grad, grad_t
