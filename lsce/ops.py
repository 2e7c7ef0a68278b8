"""The registered ops, ``torch.ops.lsce.cross_entropy_forward`` and ``..._backward``, and dispatch.

Both take 2-D rows (N, K) and give per-row values or the gradient. Registered
with ``torch.library.custom_op``, ``register_fake`` and ``register_autograd``:
one opaque node under ``torch.compile(fullgraph=True)``, kept by ``torch.export``.
Each checks the values it reads, computes the class coefficients once and calls
one backend of the per-row kernel interface (lsce/interface.py), chosen by
:func:`row_kernels`: ``"auto"`` is C++ on CPU tensors, Triton on CUDA tensors
(and on CPU tensors under ``TRITON_INTERPRET=1`` if asked for), else the reference.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import cache, checks, cpu, reference
from .interface import DistillOptions, RowKernels, RowOptions, acc_dtype, coefficients, fixed_sum


def row_kernels(backend: str, device: torch.device) -> RowKernels:
    """The backend that runs the per-row kernels for ``backend`` on ``device``."""
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        return cpu
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        try:
            from .triton_kernels import cross_entropy

            return cross_entropy
        except ImportError as e:  # triton is optional: "auto" on a GPU falls back to the (correct) reference
            if backend == "triton":
                raise RuntimeError("lsce: backend='triton' needs the triton package (pip install 'lsce[triton]')") from e
    return reference.ROWS


def _prepare(logits, target, weight, prior, ignore_index, eps, z_loss, softcap):
    """The kernels' arguments: rows with unit column stride, a contiguous target
    (no copy when they already are), the call's coefficients and options."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    coef = coefficients(logits.shape[1], weight, prior, eps, acc_dtype(logits.dtype), logits.device)
    return logits, target.contiguous(), coef, RowOptions(ignore_index, eps, z_loss, softcap)


@torch.library.custom_op("lsce::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], prior: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, m, log_s) of 2-D logits; see lsce/interface.py for the
    formulas. ``lse = m + log_s`` is the differentiable one; ``m`` and ``log_s``
    (non-differentiable) are what the backward forms ``p`` from."""
    checks.check_values(target, prior, logits.shape[1], ignore_index)
    kernels = row_kernels(backend, logits.device)
    loss, m, log_s = kernels.forward(*_prepare(logits, target, weight, prior, ignore_index, label_smoothing,
                                               z_loss, softcap))
    return loss, m + log_s, m, log_s


@cross_entropy_forward.register_fake
def _(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap, backend):
    return tuple(logits.new_empty(logits.shape[:1], dtype=acc_dtype(logits.dtype)) for _ in range(4))


@torch.library.custom_op("lsce::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
    weight: Optional[Tensor], prior: Optional[Tensor], m: Tensor, log_s: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
) -> Tensor:
    """Gradient of Σ grad_loss·loss + Σ grad_lse·lse with respect to the logits, in one pass."""
    kernels = row_kernels(backend, logits.device)
    prepared = _prepare(logits, target, weight, prior, ignore_index, label_smoothing, z_loss, softcap)
    return kernels.backward(grad_loss, grad_lse, *prepared, m.contiguous(), log_s.contiguous())


@cross_entropy_backward.register_fake
def _(grad_loss, grad_lse, logits, target, weight, prior, m, log_s, ignore_index, label_smoothing, z_loss, softcap,
      backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def differentiable_backward(grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor,
                            weight: Optional[Tensor], prior: Optional[Tensor], ignore_index: int,
                            label_smoothing: float, z_loss: float, softcap: float, *,
                            reduction: str = "none", inputs: Optional[List[Tensor]] = None) -> Tuple[Tensor, ...]:
    """The gradients of ``Σ grad_loss·loss + Σ grad_lse·lse`` (loss reduced by
    ``reduction``) for ``inputs`` (default: the logits), as a graph of
    differentiable ops (autograd of lsce.reference's statement), for a backward
    that records one (``create_graph=True``: gradient penalties, Hessians);
    the kernels' gradient would be a constant there."""
    with torch.enable_grad():  # also under vmap of a plain backward (is_grads_batched)
        loss, lse = reference.cross_entropy(
            logits.to(acc_dtype(logits.dtype)), target, weight, ignore_index, reduction, label_smoothing,
            z_loss=z_loss, softcap=softcap or None, smoothing_prior=prior, return_lse=True)
        outputs, grads = [loss], [grad_loss.to(loss.dtype)]
        if grad_lse is not None:
            outputs.append(lse)
            grads.append(grad_lse.to(lse.dtype))
        return torch.autograd.grad(outputs, [logits] if inputs is None else inputs, grads, create_graph=True)


def _setup_context(ctx, inputs, output):
    logits, target, weight, prior, *options = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.save_for_backward(logits, target, weight, prior, output[2], output[3])
    ctx.options = options


def _backward(ctx, grad_loss, grad_lse, _grad_m, _grad_log_s):
    logits, target, weight, prior, m, log_s = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(m)
    if torch.is_grad_enabled():  # create_graph=True
        grad, = differentiable_backward(grad_loss, grad_lse, logits, target, weight, prior, *ctx.options[:4])
    else:
        grad = torch.ops.lsce.cross_entropy_backward(grad_loss, grad_lse, logits, target, weight, prior, m, log_s,
                                                     *ctx.options)
    return grad, None, None, None, None, None, None, None, None


cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


class FusedStep(torch.autograd.Function):
    """The fused training step on CPU, in eager mode (lsce.functional decides
    when): the forward kernel also writes the gradient for the upstream that
    the reduction will send back (``expected``: 1/Σw for mean, 1 for sum), one
    read of the logits and one exp per element instead of two of each.
    Backward hands it out when the upstream is the expected one (an O(N)
    comparison), else the backward kernel recomputes it into the same buffer;
    a second backward (retain_graph) gets a new buffer with the same bits.
    torch.compile and torch.export trace the registered ops instead."""

    @staticmethod
    def forward(ctx, logits, target, weight, prior, ignore_index, eps, z_loss, softcap, expected):
        checks.check_values(target, prior, logits.shape[1], ignore_index)
        ctx.differentiable = (weight, prior, ignore_index, eps, z_loss, softcap)  # for create_graph=True
        logits, target, ctx.coef, ctx.opts = _prepare(logits, target, weight, prior, ignore_index, eps, z_loss, softcap)
        ctx.grad = cache.empty(logits.shape, logits.dtype)
        loss, m, log_s = cpu.forward(logits, target, ctx.coef, ctx.opts, ctx.grad, expected)
        ctx.save_for_backward(logits, target, m, log_s, expected)
        ctx.set_materialize_grads(False)
        return loss, m + log_s

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        logits, target, m, log_s, expected = ctx.saved_tensors
        # create_graph=True, or vmap over this backward (is_grads_batched), where
        # comparing the upstream with `expected` cannot be read on the host.
        batched = grad_loss is not None and (torch._C._functorch.is_functorch_wrapped_tensor(grad_loss)
                                             or torch._C._functorch.is_legacy_batchedtensor(grad_loss))
        if torch.is_grad_enabled() or batched:
            grad_loss = torch.zeros_like(m) if grad_loss is None else grad_loss
            weight, prior, *options = ctx.differentiable
            grad, = differentiable_backward(grad_loss, grad_lse, logits, target, weight, prior, *options)
            return grad, None, None, None, None, None, None, None, None
        grad, ctx.grad = ctx.grad, None  # handed out once: the caller owns it from here
        fused = grad_lse is None and grad_loss is not None and bool((grad_loss == expected).all())
        if grad is None:
            grad = cache.empty(logits.shape, logits.dtype)
            if fused:
                cpu.forward(logits, target, ctx.coef, ctx.opts, grad, expected)
        if not fused:
            grad_loss = torch.zeros_like(m) if grad_loss is None else grad_loss
            cpu.backward(grad_loss, grad_lse, logits, target, ctx.coef, ctx.opts, m, log_s, out=grad)
        return grad, None, None, None, None, None, None, None, None


def fusable(logits: Tensor, backend: str) -> bool:
    """Whether FusedStep may run: the C++ kernel on a plain CPU tensor to be
    differentiated, in eager mode (no torch.compile, torch.export or torch.func)."""
    return (
        backend in ("auto", "cpu")
        and type(logits) is torch.Tensor
        and logits.device.type == "cpu"
        and logits.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(logits)
    )


# ---------------------------------------------------------------------------
# Probability (soft) targets: the same structure, the kernels' soft_forward /
# soft_backward (lsce/interface.py), and a gradient for the target too.

def _soft_prepare(logits, target, weight, eps, z_loss, softcap):
    """The soft kernels' arguments: rows and target with unit column stride (no
    copy when they already are), the weight in the accumulation dtype, the options."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if target.stride(1) != 1:
        target = target.contiguous()
    w = None if weight is None else weight.to(acc_dtype(logits.dtype)).contiguous()
    return logits, target, w, RowOptions(-100, eps, z_loss, softcap)


@torch.library.custom_op("lsce::soft_cross_entropy_forward", mutates_args=())
def soft_cross_entropy_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], label_smoothing: float, z_loss: float, softcap: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, stats)`` of 2-D logits and a probability target of
    their shape; ``stats`` (3, N) holds ``m``, ``log_s`` and ``A`` for the
    backward and is not differentiable. Formulas: lsce/interface.py."""
    kernels = row_kernels(backend, logits.device)
    loss, m, log_s, mass = kernels.soft_forward(*_soft_prepare(logits, target, weight, label_smoothing, z_loss,
                                                               softcap))
    return loss, m + log_s, torch.stack((m, log_s, mass))


@soft_cross_entropy_forward.register_fake
def _(logits, target, weight, label_smoothing, z_loss, softcap, backend):
    acc = acc_dtype(logits.dtype)
    N = logits.shape[0]
    return logits.new_empty((N,), dtype=acc), logits.new_empty((N,), dtype=acc), logits.new_empty((3, N), dtype=acc)


@torch.library.custom_op("lsce::soft_cross_entropy_backward", mutates_args=())
def soft_cross_entropy_backward(
    grad_loss: Tensor, grad_lse: Optional[Tensor], logits: Tensor, target: Tensor, weight: Optional[Tensor],
    stats: Tensor, label_smoothing: float, z_loss: float, softcap: float, backend: str, target_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """Gradients of Σ grad_loss·loss + Σ grad_lse·lse with respect to the logits
    and, when ``target_grad``, the target (else an empty tensor), in one pass."""
    kernels = row_kernels(backend, logits.device)
    prepared = _soft_prepare(logits, target, weight, label_smoothing, z_loss, softcap)
    stats = stats.contiguous()
    grad, grad_t = kernels.soft_backward(grad_loss, grad_lse, *prepared, stats[0], stats[1], stats[2],
                                         target_grad=target_grad)
    return grad, grad_t if grad_t is not None else target.new_empty(0)


@soft_cross_entropy_backward.register_fake
def _(grad_loss, grad_lse, logits, target, weight, stats, label_smoothing, z_loss, softcap, backend, target_grad):
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return grad, torch.empty(target.shape if target_grad else (0,), dtype=target.dtype, device=target.device)


def _soft_setup_context(ctx, inputs, output):
    logits, target, weight, *options = inputs
    ctx.save_for_backward(logits, target, weight, output[2])
    ctx.options = options


def _soft_backward(ctx, grad_loss, grad_lse, grad_stats):
    logits, target, weight, stats = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(stats[0])
    target_grad = ctx.needs_input_grad[1]
    grad, grad_t = torch.ops.lsce.soft_cross_entropy_backward(grad_loss, grad_lse, logits, target, weight, stats,
                                                              *ctx.options, target_grad)
    return grad, grad_t if target_grad else None, None, None, None, None, None


soft_cross_entropy_forward.register_autograd(_soft_backward, setup_context=_soft_setup_context)


class FusedSoftStep(torch.autograd.Function):
    """FusedStep for probability targets (same rules): the forward kernel also
    writes the logits' gradient for the upstream ``expected`` (1/rows for
    mean, 1 for sum). Used only when the target needs no gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, eps, z_loss, softcap, expected):
        logits, target, ctx.weight, ctx.opts = _soft_prepare(logits, target, weight, eps, z_loss, softcap)
        ctx.grad = cache.empty(logits.shape, logits.dtype)
        loss, m, log_s, mass = cpu.soft_forward(logits, target, ctx.weight, ctx.opts, ctx.grad, expected)
        ctx.save_for_backward(logits, target, m, log_s, mass, expected)
        ctx.set_materialize_grads(False)
        return loss, m + log_s

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        logits, target, m, log_s, mass, expected = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # handed out once: the caller owns it from here
        fused = grad_lse is None and grad_loss is not None and bool((grad_loss == expected).all())
        if grad is None:
            grad = cache.empty(logits.shape, logits.dtype)
            if fused:
                cpu.soft_forward(logits, target, ctx.weight, ctx.opts, grad, expected)
        if not fused:
            grad_loss = torch.zeros_like(m) if grad_loss is None else grad_loss
            cpu.soft_backward(grad_loss, grad_lse, logits, target, ctx.weight, ctx.opts, m, log_s, mass, out=grad)
        return grad, None, None, None, None, None, None


# ---------------------------------------------------------------------------
# Distillation: a teacher's logits and optional class ids; the kernels'
# distill_forward / distill_backward (lsce/interface.py). No gradient reaches the teacher.

def _distill_prepare(student, teacher, target, weight, temperature, beta, label_smoothing, ignore_index):
    """The distillation kernels' arguments: rows with unit column stride (no copy
    when they already are), a contiguous target, the weight in the accumulation
    dtype, and the options (W = Σ w summed once, in fixed blocks, and left on the
    weight's device: no host synchronisation)."""
    if student.stride(1) != 1:
        student = student.contiguous()
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    K = student.shape[1]
    w = None if weight is None else weight.to(acc_dtype(student.dtype)).contiguous()
    W = float(K) if w is None else fixed_sum(w.double())
    opts = DistillOptions(temperature, beta, label_smoothing, ignore_index, W)
    return student, teacher, None if target is None else target.contiguous(), w, opts


@torch.library.custom_op("lsce::distillation_forward", mutates_args=())
def distillation_forward(
    student: Tensor, teacher: Tensor, target: Optional[Tensor], weight: Optional[Tensor], temperature: float,
    beta: float, label_smoothing: float, ignore_index: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(kd, ce, stats)`` of 2-D student and teacher logits (lsce/interface.py):
    ``kd = T²·D_β`` and ``ce`` (N,) are differentiable with respect to the student;
    ``stats`` (6, N) is what the backward reads."""
    if target is not None:
        checks.check_values(target, None, student.shape[1], ignore_index)
    kernels = row_kernels(backend, student.device)
    return kernels.distill_forward(*_distill_prepare(student, teacher, target, weight, temperature, beta,
                                                     label_smoothing, ignore_index))


@distillation_forward.register_fake
def _(student, teacher, target, weight, temperature, beta, label_smoothing, ignore_index, backend):
    acc, N = acc_dtype(student.dtype), student.shape[0]
    return student.new_empty((N,), dtype=acc), student.new_empty((N,), dtype=acc), student.new_empty((6, N), dtype=acc)


@torch.library.custom_op("lsce::distillation_backward", mutates_args=())
def distillation_backward(
    grad_kd: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor, target: Optional[Tensor],
    weight: Optional[Tensor], stats: Tensor, temperature: float, beta: float, label_smoothing: float,
    ignore_index: int, backend: str,
) -> Tensor:
    """The student's gradient of Σ grad_kd·kd + Σ grad_ce·ce, in one pass."""
    kernels = row_kernels(backend, student.device)
    prepared = _distill_prepare(student, teacher, target, weight, temperature, beta, label_smoothing, ignore_index)
    return kernels.distill_backward(grad_kd, grad_ce, *prepared, stats.contiguous())


@distillation_backward.register_fake
def _(grad_kd, grad_ce, student, teacher, target, weight, stats, temperature, beta, label_smoothing, ignore_index,
      backend):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def differentiable_distillation_backward(grad_kd, grad_ce, student, teacher, target, weight, temperature, beta,
                                         label_smoothing, ignore_index):
    """The student's gradient as a graph of differentiable ops (autograd of
    lsce.reference's statement), for a backward that records one (create_graph=True)."""
    with torch.enable_grad():
        kw = dict(teacher_logits=teacher, temperature=temperature, beta=beta, label_smoothing=label_smoothing,
                  weight=weight, ignore_index=ignore_index, reduction="none")
        z = student.to(acc_dtype(student.dtype))
        objective = (grad_kd * reference.distillation_loss(z, target, alpha=1.0, **kw)).sum()
        if target is not None:
            objective = objective + (grad_ce * reference.distillation_loss(z, target, alpha=0.0, **kw)).sum()
        return torch.autograd.grad(objective, student, create_graph=True)[0]


def _distill_setup_context(ctx, inputs, output):
    student, teacher, target, weight, *options = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(student, teacher, target, weight, output[2])
    ctx.options = options


def _distill_backward(ctx, grad_kd, grad_ce, _grad_stats):
    student, teacher, target, weight, stats = ctx.saved_tensors
    grad_kd = torch.zeros_like(stats[0]) if grad_kd is None else grad_kd
    grad_ce = torch.zeros_like(stats[0]) if grad_ce is None else grad_ce
    if torch.is_grad_enabled():  # create_graph=True
        grad = differentiable_distillation_backward(grad_kd, grad_ce, student, teacher, target, weight,
                                                    *ctx.options[:4])
    else:
        grad = torch.ops.lsce.distillation_backward(grad_kd, grad_ce, student, teacher, target, weight, stats,
                                                    *ctx.options)
    return grad, None, None, None, None, None, None, None, None


distillation_forward.register_autograd(_distill_backward, setup_context=_distill_setup_context)


def upstreams_match(expected: Tensor, grad_kd: Tensor, grad_ce: Tensor) -> bool:
    """Whether a distillation step's backward got the upstreams ``expected`` (2,), [g of
    every kd, h of every ce], the ones its forward computed the gradient for. Read on the
    host: for the CPU's fused steps only."""
    return bool((grad_kd == expected[0]).all()) and bool((grad_ce == expected[1]).all())


class FusedDistillStep(torch.autograd.Function):
    """FusedStep for distillation (same rules): the C++ forward kernel also writes
    the student's gradient for the upstreams ``expected`` (2,): [g of every kd, h
    of every ce], the ones the reduction's backward will send."""

    @staticmethod
    def forward(ctx, student, teacher, target, weight, temperature, beta, label_smoothing, ignore_index, expected):
        if target is not None:
            checks.check_values(target, None, student.shape[1], ignore_index)
        ctx.args = _distill_prepare(student, teacher, target, weight, temperature, beta, label_smoothing,
                                    ignore_index)
        ctx.grad = cache.empty(student.shape, student.dtype)
        kd, ce, stats = cpu.distill_forward(*ctx.args, grad=ctx.grad, upstream=expected)
        ctx.save_for_backward(stats, expected)
        ctx.differentiable = (student, teacher, target, weight, temperature, beta, label_smoothing, ignore_index)
        ctx.set_materialize_grads(False)
        return kd, ce

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        stats, expected = ctx.saved_tensors
        zeros = torch.zeros_like(stats[0])
        grad_kd = zeros if grad_kd is None else grad_kd
        grad_ce = zeros if grad_ce is None else grad_ce
        if torch.is_grad_enabled():  # create_graph=True
            s, t, y, w, *options = ctx.differentiable
            return (differentiable_distillation_backward(grad_kd, grad_ce, s, t, y, w, *options),) + (None,) * 8
        grad, ctx.grad = ctx.grad, None  # handed out once: the caller owns it from here
        fused = upstreams_match(expected, grad_kd, grad_ce)
        if grad is None:
            grad = cache.empty(stats.shape[1:] + ctx.args[0].shape[1:], ctx.args[0].dtype)
            if fused:
                cpu.distill_forward(*ctx.args, grad=grad, upstream=expected)
        if not fused:
            cpu.distill_backward(grad_kd, grad_ce, *ctx.args, stats, out=grad)
        return (grad,) + (None,) * 8
