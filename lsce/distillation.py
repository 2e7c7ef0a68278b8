"""``lsce.distillation_loss``: knowledge distillation mixed with label-smoothed cross-entropy.

Per row ``i`` whose target is not ``ignore_index`` (every row without a target)::

    loss_i = alpha · T² · D_β(t_i, s_i) + (1 − alpha) · CE_ε(z_i, y_i)

with ``s = softmax(z / T)`` the student's tempered distribution, ``t`` the
teacher's (below) and ``CE_ε`` lsce's label-smoothed cross-entropy of the
untempered student logits (its ``weight``, ``ignore_index``, ``label_smoothing``).

**The divergence** (the skew Jensen–Shannon family, exact at both ends)::

    m   = β · t + (1 − β) · s
    D_β = (1 − β) · KL(t ‖ m) + β · KL(s ‖ m)

β = 0 gives ``m = s`` and forward KL, ``KL(t ‖ s)``; β = 1 gives ``m = t`` and
reverse KL, ``KL(s ‖ t)``; β = ½ is the symmetric Jensen–Shannon divergence.
(Weighting ``KL(t ‖ m)`` by β, as some libraries write it, makes both ends 0
unless special-cased; this form needs no special case.)

**The teacher**: dense logits of the student's vocabulary, ``t = softmax(z_t / T)``;
or an offline teacher's top-k, ids and log-probabilities (N, k) at
temperature 1. ``topk_mass="renormalize"`` compares both distributions
restricted to the k ids and renormalised there (teacher ``softmax(lp / T)``,
student ``softmax(z[ids] / T)``), for any T. ``topk_mass="remainder"`` keeps the
mass outside the k as one more bucket, ``1 − Σ exp(lp)`` for the teacher and
``1 − Σ s[ids]`` for the student; the stored log-probabilities fix the
teacher's distribution at T = 1, so it needs ``temperature=1``. No gradient
reaches the teacher.

**Reductions**: ``none`` gives ``loss_i`` (0 on ignored rows); ``sum`` adds
them; ``mean`` is ``alpha·T²·(Σ_i D_i) / (rows counted) + (1 − alpha)·CE_ε``
with CE's own mean (``F.cross_entropy``'s: divided by ``Σ w_y``).

This is computed with PyTorch ops in row chunks under activation
checkpointing (memory: a few chunk-sized fp32 temporaries, not N×K); no
fused kernel yet.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import checks
from .functional import cross_entropy, mean_denominators
from .interface import acc_dtype

__all__ = ["distillation_loss", "divergence"]

TOPK_MASS = ("renormalize", "remainder")
_CHUNK_ELEMS = 1 << 22  # elements of the (rows, K) temporaries per chunk


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ_k p_k·(log p_k − log q_k) over the last dimension, with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0).sum(-1)


def divergence(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    """D_β(t, s) per row from log-probabilities (…, K) (see the module docstring)."""
    if beta == 0:
        return _kl(log_t, log_s)
    if beta == 1:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_t + torch.log(torch.tensor(beta, dtype=log_t.dtype)),
                            log_s + torch.log1p(torch.tensor(-beta, dtype=log_s.dtype)))
    return (1 - beta) * _kl(log_t, log_m) + beta * _kl(log_s, log_m)


def _log_remainder(log_p: Tensor) -> Tensor:
    """log(1 − Σ exp(log_p)) over the last dimension, clamped at log 0 (the teacher's: no gradient)."""
    mass = log_p.exp().sum(-1, keepdim=True).clamp(max=1)
    return torch.log1p(-mass)


def _chunk_divergence(z, teacher, ids, temperature, beta, topk_mass):
    """D_β per row of one chunk of student logits z (n, K), in the accumulation dtype."""
    z = z.to(acc_dtype(z.dtype)) / temperature
    if ids is None:  # dense teacher logits
        return divergence(F.log_softmax(teacher.to(z.dtype) / temperature, -1), F.log_softmax(z, -1), beta)
    lp = teacher.to(z.dtype)
    if topk_mass == "renormalize":
        return divergence(F.log_softmax(lp / temperature, -1), F.log_softmax(z.gather(1, ids), -1), beta)
    lse = torch.logsumexp(z, -1, keepdim=True)
    log_s = z.gather(1, ids) - lse
    if ids.shape[1] < z.shape[1]:  # the student's remainder from its own logits, not 1 − Σ (cancellation)
        rest = torch.logsumexp(z.scatter(1, ids, float("-inf")), -1, keepdim=True) - lse
        lp, log_s = torch.cat([lp, _log_remainder(lp)], -1), torch.cat([log_s, rest], -1)
    return divergence(lp, log_s, beta)


def _divergence_rows(z, teacher, ids, temperature, beta, topk_mass):
    """D_β per row of (N, K) student logits, in row chunks, each recomputed in the backward."""
    rows = max(1, _CHUNK_ELEMS // max(1, z.shape[1]))
    parts = []
    for i in range(0, z.shape[0], rows):
        args = (z[i:i + rows], teacher[i:i + rows], None if ids is None else ids[i:i + rows])
        if z.requires_grad and torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_divergence, *args, temperature, beta, topk_mass, use_reentrant=False))
        else:
            parts.append(_chunk_divergence(*args, temperature, beta, topk_mass))
    return torch.cat(parts) if parts else z.new_zeros(0, dtype=acc_dtype(z.dtype))


def _check(student, target, teacher_logits, ids, logprobs, temperature, alpha, beta, topk_mass):
    if not torch.is_tensor(student) or student.dim() != 2 or not student.is_floating_point():
        raise ValueError("lsce.distillation_loss: student_logits must be a float (N, K) tensor")
    N, K = student.shape
    if (teacher_logits is None) == (ids is None and logprobs is None):
        raise ValueError("lsce.distillation_loss: give either teacher_logits or teacher_topk_ids with "
                         "teacher_topk_logprobs")
    if teacher_logits is not None:
        if not torch.is_tensor(teacher_logits) or teacher_logits.shape != student.shape or \
                not teacher_logits.is_floating_point() or teacher_logits.device != student.device:
            raise ValueError(f"lsce.distillation_loss: teacher_logits must be float {tuple(student.shape)} on "
                             f"{student.device}, as the student's")
    else:
        if ids is None or logprobs is None:
            raise ValueError("lsce.distillation_loss: teacher_topk_ids and teacher_topk_logprobs go together")
        if ids.dim() != 2 or ids.shape[0] != N or logprobs.shape != ids.shape or ids.dtype != torch.int64 \
                or not logprobs.is_floating_point() or ids.device != student.device or logprobs.device != student.device:
            raise ValueError(f"lsce.distillation_loss: teacher_topk_ids (int64) and teacher_topk_logprobs (float) "
                             f"must both be (N={N}, k) on {student.device}")
        bad = ((ids < 0) | (ids >= K)).any()
        if ids.device.type == "cuda":  # no host synchronisation on CUDA
            torch._assert_async(~bad, "lsce.distillation_loss: teacher_topk_ids out of [0, K)")
        elif bad:
            raise IndexError(f"lsce.distillation_loss: teacher_topk_ids out of range [0, {K})")
        if topk_mass not in TOPK_MASS:
            raise ValueError(f"lsce.distillation_loss: topk_mass must be one of {TOPK_MASS}, got {topk_mass!r}")
        if topk_mass == "remainder" and temperature != 1:
            raise ValueError("lsce.distillation_loss: topk_mass='remainder' needs temperature=1 (the stored "
                             "log-probabilities fix the teacher's distribution at T = 1)")
    if not temperature > 0:
        raise ValueError(f"lsce.distillation_loss: temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
        raise ValueError(f"lsce.distillation_loss: alpha and beta must lie in [0, 1], got {alpha}, {beta}")
    if alpha < 1 and target is None:
        raise ValueError("lsce.distillation_loss: a target is needed unless alpha=1")


def distillation_loss(
    student_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    teacher_topk_ids: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.0,
    label_smoothing: float = 0.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    topk_mass: str = "renormalize",
    return_parts: bool = False,
):
    """``alpha·T²·D_β(teacher, student) + (1 − alpha)·CE_ε(student, target)``; see the module docstring.

    Shapes: ``student_logits`` (N, K); ``target`` (N,) class ids or None
    (alpha=1); ``teacher_logits`` (N, K), or ``teacher_topk_ids`` (N, k) int64
    with ``teacher_topk_logprobs`` (N, k). With ``return_parts=True`` also
    returns ``(kd, ce)``, each (N,) without gradient: ``T²·D_i`` and ``CE_i``
    (0 on ignored rows).
    """
    temperature, alpha, beta = float(temperature), float(alpha), float(beta)
    _check(student_logits, target, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, alpha,
           beta, topk_mass)
    checks.check_options(student_logits.shape[1], student_logits.device, weight=weight, reduction=reduction,
                         label_smoothing=label_smoothing)
    ignore_index = checks.as_ignore_index(ignore_index)
    acc = acc_dtype(student_logits.dtype)
    N = student_logits.shape[0]
    teacher = (teacher_logits if teacher_logits is not None else teacher_topk_logprobs).detach()
    ids = None if teacher_topk_ids is None else teacher_topk_ids.detach()
    if target is not None:
        checks.check_logits(student_logits, target)
        valid = target != ignore_index
    else:
        valid = torch.ones(N, dtype=torch.bool, device=student_logits.device)

    kd = torch.where(valid, _divergence_rows(student_logits, teacher, ids, temperature, beta, topk_mass), 0)
    kd = kd * temperature ** 2
    ce_rows = None
    if target is not None:
        ce_rows = cross_entropy(student_logits, target, weight, ignore_index=ignore_index, reduction="none",
                                label_smoothing=label_smoothing, out_dtype=acc)
    if reduction == "none":
        out = alpha * kd + (0.0 if ce_rows is None else (1 - alpha) * ce_rows)
    elif reduction == "sum":
        out = alpha * kd.sum() + (0.0 if ce_rows is None else (1 - alpha) * ce_rows.sum())
    else:
        out = alpha * kd.sum() / valid.sum().to(acc)
        if ce_rows is not None:
            w = None if weight is None else weight.to(acc)
            out = out + (1 - alpha) * ce_rows.sum() / mean_denominators(target, w, ignore_index, acc)[2]
    out = out.to(student_logits.dtype)
    if not return_parts:
        return out
    ce = torch.zeros(N, dtype=acc, device=student_logits.device) if ce_rows is None else ce_rows.detach()
    return out, kd.detach(), ce
