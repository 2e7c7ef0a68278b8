"""Knowledge distillation with label-smoothed cross-entropy: Triton forward and backward kernels.

These implement the per-row distillation functions of lsce/interface.py (issue 16;
``distill_forward`` / ``distill_backward``; its docstring and
``lsce.reference.ROWS`` state them): per row ``i`` of the student's logits ``z`` and the
teacher's logits ``u`` (both (N, K), any float dtypes, unit column stride),
at temperature ``T`` and skew ``β``,

    m, log_s1, log_sT   the student's max, log Σ exp(z − m), log Σ exp((z − m)/T)
    mt, log_st          the teacher's max, log Σ exp((u − mt)/T)
    ls = (z − m)/T − log_sT,  lt = (u − mt)/T − log_st,  s = exp(ls),  t = exp(lt)
    kd = T²·D_β(t, s)   (β = 0: KL(t‖s); β = 1: KL(s‖t); else the skew Jensen–Shannon mixture)
    ce = (1 − ε)·w_y·((m − z_y) + log_s1) + (ε/K)·(W·log_s1 + Σ_k w_k·(m − z_k))

Every quantity is relative to the row maxima. The mixture ``lm = log(β·t + (1 − β)·s)``
enters only through ``x = log(β/(1 − β)) + (lt − ls)``::

    lt − lm = −log β − softplus(−x),   ls − lm = −log(1 − β) − softplus(x)
    β·t/mix = sigmoid(x),              (1 − β)·s/mix = sigmoid(−x)

so each element costs two exps and one log beyond s and t, no division, and ``lt − ls`` is
formed from the two rows' differences to their maxima (never from two
absolute log-probabilities).

One program per row, looping over K in blocks (rows are not split: a
distillation row carries two (K,) streams, and training shapes have many
rows). The forward reads both rows once for β ∈ {0, 1} (the KL sums
accumulate online with max rescaling) and twice for 0 < β < 1 (the maxima and
sums, then D and Q); the backward reads both once and writes the student's
gradient once, from the forward's ``stats`` (6, N): m, log_s1, log_sT, mt,
log_st, Q (Σ s_k·q_k for 0 < β < 1, D for β = 1, 0 for β = 0).

The launchers are imported by ``cross_entropy`` (lsce.ops.row_kernels("triton", …)
returns that module) on first use; this module imports cross_entropy's helpers.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from lsce.interface import DistillOptions, check_distill_rows, grad_buffer
from lsce.triton_kernels.cross_entropy import _ACC_DTYPE, _device_guard, _finite_or_zero, _launch_config

__all__ = ["distill_forward", "distill_backward"]

# The divergence's compile-time branch (KL_MODE).
_FORWARD_KL, _REVERSE_KL, _MIXTURE = 0, 1, 2


def _kl_mode(beta: float) -> int:
    return _FORWARD_KL if beta == 0.0 else _REVERSE_KL if beta == 1.0 else _MIXTURE


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1] to about an ulp of the result, without libdevice (the
    interpreter has none) and without a division (whose slow path spills on sm_90):
    v = 1 + e rounds by c = e − (v − 1), and log(1 + e) = log(v) + c/v + O(c²) with
    |c·(1 − 1/v)| <= ulp(1)/2 · e/(1 + e)."""
    v = 1.0 + e
    return tl.log(v) + (e - (v - 1.0))


@triton.jit
def _mixture_terms(dz, du, inv_t, log_st, log_sT, logit_beta):
    """Per element of a row (dz = z − m, du = u − mt), with x = log(β/(1 − β)) + (lt − ls):
    (ls, lt, softplus(x), softplus(−x), sigmoid(x), sigmoid(−x))."""
    ls = dz * inv_t - log_sT
    lt = du * inv_t - log_st
    x = logit_beta + (lt - ls)
    e = tl.exp(-tl.abs(x))
    sp_abs = _log1p(e)
    r = tl.exp(-sp_abs)  # 1/(1 + e) without a division
    pos = x >= 0
    return (ls, lt, tl.maximum(x, 0.0) + sp_abs, tl.maximum(-x, 0.0) + sp_abs,
            tl.where(pos, r, e * r), tl.where(pos, e * r, r))


@triton.jit
def _mixture_sq(s, ls_minus_lm, sig_x, sig_neg, beta, q_sig_x):
    """s_k·q_k of the mixture, q_k = β·(ls − lm) − (1 − β)·((1 − β)·t + β·s)/mix, where
    (1 − β)·((1 − β)·t + β·s)/mix = ((1 − β)²/β)·sigmoid(x) + β·sigmoid(−x); 0 where s = 0."""
    q = beta * ls_minus_lm - (q_sig_x * sig_x + beta * sig_neg)
    return tl.where(s > 0, s * q, 0.0)


@triton.jit
def _weight_sum(weight_sum_ptr, weight_sum_arg, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """W = Σ w: read from the device with a weight (the caller left it there rather
    than synchronise to pass a float); the float argument (K) without."""
    if HAS_WEIGHT:
        w_sum = tl.load(weight_sum_ptr).to(ACC)
    else:
        w_sum = tl.full((), weight_sum_arg, ACC)
    return w_sum


@triton.jit
def _row_target(row, target_ptr, weight_ptr, ignore_index, ACC: tl.constexpr, HAS_TARGET: tl.constexpr,
                HAS_WEIGHT: tl.constexpr):
    """(y, valid, w_y) of a row: y = 0 and w_y = 0 on ignored rows and without a target
    (every row then counts for kd and has no CE)."""
    if HAS_TARGET:
        y = tl.load(target_ptr + row)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)
        if HAS_WEIGHT:
            w_y = tl.where(valid, tl.load(weight_ptr + y).to(ACC), 0.0)
        else:
            w_y = tl.where(valid, 1.0, 0.0).to(ACC)
    else:
        y = tl.full((), 0, tl.int64)
        valid = tl.full((), 1, tl.int1)
        w_y = tl.full((), 0.0, ACC)
    return y, valid, w_y


# Forward, per element: reads the student's logit (bs bytes) and the teacher's
# (bt bytes) once for β ∈ {0, 1}, twice for 0 < β < 1 (second pass: the same
# row again, mostly from L2 for K up to a few 10k); plus 4 B (8 B fp64) of the
# weight, an L2-resident (K,) vector, with smoothing and a weight. Writes
# nothing per element. Per row: reads the target (8 B), z_y and w_y; writes
# kd, ce and 6 stats (8 × 4 B; 8 B each for fp64).
@triton.jit
def _distill_forward_kernel(
    student_ptr,  # (N, K) student logits, unit column stride
    teacher_ptr,  # (N, K) teacher logits, unit column stride
    target_ptr,  # (N,) int64, or None (HAS_TARGET false)
    weight_ptr,  # (K,) ACC, or None (HAS_WEIGHT false)
    weight_sum_ptr,  # () fp64: Σ w, or None (HAS_WEIGHT false: weight_sum_arg, K)
    kd_ptr,  # (N,) ACC
    ce_ptr,  # (N,) ACC
    stats_ptr,  # (6, N) ACC contiguous: m, log_s1, log_sT, mt, log_st, Q
    N, K, student_row_stride, teacher_row_stride, ignore_index,
    temperature_arg: tl.float64, inv_t_arg: tl.float64, eps_arg: tl.float64, weight_sum_arg: tl.float64,
    beta_arg: tl.float64, log_beta_arg: tl.float64, log1m_beta_arg: tl.float64, logit_beta_arg: tl.float64,
    q_sig_x_arg: tl.float64,
    ACC: tl.constexpr, KL_MODE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr,
):
    inv_t = tl.full((), inv_t_arg, ACC)
    row = tl.program_id(0).to(tl.int64)  # int64: row * row_stride passes 2**31 on large N·K
    z_row = student_ptr + row * student_row_stride
    u_row = teacher_ptr + row * teacher_row_stride

    # Online: running maxima and sums, rescaled when a max grows (shifts are the
    # finite running maxima). For a KL end, kl = Σ p·(dp − dq) (p the weighting
    # side, exp((· − shift)/T)): when the shifts move, the old terms' weights
    # scale like p's sum and their differences move by the change of the shifts.
    m = tl.full((), float("-inf"), ACC)
    mt = tl.full((), float("-inf"), ACC)
    sum1 = tl.full((), 0.0, ACC)
    sum_st = tl.full((), 0.0, ACC)  # Σ exp((z − m)/T)
    sum_tt = tl.full((), 0.0, ACC)  # Σ exp((u − mt)/T)
    kl = tl.full((), 0.0, ACC)
    dot = tl.full((), 0.0, ACC)  # Σ w·(z − shift) (smoothing)
    seen = tl.full((), 0.0, ACC)  # Σ w over the columns so far
    sh = tl.full((), 0.0, ACC)
    sht = tl.full((), 0.0, ACC)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < K
        # Upcast right after the load: the interpreter's tl.sum on raw bf16 is wrong.
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(ACC)
        u = tl.load(u_row + cols, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        mt_new = tl.maximum(mt, tl.max(u, 0))
        sh_new = _finite_or_zero(m_new)
        sht_new = _finite_or_zero(mt_new)
        dz = z - sh_new
        du = u - sht_new
        e_s = tl.exp(dz * inv_t)
        e_t = tl.exp(du * inv_t)
        scale_s = tl.exp((m - sh_new) * inv_t)  # 0 while m is −inf
        scale_t = tl.exp((mt - sht_new) * inv_t)
        moved = ((sht - sht_new) - (sh - sh_new)) * inv_t  # change of (u − shift_t) − (z − shift)
        if KL_MODE == 0:  # Σ t·(lt − ls): t weights
            kl = scale_t * (kl + sum_tt * moved) + tl.sum(tl.where(e_t > 0, e_t * (du - dz), 0.0), 0) * inv_t
        if KL_MODE == 1:  # Σ s·(ls − lt): s weights
            kl = scale_s * (kl - sum_st * moved) + tl.sum(tl.where(e_s > 0, e_s * (dz - du), 0.0), 0) * inv_t
        sum1 = sum1 * tl.exp(m - sh_new) + tl.sum(tl.exp(dz), 0)
        sum_st = sum_st * scale_s + tl.sum(e_s, 0)
        sum_tt = sum_tt * scale_t + tl.sum(e_t, 0)
        if HAS_SMOOTHING:
            # Zero the padding before multiplying: w · (−inf) is NaN even where w = 0.
            dz0 = tl.where(mask, dz, 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
                dot = dot + seen * (sh - sh_new) + tl.sum(w * dz0, 0)
                seen += tl.sum(w, 0)
            else:
                dot = dot + seen * (sh - sh_new) + tl.sum(dz0, 0)
                seen += tl.minimum(start + BLOCK, K).to(ACC) - start
        m = m_new
        mt = mt_new
        sh = sh_new
        sht = sht_new
    log_s1 = tl.log(sum1)
    log_sT = tl.log(sum_st)
    log_st = tl.log(sum_tt)

    if KL_MODE == 0:
        d = kl / sum_tt + (log_sT - log_st)
        q_stat = tl.full((), 0.0, ACC)
    elif KL_MODE == 1:
        d = kl / sum_st + (log_st - log_sT)
        q_stat = d
    else:
        beta = tl.full((), beta_arg, ACC)
        log_beta = tl.full((), log_beta_arg, ACC)
        log1m_beta = tl.full((), log1m_beta_arg, ACC)
        logit_beta = tl.full((), logit_beta_arg, ACC)
        q_sig_x = tl.full((), q_sig_x_arg, ACC)
        # Second pass: D and Q from the final maxima and sums.
        d = tl.full((), 0.0, ACC)
        q_stat = tl.full((), 0.0, ACC)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < K
            z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(ACC)
            u = tl.load(u_row + cols, mask=mask, other=float("-inf")).to(ACC)
            ls, lt, sp_pos, sp_neg, sig_x, sig_neg = _mixture_terms(z - sh, u - sht, inv_t, log_st, log_sT,
                                                                   logit_beta)
            s = tl.exp(ls)
            t = tl.exp(lt)
            ls_lm = -log1m_beta - sp_pos
            d_el = tl.where(t > 0, (1.0 - beta) * t * (-log_beta - sp_neg), 0.0)
            d_el += tl.where(s > 0, beta * s * ls_lm, 0.0)
            # Summed per block (no per-lane accumulators: registers)
            d += tl.sum(d_el, 0)
            q_stat += tl.sum(_mixture_sq(s, ls_lm, sig_x, sig_neg, beta, q_sig_x), 0)
    kd = tl.full((), temperature_arg, ACC) * tl.full((), temperature_arg, ACC) * d

    y, valid, w_y = _row_target(row, target_ptr, weight_ptr, ignore_index, ACC, HAS_TARGET, HAS_WEIGHT)
    ce = tl.full((), 0.0, ACC)
    if HAS_TARGET:
        eps = tl.full((), eps_arg, ACC)
        z_y = tl.load(z_row + y).to(ACC)
        ce = (1.0 - eps) * w_y * ((m - z_y) + log_s1)
        if HAS_SMOOTHING:
            # Σ w·(m − z) = −dot (m standing for its finite shift).
            ce += eps / K * (_weight_sum(weight_sum_ptr, weight_sum_arg, ACC, HAS_WEIGHT) * log_s1 - dot)
    tl.store(kd_ptr + row, tl.where(valid, kd, 0.0))
    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + N + row, log_s1)
    tl.store(stats_ptr + 2 * N + row, log_sT)
    tl.store(stats_ptr + 3 * N + row, mt)
    tl.store(stats_ptr + 4 * N + row, log_st)
    tl.store(stats_ptr + 5 * N + row, q_stat)


# Backward, per element: reads the student's logit (bs bytes) and the
# teacher's (bt bytes) once and writes the gradient (bs bytes); plus 4 B (8 B
# fp64) of the weight from L2 with smoothing and a weight. Per row: reads the
# 6 stats, g, h, the target and w_y (8 B each for fp64, else 4 B; target 8 B).
@triton.jit
def _distill_backward_kernel(
    grad_ptr,  # (N, K) contiguous, the student's dtype
    grad_kd_ptr, grad_kd_stride,  # (N,) ACC, any stride (0: an expanded scalar)
    grad_ce_ptr, grad_ce_stride,  # (N,) ACC, any stride
    student_ptr,  # (N, K) student logits, unit column stride
    teacher_ptr,  # (N, K) teacher logits, unit column stride
    target_ptr,  # (N,) int64, or None (HAS_TARGET false)
    weight_ptr,  # (K,) ACC, or None (HAS_WEIGHT false)
    weight_sum_ptr,  # () fp64: Σ w, or None (HAS_WEIGHT false: weight_sum_arg, K)
    stats_ptr,  # (6, N) ACC contiguous, from the forward
    N, K, student_row_stride, teacher_row_stride, ignore_index,
    temperature_arg: tl.float64, inv_t_arg: tl.float64, eps_arg: tl.float64, weight_sum_arg: tl.float64,
    beta_arg: tl.float64, log_beta_arg: tl.float64, log1m_beta_arg: tl.float64, logit_beta_arg: tl.float64,
    q_sig_x_arg: tl.float64,
    ACC: tl.constexpr, KL_MODE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr,
):
    temperature = tl.full((), temperature_arg, ACC)
    inv_t = tl.full((), inv_t_arg, ACC)
    row = tl.program_id(0).to(tl.int64)
    z_row = student_ptr + row * student_row_stride
    u_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * K  # the gradient is contiguous (grad_buffer)

    m = tl.load(stats_ptr + row)
    log_s1 = tl.load(stats_ptr + N + row)
    log_sT = tl.load(stats_ptr + 2 * N + row)
    mt = tl.load(stats_ptr + 3 * N + row)
    log_st = tl.load(stats_ptr + 4 * N + row)
    q_stat = tl.load(stats_ptr + 5 * N + row)

    y, valid, w_y = _row_target(row, target_ptr, weight_ptr, ignore_index, ACC, HAS_TARGET, HAS_WEIGHT)
    # T·g multiplies ∂D/∂(z/T); g and h may be a scalar expanded to (N,) (stride 0).
    g_t = temperature * tl.load(grad_kd_ptr + row * grad_kd_stride).to(ACC)
    if HAS_TARGET:
        eps = tl.full((), eps_arg, ACC)
        h = tl.load(grad_ce_ptr + row * grad_ce_stride).to(ACC)
        p_coef = h * ((1.0 - eps) * w_y + eps / K * _weight_sum(weight_sum_ptr, weight_sum_arg, ACC, HAS_WEIGHT))
        true_coef = h * (1.0 - eps) * w_y  # subtracted at k = y, before the rounding
        smooth_coef = h * eps / K
    if KL_MODE == 2:
        beta = tl.full((), beta_arg, ACC)
        log1m_beta = tl.full((), log1m_beta_arg, ACC)
        logit_beta = tl.full((), logit_beta_arg, ACC)
        q_sig_x = tl.full((), q_sig_x_arg, ACC)

    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < K
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC)
        u = tl.load(u_row + cols, mask=mask, other=0.0).to(ACC)
        dz = z - m
        if KL_MODE == 0:  # T·(s − t)
            s = tl.exp(dz * inv_t - log_sT)
            t = tl.exp((u - mt) * inv_t - log_st)
            d = g_t * (s - t)
        elif KL_MODE == 1:  # T·s·((ls − lt) − D)
            ls = dz * inv_t - log_sT
            lt = (u - mt) * inv_t - log_st
            s = tl.exp(ls)
            d = g_t * tl.where(s > 0, s * ((ls - lt) - q_stat), 0.0)
        else:  # T·(s·q − s·Q)
            ls, _, sp_pos, _, sig_x, sig_neg = _mixture_terms(dz, u - mt, inv_t, log_st, log_sT, logit_beta)
            s = tl.exp(ls)
            sq = _mixture_sq(s, -log1m_beta - sp_pos, sig_x, sig_neg, beta, q_sig_x)
            d = g_t * tl.where(s > 0, sq - s * q_stat, 0.0)
        if HAS_TARGET:
            d += p_coef * tl.exp(dz - log_s1)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    d -= smooth_coef * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
                else:
                    d -= smooth_coef
            # The true-class term in ACC before the store (Liger-Kernel issue 1329).
            d = tl.where(cols == y, d - true_coef, d)
            d = tl.where(valid, d, 0.0)
        tl.store(grad_row + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)


def _check(student: Tensor, teacher: Tensor, target: Optional[Tensor]) -> Tuple[torch.dtype, tl.dtype]:
    check_distill_rows(student, teacher, target)
    return _ACC_DTYPE[student.dtype]


def _config(student: Tensor, target: Optional[Tensor], weight: Optional[Tensor], opts: DistillOptions, acc, tl_acc):
    """(weight_sum, scalars, meta) of a call: W on the device (None without a weight),
    the float options after ``ignore_index`` (as fp64,
    so that fp64 rows get them unrounded), the compile-time switches, the block and warps."""
    T, beta, eps = float(opts.temperature), float(opts.beta), float(opts.label_smoothing)
    mode = _kl_mode(beta)
    if mode == _MIXTURE:
        log_beta, log1m_beta = math.log(beta), math.log1p(-beta)
        mixture = (beta, log_beta, log1m_beta, log_beta - log1m_beta, (1.0 - beta) ** 2 / beta)
    else:
        mixture = (beta, 0.0, 0.0, 0.0, 0.0)
    W = opts.weight_sum
    if weight is None:  # W = K: a float argument
        weight_sum = None
    else:  # W on the device, as a 0-dim fp64 tensor (a float is placed there: test calls)
        weight_sum = torch.as_tensor(W, dtype=torch.float64, device=student.device).reshape(1)
        W = 0.0
    scalars = (T, 1.0 / T, eps, float(W), *mixture)
    # The block sized by the accumulation dtype, whatever the logits' dtypes: two
    # rows' values are live per element (four at the mixture), so 16 KiB of ACC
    # values per stream (16 per thread; 8 for fp64) rather than 16 KiB of input
    # (32 bf16 per thread: 128-182 registers at 0 < β < 1 on sm_80-sm_100).
    block, num_warps, _, _ = _launch_config(student.shape[0], student.shape[1], acc, student.device)
    if mode == _MIXTURE and block >= 32:
        # Half again at 0 < β < 1 (8 values per thread, 4 for fp64: still whole 128-bit
        # loads), whose forward second pass and backward keep ~8 values per element live.
        block //= 2
    has_target = target is not None
    meta = dict(ACC=tl_acc, KL_MODE=mode, HAS_TARGET=has_target, HAS_WEIGHT=has_target and weight is not None,
                HAS_SMOOTHING=has_target and eps != 0.0, BLOCK=block, num_warps=num_warps)
    return weight_sum, scalars, meta


def distill_forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], weight: Optional[Tensor],
                    opts: DistillOptions) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(kd, ce, stats)``: kd and ce (N,) and stats (6, N), in fp32 (fp64 for fp64 students).

    ``opts`` is a DistillOptions (temperature, beta, label_smoothing, ignore_index,
    weight_sum). No host synchronisation: every option is a Python number but the
    weight sum, which stays a tensor on the device.
    """
    acc, tl_acc = _check(student, teacher, target)
    N, K = student.shape
    kd = torch.empty(N, dtype=acc, device=student.device)
    ce = torch.empty(N, dtype=acc, device=student.device)
    stats = torch.empty((6, N), dtype=acc, device=student.device)
    if N == 0:
        return kd, ce, stats
    weight_sum, scalars, meta = _config(student, target, weight, opts, acc, tl_acc)
    with _device_guard(student):
        _distill_forward_kernel[(N,)](
            student, teacher, target, weight, weight_sum, kd, ce, stats,
            N, K, student.stride(0), teacher.stride(0), int(opts.ignore_index), *scalars, **meta,
        )
    return kd, ce, stats


def distill_backward(grad_kd: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor, target: Optional[Tensor],
                     weight: Optional[Tensor], opts: DistillOptions, stats: Tensor,
                     out: Optional[Tensor] = None) -> Tensor:
    """The student's gradient of ``Σ_i grad_kd[i]·kd[i] + grad_ce[i]·ce[i]`` (0 on ignored rows),
    in the student's dtype: a new contiguous (N, K) tensor, or ``out`` (which may be the
    contiguous student itself: each program reads a block before it writes that block).

    ``grad_kd`` / ``grad_ce`` (N,) in the accumulation dtype, any stride (0: an expanded
    scalar); ``stats`` (6, N) from :func:`distill_forward` with the same arguments.
    """
    acc, tl_acc = _check(student, teacher, target)
    N, K = student.shape
    grad = grad_buffer(student, out)
    if N == 0:
        return grad
    stats = stats.contiguous()
    weight_sum, scalars, meta = _config(student, target, weight, opts, acc, tl_acc)
    with _device_guard(student):
        _distill_backward_kernel[(N,)](
            grad, grad_kd, grad_kd.stride(0), grad_ce, grad_ce.stride(0), student, teacher, target, weight, weight_sum,
            stats,
            N, K, student.stride(0), teacher.stride(0), int(opts.ignore_index), *scalars, **meta,
        )
    return grad
