"""``lsce.cross_entropy``: a drop-in for ``torch.nn.functional.cross_entropy``.

This layer checks the arguments (before any kernel runs; nothing the caller
passed is modified), flattens the input to 2-D rows, calls the registered op
(lsce/ops.py) and reduces the per-row values.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, ops, reference
from .interface import acc_dtype, fixed_sum


def result_dtype(input_dtype: torch.dtype, device: torch.device, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of a returned loss: ``out_dtype`` if given, else PyTorch's:
    the input's, or under torch.autocast on the input's device fp32 (fp64
    stays fp64), since F.cross_entropy is on autocast's fp32 list. Only the
    result is cast; lsce accumulates in fp32 whatever the logits' dtype."""
    if out_dtype is not None:
        return out_dtype
    if torch.is_autocast_enabled(device.type):
        return acc_dtype(input_dtype)
    return input_dtype


def needs_differentiable_statement(*tensors) -> bool:
    """Forward-mode AD (dual tensors) or a torch.func transform (grad, jvp,
    jacfwd, vmap, ...) on any of ``tensors``: the registered ops carry only a
    reverse-mode formula, so such calls compute through lsce.reference's
    differentiable statement instead (double backward is served by the ops'
    backward itself)."""
    dual = torch.autograd.forward_ad._current_level >= 0
    for t in tensors:
        if t is None or torch.compiler.is_compiling():
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if dual and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


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
            input's dtype, fp32 under torch.autocast (fp64 stays fp64). The
            reduction runs in fp32 (fp64 for fp64) either way, so
            ``torch.float32`` returns a bf16 input's mean loss unrounded.

    Numbers (label_smoothing, z_loss, softcap, ignore_index) may be Python,
    NumPy or 0-d tensor scalars. Every autograd mode of ``F.cross_entropy``
    works: reverse mode through the fused kernels, double backward
    (``create_graph=True``) and forward mode (``jvp``, dual tensors) and the
    ``torch.func`` transforms through lsce.reference's differentiable formula.

    A floating-point ``target`` of the input's shape holds class probabilities
    (PyTorch's semantics: mixed with ``ε/K`` under label smoothing, then
    weighted; ``mean`` divides by the number of rows; no ignore_index; the
    loss in ``promote_types(input, target)``); z_loss, softcap, return_lse,
    backend and out_dtype apply to it too, smoothing_prior does not.
    ``size_average`` and ``reduce`` (deprecated in PyTorch) mean what they mean there, with its warning.
    """
    reduction = checks.legacy_reduction(size_average, reduce, reduction)
    if checks.any_dtensor(input, target, weight, smoothing_prior):  # tensor parallelism: lsce/dtensor.py
        from .dtensor import cross_entropy as dtensor_cross_entropy

        return dtensor_cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, smoothing_prior=smoothing_prior, return_lse=return_lse,
            backend=backend, out_dtype=out_dtype)
    if isinstance(target, Tensor) and target.is_floating_point():
        return _soft_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                   smoothing_prior, return_lse, backend, out_dtype)
    K = checks.check_logits(input, target)
    checks.check_options(K, input.device, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
    checks.check_out_dtype(out_dtype)
    ignore_index = checks.as_ignore_index(ignore_index)
    eps, z_loss, cap = float(label_smoothing), float(z_loss), 0.0 if softcap is None else float(softcap)
    dtype = result_dtype(input.dtype, input.device, out_dtype)
    if needs_differentiable_statement(input, target):
        if not torch._C._functorch.is_functorch_wrapped_tensor(target):  # vmap: values are not readable
            checks.check_values(target.reshape(-1), smoothing_prior, K, ignore_index)
        out = reference.cross_entropy(input, target, weight, ignore_index, reduction, eps, z_loss=z_loss,
                                      softcap=cap or None, smoothing_prior=smoothing_prior, return_lse=return_lse)
        return (out[0].to(dtype), out[1]) if return_lse else out.to(dtype)
    acc = acc_dtype(input.dtype)
    z, y, out_shape = _as_rows(input, target, K)
    w = None if weight is None else weight.to(acc).contiguous()
    prior = None if smoothing_prior is None else smoothing_prior.to(acc).contiguous()

    expected = _fused_upstream(z, y, w, ignore_index, z_loss, reduction, backend)
    if expected is not None:
        loss, lse = ops.FusedStep.apply(z, y, w, prior, ignore_index, eps, z_loss, cap, expected)
    else:
        loss, lse, _, _ = torch.ops.lsce.cross_entropy_forward(z, y, w, prior, ignore_index, eps, z_loss, cap, backend)

    out = reduce_rows(loss, lse, y, w, ignore_index, z_loss, reduction, out_shape)
    out = out.to(dtype)
    return (out, lse.reshape(out_shape)) if return_lse else out


def _soft_rows(input: Tensor, target: Tensor, K: int):
    """Rows of logits and of the probability target (unit column stride), and the per-row output shape."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0), ()
    out_shape = input.shape[:1] + input.shape[2:]
    if input.dim() > 2:  # (N, K, d1, ...): classes to the last dimension; a copy of each
        input, target = input.movedim(1, -1).reshape(-1, K), target.movedim(1, -1).reshape(-1, K)
    return input, target, out_shape


def _soft_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                        smoothing_prior, return_lse, backend, out_dtype):
    """cross_entropy with class-probability targets (see its docstring)."""
    K = checks.check_soft_logits(input, target)
    checks.check_options(K, input.device, weight=weight, reduction=reduction, label_smoothing=label_smoothing,
                         z_loss=z_loss, softcap=softcap, backend=backend)
    checks.check_out_dtype(out_dtype)
    checks.check_soft_options(checks.as_ignore_index(ignore_index), smoothing_prior)
    eps, z_loss, cap = float(label_smoothing), float(z_loss), float(softcap or 0.0)
    if needs_differentiable_statement(input, target):  # forward AD, torch.func: the reference's autograd
        return reference.soft_cross_entropy(input, target, weight, reduction, eps, z_loss=z_loss, softcap=cap or None,
                                            return_lse=return_lse)
    acc = acc_dtype(input.dtype)
    z, t, out_shape = _soft_rows(input, target, K)
    w = None if weight is None else weight.to(acc).contiguous()
    rows = torch.tensor(float(z.shape[0]), dtype=acc, device=z.device)  # mean's denominator: every row counts, weights do not

    expected = None
    if reduction != "none" and not target.requires_grad and ops.fusable(z, backend):
        expected = torch.ones(1, dtype=acc) / (rows if reduction == "mean" else 1)
    if expected is not None:
        loss, lse = ops.FusedSoftStep.apply(z, t, w, eps, z_loss, cap, expected)
    else:
        loss, lse, _ = torch.ops.lsce.soft_cross_entropy_forward(z, t, w, eps, z_loss, cap, backend)

    if reduction == "none":
        out = loss.reshape(out_shape)
    else:
        out = fixed_sum(loss)
        if reduction == "mean":
            out = out / rows  # 0 rows: NaN, as PyTorch
    out = out.to(out_dtype or torch.promote_types(input.dtype, target.dtype))
    return (out, lse.reshape(out_shape)) if return_lse else out
