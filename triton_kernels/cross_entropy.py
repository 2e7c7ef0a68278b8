"""Fused label-smoothed cross-entropy: Triton forward and backward kernels.

Per row ``z`` of the 2-D logits (N, K) with target ``y``, these implement the
per-row kernel interface of ``lsce/interface.py`` (its docstring has the
formulas): the forward gives each row's loss, max ``m`` and
``log_s = log Σ exp(zc − m)`` in fp32 (fp64 for fp64 logits) from one read of
the row; the backward gives the gradient, in the logits' dtype, from one read
and one write per element, with ``p = exp((zc − m) − log_s)``. Every quantity
is relative to the row max (docs/design.md §1). Any reduction over rows
happens in the caller (``lsce/functional.py``).

Layout of the work: program ``(row, split)`` handles the columns
``[split * cols_per_split, (split + 1) * cols_per_split)`` of one row in
chunks of ``BLOCK``. With many rows there is one split per row; with few rows
and a long vocabulary the row is cut into several splits so that the GPU has
enough programs to run, and the forward's partial (max, Σexp, Σc·(max − z),
Σc) of each split are merged by ``_combine_kernel`` (see ``_launch_config``).

Options are compile-time switches (``HAS_*``), so the plain path carries no
code for weight, prior, z-loss, softcap or an upstream ``lse`` gradient.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# The per-row kernel interface these kernels implement (lsce/interface.py).
from lsce.interface import (Coefficients, RowOptions, check_rows, check_soft_rows, grad_buffer,
                            soft_target_grad_buffer)

__all__ = ["forward", "backward", "soft_forward", "soft_backward"]  # and distill_* by __getattr__ (at the end)

_ACC_DTYPE = {
    torch.float32: (torch.float32, tl.float32),
    torch.bfloat16: (torch.float32, tl.float32),
    torch.float16: (torch.float32, tl.float32),
    torch.float64: (torch.float64, tl.float64),
}

# Bytes of logits that one program loads per loop iteration: 16 KiB is 4096
# fp32 or 8192 bf16 values, enough in flight to stream at full bandwidth
# without spilling registers.
_BLOCK_BYTES = 16 * 1024
# Smallest block: tl.arange needs a power of two and tiny blocks only waste
# launch overhead.
_MIN_BLOCK = 16
# Programs wanted in flight when the GPU is unknown (the interpreter).
_DEFAULT_PROGRAMS = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _target_programs(device: torch.device) -> int:
    """Programs that keep every SM of ``device`` busy (a few per SM hide load latency)."""
    if device.type == "cuda" and not _interpreting():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_PROGRAMS


def _launch_config(N: int, K: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK, num_warps, n_splits, cols_per_split) for an (N, K) problem.

    A row is split only when N rows alone give fewer programs than the GPU
    wants; then into as many pieces as make up the difference, each a whole
    number of blocks. Many rows never split: in the forward a split costs a
    second (tiny) kernel and three partials per piece.
    """
    elem = dtype.itemsize
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(max(K, 1)), _BLOCK_BYTES // elem))
    # About 2 KiB of the block per warp: 16 bytes per thread per vector load, a few loads each.
    num_warps = min(16, max(4, block * elem // 2048))
    n_blocks = max(1, triton.cdiv(K, block))
    wanted = _target_programs(device)
    n_splits = 1 if N >= wanted else min(n_blocks, triton.cdiv(wanted, max(N, 1)))
    blocks_per_split = triton.cdiv(n_blocks, n_splits)
    n_splits = triton.cdiv(n_blocks, blocks_per_split)
    return block, num_warps, n_splits, blocks_per_split * block


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(softcap·tanh(z/softcap), tanh(z/softcap)); (z, z) without softcap.

    tanh is written from exp(−2|x|), which lies in [0, 1]: the interpreter
    has no libdevice tanh, and exp(2x) would overflow to inf/inf = NaN for
    large |x|.
    """
    if HAS_SOFTCAP:
        x = z / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        return softcap * t, t
    else:
        return z, z


@triton.jit
def _acc_options(eps, z_loss, softcap, uniform_c, ACC: tl.constexpr):
    """The float options in ACC. They arrive as fp64 so that fp64 logits get them unrounded."""
    return tl.full((), eps, ACC), tl.full((), z_loss, ACC), tl.full((), softcap, ACC), tl.full((), uniform_c, ACC)


@triton.jit
def _finite_or_zero(m):
    """The shift to subtract before exp: a running max of ±inf would make exp(inf − inf) = NaN
    (flash-attention issue 1930), so such a max is replaced by 0 — exp(−inf) is then 0 and exp(inf) inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _store_row(
    row, m, sumexp, dot, row_ptr, target_ptr, weight_ptr, coef_sum_ptr, loss_ptr, m_ptr, log_s_ptr,
    K, ignore_index, eps, z_loss, softcap, uniform_c, uniform_over,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_COEF: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Turns a row's (max, Σexp(zc − max), Σc·(max − zc)) into its loss, m and
    log_s and stores them: every term relative to the max, so that a confident
    row's (m − zc_y) + log_s is not the difference of two large numbers."""
    log_s = tl.log(sumexp)
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    # A target outside [0, K) that is not ignore_index: the true class is in
    # another vocabulary slice, and the row has no true-class term.
    own = valid & (y >= 0) & (y < K)
    y_safe = tl.where(own, y, 0)
    zc_y, _ = _capped(tl.load(row_ptr + y_safe).to(ACC), softcap, HAS_SOFTCAP)
    loss = (m - zc_y) + log_s
    if HAS_WEIGHT:
        loss = loss * tl.load(weight_ptr + y_safe).to(ACC)
    loss = tl.where(own, loss * (1.0 - eps), 0.0)
    if HAS_SMOOTHING:
        if HAS_COEF:
            loss += eps * (tl.load(coef_sum_ptr).to(ACC) * log_s + dot)
        else:
            loss += eps * (uniform_c * log_s + dot / uniform_over)
    if HAS_ZLOSS:
        lse = m + log_s
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(m_ptr + row, m)
    tl.store(log_s_ptr + row, log_s)


# Forward, per element of the logits: reads b bytes (the logit; plus 4 bytes of
# the class coefficients c, an L2-resident (K,) vector, when smoothing with a
# weight or prior) and writes nothing. Per row: reads the target (8 B), z_y
# (b) and w_y (4 B), writes loss, m and log_s (3 × 4 B; 8 B each for fp64) —
# or 4 partials of 4 B per split, which _combine_kernel reads back.
@triton.jit
def _forward_kernel(
    logits_ptr, target_ptr, weight_ptr, coef_ptr, coef_sum_ptr, loss_ptr, m_ptr, log_s_ptr, partial_ptr,
    N, K, row_stride, ignore_index, eps_arg: tl.float64, z_loss_arg: tl.float64, softcap_arg: tl.float64,
    uniform_c_arg: tl.float64, uniform_over, cols_per_split, n_splits,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_COEF: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    eps, z_loss, softcap, uniform_c = _acc_options(eps_arg, z_loss_arg, softcap_arg, uniform_c_arg, ACC)
    row = tl.program_id(0).to(tl.int64)  # int64: row * row_stride passes 2**31 on large N·K
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * row_stride
    col0 = split * cols_per_split

    # Online softmax: running max m and Σexp(zc − m), rescaled when m grows.
    # The smoothing term Σc·(zc − shift) is summed per lane relative to the
    # shift of its iteration (the subtraction exp needs anyway); `corr` moves
    # what was summed before to the current shift: + Σc_seen·(old − new).
    m = tl.full((), float("-inf"), ACC)
    sumexp = tl.full((), 0.0, ACC)
    dot = tl.zeros([BLOCK], ACC)  # per lane Σ c·(zc − shift) (Σ (zc − shift) for the uniform prior)
    corr = tl.full((), 0.0, ACC)
    seen = tl.full((), 0.0, ACC)  # Σ c over the columns so far (their count for the uniform prior)
    prev_shift = tl.full((), 0.0, ACC)
    for start in range(0, cols_per_split, BLOCK):
        cols = col0 + start + tl.arange(0, BLOCK)
        mask = cols < K
        # Upcast right after the load: the interpreter's tl.sum on raw bf16 is wrong.
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC)
        zc, _ = _capped(z, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            zc = tl.where(mask, zc, float("-inf"))  # the cap maps the −inf padding to −softcap
        m_new = tl.maximum(m, tl.max(zc, 0))
        shift = _finite_or_zero(m_new)
        d = zc - shift
        sumexp = sumexp * tl.exp(m - shift) + tl.sum(tl.exp(d), 0)
        m = m_new
        if HAS_SMOOTHING:
            corr += seen * (prev_shift - shift)
            prev_shift = shift
            # Zero the padding before multiplying: c · (−inf) is NaN even where c = 0.
            d_or_zero = tl.where(mask, d, 0.0)
            if HAS_COEF:
                c = tl.load(coef_ptr + cols, mask=mask, other=0.0).to(ACC)
                dot += c * d_or_zero
                seen += tl.sum(c, 0)
            else:
                dot += d_or_zero
                seen += (tl.minimum(col0 + start + BLOCK, K) - tl.minimum(col0 + start, K)).to(ACC)
    dot_sum = -(tl.sum(dot, 0) + corr)  # Σ c·(m − zc), m standing for its finite-or-zero shift

    if SPLIT:
        # Planes of (N, n_splits): max, Σexp, Σc·(max − zc), Σc.
        idx = row * n_splits + split
        plane = N * n_splits
        tl.store(partial_ptr + idx, m)
        tl.store(partial_ptr + plane + idx, sumexp)
        tl.store(partial_ptr + 2 * plane + idx, dot_sum)
        tl.store(partial_ptr + 3 * plane + idx, seen)
    else:
        _store_row(row, m, sumexp, dot_sum, row_ptr, target_ptr, weight_ptr, coef_sum_ptr, loss_ptr, m_ptr,
                   log_s_ptr, K, ignore_index, eps, z_loss, softcap, uniform_c, uniform_over,
                   ACC, HAS_WEIGHT, HAS_COEF, HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP)


# Combine, per row: reads n_splits × 4 partials (4 B each; 8 B for fp64), the
# target, z_y and w_y; writes loss, m and log_s. Nothing per element.
@triton.jit
def _combine_kernel(
    partial_ptr, logits_ptr, target_ptr, weight_ptr, coef_sum_ptr, loss_ptr, m_ptr, log_s_ptr,
    N, K, row_stride, ignore_index, eps_arg: tl.float64, z_loss_arg: tl.float64, softcap_arg: tl.float64,
    uniform_c_arg: tl.float64, uniform_over, n_splits,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_COEF: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
):
    eps, z_loss, softcap, uniform_c = _acc_options(eps_arg, z_loss_arg, softcap_arg, uniform_c_arg, ACC)
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, SPLITS_BLOCK)
    mask = idx < n_splits
    ptrs = partial_ptr + row * n_splits + idx
    plane = N * n_splits
    m_part = tl.load(ptrs, mask=mask, other=float("-inf"))
    sumexp_part = tl.load(ptrs + plane, mask=mask, other=0.0)
    m = tl.max(m_part, 0)
    shift = _finite_or_zero(m)
    # A split whose max is −inf has Σexp = 0: exp(−inf − shift) = 0 keeps it at 0.
    sumexp = tl.sum(sumexp_part * tl.exp(m_part - shift), 0)
    dot = 0.0
    if HAS_SMOOTHING:
        # Each split's Σc·(m_s − zc) moved to the row's max: + Σc_s·(m − m_s).
        dot_part = tl.load(ptrs + 2 * plane, mask=mask, other=0.0)
        seen_part = tl.load(ptrs + 3 * plane, mask=mask, other=0.0)
        dot = tl.sum(dot_part + seen_part * (shift - _finite_or_zero(m_part)), 0)
    _store_row(row, m, sumexp, dot, logits_ptr + row * row_stride, target_ptr, weight_ptr,
               coef_sum_ptr, loss_ptr, m_ptr, log_s_ptr, K, ignore_index, eps, z_loss, softcap, uniform_c,
               uniform_over, ACC, HAS_WEIGHT, HAS_COEF, HAS_SMOOTHING, HAS_ZLOSS, HAS_SOFTCAP)


# Backward, per element: reads the logit (b bytes; plus 4 B of c from L2 when
# smoothing with a weight or prior) and writes its gradient (b bytes). Per
# row: reads target, m, log_s, grad_loss, grad_lse and w_y.
@triton.jit
def _backward_kernel(
    grad_ptr, grad_loss_ptr, grad_loss_stride, grad_lse_ptr, grad_lse_stride,
    logits_ptr, target_ptr, weight_ptr, coef_ptr, coef_sum_ptr, m_ptr, log_s_ptr,
    K, row_stride, ignore_index, eps_arg: tl.float64, z_loss_arg: tl.float64, softcap_arg: tl.float64,
    uniform_c_arg: tl.float64, uniform_over, cols_per_split,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_COEF: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    eps, z_loss, softcap, uniform_c = _acc_options(eps_arg, z_loss_arg, softcap_arg, uniform_c_arg, ACC)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * K  # the gradient is contiguous (grad_buffer)
    col0 = split * cols_per_split

    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    own = valid & (y >= 0) & (y < K)  # else no true-class term (see _store_row)
    y_safe = tl.where(own, y, -1)  # -1 matches no column
    # g and h may be a scalar expanded to (N,): stride 0 reads the one value.
    g = tl.where(valid, tl.load(grad_loss_ptr + row * grad_loss_stride).to(ACC), 0.0)
    m = tl.load(m_ptr + row).to(ACC)
    log_s = tl.load(log_s_ptr + row).to(ACC)
    log_s2 = log_s * 1.4426950408889634
    if HAS_WEIGHT:
        w_y = tl.where(own, tl.load(weight_ptr + tl.maximum(y_safe, 0)).to(ACC), 0.0)
    else:
        w_y = tl.where(own, 1.0, 0.0).to(ACC)
    true_coef = g * (1.0 - eps) * w_y  # subtracted at k = y
    p_coef = (1.0 - eps) * w_y  # A = g·((1 − ε)·w_y + ε·C + 2λ·lse) + h multiplies p
    if HAS_SMOOTHING:
        if HAS_COEF:
            p_coef += eps * tl.load(coef_sum_ptr).to(ACC)
            smooth_coef = g * eps
        else:
            p_coef += eps * uniform_c
            smooth_coef = g * eps / uniform_over
    if HAS_ZLOSS:
        p_coef += 2.0 * z_loss * (m + log_s)
    p_coef = g * p_coef
    if HAS_GRAD_LSE:
        p_coef += tl.load(grad_lse_ptr + row * grad_lse_stride).to(ACC)

    for start in range(0, cols_per_split, BLOCK):
        cols = col0 + start + tl.arange(0, BLOCK)
        mask = cols < K
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC)
        zc, t = _capped(z, softcap, HAS_SOFTCAP)
        # p relative to the row max: exp(zc − lse) with an absolute lse rounded
        # to ACC loses p on rows far from 0 (randn + 1e6, rows of −1e30).
        if ACC == tl.float32:
            # exp as the GPU computes it (ex2 of x·log2 e), with log_s·log2 e
            # per row: (zc − m)·log2 e − that is one FMA, no more than exp(zc − lse).
            d = p_coef * tl.math.exp2((zc - m) * 1.4426950408889634 - log_s2)
        else:
            d = p_coef * tl.exp((zc - m) - log_s)
        if HAS_SMOOTHING:
            if HAS_COEF:
                d -= smooth_coef * tl.load(coef_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                d -= smooth_coef
        # The true-class term is subtracted in ACC before the store: rounding
        # p_y to bf16 first and then subtracting 1 loses everything at p_y ≈ 1
        # (Liger-Kernel issue 1329).
        d = tl.where(cols == y_safe, d - true_coef, d)
        if HAS_SOFTCAP:
            d *= 1.0 - t * t
        tl.store(grad_row_ptr + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)


def _check(logits: Tensor, target: Tensor) -> Tuple[torch.dtype, tl.dtype]:
    check_rows(logits, target)
    return _ACC_DTYPE[logits.dtype]


def _options(coef: Coefficients, opts: RowOptions, tl_acc) -> Tuple[tuple, dict]:
    """The kernels' scalar arguments after ``ignore_index`` (eps, z_loss, softcap,
    uniform_c, uniform_over) and their compile-time switches. ``coef.C`` is a
    device tensor when ``coef.c`` is given (read by the kernels: no host sync)
    and a number on the uniform path."""
    eps, z_loss, softcap = float(opts.label_smoothing), float(opts.z_loss), float(opts.softcap)
    has_coef = coef.c is not None
    scalars = (eps, z_loss, softcap, 0.0 if has_coef else float(coef.C), coef.uniform_over)
    flags = dict(ACC=tl_acc, HAS_WEIGHT=coef.weight is not None, HAS_COEF=has_coef, HAS_SMOOTHING=eps != 0.0,
                 HAS_ZLOSS=z_loss != 0.0, HAS_SOFTCAP=softcap != 0.0)
    return scalars, flags


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def forward(logits: Tensor, target: Tensor, coef: Coefficients,
            opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, m, log_s)`` of 2-D ``logits``: lsce.interface.RowKernels.forward.

    ``logits`` (N, K) with unit column stride and any row stride; ``target``
    (N,) int64. The outputs are (N,) fp32 (fp64 for fp64 logits).
    """
    acc, tl_acc = _check(logits, target)
    N, K = logits.shape
    loss, m, log_s = (torch.empty(N, dtype=acc, device=logits.device) for _ in range(3))
    if N == 0:
        return loss, m, log_s
    scalars, flags = _options(coef, opts, tl_acc)
    block, num_warps, n_splits, cols_per_split = _launch_config(N, K, logits.dtype, logits.device)
    partials = torch.empty((4, N, n_splits), dtype=acc, device=logits.device) if n_splits > 1 else None
    coef_sum = coef.C if coef.c is not None else None
    with _device_guard(logits):
        _forward_kernel[(N, n_splits)](
            logits, target, coef.weight, coef.c, coef_sum, loss, m, log_s, partials,
            N, K, logits.stride(0), opts.ignore_index, *scalars, cols_per_split, n_splits,
            SPLIT=n_splits > 1, BLOCK=block, num_warps=num_warps, **flags,
        )
        if n_splits > 1:
            _combine_kernel[(N,)](
                partials, logits, target, coef.weight, coef_sum, loss, m, log_s,
                N, K, logits.stride(0), opts.ignore_index, *scalars, n_splits,
                SPLITS_BLOCK=max(2, triton.next_power_of_2(n_splits)), num_warps=1, **flags,
            )
    return loss, m, log_s


def backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor, coef: Coefficients,
    opts: RowOptions, m: Tensor, log_s: Tensor, out: Optional[Tensor] = None,
) -> Tensor:
    """Gradient of ``Σ grad_loss·loss + Σ grad_lse·lse`` with respect to ``logits``:
    lsce.interface.RowKernels.backward.

    ``grad_loss`` / ``grad_lse`` (N,) or None for ``grad_lse``, any stride
    (an expanded scalar has stride 0); ``m`` and ``log_s`` from :func:`forward`.
    Returns a new contiguous (N, K) tensor in the logits' dtype, or ``out``
    (``lsce.interface.grad_buffer``): each program loads a block of its row
    and stores that same block, so ``out`` may be the logits themselves.
    """
    acc, tl_acc = _check(logits, target)
    N, K = logits.shape
    grad = grad_buffer(logits, out)
    if N == 0:
        return grad
    scalars, flags = _options(coef, opts, tl_acc)
    block, num_warps, n_splits, cols_per_split = _launch_config(N, K, logits.dtype, logits.device)
    with _device_guard(logits):
        _backward_kernel[(N, n_splits)](
            grad, grad_loss, grad_loss.stride(0), grad_lse, 0 if grad_lse is None else grad_lse.stride(0),
            logits, target, coef.weight, coef.c, coef.C if coef.c is not None else None, m, log_s,
            K, logits.stride(0), opts.ignore_index, *scalars, cols_per_split,
            HAS_GRAD_LSE=grad_lse is not None, BLOCK=block, num_warps=num_warps, **flags,
        )
    return grad


# ---------------------------------------------------------------------------
# Probability (soft) targets: lsce.interface.RowKernels.soft_forward / soft_backward.
# One program per row (rows are not split: a soft-target row carries a second
# (N, K) stream, the target, and the GPU has enough rows in training shapes).
# With a_k = w_k·((1 − ε)·t_k + ε/K) every quantity is relative to the row max.


@triton.jit
def _soft_a(t, w_ptr, cols, mask, eps, inv_k, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
            HAS_SMOOTHING: tl.constexpr):
    """a_k of a block of target values (0 in masked lanes)."""
    a = t
    if HAS_SMOOTHING:
        a = (1.0 - eps) * t + eps * inv_k
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, a, 0.0)


# Soft forward, per element: reads the logit and the target value (plus 4 B of
# the weight from L2 with a weight); per row writes loss, m, log_s and A.
@triton.jit
def _soft_forward_kernel(
    logits_ptr, target_ptr, weight_ptr, loss_ptr, m_ptr, log_s_ptr, mass_ptr,
    K, row_stride, target_row_stride, eps_arg: tl.float64, z_loss_arg: tl.float64, softcap_arg: tl.float64,
    inv_k_arg: tl.float64, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    eps, z_loss, softcap, inv_k = _acc_options(eps_arg, z_loss_arg, softcap_arg, inv_k_arg, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    t_ptr = target_ptr + row * target_row_stride
    # Running max m, Σexp(zc − shift), A = Σa and dev = Σa·(shift − zc) with
    # shift the finite running max: when it grows, dev grows by A·(new − old) >= 0.
    m = tl.full((), float("-inf"), ACC)
    sumexp = tl.full((), 0.0, ACC)
    mass = tl.full((), 0.0, ACC)
    dev = tl.full((), 0.0, ACC)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < K
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC)
        zc, _ = _capped(z, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            zc = tl.where(mask, zc, float("-inf"))
        t = tl.load(t_ptr + cols, mask=mask, other=0.0).to(ACC)
        a = _soft_a(t, weight_ptr, cols, mask, eps, inv_k, ACC, HAS_WEIGHT, HAS_SMOOTHING)
        old = _finite_or_zero(m)
        m_new = tl.maximum(m, tl.max(zc, 0))
        shift = _finite_or_zero(m_new)
        sumexp = sumexp * tl.exp(m - shift) + tl.sum(tl.exp(zc - shift), 0)
        # Masked lanes: a = 0 and shift − (−inf) = inf would give NaN; they add 0.
        dev = dev + mass * (shift - old) + tl.sum(tl.where(mask, a * (shift - zc), 0.0), 0)
        mass += tl.sum(a, 0)
        m = m_new
    log_s = tl.log(sumexp)
    loss = dev + mass * log_s
    if HAS_ZLOSS:
        loss += z_loss * (m + log_s) * (m + log_s)
    tl.store(loss_ptr + row, loss)
    tl.store(m_ptr + row, m)
    tl.store(log_s_ptr + row, log_s)
    tl.store(mass_ptr + row, mass)


# Soft backward, per element: reads the logit and the target value, writes the
# logits' gradient (and the target's with HAS_TARGET_GRAD).
@triton.jit
def _soft_backward_kernel(
    grad_ptr, grad_target_ptr, grad_loss_ptr, grad_loss_stride, grad_lse_ptr, grad_lse_stride,
    logits_ptr, target_ptr, weight_ptr, m_ptr, log_s_ptr, mass_ptr,
    K, row_stride, target_row_stride, eps_arg: tl.float64, z_loss_arg: tl.float64, softcap_arg: tl.float64,
    inv_k_arg: tl.float64, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, HAS_TARGET_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    eps, z_loss, softcap, inv_k = _acc_options(eps_arg, z_loss_arg, softcap_arg, inv_k_arg, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    t_ptr = target_ptr + row * target_row_stride
    m = tl.load(m_ptr + row).to(ACC)
    log_s = tl.load(log_s_ptr + row).to(ACC)
    g = tl.load(grad_loss_ptr + row * grad_loss_stride).to(ACC)
    p_coef = g * tl.load(mass_ptr + row).to(ACC)
    if HAS_ZLOSS:
        p_coef += 2.0 * z_loss * g * (m + log_s)
    if HAS_GRAD_LSE:
        p_coef += tl.load(grad_lse_ptr + row * grad_lse_stride).to(ACC)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < K
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC)
        zc, tc = _capped(z, softcap, HAS_SOFTCAP)
        t = tl.load(t_ptr + cols, mask=mask, other=0.0).to(ACC)
        a = _soft_a(t, weight_ptr, cols, mask, eps, inv_k, ACC, HAS_WEIGHT, HAS_SMOOTHING)
        d = p_coef * tl.exp((zc - m) - log_s) - g * a
        if HAS_SOFTCAP:
            d *= 1.0 - tc * tc
        tl.store(grad_ptr + row * K + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)
        if HAS_TARGET_GRAD:
            gt = g * (1.0 - eps) * ((m - zc) + log_s)
            if HAS_WEIGHT:
                gt *= tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
            tl.store(grad_target_ptr + row * K + cols, gt.to(grad_target_ptr.dtype.element_ty), mask=mask)


def _soft_config(logits: Tensor, target: Tensor, opts: RowOptions, weight: Optional[Tensor]):
    """(BLOCK, num_warps, scalars, flags) of a soft-target call: the block sized by the wider of the two dtypes."""
    acc, tl_acc = _check_soft(logits, target)
    wider = logits.dtype if logits.dtype.itemsize >= target.dtype.itemsize else target.dtype
    block, num_warps, _, _ = _launch_config(logits.shape[0], logits.shape[1], wider, logits.device)
    eps, z_loss, softcap = float(opts.label_smoothing), float(opts.z_loss), float(opts.softcap)
    flags = dict(ACC=tl_acc, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=eps != 0.0, HAS_ZLOSS=z_loss != 0.0,
                 HAS_SOFTCAP=softcap != 0.0)
    return acc, block, num_warps, (eps, z_loss, softcap, 1.0 / logits.shape[1]), flags


def _check_soft(logits: Tensor, target: Tensor) -> Tuple[torch.dtype, tl.dtype]:
    check_soft_rows(logits, target)
    return _ACC_DTYPE[logits.dtype]


def soft_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                 opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(loss, m, log_s, A)`` of probability targets: lsce.interface.RowKernels.soft_forward."""
    acc, block, num_warps, scalars, flags = _soft_config(logits, target, opts, weight)
    N, K = logits.shape
    loss, m, log_s, mass = (torch.empty(N, dtype=acc, device=logits.device) for _ in range(4))
    if N == 0:
        return loss, m, log_s, mass
    with _device_guard(logits):
        _soft_forward_kernel[(N,)](
            logits, target, weight, loss, m, log_s, mass, K, logits.stride(0), target.stride(0), *scalars,
            BLOCK=block, num_warps=num_warps, **flags,
        )
    return loss, m, log_s, mass


def soft_backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor, weight: Optional[Tensor],
    opts: RowOptions, m: Tensor, log_s: Tensor, mass: Tensor, out: Optional[Tensor] = None,
    target_grad: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(∂/∂logits, ∂/∂target or None)`` of probability targets: lsce.interface.RowKernels.soft_backward."""
    _, block, num_warps, scalars, flags = _soft_config(logits, target, opts, weight)
    N, K = logits.shape
    grad = grad_buffer(logits, out)
    grad_t = soft_target_grad_buffer(target) if target_grad else None
    if N == 0:
        return grad, grad_t
    with _device_guard(logits):
        _soft_backward_kernel[(N,)](
            grad, grad_t, grad_loss, grad_loss.stride(0), grad_lse, 0 if grad_lse is None else grad_lse.stride(0),
            logits, target, weight, m, log_s, mass, K, logits.stride(0), target.stride(0), *scalars,
            HAS_GRAD_LSE=grad_lse is not None, HAS_TARGET_GRAD=target_grad, BLOCK=block, num_warps=num_warps,
            **flags,
        )
    return grad, grad_t


def __getattr__(name: str):
    """The distillation launchers (distillation.py) in this namespace too, since
    lsce.ops.row_kernels("triton", …) returns this module. Imported on first use:
    distillation.py imports this module's helpers, so an import at the top or
    the end here would be a cycle that fails when distillation is imported first."""
    if name in ("distill_forward", "distill_backward"):
        from lsce.triton_kernels import distillation

        return getattr(distillation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
