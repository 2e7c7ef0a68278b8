"""``lsce.cross_entropy``: a drop-in for ``torch.nn.functional.cross_entropy``.

This layer checks the arguments (before any kernel runs; nothing the caller
passed is modified), flattens the input to 2-D rows, calls the registered op
(lsce/ops.py) and reduces the per-row values.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, ops
from .interface import acc_dtype, fixed_sum


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


def mean_denominators(y: Tensor, w: Optional[Tensor], ignore_index: int, acc: torch.dtype):
    """(non-ignored mask, their count, Σ w[y] over them): ``mean`` divides the
    cross-entropy by the weight sum and the z-loss term by the count."""
    valid = y != ignore_index
    count = valid.sum().to(acc)
    if w is None:
        return valid, count, count
    return valid, count, fixed_sum(torch.where(valid, w[torch.where(valid, y, 0)], 0))


def reduce_rows(loss: Tensor, lse: Tensor, y: Tensor, w: Optional[Tensor], ignore_index: int,
                z_loss: float, reduction: str, shape, total=None) -> Tensor:
    """The reduction of per-row losses (z-loss term included), as docs/design.md §1
    states it; shared by every entry point (cross_entropy, linear, distributed,
    dtensor). ``total`` (lsce.dtensor: over the ranks that hold other rows)
    turns each sum over these rows into the sum over all rows; default: these
    rows are all."""
    if reduction == "none":
        return loss.reshape(shape)
    total = total or (lambda t: t)
    if reduction == "sum":
        return total(fixed_sum(loss))
    valid, count, total_weight = mean_denominators(y, w, ignore_index, loss.dtype)
    count, total_weight = total(count), total(total_weight)
    if w is not None and z_loss:
        # The z-loss term is averaged over rows, the cross-entropy over weight.
        zl = torch.where(valid, z_loss * lse * lse, 0)
        return total(fixed_sum(loss - zl)) / total_weight + total(fixed_sum(zl)) / count
    return total(fixed_sum(loss)) / total_weight


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


# The signature mirrors torch.nn.functional.cross_entropy on purpose (a drop-in);
# lsce.CrossEntropyLoss and lsce.distributed.vocab_parallel_cross_entropy repeat its options.
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
    checks.check_deprecated(size_average, reduce)
    if checks.any_dtensor(input, target, weight, smoothing_prior):  # tensor parallelism: lsce/dtensor.py
        from .dtensor import cross_entropy as dtensor_cross_entropy

        return dtensor_cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, smoothing_prior=smoothing_prior, return_lse=return_lse,
            backend=backend, out_dtype=out_dtype)
    K = checks.check_logits(input, target)
    checks.check_options(K, input.device, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
    checks.check_out_dtype(out_dtype)
    ignore_index = checks.as_ignore_index(ignore_index)
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
