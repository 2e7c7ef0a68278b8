"""The contract of lsce, stated in plain PyTorch.

Every backend is tested against this file. It has two parts:

* :func:`cross_entropy` — the whole public semantics (shapes, weight,
  ignore_index, reduction, label smoothing and the extensions) written with
  differentiable PyTorch ops, so autograd gives its gradient.
* :func:`rows_forward` / :func:`rows_backward` (``ROWS``) — the reference
  backend of the per-row kernel interface (formulas in lsce/interface.py), in
  closed form and row-chunked so that the ``backend="torch"`` path needs no
  more memory than ``F.cross_entropy``.

Per non-ignored row, with ``logp = log_softmax(softcap·tanh(z/softcap))``
(``z`` itself without softcap), ``c = π ⊙ w`` (``π_k = 1/K`` unless a
``smoothing_prior`` is given; ``w ≡ 1`` without ``weight``)::

    loss = (1 − ε)·(−w_y·logp_y) + ε·(−Σ_k c_k·logp_k) + λ·lse²

Reductions (docs/design.md §1): ``sum`` adds the rows; ``mean`` divides the
cross-entropy part by ``Σ_i w[y_i]`` over non-ignored rows (their count
without weight) and the z-loss part by the count of non-ignored rows; no
non-ignored row gives NaN.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .interface import (Coefficients, DistillOptions, RowOptions, acc_dtype, check_distill_rows, check_rows,
                        check_soft_rows, coefficients, grad_buffer, soft_target_grad_buffer)

# Rows per chunk in rows_forward/rows_backward: bounds the fp32 temporaries to
# about 2 × _CHUNK_ELEMS elements whatever N is.
_CHUNK_ELEMS = 1 << 22


def row_max_and_log_s(z):
    """Per row ``(m, log_s)``: ``m = max(z)`` (a constant: no gradient flows
    through it) and ``log_s = log Σ exp(z − m)``, so that ``lse = m + log_s``
    and ``log_softmax = (z − m) − log_s`` are formed relative to the row max.
    A row of only −inf has ``m = log_s = −inf``; one holding NaN or +inf has
    NaN ``log_s`` (as log_softmax gives NaN)."""
    m = z.detach().amax(dim=1)
    # A max of -inf would make z − m = -inf − (-inf) = NaN: shift by 0 instead,
    # so that Σ exp(-inf) = 0 and log_s = -inf.
    shift = torch.where(m == float("-inf"), 0.0, m)
    return m, torch.logsumexp(z - shift[:, None], dim=1)


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
    if target.is_floating_point():
        return soft_cross_entropy(input, target, weight, reduction, label_smoothing, z_loss=z_loss, softcap=softcap,
                                  return_lse=return_lse)
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

    m, log_s = row_max_and_log_s(z)
    lse = m + log_s
    logp = (z - torch.where(m == float("-inf"), 0.0, m)[:, None]) - log_s[:, None]  # relative to the row max
    w = torch.ones(K, dtype=acc, device=z.device) if weight is None else weight.to(acc)
    w_y = w[y_safe] * valid
    nll = -w_y * logp.gather(1, y_safe[:, None]).squeeze(1)
    c = coefficients(K, weight, smoothing_prior, eps, acc, z.device).c
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


def soft_cross_entropy(input, target, weight=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                       z_loss: float = 0.0, softcap=None, return_lse: bool = False):
    """Cross-entropy with class-probability targets (``target`` of ``input``'s
    shape), PyTorch's semantics in plain autograd ops, differentiable in both.

    Per row: ``−Σ_k w_k·((1 − ε)·t_k + ε/K)·logp_k + λ·lse²``; ``mean`` divides
    by the number of rows (the weights do not enter the denominator), and
    there is no ignore_index. Computed in the accumulation dtype of the
    logits; returned in ``promote_types(input, target)``, as PyTorch does.
    """
    eps = float(label_smoothing)
    acc = acc_dtype(input.dtype)
    K = input.shape[0] if input.dim() == 1 else input.shape[1]
    z = input.unsqueeze(0) if input.dim() == 1 else input.movedim(1, -1)
    t = target.unsqueeze(0) if target.dim() == 1 else target.movedim(1, -1)
    out_shape = z.shape[:-1] if input.dim() > 1 else ()
    z = _capped(z.reshape(-1, K).to(acc), softcap)
    t = t.reshape(-1, K).to(acc)
    m, log_s = row_max_and_log_s(z)
    lse = m + log_s
    # PyTorch's own log_softmax: a row holding +inf is NaN in value and gradient, as in F.cross_entropy.
    logp = torch.log_softmax(z, 1)
    tt = (1 - eps) * t + eps / K if eps else t
    a = tt if weight is None else tt * weight.to(acc)
    rows = -(a * logp).sum(1) + (z_loss * lse * lse if z_loss else 0.0)
    if reduction == "none":
        loss = rows.reshape(out_shape)
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        loss = rows.sum() / rows.shape[0] if rows.shape[0] else rows.sum() * float("nan")
    else:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    loss = loss.to(torch.promote_types(input.dtype, target.dtype))
    return (loss, lse.reshape(out_shape)) if return_lse else loss


def _row_terms(z, y, weight, ignore_index, softcap):
    """Capped fp32/fp64 logits, validity and in-range masks, safe target and w_y (0 where out of range)."""
    zc = _capped(z.to(acc_dtype(z.dtype)), softcap)
    valid = y != ignore_index
    own = valid & (y >= 0) & (y < z.shape[1])
    y_safe = torch.where(own, y, torch.zeros_like(y))
    w_y = (weight[y_safe] if weight is not None else torch.ones_like(zc[:, 0])) * own
    return zc, valid, own, y_safe, w_y


def rows_forward(logits, target, coef: Coefficients, opts: RowOptions):
    """Per-row ``(loss, m, log_s)`` of 2-D ``logits`` (N, K), each (N,) in the
    accumulation dtype: the reference backend of lsce.interface.RowKernels."""
    check_rows(logits, target)
    N, K = logits.shape
    acc = acc_dtype(logits.dtype)
    eps = opts.label_smoothing
    loss, m, log_s = (torch.empty(N, dtype=acc, device=logits.device) for _ in range(3))
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for s in range(0, N, step):
        zc, valid, own, y_safe, w_y = _row_terms(logits[s : s + step], target[s : s + step], coef.weight,
                                                 opts.ignore_index, opts.softcap)
        m_c, log_s_c = row_max_and_log_s(zc)
        below = m_c[:, None] - zc  # m − zc_k: exact where zc_k is within a factor 2 of m
        row = torch.where(own, (1 - eps) * w_y * (below.gather(1, y_safe[:, None]).squeeze(1) + log_s_c), 0)
        if eps:
            dot = below.sum(1) / coef.uniform_over if coef.c is None else below @ coef.c
            row = row + eps * (coef.C * log_s_c + dot)
        if opts.z_loss:
            lse_c = m_c + log_s_c
            row = row + opts.z_loss * lse_c * lse_c
        loss[s : s + step] = torch.where(valid, row, torch.zeros_like(row))
        m[s : s + step], log_s[s : s + step] = m_c, log_s_c
    return loss, m, log_s


def rows_backward(grad_loss, grad_lse, logits, target, coef: Coefficients, opts: RowOptions, m, log_s, out=None):
    """Gradient of ``Σ g·loss + Σ h·lse`` with respect to 2-D ``logits``, in
    their dtype, into ``out`` when given (lsce.interface.grad_buffer; it may be
    ``logits``): the reference backend of lsce.interface.RowKernels."""
    check_rows(logits, target)
    N, K = logits.shape
    acc = acc_dtype(logits.dtype)
    eps = opts.label_smoothing
    grad = grad_buffer(logits, out)
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for s in range(0, N, step):
        e = s + step
        zc, valid, _, y_safe, w_y = _row_terms(logits[s:e], target[s:e], coef.weight, opts.ignore_index, opts.softcap)
        g = torch.where(valid, grad_loss[s:e].to(acc), 0)
        A = g * ((1 - eps) * w_y + eps * coef.C + 2 * opts.z_loss * (m[s:e] + log_s[s:e]))
        if grad_lse is not None:
            A = A + grad_lse[s:e].to(acc)
        p = torch.exp((zc - m[s:e, None]) - log_s[s:e, None])
        d = p * A[:, None]
        if eps:
            d -= (g * eps / coef.uniform_over)[:, None] if coef.c is None else (g * eps)[:, None] * coef.c
        # The true-class term is subtracted in the accumulation dtype, before
        # any rounding to the logits' dtype (Liger-Kernel issue 1329); w_y is 0
        # for a row whose true class lies outside these columns.
        d.scatter_add_(1, y_safe[:, None], (-(1 - eps) * w_y * g)[:, None])
        if opts.softcap:
            d *= 1 - (zc / opts.softcap) ** 2
        # d is a new tensor, complete before this store: with grad = logits,
        # rows s:e are overwritten only after they have been read.
        grad[s:e] = d
    return grad


def _soft_terms(logits, target, weight, opts):
    """Capped acc logits, a_k = w_k·((1 − ε)·t_k + ε/K), the row max m and log_s of rows of probability targets."""
    acc = acc_dtype(logits.dtype)
    zc = _capped(logits.to(acc), opts.softcap)
    eps, K = opts.label_smoothing, logits.shape[1]
    a = (1 - eps) * target.to(acc) + eps / K
    if weight is not None:
        a = a * weight
    m = zc.amax(1) if K else zc.new_zeros(zc.shape[0])
    shift = torch.where(m == float("-inf"), 0, m)  # a row of −inf only: exp(−inf − 0) = 0, no NaN from −inf − (−inf)
    log_s = torch.log(torch.exp(zc - shift[:, None]).sum(1))
    return zc, a, m, log_s, shift


def rows_soft_forward(logits, target, weight, opts: RowOptions):
    """Per-row ``(loss, m, log_s, A)`` of probability targets (lsce.interface.RowKernels.soft_forward)."""
    check_soft_rows(logits, target)
    N, K = logits.shape
    acc = acc_dtype(logits.dtype)
    out = [torch.empty(N, dtype=acc, device=logits.device) for _ in range(4)]
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for s in range(0, N, step):
        zc, a, m, log_s, shift = _soft_terms(logits[s : s + step], target[s : s + step], weight, opts)
        mass = a.sum(1)
        # Σ a·(m − zc) + A·log_s: each term >= 0 for a target >= 0, none of them an absolute lse.
        loss = (a * (shift[:, None] - zc)).sum(1) + mass * (log_s + (m - shift))
        if opts.z_loss:
            loss = loss + opts.z_loss * (m + log_s) ** 2
        for o, v in zip(out, (loss, m, log_s, mass)):
            o[s : s + step] = v
    return tuple(out)


def rows_soft_backward(grad_loss, grad_lse, logits, target, weight, opts: RowOptions, m, log_s, mass, out=None,
                       target_grad: bool = False):
    """``(∂/∂logits, ∂/∂target or None)`` of probability targets (lsce.interface.RowKernels.soft_backward)."""
    check_soft_rows(logits, target)
    N, K = logits.shape
    acc = acc_dtype(logits.dtype)
    grad = grad_buffer(logits, out)
    grad_t = soft_target_grad_buffer(target) if target_grad else None
    eps = opts.label_smoothing
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for s in range(0, N, step):
        e = s + step
        zc, a, _, _, _ = _soft_terms(logits[s:e], target[s:e], weight, opts)
        g = grad_loss[s:e].to(acc)
        mi, li = m[s:e, None], log_s[s:e, None]
        cp = g * mass[s:e]
        if opts.z_loss:
            cp = cp + 2 * opts.z_loss * g * (m[s:e] + log_s[s:e])
        if grad_lse is not None:
            cp = cp + grad_lse[s:e].to(acc)
        d = cp[:, None] * torch.exp((zc - mi) - li) - g[:, None] * a
        if opts.softcap:
            d *= 1 - (zc / opts.softcap) ** 2
        if grad_t is not None:
            w = 1 if weight is None else weight
            grad_t[s:e] = (g[:, None] * (1 - eps) * w) * ((mi - zc) + li)
        grad[s:e] = d  # complete before this store: grad may be the logits
    return grad, grad_t


# ---------------------------------------------------------------- distillation

def kl(log_p, log_q):
    """Σ_k p_k·(log p_k − log q_k) over the last dimension, with 0·log 0 = 0 (a NaN p stays NaN)."""
    p = log_p.exp()
    return torch.where(p == 0, 0, p * (log_p - log_q)).sum(-1)


def log_mixture(log_t, log_s, beta: float):
    """log(β·t + (1 − β)·s) from log-probabilities, for 0 < β < 1."""
    return torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))


def divergence(log_t, log_s, beta: float):
    """D_β(t, s) per row from log-probabilities (…, K): ``(1 − β)·KL(t ‖ m) + β·KL(s ‖ m)``
    with ``m = β·t + (1 − β)·s``; forward KL(t ‖ s) at β = 0, reverse KL(s ‖ t) at β = 1."""
    if beta == 0:
        return kl(log_t, log_s)
    if beta == 1:
        return kl(log_s, log_t)
    log_m = log_mixture(log_t, log_s, beta)
    return (1 - beta) * kl(log_t, log_m) + beta * kl(log_s, log_m)


def _log_remainder(log_p):
    """log(1 − Σ exp(log_p)) over the last dimension, clamped at log 0 (the teacher's: no gradient)."""
    mass = log_p.exp().sum(-1, keepdim=True).clamp(max=1)
    return torch.log1p(-mass)


def softmax_divergence(z, u, temperature: float, beta: float):
    """D_β of ``softmax(u / T)`` (the teacher) and ``softmax(z / T)`` (the student) per row,
    in z's accumulation dtype: tempered_divergence of dense logits, and of the renormalised
    top-k from the student's k gathered logits and the teacher's log-probabilities."""
    acc = acc_dtype(z.dtype)
    return divergence(torch.log_softmax(u.to(acc) / temperature, -1), torch.log_softmax(z.to(acc) / temperature, -1),
                      beta)


def tempered_divergence(z, teacher, ids, temperature: float, beta: float, topk_mass: str = "renormalize"):
    """D_β of the tempered teacher and student per row of student logits z (n, K), in the accumulation dtype.

    ``ids`` None: ``teacher`` holds dense logits (n, K), ``t = softmax(teacher / T)``.
    Else the teacher's top-k: ``ids`` (n, k) and log-probabilities ``teacher`` (n, k) at
    T = 1. ``topk_mass="renormalize"`` compares both distributions restricted to the k ids
    and renormalised there (``softmax(lp / T)`` against ``softmax(z[ids] / T)``);
    ``"remainder"`` (T = 1) adds the mass outside the k as one more bucket,
    ``1 − Σ exp(lp)`` for the teacher and the student's own remainder."""
    if ids is None:
        return softmax_divergence(z, teacher, temperature, beta)
    if topk_mass == "renormalize":  # only the k columns: no (n, K) temporary
        return softmax_divergence(z.gather(1, ids), teacher, temperature, beta)
    z = z.to(acc_dtype(z.dtype)) / temperature
    lp = teacher.to(z.dtype)
    lse = torch.logsumexp(z, -1, keepdim=True)
    log_s = z.gather(1, ids) - lse
    if ids.shape[1] < z.shape[1]:  # the student's remainder from its own logits, not 1 − Σ (cancellation)
        rest = torch.logsumexp(z.scatter(1, ids, float("-inf")), -1, keepdim=True) - lse
        lp, log_s = torch.cat([lp, _log_remainder(lp)], -1), torch.cat([log_s, rest], -1)
    return divergence(lp, log_s, beta)


def distillation_loss(student_logits, target=None, *, teacher_logits=None, teacher_topk_ids=None,
                      teacher_topk_logprobs=None, temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.0,
                      label_smoothing: float = 0.0, weight=None, ignore_index: int = -100, reduction: str = "mean",
                      topk_mass: str = "renormalize"):
    """The statement of ``lsce.distillation_loss`` (its docstring has the definition), differentiable.

    Per row ``alpha·T²·D_β + (1 − alpha)·CE_ε`` (0 on ignored rows); ``mean`` divides
    the distillation term by the rows counted and CE by its own mean's denominator."""
    teacher = (teacher_logits if teacher_logits is not None else teacher_topk_logprobs).detach()
    kd = temperature ** 2 * tempered_divergence(student_logits, teacher, teacher_topk_ids, temperature, beta,
                                                topk_mass)
    if target is None:
        rows = alpha * kd
        return rows if reduction == "none" else rows.sum() / (kd.shape[0] if reduction == "mean" else 1)
    valid = target != ignore_index
    kd = torch.where(valid, kd, 0)
    ce = cross_entropy(student_logits.to(kd.dtype), target, weight, ignore_index, "none", label_smoothing)
    if reduction == "none":
        return alpha * kd + (1 - alpha) * ce
    if reduction == "sum":
        return alpha * kd.sum() + (1 - alpha) * ce.sum()
    w_y = torch.ones_like(kd) if weight is None else weight.to(kd.dtype)[torch.where(valid, target, 0)]
    return alpha * kd.sum() / valid.sum() + (1 - alpha) * ce.sum() / torch.where(valid, w_y, 0).sum()


def _distill_terms(student, teacher, target, weight, opts: DistillOptions):
    """Per row of a chunk: the stats' tensors, log-probabilities and the masks of lsce/interface.py's formulas."""
    acc = acc_dtype(student.dtype)
    T, beta = opts.temperature, opts.beta
    z, u = student.to(acc), teacher.to(acc)
    m, log_s1 = row_max_and_log_s(z)
    mt, _ = row_max_and_log_s(u)
    shift = torch.where(m == float("-inf"), 0, m)[:, None]
    tshift = torch.where(mt == float("-inf"), 0, mt)[:, None]
    zs, us = (z - shift) / T, (u - tshift) / T
    log_sT, log_st = torch.logsumexp(zs, 1), torch.logsumexp(us, 1)
    ls, lt = zs - log_sT[:, None], us - log_st[:, None]
    s, t = ls.exp(), lt.exp()
    valid = torch.ones_like(m, dtype=torch.bool) if target is None else target != opts.ignore_index
    if beta == 0:
        D, q = kl(lt, ls), None
        Q = torch.zeros_like(D)
    elif beta == 1:
        D, q = kl(ls, lt), ls - lt
        Q = D
    else:
        lm = log_mixture(lt, ls, beta)
        D = (1 - beta) * kl(lt, lm) + beta * kl(ls, lm)
        mix = lm.exp()
        q = beta * (ls - lm) - (1 - beta) * torch.where(mix > 0, ((1 - beta) * t + beta * s) / mix, 0)
        Q = torch.where(s == 0, 0, s * q).sum(1)
    stats = torch.stack((m, log_s1, log_sT, mt, log_st, Q))
    return z, s, t, q, D, valid, stats


def _ce_terms(z, target, weight, opts: DistillOptions, m, log_s1, valid):
    """``((1 − ε)·w_y, safe y)`` of the rows (0 without a target or on ignored rows)."""
    if target is None:
        return torch.zeros_like(m), torch.zeros_like(m, dtype=torch.int64)
    y = torch.where(valid, target, 0)
    w_y = torch.ones_like(m) if weight is None else weight[y]
    return torch.where(valid, (1 - opts.label_smoothing) * w_y, 0), y


def rows_distill_forward(student, teacher, target, weight, opts: DistillOptions):
    """Per-row ``(kd, ce, stats)`` of distillation (lsce.interface.RowKernels.distill_forward)."""
    check_distill_rows(student, teacher, target)
    N, K = student.shape
    acc = acc_dtype(student.dtype)
    eps = opts.label_smoothing
    kd, ce = (torch.zeros(N, dtype=acc, device=student.device) for _ in range(2))
    stats = torch.empty(6, N, dtype=acc, device=student.device)
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for a in range(0, N, step):
        b = a + step
        y = None if target is None else target[a:b]
        z, _, _, _, D, valid, st = _distill_terms(student[a:b], teacher[a:b], y, weight, opts)
        m, log_s1 = st[0], st[1]
        kd[a:b] = torch.where(valid, opts.temperature ** 2 * D, 0)
        if target is not None:
            keep_wy, ys = _ce_terms(z, y, weight, opts, m, log_s1, valid)
            below = m[:, None] - z
            row = keep_wy * (below.gather(1, ys[:, None]).squeeze(1) + log_s1)
            if eps:
                wsum = below.sum(1) if weight is None else below @ weight
                row = row + eps / K * (opts.weight_sum * log_s1 + wsum)
            ce[a:b] = torch.where(valid, row, 0)
        stats[:, a:b] = st
    return kd, ce, stats


def rows_distill_backward(grad_kd, grad_ce, student, teacher, target, weight, opts: DistillOptions, stats, out=None):
    """The student's gradient of ``Σ g·kd + Σ h·ce`` (lsce.interface.RowKernels.distill_backward).
    Recomputes the stats (the reference's own, equal to the forward's) rather than reading them."""
    check_distill_rows(student, teacher, target)
    N, K = student.shape
    acc = acc_dtype(student.dtype)
    eps, T = opts.label_smoothing, opts.temperature
    grad = grad_buffer(student, out)
    step = max(1, _CHUNK_ELEMS // max(K, 1))
    for a in range(0, N, step):
        b = a + step
        y = None if target is None else target[a:b]
        z, s, t, q, _, valid, st = _distill_terms(student[a:b], teacher[a:b], y, weight, opts)
        g = torch.where(valid, grad_kd[a:b].to(acc), 0)[:, None]
        if q is None:
            d = g * T * (s - t)
        else:
            d = g * T * torch.where(s == 0, 0, s * (q - st[5][:, None]))
        if target is not None:
            h = torch.where(valid, grad_ce[a:b].to(acc), 0)
            keep_wy, ys = _ce_terms(z, y, weight, opts, st[0], st[1], valid)
            p = torch.exp((z - st[0][:, None]) - st[1][:, None])
            d = d + (h * (keep_wy + eps / K * opts.weight_sum))[:, None] * p
            if eps:
                d = d - (h * eps / K)[:, None] * (1 if weight is None else weight)
            d.scatter_add_(1, ys[:, None], (-h * keep_wy)[:, None])  # before rounding (Liger-Kernel issue 1329)
        grad[a:b] = d  # complete before this store: grad may be the student
    return grad


# The reference backend of the per-row kernel interface.
ROWS = SimpleNamespace(forward=rows_forward, backward=rows_backward, soft_forward=rows_soft_forward,
                       soft_backward=rows_soft_backward, distill_forward=rows_distill_forward,
                       distill_backward=rows_distill_backward)
