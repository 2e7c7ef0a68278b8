"""Vocabulary-parallel label-smoothed cross-entropy (tensor parallelism).

Each rank of a ``torch.distributed`` group holds the logits of a slice of the
vocabulary, ``z[:, s_r : s_r + K_r]``. :func:`vocab_parallel_cross_entropy`
returns, on every rank, the loss of the full ``(N, K)`` logits with the
global prior ``π`` (``1/K``, not ``1/K_r``), class weights and mean
denominator ``Σ w[y]`` (Megatron-LM issue 737 smooths with the local
vocabulary; flash-attention's version has no class weights or prior), and
the gradient of the rank's own slice. :func:`vocab_parallel_linear_cross_entropy`
does the same from the hidden states and the rank's rows of the LM head.

Maths (lsce/reference.py's notation: ``c = π ⊙ w``, ``C = Σ_k c_k``, ``zc``
the soft-capped logits; one row, target ``y``)::

    loss = (1 − ε)·w_y·(lse − zc_y) + ε·(C·lse − Σ_k c_k·zc_k)
         = ((1 − ε)·w_y + ε·C)·lse − Σ_r T_r
    T_r  = (1 − ε)·w_y·zc_y·[y in slice r] + ε·Σ_{k in r} c_k·zc_k
    lse  = logsumexp_r(lse_r)

so a row needs only the global ``lse`` and ``Σ_r T_r``: the forward is **one
all_gather of an (N, 2) tensor** ``[lse_r, T_r]`` (accumulation dtype),
combined locally in rank order, so that every rank gets bitwise the same
loss. Before it, **one all_gather of 8 int64 per rank** checks that the ranks
agree (rows, dtype, options, slices tiling ``[0, K)``) and gives the default
``vocab_start_index``; a mismatch raises on every rank instead of leaving
some waiting in a collective. **Backward sends nothing**: the global ``lse``
is saved. The z-loss ``λ·lse²`` is added outside the autograd function, from
the returned ``lse``, so it reaches the gradient through the lse upstream.

The registered per-row ops do the N×K_r work (one read of the slice in
forward, one read and one write in backward); the rest is O(N) or O(K):

* forward: ``cross_entropy_forward(z_r, y_op, c_r, None, -1, ε=1, λ=0, cap)``.
  Given ``c_r`` as class weight, the op uses the coefficients
  ``u = fl(1/K_r)·c_r``, so ``c_r = s·u`` with ``s = 1/fl(1/K_r)`` (without
  weight or prior it gets neither and uses ``1/K_r``: ``s = K_r/K``). With
  ``ε = 1`` its loss is ``C_u·lse_r − Σ u_k·zc_k`` (``C_u = Σ u``), so
  ``Σ_{k in r} c_k·zc_k = s·(C_u·lse_r − loss_r)``: no division by
  ``C_r = Σ c_r``, and a slice with zero prior/weight mass gives 0.
  ``zc_y`` is a gather at the local target. ``y_op`` is the local target for
  rows whose target is in the slice, column 0 for other rows, and -1 for
  ignored rows (-1, the op's ignore_index, is never a local column, whatever
  the user's ignore_index is). With ``ε = 0`` only ``lse_r`` is used, so -inf
  logits give no ``0·∞``.
* backward: with ``g`` and ``h`` the upstream gradients of a row's loss and
  lse and ``A = g·((1 − ε)·w_y + ε·C) + h``, the slice's gradient is
  ``(A·p_k − g·ε·c_k − g·(1 − ε)·w_y·[k = y])·dcap_k``, ``p`` from the global
  ``lse``. ``cross_entropy_backward(g', h', z_r, y_op, c_r, None, lse, -1, 1,
  0, cap)`` computes ``((h' + g'·C_u)·p_k − g'·u_k)·dcap_k``; ``g' = g·ε·s``
  and ``h' = A − g'·C_u`` make that everything but the true-class term
  (``ε = 0``: ``g' = 0``, ``h' = A``). Then the entry at ``(i, y_op_i)`` is
  recomputed whole in fp32 (fp64) from the logit there, true-class term and
  softcap factor included, and stored once, rounded to the logits' dtype only
  after the subtraction (Liger-Kernel issue 1329): an O(N) update of the op's
  fresh buffer. Rows whose target is elsewhere get back the value the op
  wrote, so there is no data-dependent indexing and no host sync.

Costs per call: 2 all_gathers in forward (8·W int64, and 2·N·W values in
fp32, fp64 for fp64 logits), none in backward (the linear variant adds one
all_reduce of the input's gradient; see its docstring). Gathering the logits
instead would move ``N·K·b`` bytes. The checks' all_gather runs on the CPU
when the group has a CPU backend (gloo, or
``init_process_group("cpu:gloo,cuda:nccl")``) and waits for no GPU work; on
an NCCL-only group it is a device-to-host copy of 8·W integers, the one host
sync of a call. Target values and the prior are checked as
``lsce.cross_entropy`` checks them (asynchronously on CUDA). Ranks must pass
the same target, weight and prior; that is not verified.

These are ``torch.autograd.Function``s calling ``torch.distributed``:
``torch.compile`` graph-breaks at the collective.
"""

from __future__ import annotations

import zlib
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops  # noqa: F401  (registers torch.ops.lsce.*)
from .functional import _FLOAT_DTYPES, _check_arguments, as_ignore_index, reduce_rows
from .ops import _check_values
from .reference import acc_dtype, class_coefficients

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

# The op's ignore_index for globally ignored rows: never a local column.
_IGNORED = -1
# Exception kinds a rank's argument checks can raise, by their code in the
# metadata (0: none), so that every rank raises the same kind.
_ERRORS = (None, TypeError, ValueError, IndexError)
# Metadata per rank: error code, rows, width, start (-1: default), weight and
# prior lengths (-1: none), dtype code, options fingerprint.
_META_FIELDS = 8


def _capped(z: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(z / cap) if cap else z


def _all_gather(inp: Tensor, group, world: int) -> Tensor:
    """``inp`` of every rank, stacked in rank order: (world, *inp.shape).

    ``torch.distributed`` is looked up at call time so that a wrapper (the
    benchmark's byte counter) sees the call."""
    out = inp.new_empty((world * inp.shape[0],) + tuple(inp.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp.contiguous(), group=group)
    return out.view((world,) + tuple(inp.shape))


def _meta_device(group, logits) -> torch.device:
    """CPU when the group can run collectives there (no GPU sync), else the logits' device."""
    try:
        config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl" or "gloo"
    except (AttributeError, RuntimeError, ValueError):
        config = str(dist.get_backend(group))
    if "cpu:" in config or config in ("gloo", "mpi"):
        return torch.device("cpu")
    if isinstance(logits, Tensor):
        return logits.device
    return torch.device("cuda", torch.cuda.current_device())


def _check_local(local_logits, target, weight, smoothing_prior, vocab_start_index,
                 reduction, label_smoothing, z_loss, softcap, backend) -> None:
    """This rank's own arguments, everything that does not need the other ranks."""
    if not isinstance(local_logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("lsce: local_logits and target must be Tensors")
    if local_logits.dim() < 1:
        raise ValueError("lsce: local_logits must have at least 1 dimension (its vocabulary slice), got a scalar")
    if tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(
            f"lsce: target shape {tuple(target.shape)} does not match local_logits shape "
            f"{tuple(local_logits.shape)}: expected {tuple(local_logits.shape[:-1])} (classes are the last dimension)")
    width = local_logits.shape[-1]
    if width < 1:
        raise ValueError("lsce: local_logits has an empty vocabulary slice (last dimension 0); at least 1 is needed")
    rows = target.numel()
    stand_in = torch.empty((), dtype=local_logits.dtype, device=local_logits.device).expand(rows, width)
    _check_arguments(stand_in, target.reshape(-1), None, reduction, label_smoothing, z_loss, softcap, None, backend)
    for name, v in (("weight", weight), ("smoothing_prior", smoothing_prior)):
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"lsce: {name} must be a Tensor or None, got {type(v).__name__}")
        if v.dim() != 1:
            raise ValueError(f"lsce: {name} must be 1-D, one value per class of the full vocabulary; "
                             f"got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"lsce: {name} must be a floating-point tensor, got {v.dtype}")
        if v.device != local_logits.device:
            raise ValueError(f"lsce: {name} is on {v.device} but local_logits is on {local_logits.device}")
    if vocab_start_index is not None and (
        isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) or vocab_start_index < 0
    ):
        raise ValueError(f"lsce: vocab_start_index must be None or an int >= 0, got {vocab_start_index!r}")


def _fingerprint(options) -> int:
    """A number equal on ranks called with equal options (hash() of str is salted per process)."""
    return zlib.crc32(repr(options).encode())


def _agree(metas: List[List[int]], rank: int, own_error: Optional[Exception]):
    """From every rank's metadata, the same verdict on every rank: (K, this rank's start) or an exception."""
    world = len(metas)
    codes = [m[0] for m in metas]
    if own_error is not None:
        raise own_error
    bad = [r for r, code in enumerate(codes) if code]
    if bad:
        raise _ERRORS[codes[bad[0]]](
            f"lsce: rank {bad[0]} of the group failed its argument checks (its own error says why); "
            "every rank raises so that none is left waiting in a collective")
    column = lambda j: [m[j] for m in metas]  # noqa: E731
    rows, widths, starts, wlens, plens, dtypes, prints = (column(j) for j in range(1, _META_FIELDS))
    if len(set(rows)) > 1:
        raise ValueError(f"lsce: every rank must pass the same rows; rows (N) per rank: {rows}")
    if len(set(dtypes)) > 1:
        names = [str(_FLOAT_DTYPES[d]) for d in dtypes]
        raise TypeError(f"lsce: every rank must pass logits (or hidden states) of the same dtype; per rank: {names}")
    if len(set(prints)) > 1:
        raise ValueError("lsce: the ranks were called with different options (ignore_index, reduction, "
                         "label_smoothing, z_loss, softcap, weight/smoothing_prior given or not, return_lse "
                         "or reduce_input_grad)")
    K = sum(widths)
    if all(s == -1 for s in starts):
        starts = [sum(widths[:r]) for r in range(world)]
    elif any(s == -1 for s in starts):
        given = [r for r, s in enumerate(starts) if s != -1]
        raise ValueError(f"lsce: vocab_start_index was given on ranks {given} only; give it on every rank or none")
    else:
        end = 0
        for s, w in sorted(zip(starts, widths)):
            if s != end:
                slices = [(s_, s_ + w_) for s_, w_ in zip(starts, widths)]
                raise ValueError(f"lsce: the ranks' vocabulary slices [start, end) {slices} do not tile [0, {K}) "
                                 f"(a {'gap' if s > end else 'overlap'} at {min(s, end)})")
            end = s + w
    for name, lengths in (("weight", wlens), ("smoothing_prior", plens)):
        wrong = [(r, n) for r, n in enumerate(lengths) if n not in (-1, K)]
        if wrong:
            raise ValueError(f"lsce: {name} must have shape ({K},), the full vocabulary (sum of the ranks' "
                             f"widths); (rank, length): {wrong}")
    return K, starts[rank]


class _Rows(NamedTuple):
    """Where each row's target is, as seen from this rank (all (N,) tensors)."""

    valid: Tensor  # target is not ignore_index
    own: Tensor  # ... and lies in this rank's slice
    col: Tensor  # its local column where own, else 0 (any valid column)
    y_op: Tensor  # col for valid rows, _IGNORED for ignored ones: the target given to the op
    w_y: Tensor  # weight[target] (1 without weight; any value on ignored rows)

    def chunk(self, start: int, end: int) -> "_Rows":
        return _Rows(*(t[start:end] for t in self))


class _Slice:
    """One call's constants on this rank's slice, and the steps of the forward and backward.

    The op is given ``c_r`` as its class weight and then uses the coefficients
    ``u = fl(1/K_r)·c_r`` (its own uniform ``1/K_r`` without weight and prior),
    whose sum is ``C_op``; ``s`` maps them back: ``c_r = s·u``."""

    def __init__(self, start, width, K, c, C, w, eps, cap, ignore_index, backend, group, world, acc):
        self.start, self.width, self.K = start, width, K
        self.eps, self.cap, self.ignore_index, self.backend = eps, cap, ignore_index, backend
        self.group, self.world, self.acc = group, world, acc
        self.w, self.C = w, C  # full-K weight (or None); Σ c over the full vocabulary
        if c is None:  # uniform prior, no weight: c_k = 1/K = (K_r/K)·(1/K_r)
            self.c_r = None
            self.s, self.C_op = width / K, 1.0
        else:
            inv_width = torch.tensor(1.0 / width, dtype=acc).item()  # the op's fl(1/K_r)
            self.c_r = c[start:start + width].contiguous()
            self.s, self.C_op = 1.0 / inv_width, (self.c_r * inv_width).sum()

    def rows(self, y: Tensor) -> _Rows:
        valid = y != self.ignore_index
        own = valid & (y >= self.start) & (y < self.start + self.width)
        col = torch.where(own, y - self.start, 0)
        w_y = torch.ones_like(y, dtype=self.acc) if self.w is None else self.w[torch.where(valid, y, 0)]
        return _Rows(valid, own, col, torch.where(valid, col, _IGNORED), w_y)

    def local_stats(self, z: Tensor, rows: _Rows):
        """(lse_r, T_r) of the rows of the slice ``z``, from one read of it."""
        eps = self.eps
        if eps:
            loss_r, lse_r = torch.ops.lsce.cross_entropy_forward(
                z, rows.y_op, self.c_r, None, _IGNORED, 1.0, 0.0, self.cap, self.backend)
            T_r = eps * self.s * (self.C_op * lse_r - loss_r)  # ε·Σ_{k∈r} c_k·zc_k
        else:  # (the op's loss is not used: no ε·Σ c·zc, so no 0·∞ from -inf logits)
            _, lse_r = torch.ops.lsce.cross_entropy_forward(
                z, rows.y_op, None, None, _IGNORED, 0.0, 0.0, self.cap, self.backend)
            T_r = torch.zeros_like(lse_r)
        if eps < 1:
            zc_y = _capped(z.gather(1, rows.col[:, None]).squeeze(1).to(self.acc), self.cap)
            T_r = T_r + torch.where(rows.own, (1 - eps) * rows.w_y * zc_y, 0)
        return lse_r, T_r

    def combine(self, lse_r: Tensor, T_r: Tensor, rows: _Rows):
        """(per-row cross-entropy, global lse): the one all_gather, combined in rank order."""
        gathered = _all_gather(torch.stack([lse_r, T_r], dim=1), self.group, self.world)
        lse = torch.logsumexp(gathered[:, :, 0], dim=0)
        T = gathered[:, :, 1].sum(0)
        ce = torch.where(rows.valid, ((1 - self.eps) * rows.w_y + self.eps * self.C) * lse - T, 0)
        return ce, lse

    def upstream(self, grad_ce: Optional[Tensor], grad_lse: Optional[Tensor], rows: _Rows, lse: Tensor):
        """(g, A): the loss's upstream gradient (0 on ignored rows) and the coefficient of p."""
        g = torch.zeros_like(lse) if grad_ce is None else torch.where(rows.valid, grad_ce.to(lse.dtype), 0)
        A = g * ((1 - self.eps) * rows.w_y + self.eps * self.C)
        if grad_lse is not None:
            A = A + grad_lse.to(lse.dtype)
        return g, A.contiguous()

    def slice_grad(self, g: Tensor, A: Tensor, z: Tensor, rows: _Rows, lse: Tensor) -> Tensor:
        """The gradient of the slice ``z``: one read and one write by the op, then an O(N) fix."""
        eps, cap = self.eps, self.cap
        if eps:  # (A·p_k − g·ε·c_k)·dcap_k
            g_op = g * (eps * self.s)
            grad = torch.ops.lsce.cross_entropy_backward(
                g_op, A - g_op * self.C_op, z, rows.y_op, self.c_r, None, lse, _IGNORED, 1.0, 0.0, cap, self.backend)
        else:  # A·p_k·dcap_k
            grad = torch.ops.lsce.cross_entropy_backward(
                torch.zeros_like(A), A, z, rows.y_op, None, None, lse, _IGNORED, 0.0, 0.0, cap, self.backend)
        # The entry at (row, col) whole, true-class term included, in fp32/fp64.
        index = (torch.arange(z.shape[0], device=z.device), rows.col)
        zc = _capped(z[index].to(lse.dtype), cap)
        d = A * torch.exp(zc - lse) - torch.where(rows.own, g * (1 - eps) * rows.w_y, 0)
        if eps:
            d = d - g * eps * (1.0 / self.K if self.c_r is None else self.c_r[rows.col])
        if cap:
            d = d * (1 - (zc / cap) ** 2)
        grad[index] = d.to(grad.dtype)
        return grad


class _VocabParallelRows(torch.autograd.Function):
    """Per-row (cross-entropy without z-loss, global lse) of the full logits, from this rank's slice."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, sl: _Slice):
        rows = sl.rows(y)
        ce, lse = sl.combine(*sl.local_stats(z, rows), rows)
        ctx.save_for_backward(z, lse, *rows)
        ctx.slice = sl
        ctx.set_materialize_grads(False)
        return ce, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Optional[Tensor], grad_lse: Optional[Tensor]):
        z, lse, *rows = ctx.saved_tensors
        rows, sl = _Rows(*rows), ctx.slice
        g, A = sl.upstream(grad_ce, grad_lse, rows, lse)
        return sl.slice_grad(g, A, z, rows, lse), None, None


class _VocabParallelLinearRows(torch.autograd.Function):
    """As _VocabParallelRows for the logits ``x @ W_r.T + b_r``, chunk by chunk
    (lsce.linear's chunking): the slice's logits never exist whole."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Optional[Tensor], y: Tensor, sl: _Slice, chunk: int,
                reduce_input_grad: bool):
        from .linear import _chunk_logits, _row_chunks

        rows = sl.rows(y)
        N = x.shape[0]
        lse_r = x.new_empty(N, dtype=sl.acc)
        T_r = x.new_empty(N, dtype=sl.acc)
        buffer = x.new_empty((min(chunk, N), sl.width))
        for s, e in _row_chunks(N, chunk):
            lse_r[s:e], T_r[s:e] = sl.local_stats(_chunk_logits(buffer, x[s:e], W, b), rows.chunk(s, e))
        ce, lse = sl.combine(lse_r, T_r, rows)
        ctx.save_for_backward(x, W, b, lse, *rows)
        ctx.slice, ctx.chunk, ctx.reduce_input_grad = sl, chunk, reduce_input_grad
        ctx.set_materialize_grads(False)
        return ce, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Optional[Tensor], grad_lse: Optional[Tensor]):
        from .linear import _chunk_logits, _GradSums, _row_chunks

        x, W, b, lse, *rows = ctx.saved_tensors
        rows, sl = _Rows(*rows), ctx.slice
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
        g, A = sl.upstream(grad_ce, grad_lse, rows, lse)
        grads = _GradSums(x, W, b, mask)
        buffer = x.new_empty((min(ctx.chunk, x.shape[0]), sl.width))
        for s, e in _row_chunks(x.shape[0], ctx.chunk):
            z = _chunk_logits(buffer, x[s:e], W, b)
            grads.add(sl.slice_grad(g[s:e], A[s:e], z, rows.chunk(s, e), lse[s:e]), x[s:e], W, s, e)
        gi, gw, gb = grads.tensors(x, W, b, final=True)
        if mask[0] and ctx.reduce_input_grad:  # the input's gradient is the sum over the slices
            dist.all_reduce(gi, group=sl.group)
        return (*(t if m else None for t, m in zip((gi, gw, gb), mask)), None, None, None, None)


def _prepare(local_checks, target, group, vocab_start_index, weight, smoothing_prior, ignore_index,
             reduction, label_smoothing, z_loss, softcap, backend, options=()):
    """The checks every rank agrees on (one small all_gather), then the call's constants.

    ``local_checks()`` checks what only this rank has and returns its logits
    (or a zero-cost stand-in of their shape). Returns ``(logits, slice, y, w)``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("lsce: the vocabulary-parallel losses need torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("lsce: this process is not a member of the process group passed as group")

    own_error, logits = None, None
    try:
        logits = local_checks()
        _check_local(logits, target, weight, smoothing_prior, vocab_start_index,
                     reduction, label_smoothing, z_loss, softcap, backend)
        ignore_index = as_ignore_index(ignore_index)
    except (TypeError, ValueError, IndexError) as e:
        own_error = e
    meta = [0, -1, -1, -1, -1, -1, -1, 0]
    if own_error is None:
        every = (ignore_index, reduction, float(label_smoothing), float(z_loss), float(softcap or 0.0),
                 weight is None, smoothing_prior is None) + tuple(options)
        meta[1:] = [
            target.numel(), logits.shape[-1],
            -1 if vocab_start_index is None else vocab_start_index,
            -1 if weight is None else weight.shape[0],
            -1 if smoothing_prior is None else smoothing_prior.shape[0],
            _FLOAT_DTYPES.index(logits.dtype), _fingerprint(every),
        ]
    else:
        meta[0] = next(code for code, kind in enumerate(_ERRORS) if kind and isinstance(own_error, kind))
    meta_t = torch.tensor(meta, dtype=torch.int64, device=_meta_device(group, logits))
    K, start = _agree(_all_gather(meta_t, group, world).tolist(), rank, own_error)

    acc = acc_dtype(logits.dtype)
    y = target.reshape(-1).to(torch.int64)
    w = None if weight is None else weight.to(acc).contiguous()
    prior = None if smoothing_prior is None else smoothing_prior.to(acc).contiguous()
    _check_values(y, prior, K, ignore_index)
    c, C = class_coefficients(K, w, prior, acc, logits.device)
    sl = _Slice(start, logits.shape[-1], K, c, C, w, float(label_smoothing), float(softcap or 0.0),
                ignore_index, backend, group, world, acc)
    return logits, sl, y, w


def _reduce(ce: Tensor, lse: Tensor, y: Tensor, w: Optional[Tensor], sl: _Slice, z_loss: float,
            reduction: str, shape) -> Tensor:
    """The z-loss from the global lse, then the reduction lsce.cross_entropy does."""
    loss = ce + torch.where(y != sl.ignore_index, z_loss * lse * lse, 0) if z_loss else ce
    return reduce_rows(loss, lse, y, w, sl.ignore_index, z_loss, reduction, shape)


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    vocab_start_index: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    smoothing_prior: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """``lsce.cross_entropy`` of the full logits, from this rank's vocabulary slice.

    Args:
        local_logits: ``(N, K_r)``, ``(B, T, K_r)`` or any ``(..., K_r)``: this
            rank's columns of the logits (classes last). The slices of the
            ranks of ``group`` make up the full vocabulary K; widths may differ.
        target: global class ids of shape ``local_logits.shape[:-1]``, the same
            on every rank.
        group: the tensor-parallel process group (default: the world).
        vocab_start_index: this rank's first class id; default: the sum of the
            widths of the lower ranks. If given, on every rank, the slices must
            tile ``[0, K)`` (in any order).
        weight, smoothing_prior: full-K vectors, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`lsce.cross_entropy`.
        return_lse: also return the global per-row logsumexp (fp32; fp64 for
            fp64 logits), differentiable.
        backend: the per-row kernels, as in :func:`lsce.cross_entropy`.

    Every rank returns the same loss; backward gives the gradient of this
    rank's slice. Collectives: see the module docstring (two small
    all_gathers in forward, none in backward).
    """
    def local_checks():
        if not isinstance(local_logits, Tensor):
            raise TypeError(f"lsce: local_logits must be a Tensor, got {type(local_logits).__name__}")
        return local_logits

    _, sl, y, w = _prepare(local_checks, target, group, vocab_start_index, weight, smoothing_prior, ignore_index,
                           reduction, label_smoothing, z_loss, softcap, backend, options=(bool(return_lse),))
    z = local_logits.reshape(-1, sl.width)
    if z.stride(-1) != 1:
        z = z.contiguous()
    ce, lse = _VocabParallelRows.apply(z, y, sl)
    out = _reduce(ce, lse, y, w, sl, float(z_loss), reduction, target.shape).to(local_logits.dtype)
    return (out, lse.reshape(target.shape)) if return_lse else out


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    local_linear_bias: Optional[Tensor] = None,
    group: Optional["dist.ProcessGroup"] = None,
    vocab_start_index: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: Optional[int] = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    smoothing_prior: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    reduce_input_grad: bool = True,
) -> Tensor:
    """``lsce.linear_cross_entropy`` with the LM head's rows (the vocabulary) split over the ranks.

    Each rank holds the same ``input`` (N, H) (or any ``(..., H)``) and its rows
    ``local_linear_weight`` (K_r, H) (and ``local_linear_bias`` (K_r,)) of the
    full ``(K, H)`` head; the loss is ``lsce.linear_cross_entropy`` with the
    full head, on every rank, and the slice's logits are only ever computed
    ``chunk_size`` rows at a time (``lsce.linear``'s chunking; backward
    recomputes them: 4 matmuls in all). Collectives: those of
    :func:`vocab_parallel_cross_entropy` in forward; in backward, when
    ``reduce_input_grad`` (default), one all_reduce of the input's gradient
    (N·H values in its dtype), which is the sum of every slice's share. Pass
    ``reduce_input_grad=False`` when the layer that produced ``input`` already
    all-reduces its gradient (Megatron-LM's column-parallel LM head does):
    each rank then gets only its own share.

    Other arguments: as in :func:`vocab_parallel_cross_entropy`.
    """
    from .linear import _check_linear_arguments, default_chunk_size

    ignore_index = -100 if ignore_index is None else ignore_index  # as lsce.linear_cross_entropy

    def local_checks():
        _check_linear_arguments(input, local_linear_weight, target, local_linear_bias, chunk_size)
        shape = tuple(input.shape[:-1]) + (local_linear_weight.shape[0],)
        return torch.empty((), dtype=input.dtype, device=input.device).expand(shape)

    grad_input = torch.is_grad_enabled() and isinstance(input, Tensor) and input.requires_grad
    _, sl, y, w = _prepare(local_checks, target, group, vocab_start_index, weight, smoothing_prior, ignore_index,
                           reduction, label_smoothing, z_loss, softcap, "auto",
                           options=(bool(reduce_input_grad) and grad_input,))
    x = input.reshape(-1, input.shape[-1])
    chunk = default_chunk_size(x.shape[0], x.shape[1], sl.width) if chunk_size is None else chunk_size
    ce, lse = _VocabParallelLinearRows.apply(x, local_linear_weight, local_linear_bias, y, sl, chunk,
                                             bool(reduce_input_grad))
    return _reduce(ce, lse, y, w, sl, float(z_loss), reduction, target.shape).to(input.dtype)
