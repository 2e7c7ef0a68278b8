"""Probability (soft) targets for :func:`lsce.linear_cross_entropy`: the chunk
loop of lsce.linear (its LogitChunks and GradSums) with the per-row soft
kernels (lsce/interface.py's soft_forward / soft_backward).

``target`` has the shape ``input.shape[:-1] + (K,)`` (PyTorch's layout for
probability targets), any float dtype. As in lsce.linear, ``mean`` and ``sum``
compute the gradients during the forward (each chunk's logit gradient written
over its logits) and scale them in backward; ``none`` keeps the per-row
statistics (m, log_s, A) and recomputes each chunk's logits in backward. No
gradient for the target: a target requiring one is refused (use
``lsce.cross_entropy(F.linear(...), target)``, which gives it).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import checks, ops
from .interface import RowOptions, acc_dtype, fixed_sum
from .linear import REDUCED_AUTOGRAD, GradSums, LogitChunks, fake_grads


def _soft_rows(x, W, b, t, weight, opts: RowOptions, chunk_size: int):
    """Iterates over the chunks: (start, end, logits z, (loss, m, log_s, A) of its rows)."""
    kernels = ops.row_kernels("auto", x.device)
    for s, e, z in LogitChunks(x, W, b, chunk_size):
        yield s, e, z, kernels, kernels.soft_forward(z, t[s:e], weight, opts)


def _reduced_impl(
    x: Tensor, W: Tensor, b: Optional[Tensor], t: Tensor, weight: Optional[Tensor], prior: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int, mean: bool,
    grad_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_scale, grad_input, grad_weight, grad_bias) as lsce.linear's reduced op:
    the gradients of the summed loss, to be scaled by grad_scale (1/rows for mean).
    Its inputs are that op's (``prior`` None and ``ignore_index`` unused here), so
    that its autograd is lsce.linear's (REDUCED_AUTOGRAD)."""
    acc = acc_dtype(x.dtype)
    opts = RowOptions(-100, label_smoothing, z_loss, softcap)
    grads = GradSums(x, W, b, grad_mask)
    one = torch.ones((), dtype=acc, device=x.device)
    loss = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for s, e, z, kernels, (rows, m, log_s, mass) in _soft_rows(x, W, b, t, weight, opts, chunk_size):
        loss[s:e] = rows
        if grads.wanted:
            d, _ = kernels.soft_backward(one.expand(e - s), None, z, t[s:e], weight, opts, m, log_s, mass, out=z)
            grads.add(d, x[s:e], W, s, e)
    count = torch.tensor(float(x.shape[0]), dtype=acc, device=x.device)
    out = fixed_sum(loss)
    grad_scale = 1 / count if mean else one
    return (out * grad_scale if mean else out, grad_scale, *grads.tensors(x, W, b, final=False))


def _rows_impl(x: Tensor, W: Tensor, b: Optional[Tensor], t: Tensor, weight: Optional[Tensor],
               label_smoothing: float, z_loss: float, softcap: float, chunk_size: int) -> Tuple[Tensor, Tensor]:
    """Per-row loss and the (3, N) statistics (m, log_s, A) the backward needs."""
    acc = acc_dtype(x.dtype)
    opts = RowOptions(-100, label_smoothing, z_loss, softcap)
    loss = torch.empty(x.shape[0], dtype=acc, device=x.device)
    stats = torch.empty((3, x.shape[0]), dtype=acc, device=x.device)
    for s, e, _, _, (rows, m, log_s, mass) in _soft_rows(x, W, b, t, weight, opts, chunk_size):
        loss[s:e] = rows
        stats[:, s:e] = torch.stack((m, log_s, mass))
    return loss, stats


def _rows_backward_impl(grad_loss: Tensor, x: Tensor, W: Tensor, b: Optional[Tensor], t: Tensor,
                        weight: Optional[Tensor], stats: Tensor, label_smoothing: float, z_loss: float,
                        softcap: float, chunk_size: int, grad_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ grad_loss·loss for (input, weight, bias), recomputing each chunk's logits."""
    opts = RowOptions(-100, label_smoothing, z_loss, softcap)
    grads = GradSums(x, W, b, grad_mask)
    kernels = ops.row_kernels("auto", x.device)
    stats = stats.contiguous()
    for s, e, z in LogitChunks(x, W, b, chunk_size):
        d, _ = kernels.soft_backward(grad_loss[s:e], None, z, t[s:e], weight, opts, stats[0, s:e], stats[1, s:e],
                                     stats[2, s:e], out=z)
        grads.add(d, x[s:e], W, s, e)
    return grads.tensors(x, W, b, final=True)


_reduced_op = torch.library.custom_op("lsce::linear_soft_cross_entropy_reduced", _reduced_impl, mutates_args=())
_rows_op = torch.library.custom_op("lsce::linear_soft_cross_entropy_rows", _rows_impl, mutates_args=())
_rows_backward_op = torch.library.custom_op("lsce::linear_soft_cross_entropy_rows_backward", _rows_backward_impl,
                                            mutates_args=())


@_reduced_op.register_fake
def _(x, W, b, t, weight, prior, ignore_index, label_smoothing, z_loss, softcap, chunk_size, mean, grad_mask):
    acc = acc_dtype(x.dtype)
    return (x.new_empty((), dtype=acc), x.new_empty((), dtype=acc), *fake_grads(x, W, b, grad_mask, acc))


@_rows_op.register_fake
def _(x, W, b, t, weight, label_smoothing, z_loss, softcap, chunk_size):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[:1], dtype=acc), x.new_empty((3, x.shape[0]), dtype=acc)


@_rows_backward_op.register_fake
def _(grad_loss, x, W, b, t, weight, stats, label_smoothing, z_loss, softcap, chunk_size, grad_mask):
    return fake_grads(x, W, b, grad_mask, None)


_reduced_op.register_autograd(REDUCED_AUTOGRAD["backward"], setup_context=REDUCED_AUTOGRAD["setup_context"])


def _rows_setup_context(ctx, inputs, output):
    x, W, b, t, weight, *options = inputs
    ctx.save_for_backward(x, W, b, t, weight, output[1])
    ctx.options = options


def _rows_backward(ctx, grad_loss, _grad_stats):
    x, W, b, t, weight, stats = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
    if grad_loss is None:
        grad_loss = torch.zeros_like(stats[0])
    gi, gw, gb = torch.ops.lsce.linear_soft_cross_entropy_rows_backward(grad_loss, x, W, b, t, weight, stats,
                                                                         *ctx.options, mask)
    return (*[g if m else None for g, m in zip((gi, gw, gb), mask)], None, None, None, None, None, None)


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup_context)


def linear_soft_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
                              weight: Optional[Tensor], reduction: str, label_smoothing: float, z_loss: float,
                              softcap: float, chunk_size: int, out_dtype: Optional[torch.dtype]) -> Tensor:
    """lsce.linear_cross_entropy's path for a probability target, after its checks
    (lsce.linear.check_linear_arguments and the options)."""
    if target.requires_grad and torch.is_grad_enabled():
        raise checks.SoftTargetError(
            "lsce: linear_cross_entropy computes no gradient for a probability target that requires one; "
            "pass target.detach(), or use lsce.cross_entropy(F.linear(input, linear_weight, linear_bias), target)")
    K, H = linear_weight.shape
    acc = acc_dtype(input.dtype)
    x = input.reshape(-1, H)
    t = target.reshape(-1, K)
    if t.shape[0] and t.stride(1) != 1:
        t = t.contiguous()
    w = None if weight is None else weight.to(acc).contiguous()
    options = (float(label_smoothing), float(z_loss), float(softcap or 0.0), chunk_size)
    dtype = out_dtype or torch.promote_types(input.dtype, target.dtype)
    if reduction == "none":
        loss, _ = torch.ops.lsce.linear_soft_cross_entropy_rows(x, linear_weight, linear_bias, t, w, *options)
        return loss.reshape(target.shape[:-1]).to(dtype)
    grad_on = torch.is_grad_enabled()
    grad_mask = [grad_on and v is not None and v.requires_grad for v in (input, linear_weight, linear_bias)]
    loss, *_ = torch.ops.lsce.linear_soft_cross_entropy_reduced(x, linear_weight, linear_bias, t, w, None, -100,
                                                                *options, reduction == "mean", grad_mask)
    return loss.to(dtype)
