"""The registered ops, ``torch.ops.lsce.cross_entropy_forward`` and ``..._backward``, and dispatch.

Both take 2-D rows (N, K) and give per-row values or the gradient. Registered
with ``torch.library.custom_op``, ``register_fake`` and ``register_autograd``:
one opaque node under ``torch.compile(fullgraph=True)``, kept by ``torch.export``.
Each checks the values it reads, computes the class coefficients once and calls
one backend of the per-row kernel interface (lsce/interface.py), chosen by
:func:`row_kernels`: ``"auto"`` is C++ on CPU tensors, Triton on CUDA tensors
(and on CPU tensors under ``TRITON_INTERPRET=1`` if asked for), else the reference.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import cache, checks, cpu, reference
from .interface import RowKernels, RowOptions, acc_dtype, coefficients


def row_kernels(backend: str, device: torch.device) -> RowKernels:
    """The backend that runs the per-row kernels for ``backend`` on ``device``."""
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        return cpu
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        try:
            from .triton_kernels import cross_entropy

            return cross_entropy
        except ImportError as e:  # triton is optional: "auto" on a GPU falls back to the (correct) reference
            if backend == "triton":
                raise RuntimeError("lsce: backend='triton' needs the triton package (pip install 'lsce[triton]')") from e
    return reference.ROWS


def _prepare(logits, target, weight, prior, ignore_index, eps, z_loss, softcap):
    """The kernels' arguments: rows with unit column stride, a contiguous target
    (no copy when they already are), the call's coefficients and options."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    coef = coefficients(logits.shape[1], weight, prior, eps, acc_dtype(logits.dtype), logits.device)
    return logits, target.contiguous(), coef, RowOptions(ignore_index, eps, z_loss, softcap)


@torch.library.custom_op("lsce::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], prior: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    """Per-row (loss, lse) of 2-D logits; see lsce/interface.py for the formulas."""
    checks.check_values(target, prior, logits.shape[1], ignore_index)
    kernels = row_kernels(backend, logits.device)
    return kernels.forward(*_prepare(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap))


@cross_entropy_forward.register_fake
def _(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap, backend):
    return tuple(logits.new_empty(logits.shape[:1], dtype=acc_dtype(logits.dtype)) for _ in range(2))


@torch.library.custom_op("lsce::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
    weight: Optional[Tensor], prior: Optional[Tensor], lse: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
) -> Tensor:
    """Gradient of Σ grad_loss·loss + Σ grad_lse·lse with respect to the logits, in one pass."""
    kernels = row_kernels(backend, logits.device)
    prepared = _prepare(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap)
    return kernels.backward(grad_loss, grad_lse, *prepared, lse.contiguous())


@cross_entropy_backward.register_fake
def _(grad_loss, grad_lse, logits, target, weight, prior, lse, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def differentiable_backward(grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
                            weight: Optional[Tensor], prior: Optional[Tensor], ignore_index: int,
                            label_smoothing: float, z_loss: float, softcap: float, *,
                            reduction: str = "none", inputs: Optional[List[Tensor]] = None) -> Tuple[Tensor, ...]:
    """The gradients of ``Σ grad_loss·loss + Σ grad_lse·lse`` (loss reduced by
    ``reduction``) for ``inputs`` (default: the logits), as a graph of
    differentiable ops (autograd of lsce.reference's statement), for a backward
    that records one (``create_graph=True``: gradient penalties, Hessians);
    the kernels' gradient would be a constant there."""
    with torch.enable_grad():  # also under vmap of a plain backward (is_grads_batched)
        loss, lse = reference.cross_entropy(
            logits.to(acc_dtype(logits.dtype)), target, weight, ignore_index, reduction, label_smoothing,
            z_loss=z_loss, softcap=softcap or None, smoothing_prior=prior, return_lse=True)
        outputs, grads = [loss], [grad_loss.to(loss.dtype)]
        if grad_lse is not None:
            outputs.append(lse)
            grads.append(grad_lse.to(lse.dtype))
        return torch.autograd.grad(outputs, [logits] if inputs is None else inputs, grads, create_graph=True)


def _setup_context(ctx, inputs, output):
    logits, target, weight, prior, *options = inputs
    ctx.save_for_backward(logits, target, weight, prior, output[1])
    ctx.options = options


def _backward(ctx, grad_loss, grad_lse):
    logits, target, weight, prior, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    if torch.is_grad_enabled():  # create_graph=True
        grad, = differentiable_backward(grad_loss, grad_lse, logits, target, weight, prior, *ctx.options[:4])
    else:
        grad = torch.ops.lsce.cross_entropy_backward(grad_loss, grad_lse, logits, target, weight, prior, lse,
                                                     *ctx.options)
    return grad, None, None, None, None, None, None, None, None


cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


class FusedStep(torch.autograd.Function):
    """The fused training step on CPU, in eager mode (lsce.functional decides
    when): the forward kernel also writes the gradient for the upstream that
    the reduction will send back (``expected``: 1/Σw for mean, 1 for sum), one
    read of the logits and one exp per element instead of two of each.
    Backward hands it out when the upstream is the expected one (an O(N)
    comparison), else the backward kernel recomputes it into the same buffer;
    a second backward (retain_graph) gets a new buffer with the same bits.
    torch.compile and torch.export trace the registered ops instead."""

    @staticmethod
    def forward(ctx, logits, target, weight, prior, ignore_index, eps, z_loss, softcap, expected):
        checks.check_values(target, prior, logits.shape[1], ignore_index)
        ctx.differentiable = (weight, prior, ignore_index, eps, z_loss, softcap)  # for create_graph=True
        logits, target, ctx.coef, ctx.opts = _prepare(logits, target, weight, prior, ignore_index, eps, z_loss, softcap)
        ctx.grad = cache.empty(logits.shape, logits.dtype)
        loss, lse = cpu.forward(logits, target, ctx.coef, ctx.opts, ctx.grad, expected)
        ctx.save_for_backward(logits, target, lse, expected)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        logits, target, lse, expected = ctx.saved_tensors
        # create_graph=True, or vmap over this backward (is_grads_batched), where
        # comparing the upstream with `expected` cannot be read on the host.
        batched = grad_loss is not None and (torch._C._functorch.is_functorch_wrapped_tensor(grad_loss)
                                             or torch._C._functorch.is_legacy_batchedtensor(grad_loss))
        if torch.is_grad_enabled() or batched:
            grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
            weight, prior, *options = ctx.differentiable
            grad, = differentiable_backward(grad_loss, grad_lse, logits, target, weight, prior, *options)
            return grad, None, None, None, None, None, None, None, None
        grad, ctx.grad = ctx.grad, None  # handed out once: the caller owns it from here
        fused = grad_lse is None and grad_loss is not None and bool((grad_loss == expected).all())
        if grad is None:
            grad = cache.empty(logits.shape, logits.dtype)
            if fused:
                cpu.forward(logits, target, ctx.coef, ctx.opts, grad, expected)
        if not fused:
            grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
            cpu.backward(grad_loss, grad_lse, logits, target, ctx.coef, ctx.opts, lse, out=grad)
        return grad, None, None, None, None, None, None, None, None


def fusable(logits: Tensor, backend: str) -> bool:
    """Whether FusedStep may run: the C++ kernel on a plain CPU tensor to be
    differentiated, in eager mode (no torch.compile, torch.export or torch.func)."""
    return (
        backend in ("auto", "cpu")
        and type(logits) is torch.Tensor
        and logits.device.type == "cpu"
        and logits.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(logits)
    )
