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

__all__ = ["forward", "backward", "soft_forward", "soft_backward", "distill_forward", "distill_backward"]

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


def _distill_args(student: Tensor, teacher: Tensor, target: Optional[Tensor], weight: Optional[Tensor], opts) -> dict:
    """The keywords that lsce._C.distill_forward and .distill_backward share.
    ``opts`` is a DistillOptions (temperature, beta, label_smoothing,
    ignore_index, weight_sum); the caller has checked the inputs (shapes,
    strides, target range), as for the other kernels."""
    N, K = student.shape
    return dict(
        dtype=_DTYPE_CODE[student.dtype], teacher_dtype=_DTYPE_CODE[teacher.dtype], student=_ptr(student), N=N, K=K,
        row_stride=student.stride(0), teacher=_ptr(teacher), teacher_row_stride=teacher.stride(0),
        target=_ptr(target), weight=_ptr(weight), temperature=float(opts.temperature), beta=float(opts.beta),
        eps=float(opts.label_smoothing), weight_sum=float(opts.weight_sum), ignore_index=int(opts.ignore_index),
        nthreads=torch.get_num_threads(),
    )


def distill_forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], weight: Optional[Tensor], opts,
                    grad: Optional[Tensor] = None, upstream: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(kd, ce, stats)`` of distillation (the contract:
    lsce.reference.ROWS.distill_forward); stats is (6, N): m, log_s1, log_sT,
    mt, log_st, Q. With ``grad`` ((N, K) contiguous, the student's dtype) the
    same call also writes there the student's gradient for ``upstream``, a (2,)
    acc tensor [g, h] applied to every row's kd and ce: the fused training step."""
    from . import _C

    acc = acc_dtype(student.dtype)
    N = student.shape[0]
    kd, ce = torch.empty(N, dtype=acc), torch.empty(N, dtype=acc)
    stats = torch.empty(6, N, dtype=acc)
    fused = {}
    if grad is not None:
        # The kernel reads g and h through pointers with stride 0: [g, h] must be contiguous acc.
        up = upstream.to(acc).contiguous()
        fused = dict(grad=_ptr(grad), grad_kd=_ptr(up), grad_kd_stride=0, grad_ce=_ptr(up) + up.element_size(),
                     grad_ce_stride=0)
    _C.distill_forward(**_distill_args(student, teacher, target, weight, opts), kd=_ptr(kd), ce=_ptr(ce),
                       stats=_ptr(stats), **fused)
    return kd, ce, stats


def distill_backward(grad_kd: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor, target: Optional[Tensor],
                     weight: Optional[Tensor], opts, stats: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The student's gradient of distillation for the upstreams ``grad_kd`` and
    ``grad_ce`` ((N,) acc, any stride), from the forward's ``stats``; in ``out``
    (which may be the contiguous student itself) or a new (cached) tensor."""
    from . import _C

    grad = grad_buffer(student, out) if out is not None else cache.empty(student.shape, student.dtype)
    stats = stats.contiguous()  # held while the kernel reads it
    _C.distill_backward(**_distill_args(student, teacher, target, weight, opts), stats=_ptr(stats),
                        grad_kd=_ptr(grad_kd), grad_kd_stride=grad_kd.stride(0), grad_ce=_ptr(grad_ce),
                        grad_ce_stride=grad_ce.stride(0), grad=_ptr(grad))
    return grad
