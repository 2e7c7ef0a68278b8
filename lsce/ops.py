"""The registered ops: ``torch.ops.lsce.cross_entropy_forward`` and ``..._backward``.

Both work on 2-D rows (N, K) with unit column stride and return per-row values
(forward) or the gradient (backward); checks, shapes and reductions live in
``lsce/functional.py``. Registered with ``torch.library.custom_op`` plus
``register_fake`` and ``register_autograd`` so that ``torch.compile(fullgraph=True)``
sees one opaque node and ``torch.export`` keeps it.

Dispatch (``backend``): ``"auto"`` runs the C++ kernel on CPU tensors, the
Triton kernel on CUDA tensors and the reference elsewhere; ``"cpu"``,
``"triton"`` and ``"torch"`` force one. The Triton kernel runs on CPU tensors
only under ``TRITON_INTERPRET=1`` (how its tests run without a GPU).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cache, reference

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _acc_empty(n: int, logits: Tensor) -> Tensor:
    return torch.empty(n, dtype=reference.acc_dtype(logits.dtype), device=logits.device)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class _Cpp:
    """The C++/OpenMP kernels (lsce._C): raw pointers, sizes and strides."""

    @staticmethod
    def _common(logits, target, weight, prior, ignore_index, eps, z_loss, softcap):
        N, K = logits.shape
        return dict(
            dtype=_DTYPE_CODE[logits.dtype], logits=_ptr(logits), N=N, K=K,
            row_stride=logits.stride(0), target=_ptr(target), ignore_index=ignore_index,
            weight=_ptr(weight), prior=_ptr(prior), eps=eps, z_loss=z_loss, softcap=softcap,
            nthreads=torch.get_num_threads(),
        )

    @staticmethod
    def forward(logits, target, weight, prior, ignore_index, eps, z_loss, softcap):
        from . import _C

        loss, lse = _acc_empty(logits.shape[0], logits), _acc_empty(logits.shape[0], logits)
        _C.forward(**_Cpp._common(logits, target, weight, prior, ignore_index, eps, z_loss, softcap),
                   loss=_ptr(loss), lse=_ptr(lse))
        return loss, lse

    @staticmethod
    def backward(grad_loss, grad_lse, logits, target, weight, prior, lse, ignore_index, eps, z_loss, softcap,
                 out=None):
        """The logits' gradient, in a new tensor or in ``out`` (reference.grad_buffer; may be ``logits``)."""
        from . import _C

        grad = reference.grad_buffer(logits, out) if out is not None else cache.empty(logits.shape, logits.dtype)
        _C.backward(**_Cpp._common(logits, target, weight, prior, ignore_index, eps, z_loss, softcap),
                    lse=_ptr(lse), grad_loss=_ptr(grad_loss), grad_loss_stride=grad_loss.stride(0),
                    grad_lse=_ptr(grad_lse), grad_lse_stride=0 if grad_lse is None else grad_lse.stride(0),
                    grad=_ptr(grad))
        return grad


class _Reference:
    forward = staticmethod(reference.rows_forward)
    backward = staticmethod(reference.rows_backward)


def _triton():
    try:
        from .triton_kernels import cross_entropy
    except ImportError as e:  # triton is an optional dependency
        raise RuntimeError("lsce: backend='triton' needs the triton package (pip install 'lsce[triton]')") from e
    return cross_entropy


def _kernels(backend: str, device: torch.device):
    if backend == "torch":
        return _Reference
    if backend == "triton":
        return _triton()
    if device.type == "cuda":
        try:
            return _triton()
        except RuntimeError:  # "auto" on a GPU without triton: still correct, just slower
            return _Reference
    if device.type == "cpu":
        return _Cpp
    return _Reference


def _check_values(target: Tensor, prior: Optional[Tensor], K: int, ignore_index: int) -> None:
    """Checks that read tensor values: a host sync on CPU, an async device assert on CUDA."""
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
        raise ValueError("lsce: smoothing_prior must be a probability vector: finite, non-negative, summing to 1")


def _kernel_layout(logits: Tensor, target: Tensor, weight, prior):
    """What every kernel reads through raw pointers: rows with unit column
    stride (any row stride), contiguous target and class vectors. No copy when
    the caller's tensors already are (lsce.functional prepares them); a strided
    target would otherwise be read as if it were contiguous."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return logits, target.contiguous(), contiguous(weight), contiguous(prior)


@torch.library.custom_op("lsce::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], prior: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    """Per-row (loss, lse) of 2-D logits; see lsce/reference.py for the formulas."""
    _check_values(target, prior, logits.shape[1], ignore_index)
    logits, target, weight, prior = _kernel_layout(logits, target, weight, prior)
    kernels = _kernels(backend, logits.device)
    return kernels.forward(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap)


@cross_entropy_forward.register_fake
def _(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap, backend):
    n = logits.shape[0]
    return _acc_empty(n, logits), _acc_empty(n, logits)


@torch.library.custom_op("lsce::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
    weight: Optional[Tensor], prior: Optional[Tensor], lse: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
) -> Tensor:
    """Gradient of Σ grad_loss·loss + Σ grad_lse·lse with respect to the logits, in one pass."""
    logits, target, weight, prior = _kernel_layout(logits, target, weight, prior)
    lse = lse.contiguous()
    kernels = _kernels(backend, logits.device)
    return kernels.backward(grad_loss, grad_lse, logits, target, weight, prior, lse,
                            ignore_index, label_smoothing, z_loss, softcap)


@cross_entropy_backward.register_fake
def _(grad_loss, grad_lse, logits, target, weight, prior, lse, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, weight, prior, *options = inputs
    ctx.save_for_backward(logits, target, weight, prior, output[1])
    ctx.options = options


def _backward(ctx, grad_loss, grad_lse):
    logits, target, weight, prior, lse = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, backend = ctx.options
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad = torch.ops.lsce.cross_entropy_backward(
        grad_loss, grad_lse, logits, target, weight, prior, lse,
        ignore_index, label_smoothing, z_loss, softcap, backend,
    )
    return grad, None, None, None, None, None, None, None, None


cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


class FusedStep(torch.autograd.Function):
    """The fused training step on CPU, in eager mode (lsce.functional decides
    when): the forward kernel also writes the gradient for the per-row upstream
    that the reduction will send back (``expected``: 1/Σw for mean, 1 for sum,
    a 1-element tensor), one read of the logits and one exp per element instead
    of two of each. Backward returns that gradient when the upstream is the
    expected one (an O(N) comparison on the host, no N×K pass); otherwise
    (a scaled loss, a differentiated lse) the backward kernel computes it, into
    the same buffer. A second backward (retain_graph) gets a new buffer with
    the same bits as the first. Peak memory stays logits + gradient: the buffer
    is the gradient, allocated a little earlier. torch.compile and
    torch.export trace the registered ops instead."""

    @staticmethod
    def _fused(logits, target, weight, prior, options, expected, grad):
        """The fused kernel: (loss, lse), and the gradient for `expected` into `grad`."""
        from . import _C

        loss, lse = _acc_empty(logits.shape[0], logits), _acc_empty(logits.shape[0], logits)
        _C.forward(**_Cpp._common(logits, target, weight, prior, *options),
                   loss=_ptr(loss), lse=_ptr(lse), grad=_ptr(grad), grad_loss=_ptr(expected), grad_loss_stride=0)
        return loss, lse

    @staticmethod
    def forward(ctx, logits, target, weight, prior, ignore_index, eps, z_loss, softcap, expected):
        _check_values(target, prior, logits.shape[1], ignore_index)
        logits, target, weight, prior = _kernel_layout(logits, target, weight, prior)
        ctx.options = (ignore_index, eps, z_loss, softcap)
        ctx.grad = cache.empty(logits.shape, logits.dtype)
        loss, lse = FusedStep._fused(logits, target, weight, prior, ctx.options, expected, ctx.grad)
        ctx.save_for_backward(logits, target, weight, prior, lse, expected)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        from . import _C

        logits, target, weight, prior, lse, expected = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # handed out once: the caller owns it from here
        fused = grad_lse is None and grad_loss is not None and bool((grad_loss == expected).all())
        if grad is None:
            grad = cache.empty(logits.shape, logits.dtype)
            if fused:
                FusedStep._fused(logits, target, weight, prior, ctx.options, expected, grad)
        if not fused:
            if grad_loss is None:
                grad_loss = torch.zeros_like(lse)
            _C.backward(**_Cpp._common(logits, target, weight, prior, *ctx.options),
                        lse=_ptr(lse), grad_loss=_ptr(grad_loss), grad_loss_stride=grad_loss.stride(0),
                        grad_lse=_ptr(grad_lse), grad_lse_stride=0 if grad_lse is None else grad_lse.stride(0),
                        grad=_ptr(grad))
        return grad, None, None, None, None, None, None, None, None


def fusable(logits: Tensor, backend: str) -> bool:
    """Whether FusedStep may run: the C++ kernel on a plain CPU tensor that
    will be differentiated, in eager mode (not traced by torch.compile or
    torch.export, not under a torch.func transform)."""
    return (
        backend in ("auto", "cpu")
        and type(logits) is torch.Tensor
        and logits.device.type == "cpu"
        and logits.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(logits)
    )
