"""The per-row kernel interface: what every backend implements, and what every
caller (lsce.ops, lsce.linear, lsce.distributed) hands it.

A backend is any object with the four functions of :class:`RowKernels`. Three
implement it: the C++/OpenMP kernels (``lsce.cpu``), the Triton kernels
(``lsce.triton_kernels.cross_entropy``) and the pure-PyTorch reference
(``lsce.reference.ROWS``). Each works on 2-D rows ``(N, K)`` with unit column
stride and any row stride; everything above it (shapes, argument and value
checks, class coefficients, reductions) is computed once by the caller.

For row ``i`` with target ``y = target[i]``, ``zc = softcap·tanh(z/softcap)``
(``zc = z`` when ``softcap`` is 0), ``m = max_k zc_k``, ``log_s = log Σ_k exp(zc_k − m)``,
``lse = m + log_s``, ``p = exp((zc − m) − log_s)``, ``own = 0 <= y < K`` and the
coefficients ``(w, c, C)`` of :class:`Coefficients`::

    loss = (1 − ε)·w_y·((m − zc_y) + log_s)·[own] + ε·(C·log_s + Σ_k c_k·(m − zc_k)) + λ·lse²

    A        = g·((1 − ε)·w_y·[own] + ε·C + 2·λ·lse) + h
    ∂/∂zc_k  = A·p_k − g·ε·c_k − g·(1 − ε)·w_y·[k = y]
    ∂/∂z_k   = ∂/∂zc_k · (1 − (zc_k/softcap)²)       (softcap only)

with ``g``, ``h`` the upstream gradients of the row's loss and lse. For full
rows (``C = Σ_k c_k``, as :func:`coefficients` makes it) the loss is the
smoothed cross-entropy ``(1 − ε)·w_y·(lse − zc_y) + ε·(C·lse − Σ_k c_k·zc_k) + λ·lse²``
and the gradient is its gradient. On a slice of the vocabulary (C is the full
row's, not the slice's Σ c; lsce.distributed) the loss is the slice's share
relative to the slice's own max, and the gradient is the formula above (the
gradient with m held constant). A row whose target is ``ignore_index`` has
loss 0 and ``g = 0`` (its m and log_s are still computed, and ``h`` still
reaches its gradient). A target outside ``[0, K)`` that is not
``ignore_index`` means that the row's true class lies outside these columns
(a vocabulary slice, lsce.distributed): the row gets no true-class term.
Callers range-check targets where they must lie inside (lsce.checks.check_values).

Precision: every quantity is formed relative to the row max (docs/design.md
§1). ``m − zc_k`` is exact wherever ``zc_k`` is within a factor 2 of ``m``, so
a confident row's loss ``(m − zc_y) + log_s`` is not the difference of two
large numbers, the smoothing term overflows only where log_softmax does, and
``p`` keeps its relative precision for rows at any offset (``randn + 1e6``,
rows of −1e30). That is why the forward returns ``m`` and ``log_s``
separately and the backward takes both: an absolute ``lse`` rounded to the
accumulation dtype cannot give ``exp(zc − lse)`` to better than its own ulp.
A row of only −inf has ``m = log_s = −inf`` (lse −inf); one holding NaN or
+inf has NaN ``log_s``.

**Probability targets** (``soft_forward`` / ``soft_backward``): row ``i`` has a
target row ``t`` (K,) of any float dtype instead of a class id. With
``a_k = w_k·((1 − ε)·t_k + ε/K)`` (PyTorch's rule: the target is mixed with
``ε/K`` first, then weighted), ``A = Σ_k a_k``, ``m = max_k zc_k`` and
``log_s = log Σ_k exp(zc_k − m)`` (so ``lse = m + log_s``), every quantity
relative to the row max::

    loss      = Σ_k a_k·(m − zc_k) + A·log_s + λ·(m + log_s)²
    p_k       = exp((zc_k − m) − log_s)
    ∂/∂zc_k   = (g·(A + 2·λ·(m + log_s)) + h)·p_k − g·a_k
    ∂/∂t_k    = g·(1 − ε)·w_k·((m − zc_k) + log_s)       (= −g·(1 − ε)·w_k·logp_k)

The forward returns ``(loss, m, log_s, A)`` per row and the backward takes
``(m, log_s, A)``: one read of the logits and the target per direction (the
backward needs ``A`` before its one pass). There is no ignore_index and no
out-of-slice target: every row counts. A row of only −inf logits has
``m = log_s = −inf`` and a NaN loss, as ``log_softmax`` gives.

**Distillation** (``distill_forward`` / ``distill_backward``): row ``i`` has the
student's logits ``z`` and a teacher's logits ``u`` (K,) of any float dtype, an
optional class id ``y``, and :class:`DistillOptions` (T, β, ε, ignore_index, W).
Relative to the row maxima ``m = max z`` and ``mt = max u``::

    log_s1 = log Σ exp(z − m)         p  = exp((z − m) − log_s1)            (CE, T = 1)
    log_sT = log Σ exp((z − m)/T)     ls = (z − m)/T − log_sT,  s = exp(ls)  (the tempered student)
    log_st = log Σ exp((u − mt)/T)    lt = (u − mt)/T − log_st, t = exp(lt)  (the tempered teacher)
    lm = log(β·t + (1 − β)·s)
    D  = (1 − β)·Σ t·(lt − lm) + β·Σ s·(ls − lm)    (β = 0: KL(t‖s); β = 1: KL(s‖t); 0·log 0 = 0)
    kd = T²·D
    ce = (1 − ε)·w_y·((m − z_y) + log_s1) + (ε/K)·(W·log_s1 + Σ_k w_k·(m − z_k))

and for the upstream ``g`` of kd and ``h`` of ce::

    ∂kd/∂z_k = T·(s_k − t_k)                  (β = 0)
             = T·s_k·(q_k − Q)                (β > 0; Q = Σ s·q)
      q_k    = β·(ls_k − lm_k) − (1 − β)·((1 − β)·t_k + β·s_k) / (β·t_k + (1 − β)·s_k)
    ∂ce/∂z_k = ((1 − ε)·w_y + (ε/K)·W)·p_k − (1 − ε)·w_y·[k = y] − (ε/K)·w_k

The forward returns ``(kd, ce, stats)``, ``stats`` (6, N) = ``[m, log_s1, log_sT,
mt, log_st, Q]`` (``Q`` is 0 for β = 0, D for β = 1), and the backward reads only
those: one read of z and u, one write of the gradient. β ∈ {0, 1} needs one read
of each row in the forward (the sums accumulate online), 0 < β < 1 two (lm
needs both normalisers). A row whose target is ``ignore_index`` has kd = ce = 0
and a zero gradient; without a target (None) every row counts and ce = 0.

Without weight or prior the gradient is ``g·(p − y_ls)``, ``y_ls = (1 − ε)·onehot(y) + ε/K``.
Everything is accumulated in fp32 (fp64 for fp64 logits); the gradient is
stored in the logits' dtype, the true-class term subtracted before that
rounding (Liger-Kernel issue 1329).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple, Union

import torch
from torch import Tensor

__all__ = ["RowOptions", "Coefficients", "RowKernels", "coefficients", "check_rows", "grad_buffer", "acc_dtype",
           "fixed_sum", "check_soft_rows", "soft_target_grad_buffer", "DistillOptions", "check_distill_rows"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowOptions(NamedTuple):
    """The scalar options of one call."""

    ignore_index: int
    label_smoothing: float  # ε in [0, 1]
    z_loss: float  # λ >= 0
    softcap: float  # > 0, or 0 for none


class DistillOptions(NamedTuple):
    """The scalar options of one distillation call (the module docstring's formulas)."""

    temperature: float  # T > 0
    beta: float  # β in [0, 1]
    label_smoothing: float  # ε in [0, 1]
    ignore_index: int
    # W = Σ_k w_k, computed once by the caller: with a weight, a 0-dim fp64 tensor on
    # the weight's device (a float would synchronise a CUDA call); without, K as a float.
    weight_sum: Union[float, Tensor]


class Coefficients(NamedTuple):
    """The class vectors of one call, in the accumulation dtype, on the logits' device."""

    weight: Optional[Tensor]  # (K,): w, whose w_y scales the true-class term; None: w ≡ 1
    c: Optional[Tensor]  # (K,): c_k of the smoothing term; None: uniform, c_k = 1 / uniform_over
    C: Union[Tensor, float]  # log_s's coefficient in the smoothing term (Σ c of full rows); 0-d tensor iff c is given
    uniform_over: int  # classes the uniform prior spreads over (the full vocabulary)


def fixed_sum(x: Tensor, chunk: int = 16384) -> Tensor:
    """x.sum() in fixed blocks: bitwise the same for any thread count (torch.sum splits > 32768 elements)."""
    n = x.numel()
    if n <= chunk:
        return x.sum()
    return torch.nn.functional.pad(x.reshape(-1), (0, (-n) % chunk)).view(-1, chunk).sum(1).sum()


def coefficients(K: int, weight: Optional[Tensor], prior: Optional[Tensor], label_smoothing: float,
                 dtype: torch.dtype, device: torch.device) -> Coefficients:
    """``c = π ⊙ w`` (π = ``prior``, or uniform ``1/K``) and ``C = Σ c`` for full rows of K classes.

    ``c`` is None, and the kernels take their uniform path, without weight and
    prior or without smoothing (the smoothing term is then absent). ``C`` is
    summed in fp64 in fixed blocks, then rounded once: the same bits on every
    backend and for any thread count. No host synchronisation.
    """
    w = None if weight is None else weight.to(dtype).contiguous()
    if not label_smoothing or (weight is None and prior is None):
        return Coefficients(w, None, 1.0, K)
    c = torch.full((K,), 1.0 / K, dtype=dtype, device=device) if prior is None else prior.to(dtype)
    if w is not None:
        c = c * w
    return Coefficients(w, c.contiguous(), fixed_sum(c.double()).to(dtype), K)


def check_rows(logits: Tensor, target: Tensor) -> None:
    """What every backend takes (RowKernels): float 2-D rows with unit column stride, one target per row."""
    if logits.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"lsce kernels: logits dtype {logits.dtype} is not one of fp32, bf16, fp16, fp64")
    # Rows may overlap (an expanded row has stride 0); with one class the column stride is never used.
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError("lsce kernels: logits must be 2-D rows with unit column stride")
    if target.shape != logits.shape[:1] or (logits.shape[1] == 0 and logits.shape[0] > 0):
        raise ValueError(f"lsce kernels: target {tuple(target.shape)} for logits {tuple(logits.shape)}: "
                         "one target per row and at least one class")


def check_soft_rows(logits: Tensor, target: Tensor) -> None:
    """What every backend's soft_forward/soft_backward take: float 2-D rows with
    unit column stride, and a float target of the same shape with unit column stride."""
    check_rows(logits, logits.new_empty(logits.shape[:1], dtype=torch.int64))
    if target.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"lsce kernels: target dtype {target.dtype} is not one of fp32, bf16, fp16, fp64")
    if target.shape != logits.shape or (target.shape[1] > 1 and target.stride(1) != 1):
        raise ValueError(f"lsce kernels: probability target {tuple(target.shape)} for logits "
                         f"{tuple(logits.shape)}: the same shape, with unit column stride")


def check_distill_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor]) -> None:
    """What every backend's distill_forward/distill_backward take: student rows as
    check_rows takes logits, a float teacher of their shape with unit column stride,
    and one int64 target per row or None."""
    check_rows(student, student.new_empty(student.shape[:1], dtype=torch.int64) if target is None else target)
    if teacher.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"lsce kernels: teacher dtype {teacher.dtype} is not one of fp32, bf16, fp16, fp64")
    if teacher.shape != student.shape or (teacher.shape[1] > 1 and teacher.stride(1) != 1):
        raise ValueError(f"lsce kernels: teacher logits {tuple(teacher.shape)} for student logits "
                         f"{tuple(student.shape)}: the same shape, with unit column stride")


def soft_target_grad_buffer(target: Tensor) -> Tensor:
    """Where soft_backward writes the target's gradient: a new contiguous tensor in its dtype."""
    return torch.empty(target.shape, dtype=target.dtype, device=target.device)


def grad_buffer(logits: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Where a backward kernel writes the gradient of 2-D ``logits``: a new
    contiguous tensor, or ``out``, which may be the contiguous logits themselves
    (every kernel reads an element before it writes it, and never after; how
    lsce.linear keeps one buffer per chunk) but may not overlap them otherwise."""
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


class RowKernels(Protocol):
    """The functions every backend implements (see the module docstring): class
    indices (forward, backward) and probability targets (soft_forward, soft_backward).

    Shapes: ``logits`` (N, K), unit column stride, any row stride >= 0 (an
    expanded row has stride 0); ``target`` (N,) int64, contiguous; the class
    vectors of ``coef`` contiguous (K,); ``m``, ``log_s``, ``grad_loss``,
    ``grad_lse`` (N,) in the accumulation dtype, ``grad_loss``/``grad_lse`` any
    stride (an expanded scalar has stride 0).
    """

    def forward(self, logits: Tensor, target: Tensor, coef: Coefficients,
                opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-row ``(loss, m, log_s)``, each (N,) in the accumulation dtype, from
        one read of the logits (the row's lse is ``m + log_s``)."""

    def backward(self, grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
                 coef: Coefficients, opts: RowOptions, m: Tensor, log_s: Tensor,
                 out: Optional[Tensor] = None) -> Tensor:
        """The gradient of ``Σ g·loss + Σ h·lse`` with respect to the logits, in
        their dtype, from one read of them and one write, with ``p = exp((zc − m) − log_s)``
        from the forward's ``m`` and ``log_s``: into ``out`` when given
        (:func:`grad_buffer`; it may be the logits), else into a new tensor."""

    def soft_forward(self, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                     opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row ``(loss, m, log_s, A)`` of probability targets (the module
        docstring's formulas), each (N,) in the accumulation dtype, from one read
        of the logits and of the target. ``target`` (N, K) of any float dtype,
        unit column stride (:func:`check_soft_rows`); ``weight`` (K,) in the
        accumulation dtype or None; ``opts.ignore_index`` is not used."""

    def soft_backward(self, grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
                      weight: Optional[Tensor], opts: RowOptions, m: Tensor, log_s: Tensor, mass: Tensor,
                      out: Optional[Tensor] = None, target_grad: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """``(∂/∂logits, ∂/∂target or None)`` of ``Σ g·loss + Σ h·(m + log_s)``,
        in the logits' (target's) dtype, from one read of the logits and the
        target and one write of each gradient; the logits' gradient into ``out``
        when given (:func:`grad_buffer`), the target's (``target_grad``) into a
        new contiguous tensor."""

    def distill_forward(self, student: Tensor, teacher: Tensor, target: Optional[Tensor], weight: Optional[Tensor],
                        opts: DistillOptions) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-row ``(kd, ce, stats)`` of distillation (the module docstring's
        formulas): kd, ce (N,) and stats (6, N) in the accumulation dtype.
        ``teacher`` (N, K) of any float dtype, unit column stride
        (:func:`check_distill_rows`); ``target`` (N,) int64 or None; ``weight``
        (K,) in the accumulation dtype or None."""

    def distill_backward(self, grad_kd: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                         target: Optional[Tensor], weight: Optional[Tensor], opts: DistillOptions, stats: Tensor,
                         out: Optional[Tensor] = None) -> Tensor:
        """The student's gradient of ``Σ g·kd + Σ h·ce``, in its dtype, from one
        read of the student and the teacher and one write; into ``out`` when
        given (:func:`grad_buffer`; it may be the student)."""
