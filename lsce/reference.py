"""The contract of lsce, stated in plain PyTorch.

Every backend is tested against this file. It has two parts:

* :func:`cross_entropy` — the whole public semantics (shapes, weight,
  ignore_index, reduction, label smoothing and the extensions) written with
  differentiable PyTorch ops, so autograd gives its gradient.
* :func:`rows_forward` / :func:`rows_backward` — the per-row kernel interface
  that the C++ and Triton kernels implement, in closed form and row-chunked so
  that the ``backend="torch"`` path needs no more memory than
  ``F.cross_entropy``.

For one row ``z`` (length K) with target ``y`` that is not ``ignore_index``,
with ``zc = softcap * tanh(z / softcap)`` (``zc = z`` without softcap),
``lse = logsumexp(zc)``, ``p = softmax(zc)``, ``c_k = π_k · w_k`` (``π_k = 1/K``
unless a ``smoothing_prior`` is given; ``w ≡ 1`` without ``weight``) and
``C = Σ_k c_k``::

    loss = (1 − ε) · w_y · (lse − zc_y)  +  ε · (C · lse − Σ_k c_k · zc_k)  +  λ · lse²

which is ``(1 − ε) · nll + ε · smooth + z_loss`` of design.md §1. Ignored rows
have loss 0 (``lse`` is still computed for them). The gradient, with ``g`` the
upstream gradient of the row's loss and ``h`` that of its ``lse``::

    A          = g · ((1 − ε) · w_y + ε · C + 2 · λ · lse) + h      (h alone for ignored rows)
    ∂/∂zc_k    = A · p_k − g · (ε · c_k + (1 − ε) · w_y · [k = y])
    ∂/∂z_k     = ∂/∂zc_k · (1 − (zc_k / softcap)²)                 (chain rule through tanh)

Without weight, prior or z_loss that is ``g · (p − y_ls)`` with
``y_ls = (1 − ε) · onehot(y) + ε / K``.

Reductions (design.md §1): ``sum`` adds the rows; ``mean`` divides the
cross-entropy part by ``Σ_i w[y_i]`` over non-ignored rows (their count
without weight) and the z-loss part by the count of non-ignored rows; no
non-ignored row gives NaN.
"""

from __future__ import annotations

import torch

# Rows per chunk in rows_forward/rows_backward: bounds the fp32 temporaries to
# about 2 × _CHUNK_ELEMS elements whatever N is.
_CHUNK_ELEMS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_coefficients(K, weight, prior, dtype, device):
    """``c = π ⊙ w`` (None for the plain uniform, unweighted case) and ``C = Σ c``."""
    if weight is None and prior is None:
        return None, 1.0
    c = torch.full((K,), 1.0 / K, dtype=dtype, device=device) if prior is None else prior.to(dtype)
    if weight is not None:
        c = c * weight.to(dtype)
    return c, c.sum()


def _lse(z):
    """logsumexp over dim 1, NaN (not +inf) for a row holding +inf, as log_softmax gives."""
    lse = torch.logsumexp(z, dim=1)
    return torch.where(lse == float("inf"), float("nan"), lse)


def _capped(z, softcap):
    return z if not softcap else softcap * torch.tanh(z / softcap)


def cross_entropy(
    input,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap=None,
    smoothing_prior=None,
    return_lse: bool = False,
):
    """Label-smoothed cross-entropy with PyTorch's semantics, in plain autograd ops.

    Accepts the shapes of ``F.cross_entropy`` (``(K,)``, ``(N, K)``,
    ``(N, K, d1, ...)``) with class indices as target. Computes in fp32 (fp64
    for fp64 input) and returns the loss in the input's dtype; ``lse`` (when
    ``return_lse``) has the target's shape and the accumulation dtype.
    """
    eps = float(label_smoothing)
    dtype = input.dtype
    acc = acc_dtype(dtype)
    K = input.shape[0] if input.dim() == 1 else input.shape[1]
    z = input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1)
    out_shape = z.shape[:-1] if input.dim() > 1 else ()
    z = _capped(z.reshape(-1, K).to(acc), softcap)
    y = target.reshape(-1).long()
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))

    lse = _lse(z)
    logp = z - lse[:, None]
    w = torch.ones(K, dtype=acc, device=z.device) if weight is None else weight.to(acc)
    w_y = w[y_safe] * valid
    nll = -w_y * logp.gather(1, y_safe[:, None]).squeeze(1)
    c, _ = class_coefficients(K, weight, smoothing_prior, acc, z.device)
    smooth = -(logp.sum(1) / K if c is None else (logp * c).sum(1))
    # Without smoothing PyTorch computes the NLL alone: 0·smooth would turn a
    # -inf logit's infinite smoothing term into NaN.
    ce = nll if eps == 0 else (1 - eps) * nll + eps * smooth
    ce = torch.where(valid, ce, torch.zeros_like(nll))
    zl = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))

    if reduction == "none":
        loss = (ce + zl).reshape(out_shape)
    elif reduction == "sum":
        loss = (ce + zl).sum()
    elif reduction == "mean":
        loss = ce.sum() / w_y.sum() + (zl.sum() / valid.sum() if z_loss else 0.0)
    else:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    loss = loss.to(dtype)
    return (loss, lse.reshape(out_shape)) if return_lse else loss


def _row_terms(z, y, weight, ignore_index, softcap):
    """Capped fp32/fp64 logits, validity mask, safe target and w_y of one chunk."""
    zc = _capped(z.to(acc_dtype(z.dtype)), softcap)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    w_y = (weight[y_safe] if weight is not None else torch.ones_like(zc[:, 0])) * valid
    return zc, valid, y_safe, w_y


def rows_forward(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss and lse of 2-D ``logits`` (N, K); see the module docstring.

    ``weight``/``prior``: None or (K,) tensors. ``softcap``: 0 for none.
    Returns ``(loss, lse)``, each (N,) in the accumulation dtype.
    """
    N, K = logits.shape
    acc = acc_dtype(logits.dtype)
    c, C = class_coefficients(K, weight, prior, acc, logits.device)
    w = None if weight is None else weight.to(acc)
    loss = torch.empty(N, dtype=acc, device=logits.device)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for s in range(0, N, step):
        zc, valid, y_safe, w_y = _row_terms(logits[s : s + step], target[s : s + step], w, ignore_index, softcap)
        lse_c = _lse(zc)
        zc_y = zc.gather(1, y_safe[:, None]).squeeze(1)
        row = (1 - label_smoothing) * w_y * (lse_c - zc_y)
        if label_smoothing:
            dot = zc.sum(1) / K if c is None else zc @ c
            row = row + label_smoothing * (C * lse_c - dot)
        if z_loss:
            row = row + z_loss * lse_c * lse_c
        loss[s : s + step] = torch.where(valid, row, torch.zeros_like(row))
        lse[s : s + step] = lse_c
    return loss, lse


def grad_buffer(logits, out=None):
    """Where a backward kernel writes the gradient of 2-D ``logits``: a new
    contiguous tensor, or ``out``. ``out`` may be the logits themselves (every
    kernel reads each element before it writes that element and never reads
    it again), which is how lsce.linear keeps one buffer per chunk; it must
    then be contiguous, as the gradient always is. A partial overlap, or any
    other layout, is refused: the kernels would read values already replaced.
    Only lsce's private buffers are ever passed here."""
    if out is None:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(f"lsce: gradient buffer {tuple(out.shape)} {out.dtype} on {out.device} does not match "
                         f"the logits {tuple(logits.shape)} {logits.dtype} on {logits.device}")
    if not out.is_contiguous():
        raise ValueError("lsce: the gradient buffer must be contiguous")
    same = out.data_ptr() == logits.data_ptr() and logits.is_contiguous()
    if not same and out.numel() and logits.numel():
        o0, l0 = out.data_ptr(), logits.data_ptr()
        o1 = o0 + out.numel() * out.element_size()
        l1 = l0 + ((logits.shape[0] - 1) * logits.stride(0) + logits.shape[1]) * logits.element_size()
        if o0 < l1 and l0 < o1:
            raise ValueError("lsce: the gradient buffer overlaps the logits without being exactly them")
    return out


def rows_backward(grad_loss, grad_lse, logits, target, weight, prior, lse, ignore_index, label_smoothing, z_loss,
                  softcap, out=None):
    """Gradient of ``Σ g·loss + Σ h·lse`` with respect to 2-D ``logits``.

    ``grad_loss`` (g) and ``grad_lse`` (h, or None): (N,) tensors, possibly
    expanded from a scalar. Returns an (N, K) tensor in the logits' dtype:
    ``out`` when given (see :func:`grad_buffer`; it may be ``logits``).
    """
    N, K = logits.shape
    acc = acc_dtype(logits.dtype)
    eps = label_smoothing
    c, C = class_coefficients(K, weight, prior, acc, logits.device)
    w = None if weight is None else weight.to(acc)
    grad = grad_buffer(logits, out)
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for s in range(0, N, step):
        e = s + step
        zc, valid, y_safe, w_y = _row_terms(logits[s:e], target[s:e], w, ignore_index, softcap)
        g = torch.where(valid, grad_loss[s:e].to(acc), 0)
        A = g * ((1 - eps) * w_y + eps * C + 2 * z_loss * lse[s:e])
        if grad_lse is not None:
            A = A + grad_lse[s:e].to(acc)
        p = torch.exp(zc - lse[s:e, None])
        d = p * A[:, None]
        if eps:
            d -= (g * eps / K)[:, None] if c is None else (g * eps)[:, None] * c
        # The true-class term is subtracted in the accumulation dtype, before
        # any rounding to the logits' dtype (Liger-Kernel issue 1329).
        d.scatter_add_(1, y_safe[:, None], (-(1 - eps) * w_y * g)[:, None])
        if softcap:
            d *= 1 - (zc / softcap) ** 2
        # d is a new tensor, complete before this store: with grad = logits,
        # rows s:e are overwritten only after they have been read.
        grad[s:e] = d
    return grad
