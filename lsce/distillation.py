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

:func:`linear_distillation_loss` takes the student's last hidden states and
LM head (and a live teacher's) instead of logits, in row chunks: the chunk
loop of lsce.linear (its LogitChunks and GradSums), a chunk's logits (the
student's, the teacher's) existing only while that chunk is computed, and
the weight gradient summed in place over chunks. With ``mean`` or ``sum`` on
CPU the gradients are computed in the forward's chunks (4 matmuls in all: no
logits recomputed); otherwise the backward recomputes each chunk's logits
(6). Memory holds a few chunk-sized temporaries, never N×K. A second
derivative (``create_graph=True``), torch.compile and torch.func go through
the same chunks as differentiable PyTorch ops under activation checkpointing.

**Kernels**: a dense teacher goes to the registered op
``lsce::distillation_forward`` / ``_backward`` (the per-row interface of
lsce/interface.py: C++ on CPU, Triton on CUDA, ``backend=`` as
lsce.cross_entropy takes it), one read of the student and the teacher per
direction; on CPU in eager mode the forward also writes the gradient for the
reduction's upstream (ops.FusedDistillStep). The statement both are tested
against is lsce.reference.distillation_loss. A top-k teacher is computed with
PyTorch ops on the gathered (N, k) columns, its cross-entropy term by lsce's
kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import checks, ops
from .reference import divergence, softmax_divergence, tempered_divergence
from .functional import cross_entropy, mean_denominators
from .interface import acc_dtype
from .functional import needs_differentiable_statement
from .linear import GradSums, LogitChunks, default_chunk_size

__all__ = ["distillation_loss", "linear_distillation_loss", "divergence"]

TOPK_MASS = ("renormalize", "remainder")
_CHUNK_ELEMS = 1 << 22  # elements of the (rows, K) temporaries per chunk


class _Settings(NamedTuple):
    temperature: float
    alpha: float
    beta: float
    label_smoothing: float
    weight: Optional[Tensor]
    ignore_index: int
    topk_mass: str
    backend: str


def _chunk_terms(z: Tensor, t: Tensor, ids: Optional[Tensor], y: Optional[Tensor], s: _Settings,
                 zk: Optional[Tensor] = None):
    """Per-row ``T²·D_i`` and ``CE_i`` of student logits z (n, K) (0 on ignored rows): the
    registered op for a dense teacher t (n, K), PyTorch ops for a top-k one (ids, t: (n, k)).
    ``zk``: z's k gathered columns as a tensor of their own, for the renormalised top-k's D."""
    if ids is None:
        kd, ce, _ = torch.ops.lsce.distillation_forward(z, t, y, s.weight, s.temperature, s.beta, s.label_smoothing,
                                                        s.ignore_index, s.backend)
        return kd, ce
    if zk is None:
        kd = tempered_divergence(z, t, ids, s.temperature, s.beta, s.topk_mass)
    else:
        kd = softmax_divergence(zk, t, s.temperature, s.beta)
    kd = kd * s.temperature ** 2
    if y is None:
        return kd, torch.zeros_like(kd)
    ce = cross_entropy(z, y, s.weight, ignore_index=s.ignore_index, reduction="none",
                       label_smoothing=s.label_smoothing, out_dtype=kd.dtype, backend=s.backend)
    return torch.where(y != s.ignore_index, kd, 0), ce


def _rows(student, teacher, ids, target, N: int, chunk_rows: int, s: _Settings):
    """Per-row ``T²·D_i`` and ``CE_i`` (each (N,), 0 on ignored rows) in row chunks.

    ``student(i, j)`` gives the student's logits of rows [i, j) (K columns),
    ``teacher(i, j)`` the teacher's logits or top-k log-probabilities. With
    more than one chunk each runs under activation checkpointing, so only its
    inputs are kept and its logits are recomputed in the backward.
    """

    def chunk(i: int, j: int):
        z = student(i, j)
        with torch.no_grad():
            t = teacher(i, j)
        return _chunk_terms(z, t, None if ids is None else ids[i:j], None if target is None else target[i:j], s)

    if N <= chunk_rows:
        return chunk(0, N)
    run = functools.partial(checkpoint, chunk, use_reentrant=False) if torch.is_grad_enabled() else chunk
    parts = [run(i, min(i + chunk_rows, N)) for i in range(0, N, chunk_rows)]
    return torch.cat([kd for kd, _ in parts]), torch.cat([ce for _, ce in parts])


def _row_chunks(x: Tensor, rows: int):
    """``(i, j) -> x[i:j]`` for the chunks of ``rows`` rows that _rows asks for, cut by one
    split: a slice per chunk would give each chunk's backward a zero gradient of x's whole
    size to add into (time quadratic in the number of chunks); the split's backward
    concatenates the chunks' gradients once."""
    pieces = x.split(rows)
    return lambda i, j: pieces[i // rows]


def _chunk_grad(z: Tensor, t: Tensor, ids: Optional[Tensor], y: Optional[Tensor], s: _Settings, g: Tensor,
                h: Tensor):
    """(d, kd, ce) of a chunk of student logits z (n, K): the per-row terms and their
    gradient d (n, K) for upstreams g, h (n,) (autograd of _chunk_terms on the chunk alone).

    The renormalised top-k's D reads only k columns: its gradient, taken with respect to
    those columns, is added into the CE's at them, rather than scattered into an (n, K)
    tensor of its own and summed with it (two chunk-sized buffers fewer)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        zk = z.detach().gather(1, ids).requires_grad_() if ids is not None and s.topk_mass == "renormalize" else None
        kd, ce = _chunk_terms(z, t, ids, y, s, zk)
        pairs = [(out, up) for out, up in ((kd, g), (ce, h)) if out.requires_grad]
        wrt = (z,) if zk is None else (z, zk)
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [u for _, u in pairs], allow_unused=True)
    d, dk = grads[0], (None if zk is None else grads[1])
    if d is None:  # only D, through zk
        d = torch.zeros_like(z)
    if dk is not None:
        d.scatter_add_(1, ids, dk.to(d.dtype))
    return d, kd.detach(), ce.detach()


class _LinearDistill(torch.autograd.Function):
    """Per-row (kd, ce) of the student's head ``F.linear(x, W, b)`` against a live
    teacher's head (tx, tW, tb) or a top-k teacher (ids, tlp), row chunk by row chunk
    (lsce.linear's LogitChunks for both heads, GradSums for the student's gradients).

    ``expected`` (2,) or None: the upstreams [g, h] the reduction's backward will send
    (_fused_upstream). Given, the forward computes the gradients for them in its chunks,
    and the backward hands them out when the upstreams are those (else recomputes)."""

    @staticmethod
    def forward(ctx, x, W, b, tx, tW, tb, ids, tlp, target, s, rows, expected):
        N, acc = x.shape[0], acc_dtype(x.dtype)
        ctx.save_for_backward(x, W, b, tx, tW, tb, ids, tlp, target)
        ctx.s, ctx.rows, ctx.expected = s, rows, expected
        ctx.mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
        ctx.set_materialize_grads(False)
        kd, ce = (torch.empty(N, dtype=acc, device=x.device) for _ in range(2))
        ctx.grads = None if expected is None else GradSums(x, W, b, ctx.mask)
        g, h = (None, None) if expected is None else (expected[0].expand(rows), expected[1].expand(rows))
        for i, j, z, t, c_ids, c_y in _LinearDistill._chunks(x, W, b, tx, tW, tb, ids, tlp, target, rows):
            if ctx.grads is None:
                kd[i:j], ce[i:j] = _chunk_terms(z, t, c_ids, c_y, s)
                continue
            d, kd[i:j], ce[i:j] = _chunk_grad(z, t, c_ids, c_y, s, g[: j - i], h[: j - i])
            ctx.grads.add(d, x[i:j], W, i, j)
        return kd, ce

    @staticmethod
    def _chunks(x, W, b, tx, tW, tb, ids, tlp, target, rows):
        """(i, j, student logits, teacher logits or top-k log-probabilities, ids, target) of each chunk."""
        teacher = LogitChunks(tx, tW, tb, rows) if tx is not None else (
            (i, min(i + rows, x.shape[0]), None) for i in range(0, x.shape[0], rows))
        for (i, j, z), (_, _, t) in zip(LogitChunks(x, W, b, rows), teacher):
            yield (i, j, z, tlp[i:j] if t is None else t, None if ids is None else ids[i:j],
                   None if target is None else target[i:j])

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        x, W, b, tx, tW, tb, ids, tlp, target = ctx.saved_tensors
        s, rows, expected, mask = ctx.s, ctx.rows, ctx.expected, ctx.mask
        zeros = x.new_zeros(x.shape[0], dtype=acc_dtype(x.dtype))
        grad_kd = zeros if grad_kd is None else grad_kd
        grad_ce = zeros if grad_ce is None else grad_ce
        none = (None,) * 9
        if torch.is_grad_enabled():  # create_graph=True: the chunks as differentiable ops
            kd, ce = _linear_rows_checkpointed(x, W, b, tx, tW, tb, ids, tlp, target, s, rows)
            wrt = [v for v, m in zip((x, W, b), mask) if m]
            got = iter(torch.autograd.grad((kd, ce), wrt, (grad_kd, grad_ce), create_graph=True, allow_unused=True))
            return (*(next(got) if m else None for m in mask), *none)
        grads, ctx.grads = ctx.grads, None  # handed out once
        if grads is None or not ops.upstreams_match(expected, grad_kd, grad_ce):  # expected: CPU only (ops.fusable)
            grads = GradSums(x, W, b, mask)
            for i, j, z, t, c_ids, c_y in _LinearDistill._chunks(x, W, b, tx, tW, tb, ids, tlp, target, rows):
                d, _, _ = _chunk_grad(z, t, c_ids, c_y, s, grad_kd[i:j], grad_ce[i:j])
                grads.add(d, x[i:j], W, i, j)
        gi, gw, gb = grads.tensors(x, W, b, final=True)
        return (*(g if m else None for g, m in zip((gi, gw, gb), mask)), *none)


def _linear_rows_checkpointed(x, W, b, tx, tW, tb, ids, tlp, target, s, rows):
    """_LinearDistill's (kd, ce) as differentiable PyTorch ops: each chunk under
    activation checkpointing (its logits recomputed in the backward)."""
    if tx is not None:
        teacher = lambda i, j: F.linear(tx[i:j].detach(), tW.detach(), None if tb is None else tb.detach())  # noqa: E731
    else:
        teacher = lambda i, j: tlp[i:j].detach()  # noqa: E731
    hidden = _row_chunks(x, rows)
    student = lambda i, j: F.linear(hidden(i, j), W, b)  # noqa: E731
    return _rows(student, teacher, ids, target, x.shape[0], rows, s)


def _reduce(kd: Tensor, ce: Tensor, target: Optional[Tensor], reduction: str, s: _Settings) -> Tensor:
    """The module docstring's reductions of the per-row terms."""
    if reduction == "none":
        return s.alpha * kd + (1 - s.alpha) * ce
    if reduction == "sum":
        return s.alpha * kd.sum() + (1 - s.alpha) * ce.sum()
    if target is None:
        return s.alpha * kd.sum() / kd.shape[0]
    w = None if s.weight is None else s.weight.to(kd.dtype)
    valid, count, total_weight = mean_denominators(target, w, s.ignore_index, kd.dtype)
    return s.alpha * kd.sum() / count + (1 - s.alpha) * ce.sum() / total_weight


def _fused_upstream(N: int, target: Optional[Tensor], reduction: str, s: _Settings, acc) -> Tensor:
    """The upstreams [g, h] (2,) that _reduce's backward sends every row's kd and ce when
    the loss gets gradient 1, by running that backward (the same bits, for the comparison
    in ops.FusedDistillStep's backward)."""
    kd, ce = (torch.zeros(N, dtype=acc, requires_grad=True) for _ in range(2))
    with torch.enable_grad():
        g, h = torch.autograd.grad(_reduce(kd, ce, target, reduction, s), (kd, ce), allow_unused=True)
    return torch.stack([g[0], torch.zeros((), dtype=acc) if h is None else h[0]])


def _loss(rows, target, N: int, s: _Settings, reduction, dtype, device, return_parts):
    acc = acc_dtype(dtype)
    kd, ce = rows() if N else (torch.zeros(0, dtype=acc, device=device),) * 2
    out = _reduce(kd, ce, target, reduction, s).to(dtype)
    return (out, kd.detach(), ce.detach()) if return_parts else out


def _float(name: str, t, shape, device) -> None:
    if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(f"lsce.distillation_loss: {name} must be a float tensor of shape {tuple(shape)} on {device}"
                         + ("" if not torch.is_tensor(t) else f", got {t.dtype} {tuple(t.shape)} on {t.device}"))


def _check_teacher_and_settings(N, K, device, target, dense, ids, logprobs, temperature, alpha, beta, topk_mass,
                                weight, reduction, label_smoothing, ignore_index, backend) -> _Settings:
    """The checks common to both entry points, given the student's N rows of K classes; ``dense``: whether
    a dense teacher (logits or hidden states) was given."""
    if dense == (ids is not None or logprobs is not None):
        raise ValueError("lsce.distillation_loss: give either a dense teacher (logits, or hidden states and "
                         "weight) or teacher_topk_ids with teacher_topk_logprobs")
    if not dense:
        if ids is None or logprobs is None:
            raise ValueError("lsce.distillation_loss: teacher_topk_ids and teacher_topk_logprobs go together")
        if not torch.is_tensor(ids) or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != N \
                or ids.device != device:
            raise ValueError(f"lsce.distillation_loss: teacher_topk_ids must be int64 (N={N}, k) on {device}")
        _float("teacher_topk_logprobs", logprobs, ids.shape, device)
        if topk_mass not in TOPK_MASS:
            raise ValueError(f"lsce.distillation_loss: topk_mass must be one of {TOPK_MASS}, got {topk_mass!r}")
        if topk_mass == "remainder" and temperature != 1:
            raise ValueError("lsce.distillation_loss: topk_mass='remainder' needs temperature=1 (the stored "
                             "log-probabilities fix the teacher's distribution at T = 1)")
        bad_ids, bad_lp = ((ids < 0) | (ids >= K)).any(), (logprobs > 0).any()
        if ids.device.type == "cuda" or torch.compiler.is_compiling():  # no host synchronisation, no graph break
            torch._assert_async(~bad_ids, "lsce.distillation_loss: teacher_topk_ids out of [0, K)")
            torch._assert_async(~bad_lp, "lsce.distillation_loss: teacher_topk_logprobs above 0")
        elif bad_ids:
            raise IndexError(f"lsce.distillation_loss: teacher_topk_ids out of range [0, {K})")
        elif bad_lp:
            raise ValueError("lsce.distillation_loss: teacher_topk_logprobs must be log-probabilities (<= 0)")
    if not temperature > 0:
        raise ValueError(f"lsce.distillation_loss: temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
        raise ValueError(f"lsce.distillation_loss: alpha and beta must lie in [0, 1], got {alpha}, {beta}")
    if alpha < 1 and target is None:
        raise ValueError("lsce.distillation_loss: a target is needed unless alpha=1")
    checks.check_options(K, device, weight=weight, reduction=reduction, label_smoothing=label_smoothing,
                         backend=backend)
    ignore_index = checks.as_ignore_index(ignore_index)
    if target is not None:
        checks.check_target(target, device)
        if tuple(target.shape) != (N,):
            raise ValueError(f"lsce.distillation_loss: target must have shape ({N},), got {tuple(target.shape)}")
        if not torch.compiler.is_compiling():  # traced, the registered ops check the values
            checks.check_values(target, None, K, ignore_index)
    return _Settings(temperature, alpha, beta, float(label_smoothing), weight, ignore_index, topk_mass, backend)


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
    backend: str = "auto",
):
    """``alpha·T²·D_β(teacher, student) + (1 − alpha)·CE_ε(student, target)``; see the module docstring.

    Shapes: ``student_logits`` (N, K); ``target`` (N,) class ids or None
    (alpha=1); ``teacher_logits`` (N, K), or ``teacher_topk_ids`` (N, k) int64
    with ``teacher_topk_logprobs`` (N, k). With ``return_parts=True`` also
    returns ``(kd, ce)``, each (N,) without gradient: ``T²·D_i`` and ``CE_i``
    (0 on ignored rows).
    """
    if not torch.is_tensor(student_logits) or student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError("lsce.distillation_loss: student_logits must be a float (N, K) tensor")
    (N, K), device = student_logits.shape, student_logits.device
    if teacher_logits is not None:
        _float("teacher_logits", teacher_logits, (N, K), device)
    s = _check_teacher_and_settings(N, K, device, target, teacher_logits is not None, teacher_topk_ids,
                                    teacher_topk_logprobs, float(temperature), float(alpha), float(beta), topk_mass,
                                    weight, reduction, label_smoothing, ignore_index, backend)
    teacher = (teacher_logits if teacher_logits is not None else teacher_topk_logprobs).detach()
    if teacher_logits is not None:
        rows = functools.partial(_chunk_terms, student_logits, teacher, None, target, s)  # one call: O(N) saved
        if reduction != "none" and ops.fusable(student_logits, backend):
            expected = _fused_upstream(N, target, reduction, s, acc_dtype(student_logits.dtype))
            rows = functools.partial(ops.FusedDistillStep.apply, student_logits, teacher, target, weight,
                                     s.temperature, s.beta, s.label_smoothing, s.ignore_index, expected)
    else:
        chunk_rows = max(1, _CHUNK_ELEMS // max(1, K))
        rows = functools.partial(_rows, _row_chunks(student_logits, chunk_rows), lambda i, j: teacher[i:j],
                                 teacher_topk_ids, target, N, chunk_rows, s)
    return _loss(rows, target, N, s, reduction, student_logits.dtype, device, return_parts)


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_topk_ids: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.0,
    label_smoothing: float = 0.0,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    topk_mass: str = "renormalize",
    return_parts: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
):
    """:func:`distillation_loss` of the LM heads' logits, ``student_hidden @ student_weight.T + student_bias``
    (and the live teacher's likewise), computed in chunks of ``chunk_size`` rows (default: as
    lsce.linear_cross_entropy chooses), so that neither model's N×K logits exist whole.

    Shapes: ``student_hidden`` (N, H), ``student_weight`` (K, H), ``student_bias`` (K,);
    ``teacher_hidden`` (N, H_t), ``teacher_weight`` (K, H_t), ``teacher_bias`` (K,);
    or the top-k form of :func:`distillation_loss`. Gradients reach the student's hidden
    states, weight and bias; none reaches the teacher.
    """
    if not torch.is_tensor(student_hidden) or student_hidden.dim() != 2 or not student_hidden.is_floating_point():
        raise ValueError("lsce.distillation_loss: student_hidden must be a float (N, H) tensor")
    (N, H), device = student_hidden.shape, student_hidden.device
    if not torch.is_tensor(student_weight) or student_weight.dim() != 2:
        raise ValueError("lsce.distillation_loss: student_weight must be a (K, H) tensor")
    K = student_weight.shape[0]
    _float("student_weight", student_weight, (K, H), device)
    if student_bias is not None:
        _float("student_bias", student_bias, (K,), device)
    dense = teacher_hidden is not None or teacher_weight is not None
    if dense:
        if teacher_hidden is None or teacher_weight is None or teacher_hidden.dim() != 2:
            raise ValueError("lsce.distillation_loss: a live teacher needs teacher_hidden (N, H_t) and "
                             "teacher_weight (K, H_t)")
        _float("teacher_hidden", teacher_hidden, (N, teacher_hidden.shape[1]), device)
        _float("teacher_weight", teacher_weight, (K, teacher_hidden.shape[1]), device)
        if teacher_bias is not None:
            _float("teacher_bias", teacher_bias, (K,), device)
    s = _check_teacher_and_settings(N, K, device, target, dense, teacher_topk_ids, teacher_topk_logprobs,
                                    float(temperature), float(alpha), float(beta), topk_mass, weight, reduction,
                                    label_smoothing, ignore_index, backend)
    checks.check_chunk_size(chunk_size)
    rows = max(1, chunk_size or default_chunk_size(N, H, K, student_hidden.dtype))
    args = (student_hidden, student_weight, student_bias, *(
        (v.detach() if v is not None else None) for v in (teacher_hidden, teacher_weight, teacher_bias,
                                                          teacher_topk_ids, teacher_topk_logprobs)), target, s, rows)
    if torch.compiler.is_compiling() or needs_differentiable_statement(student_hidden, student_weight, student_bias):
        run = functools.partial(_linear_rows_checkpointed, *args)
    else:
        # Gradients in the forward where the reduction's upstream is known and may be compared on the host.
        fused = reduction != "none" and any(v is not None and ops.fusable(v, backend)
                                            for v in (student_hidden, student_weight, student_bias))
        expected = _fused_upstream(N, target, reduction, s, acc_dtype(student_hidden.dtype)) if fused else None
        run = functools.partial(_LinearDistill.apply, *args, expected)
    return _loss(run, target, N, s, reduction, student_hidden.dtype, device, return_parts)
