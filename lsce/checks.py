"""Argument checks of every entry point, before any kernel runs; nothing the caller passed is modified.

On the tensors (:func:`check_logits`, :func:`check_target`, :func:`check_float`),
on the options given the number of classes K (:func:`check_options`), and on
tensor values (:func:`check_values`, run by the ops: it reads the values).
"""

from __future__ import annotations

import numbers
import operator
import os
import sys
from typing import Optional

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "cpu", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# PyTorch's losses raise RuntimeError for most bad arguments (ValueError for an
# unknown reduction, TypeError for a non-Tensor); lsce raised ValueError and
# TypeError. These are both, so that code catching either still catches lsce's.
class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """Logits of a dtype without a kernel (PyTorch: NotImplementedError, a RuntimeError)."""


def any_dtensor(*tensors) -> bool:
    """Whether one of ``tensors`` is a ``torch.distributed.tensor.DTensor`` (the
    entry points then hand the call to lsce.dtensor). Nothing is a DTensor
    before that module is imported, so this never imports it."""
    module = sys.modules.get("torch.distributed.tensor")
    DTensor = getattr(module, "DTensor", None)
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def check_target(target, device: torch.device) -> None:
    """Class indices of an integer dtype, on ``device``."""
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"lsce: target must be a Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex():
        raise ArgumentTypeError(
            f"lsce: target must hold class indices (int64, int32 or uint8), got {target.dtype}; "
            "class-probability targets are not supported"
        )
    if target.dtype not in _INDEX_DTYPES:
        raise ArgumentTypeError(f"lsce: target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    if target.device != device:
        raise ArgumentError(f"lsce: target is on {target.device} but input is on {device}")


def check_float(name: str, t, what: str, last_dim: str) -> None:
    """``t`` is a Tensor of one of lsce's float dtypes with at least one dimension (``last_dim``)."""
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"lsce: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"lsce: {name} must be float32, float64, bfloat16 or float16 {what}, got {t.dtype}")
    if t.dim() == 0:
        raise ArgumentError(f"lsce: {name} must have at least 1 dimension (the {last_dim}), got a scalar")


def check_logits(input, target) -> int:
    """``lsce.cross_entropy``'s logits ((K,), (N, K) or (N, K, d1, ...)) and targets; returns K."""
    check_float("input", input, "logits", "classes")
    check_target(target, input.device)
    expected = () if input.dim() == 1 else input.shape[:1] + input.shape[2:]
    if tuple(target.shape) != tuple(expected):
        raise ArgumentError(
            f"lsce: target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"expected {tuple(expected)} (input's shape without the class dimension {0 if input.dim() == 1 else 1})"
        )
    K = input.shape[0] if input.dim() == 1 else input.shape[1]
    if K < 1:
        raise ArgumentError(f"lsce: input has {K} classes; at least 1 is needed")
    return K


def check_class_vector(name: str, v: Optional[Tensor], K: Optional[int], device: Optional[torch.device]) -> None:
    """None, or a (K,) float vector on ``device`` that needs no gradient; K or device None: any."""
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise ArgumentTypeError(f"lsce: {name} must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1:
        raise ArgumentError(f"lsce: {name} must be 1-D (one value per class), got shape {tuple(v.shape)}")
    if K is not None and v.shape[0] != K:
        raise ArgumentError(f"lsce: {name} must have shape ({K},) (one value per class), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise ArgumentTypeError(f"lsce: {name} must be a floating-point tensor, got {v.dtype}")
    if v.requires_grad:
        raise ArgumentError(f"lsce: {name} requires grad, but lsce computes no gradient for it; pass {name}.detach()")
    if device is not None and v.device != device:
        raise ArgumentError(f"lsce: {name} is on {v.device} but input is on {device}")


def _finite(v) -> bool:
    """math.isfinite by a comparison (False for NaN and ±inf): under
    torch.compile(dynamic=True) a float is a SymFloat, which math.isfinite cannot trace."""
    return abs(v) < float("inf")


def real(value):
    """A real number given as Python, NumPy or 0-d tensor scalar (PyTorch's losses
    take all three) as a Python number; None for anything else. A CUDA tensor
    is read on the host, as PyTorch reads it."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            return None
        return value.item()
    if isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        return value
    return None


def _number(name: str, value):
    """real(value), or a TypeError (as PyTorch's argument parser raises) naming the option."""
    number = real(value)
    if number is None:
        raise ArgumentTypeError(f"lsce: {name} must be a number (Python, NumPy or 0-d tensor), "
                                f"got {type(value).__name__}")
    return number


def check_options(K: Optional[int], device: Optional[torch.device], *, weight=None, smoothing_prior=None,
                  reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, backend="auto") -> None:
    """The options of a call on logits of K classes on ``device``; K None: class
    vectors of any length, device None: any device (a module's constructor)."""
    check_class_vector("weight", weight, K, device)
    check_class_vector("smoothing_prior", smoothing_prior, K, device)
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"lsce: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps, zl, cap = (_number(n, v) for n, v in (("label_smoothing", label_smoothing), ("z_loss", z_loss),
                                                ("softcap", 1.0 if softcap is None else softcap)))
    if not 0.0 <= eps <= 1.0:
        raise ArgumentError(f"lsce: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not _finite(zl) or zl < 0:
        raise ArgumentError(f"lsce: z_loss must be a finite number >= 0, got {z_loss!r}")
    if not _finite(cap) or cap <= 0:
        raise ArgumentError(f"lsce: softcap must be None or a finite number > 0, got {softcap!r}")
    if backend not in BACKENDS:
        raise ArgumentError(f"lsce: backend must be one of {BACKENDS}, got {backend!r}")
    if device is None:
        return
    if backend == "cpu" and device.type != "cpu":
        raise ArgumentError(f"lsce: backend='cpu' runs the C++ kernel on CPU tensors; input is on {device}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ArgumentError(
            f"lsce: backend='triton' needs CUDA tensors (input is on {device}), "
            "or TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter"
        )


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """``reduction``, or what PyTorch makes of its deprecated ``size_average`` /
    ``reduce`` when either is given (its own mapping, and its deprecation warning)."""
    if size_average is None and reduce is None:
        return reduction
    return torch.nn._reduction.legacy_get_string(size_average, reduce)


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"lsce: out_dtype must be None or one of {FLOAT_DTYPES}, got {out_dtype!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"lsce: chunk_size must be None or an int >= 1, got {chunk_size!r}")


def as_ignore_index(value) -> int:
    """An int, numpy integer or 0-d integer tensor, as F.cross_entropy takes; not a float (1.5 → 1)."""
    try:
        return operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"lsce: ignore_index must be an int, got {type(value).__name__}") from None


def check_values(target: Tensor, prior: Optional[Tensor], K: int, ignore_index: int) -> None:
    """Targets in [0, K) or ignore_index; a probability vector as prior (async assert on CUDA)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= K))
    bad_prior = None
    if prior is not None:
        bad_prior = (prior < 0).any() | ((prior.sum() - 1).abs() > 1e-4) | ~torch.isfinite(prior).all()
    if target.device.type == "cuda":
        torch._assert_async(~bad.any(), "lsce: target holds a class id out of [0, K) that is not ignore_index")
        if bad_prior is not None:
            torch._assert_async(~bad_prior, "lsce: smoothing_prior must be non-negative and sum to 1")
        return
    if bad.any():
        first = target[bad][0].item()
        raise IndexError(f"lsce: target {first} is out of bounds for {K} classes (and is not ignore_index={ignore_index})")
    if bad_prior is not None and bad_prior.item():
        raise ArgumentError("lsce: smoothing_prior must be a probability vector: finite, non-negative, summing to 1")


class SoftTargetError(ValueError, RuntimeError):
    """A refused probability-target call: a ValueError as lsce's other checks
    raise, and a RuntimeError as PyTorch raises for the same inputs."""


def check_soft_logits(input, target) -> int:
    """Logits ((K,), (N, K) or (N, K, d1, ...)) and a probability target of
    their shape, as ``F.cross_entropy`` takes them; returns K."""
    check_float("input", input, "logits", "classes")
    if target.dtype not in FLOAT_DTYPES:
        raise SoftTargetError(f"lsce: a probability target must be float32, float64, bfloat16 or float16, "
                              f"got {target.dtype}")
    if target.device != input.device:
        raise SoftTargetError(f"lsce: target is on {target.device} but input is on {input.device}")
    if tuple(target.shape) != tuple(input.shape):
        raise SoftTargetError(
            f"lsce: a floating-point target holds class probabilities and must have the input's shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)} (class indices must be an integer tensor)"
        )
    K = input.shape[0] if input.dim() == 1 else input.shape[1]
    if K < 1:
        raise ValueError(f"lsce: input has {K} classes; at least 1 is needed")
    return K


def check_soft_options(ignore_index: int, smoothing_prior) -> None:
    """What probability targets do not take: PyTorch refuses an ignore_index >= 0
    (a negative one, as the default -100, is accepted and unused); lsce's
    smoothing_prior has no meaning for them."""
    if ignore_index >= 0:
        raise SoftTargetError(f"lsce: ignore_index={ignore_index} is not supported for probability targets "
                              "(as in PyTorch; a negative value such as the default -100 is accepted and unused)")
    if smoothing_prior is not None:
        raise SoftTargetError("lsce: smoothing_prior is not supported with probability targets; mix the prior into "
                              "the target instead: (1 - eps) * target + eps * prior, with label_smoothing=0")
