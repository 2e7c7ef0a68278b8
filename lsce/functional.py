"""``lsce.cross_entropy``: a drop-in for ``torch.nn.functional.cross_entropy``.

This layer checks the arguments (before any kernel runs; nothing the caller
passed is modified), flattens the input to 2-D rows, calls the registered op
(lsce/ops.py) and reduces the per-row values.
"""

from __future__ import annotations

import operator
import os
from typing import Optional

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.lsce.*)
from .reference import acc_dtype

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "cpu", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_class_vector(name: str, v: Optional[Tensor], K: int, device: torch.device) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"lsce: {name} must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != K:
        raise ValueError(f"lsce: {name} must have shape ({K},) (one value per class), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"lsce: {name} must be a floating-point tensor, got {v.dtype}")
    if v.requires_grad:
        raise ValueError(f"lsce: {name} requires grad, but lsce computes no gradient for it; pass {name}.detach()")
    if v.device != device:
        raise ValueError(f"lsce: {name} is on {v.device} but input is on {device}")


def _finite(v) -> bool:
    """math.isfinite without the call: under torch.compile(dynamic=True) a float
    argument is a SymFloat, which math.isfinite cannot trace; comparisons can.
    False for NaN (every comparison with it is False) and ±inf."""
    return abs(v) < float("inf")


def _check_arguments(input, target, weight, reduction, label_smoothing, z_loss, softcap, smoothing_prior, backend):
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("lsce: input and target must be Tensors")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lsce: input must be float32, float64, bfloat16 or float16 logits, got {input.dtype}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            f"lsce: target must hold class indices (int64, int32 or uint8), got {target.dtype}; "
            "class-probability targets are not supported"
        )
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"lsce: target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    if input.dim() == 0:
        raise ValueError("lsce: input must have at least 1 dimension (the classes), got a scalar")
    expected = () if input.dim() == 1 else input.shape[:1] + input.shape[2:]
    if tuple(target.shape) != tuple(expected):
        raise ValueError(
            f"lsce: target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"expected {tuple(expected)} (input's shape without the class dimension {0 if input.dim() == 1 else 1})"
        )
    K = input.shape[0] if input.dim() == 1 else input.shape[1]
    if K < 1:
        raise ValueError(f"lsce: input has {K} classes; at least 1 is needed")
    if target.device != input.device:
        raise ValueError(f"lsce: target is on {target.device} but input is on {input.device}")
    _check_class_vector("weight", weight, K, input.device)
    _check_class_vector("smoothing_prior", smoothing_prior, K, input.device)
    if reduction not in REDUCTIONS:
        raise ValueError(f"lsce: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"lsce: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not _finite(z_loss) or z_loss < 0:
        raise ValueError(f"lsce: z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not _finite(softcap) or softcap <= 0):
        raise ValueError(f"lsce: softcap must be None or a finite number > 0, got {softcap!r}")
    if backend not in BACKENDS:
        raise ValueError(f"lsce: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" and input.device.type != "cpu":
        raise ValueError(f"lsce: backend='cpu' runs the C++ kernel on CPU tensors; input is on {input.device}")
    if backend == "triton" and input.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"lsce: backend='triton' needs CUDA tensors (input is on {input.device}), "
            "or TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter"
        )
    return K


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lsce: out_dtype must be None or one of {_FLOAT_DTYPES}, got {out_dtype!r}")


def as_ignore_index(value) -> int:
    """An int, numpy integer or 0-d integer tensor, as F.cross_entropy takes;
    not a float (1.5 would silently become 1) nor a string."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"lsce: ignore_index must be an int, got {type(value).__name__}") from None


def _as_rows(input: Tensor, target: Tensor, K: int):
    """(rows of logits with unit column stride, int64 targets, the per-row output shape)."""
    if input.dim() == 1:
        z, out_shape = input.unsqueeze(0), ()
    elif input.dim() == 2:
        z, out_shape = input, target.shape
    else:  # (N, K, d1, ...): classes to the last dimension; a copy of the logits
        z, out_shape = input.movedim(1, -1).reshape(-1, K), target.shape
    if z.stride(-1) != 1:
        z = z.contiguous()
    return z, target.reshape(-1).to(torch.int64), out_shape


def _sum(x: Tensor, chunk: int = 16384) -> Tensor:
    """x.sum(), bitwise the same for any torch thread count: torch.sum of more than
    32768 elements splits them across threads, each split rounding differently."""
    n = x.numel()
    if n <= chunk:
        return x.sum()
    return torch.nn.functional.pad(x, (0, (-n) % chunk)).view(-1, chunk).sum(1).sum()


def mean_denominators(y: Tensor, w: Optional[Tensor], ignore_index: int, acc: torch.dtype):
    """(non-ignored mask, their count, Σ w[y] over them): ``mean`` divides the
    cross-entropy by the weight sum and the z-loss term by the count."""
    valid = y != ignore_index
    count = valid.sum().to(acc)
    if w is None:
        return valid, count, count
    return valid, count, _sum(torch.where(valid, w[torch.where(valid, y, 0)], 0))


def reduce_rows(loss: Tensor, lse: Tensor, y: Tensor, w: Optional[Tensor], ignore_index: int,
                z_loss: float, reduction: str, shape) -> Tensor:
    """The reduction of per-row losses (z-loss term included), as design.md §1
    states it; shared by every entry point (cross_entropy, linear, distributed)."""
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return _sum(loss)
    valid, count, total_weight = mean_denominators(y, w, ignore_index, loss.dtype)
    if w is not None and z_loss:
        # The z-loss term is averaged over rows, the cross-entropy over weight.
        zl = torch.where(valid, z_loss * lse * lse, 0)
        return _sum(loss - zl) / total_weight + _sum(zl) / count
    return _sum(loss) / total_weight


def _fused_upstream(z, y, w, ignore_index, z_loss, reduction, backend) -> Optional[Tensor]:
    """The per-row upstream that reduce_rows' backward sends each row's loss
    when the reduced loss gets gradient 1 (loss.backward()), for
    ops.FusedStep to compute the gradient with in the forward; None where it
    does not apply: reduction 'none' (no reduction to predict), mean with
    weight and z_loss (two scales), or not ops.fusable."""
    if reduction == "none" or (reduction == "mean" and w is not None and z_loss) or not ops.fusable(z, backend):
        return None
    acc = acc_dtype(z.dtype)
    one = torch.ones(1, dtype=acc)
    if reduction == "sum":
        return one
    _, _, total_weight = mean_denominators(y, w, ignore_index, acc)
    return one / total_weight  # the same division as the backward of reduce_rows' mean


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    smoothing_prior: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
    out_dtype: Optional[torch.dtype] = None,
):
    """Label-smoothed cross-entropy, fused; same arguments and results as ``F.cross_entropy``.

    Args (beyond ``torch.nn.functional.cross_entropy``'s, which keep their meaning):
        z_loss: adds ``z_loss · logsumexp(row)²`` per non-ignored row (PaLM);
            under ``mean`` that term is divided by the count of non-ignored rows.
        softcap: logits pass through ``softcap · tanh(z / softcap)`` first (Gemma 2).
        smoothing_prior: a length-K probability vector π replacing the uniform
            ``1/K``, so that the smoothed target is ``(1 − ε)·onehot + ε·π``.
        return_lse: also return the per-row logsumexp (fp32; fp64 for fp64
            input) in the target's shape; it is differentiable.
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"cpu"``, ``"triton"``
            or ``"torch"`` (the pure-PyTorch reference).
        out_dtype: dtype of the returned loss; None (PyTorch's rule) means
            input's dtype. The reduction runs in fp32 (fp64 for fp64) either
            way, so ``torch.float32`` returns a bf16 input's mean loss unrounded.

    Class-probability (soft) targets are not supported; ``size_average`` and
    ``reduce`` (deprecated in PyTorch) raise.
    """
    if size_average is not None or reduce is not None:
        raise TypeError("lsce: size_average and reduce are deprecated in PyTorch and not supported; use reduction=")
    K = _check_arguments(input, target, weight, reduction, label_smoothing, z_loss, softcap, smoothing_prior, backend)
    check_out_dtype(out_dtype)
    ignore_index = as_ignore_index(ignore_index)
    eps, z_loss, cap = float(label_smoothing), float(z_loss), float(softcap or 0.0)
    acc = acc_dtype(input.dtype)
    z, y, out_shape = _as_rows(input, target, K)
    w = None if weight is None else weight.to(acc).contiguous()
    prior = None if smoothing_prior is None else smoothing_prior.to(acc).contiguous()

    expected = _fused_upstream(z, y, w, ignore_index, z_loss, reduction, backend)
    if expected is not None:
        loss, lse = ops.FusedStep.apply(z, y, w, prior, ignore_index, eps, z_loss, cap, expected)
    else:
        loss, lse = torch.ops.lsce.cross_entropy_forward(z, y, w, prior, ignore_index, eps, z_loss, cap, backend)

    out = reduce_rows(loss, lse, y, w, ignore_index, z_loss, reduction, out_shape)
    out = out.to(out_dtype or input.dtype)
    return (out, lse.reshape(out_shape)) if return_lse else out
