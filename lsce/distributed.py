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
the soft-capped logits; one row, target ``y``; every term relative to a max,
lsce/interface.py)::

    loss = (1 − ε)·w_y·((m − zc_y) + log_s) + ε·(C·log_s + Σ_k c_k·(m − zc_k))
         = X·log_s + Σ_r (T_r + X_r·(m − m_r))
    T_r  = (1 − ε)·w_y·(m_r − zc_y)·[y in slice r] + ε·Σ_{k in r} c_k·(m_r − zc_k)
    X_r  = (1 − ε)·w_y·[y in slice r] + ε·C_r,   C_r = Σ_{k in r} c_k,   X = Σ_r X_r
    m    = max_r m_r,   log_s = log Σ_r exp((m_r − m) + log_s_r)

with ``m_r`` the slice's max and ``log_s_r = log Σ_{k in r} exp(zc_k − m_r)``,
so a row needs only per-row values of each slice: the forward is **one
all_gather of an (N, 4) tensor** ``[m_r, log_s_r, T_r, X_r]`` (accumulation
dtype), combined locally in rank order, so that every rank gets bitwise the
same loss. Nothing is formed as the difference of two absolute logsumexps,
so rows far from 0 (``randn + 1e6``, −1e30) keep their precision, as in one
process. Before it, **one all_gather of 8 int64 per rank** checks that the ranks
agree (rows, dtype, options, slices tiling ``[0, K)``) and gives the default
``vocab_start_index``; a mismatch raises on every rank instead of leaving
some waiting in a collective. **Backward sends nothing**: the global ``m``
and ``log_s`` are saved. The z-loss ``λ·lse²`` is added outside the autograd
function, from the returned ``lse = m + log_s``, so it reaches the gradient
through the lse upstream.

The per-row kernels (lsce/interface.py, through lsce.ops.row_kernels) do
the N×K_r work, called with the slice's own coefficients: ``w_r`` and
``c_r``, the slice's entries of the global ``w`` and ``c``, the uniform
``1/K`` (not ``1/K_r``) without weight and prior. A row's target is its local
column where it lies in the slice; a target outside ``[0, K_r)`` tells the
kernels that the true class is elsewhere (no true-class term); -2 marks
ignored rows. The rest is O(N):

* forward: the kernels, with every target outside the slice and 0 as the
  coefficient of log_s, give ``loss_r = ε·Σ_{k in r} c_k·(m_r − zc_k)``,
  ``m_r`` and ``log_s_r``; ``T_r`` adds the true-class term, a gather of
  ``zc_y`` at the local target. With ``ε = 0`` only that gather is used, so
  -inf logits give no ``0·∞``.
* backward: with ``g`` and ``h`` the upstream gradients of a row's loss and
  lse, one backward call with the local targets, the global ``C`` and the
  global ``(m, log_s)`` computes the slice's gradient, true-class term
  included; its coefficient of ``p`` lacks ``g·(1 − ε)·w_y`` on rows whose
  target is elsewhere, which ``h`` makes up.

Costs per call: 2 all_gathers in forward (8·W int64, and 4·N·W per-row
values), none in backward (the linear variant adds one all_reduce of the
input's gradient). The checks' all_gather runs on the CPU when the group has
a CPU backend (gloo, or "cpu:gloo,cuda:nccl"); on an NCCL-only group it is the
one host sync of a call. Ranks must pass the same target, weight and prior;
that is not verified.

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

from . import checks, ops
from .functional import reduce_rows
from .interface import Coefficients, RowOptions, acc_dtype, coefficients, fixed_sum
from .linear import GradSums, LogitChunks, check_linear_arguments, default_chunk_size

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "check_agreement"]

# The kernels' targets for ignored rows and for rows whose true class is in
# another slice: never a local column, whatever the user's ignore_index is.
_IGNORED, _ELSEWHERE = -2, -1
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


def _meta_device(group, device: Optional[torch.device]) -> torch.device:
    """CPU when the group can run collectives there (no GPU sync), else the logits' device."""
    try:
        config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl" or "gloo"
    except (AttributeError, RuntimeError, ValueError):
        config = str(dist.get_backend(group))
    if "cpu:" in config or config in ("gloo", "mpi"):
        return torch.device("cpu")
    if device is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device())


def _check_slice(local_logits, target) -> None:
    """This rank's logits (classes last) and global targets."""
    checks.check_float("local_logits", local_logits, "logits", "its vocabulary slice")
    checks.check_target(target, local_logits.device)
    if tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(
            f"lsce: target shape {tuple(target.shape)} does not match local_logits shape "
            f"{tuple(local_logits.shape)}: expected {tuple(local_logits.shape[:-1])} (classes are the last dimension)")
    if local_logits.shape[-1] < 1:
        raise ValueError("lsce: local_logits has an empty vocabulary slice (last dimension 0); at least 1 is needed")


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
        names = [str(checks.FLOAT_DTYPES[d]) for d in dtypes]
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
    y_local: Tensor  # the kernels' target: col where own, _ELSEWHERE or _IGNORED otherwise
    w_y: Tensor  # weight[target] (1 without weight; any value on ignored rows)

    def chunk(self, start: int, end: int) -> "_Rows":
        return _Rows(*(t[start:end] for t in self))


def _shift(m: Tensor) -> Tensor:
    """What a max is subtracted as: 0 for −inf (lsce.interface: an all −inf row or slice)."""
    return torch.where(m == float("-inf"), 0.0, m)


class _Slice:
    """One call's constants on this rank's slice, and the steps of the forward and backward."""

    def __init__(self, start, width, coef: Coefficients, eps, cap, ignore_index, backend, group, world, acc, device):
        self.start, self.width, self.eps, self.ignore_index, self.acc = start, width, eps, ignore_index, acc
        self.group, self.world, self.coef = group, world, coef
        cols = slice(start, start + width)
        w_r = None if coef.weight is None else coef.weight[cols]
        c_r = None if coef.c is None else coef.c[cols]
        self.local = Coefficients(w_r, c_r, coef.C, coef.uniform_over)
        # The forward's: 0 as log_s's coefficient, so that the kernels' loss is
        # the slice's ε·Σ c_k·(m_r − zc_k) alone (lsce/interface.py).
        zero = 0.0 if c_r is None else torch.zeros((), dtype=acc, device=device)
        self.stats_coef = Coefficients(w_r, c_r, zero, coef.uniform_over)
        # C_r = Σ_{k in r} c_k: the slice's share of log_s's coefficient.
        self.C_r = width / coef.uniform_over if c_r is None else fixed_sum(c_r.double()).to(acc)
        self.opts = RowOptions(_IGNORED, eps, 0.0, cap)
        self.kernels = ops.row_kernels(backend, device)

    def rows(self, y: Tensor) -> _Rows:
        valid = y != self.ignore_index
        own = valid & (y >= self.start) & (y < self.start + self.width)
        col = torch.where(own, y - self.start, 0)
        w = self.coef.weight
        w_y = torch.ones_like(y, dtype=self.acc) if w is None else w[torch.where(valid, y, 0)]
        y_local = torch.where(own, col, torch.where(valid, _ELSEWHERE, _IGNORED))
        return _Rows(valid, own, col, y_local, w_y)

    def local_stats(self, z: Tensor, rows: _Rows) -> Tensor:
        """(N, 4): ``[m_r, log_s_r, T_r, X_r]`` of the rows of the slice ``z``, from one read of it."""
        eps = self.eps
        elsewhere = torch.where(rows.valid, _ELSEWHERE, _IGNORED)  # no true-class term in loss_r
        T_r, m_r, log_s_r = self.kernels.forward(z, elsewhere, self.stats_coef, self.opts)  # T_r: ε·Σ c·(m_r − zc)
        true = torch.where(rows.own, (1 - eps) * rows.w_y, 0)
        if eps < 1:
            zc_y = _capped(z.gather(1, rows.col[:, None]).squeeze(1).to(self.acc), self.opts.softcap)
            T_r = T_r + torch.where(rows.own, true * (_shift(m_r) - zc_y), 0)  # relative to 0 where m_r is -inf
        return torch.stack([m_r, log_s_r, T_r, true + eps * self.C_r], dim=1)

    def combine(self, stats: Tensor, rows: _Rows):
        """(per-row cross-entropy, global m, global log_s): the one all_gather, combined in rank order."""
        gathered = _all_gather(stats, self.group, self.world)  # (world, N, 4)
        m_r, log_s_r, T_r, X_r = gathered.unbind(2)
        m = m_r.amax(0)
        shift = _shift(m)
        log_s = torch.logsumexp((m_r - shift) + log_s_r, dim=0)
        # X_r·(m − m_r) is 0 where X_r is, also for a slice of only −inf.
        moved = torch.where(X_r == 0, 0, X_r * (shift - _shift(m_r)))
        X = (1 - self.eps) * rows.w_y + self.eps * self.coef.C
        return torch.where(rows.valid, X * log_s + (T_r + moved).sum(0), 0), m, log_s

    def upstream(self, grad_ce: Optional[Tensor], grad_lse: Optional[Tensor], rows: _Rows, m: Tensor):
        """(g, h) for the kernels' backward: the loss's upstream (0 on ignored
        rows) and the lse's, plus the true-class weight of rows whose target
        lies in another slice (the kernels add it only where it lies here)."""
        g = torch.zeros_like(m) if grad_ce is None else torch.where(rows.valid, grad_ce.to(m.dtype), 0)
        h = torch.where(rows.valid & ~rows.own, g * (1 - self.eps) * rows.w_y, 0)
        return g, h if grad_lse is None else h + grad_lse.to(m.dtype)

    def slice_grad(self, g: Tensor, h: Tensor, z: Tensor, rows: _Rows, m: Tensor, log_s: Tensor,
                   out=None) -> Tensor:
        """The gradient of the slice ``z``: one read and one write by the kernels."""
        return self.kernels.backward(g, h, z, rows.y_local, self.local, self.opts, m, log_s, out=out)


class _VocabParallelRows(torch.autograd.Function):
    """Per-row (cross-entropy without z-loss, global lse) of the full logits, from this rank's slice."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, sl: _Slice):
        rows = sl.rows(y)
        ce, m, log_s = sl.combine(sl.local_stats(z, rows), rows)
        ctx.save_for_backward(z, m, log_s, *rows)
        ctx.slice = sl
        ctx.set_materialize_grads(False)
        return ce, m + log_s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Optional[Tensor], grad_lse: Optional[Tensor]):
        z, m, log_s, *rows = ctx.saved_tensors
        rows, sl = _Rows(*rows), ctx.slice
        return sl.slice_grad(*sl.upstream(grad_ce, grad_lse, rows, m), z, rows, m, log_s), None, None


class _VocabParallelLinearRows(torch.autograd.Function):
    """As _VocabParallelRows for the logits ``x @ W_r.T + b_r``, chunk by chunk
    (lsce.linear.LogitChunks): the slice's logits never exist whole."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Optional[Tensor], y: Tensor, sl: _Slice, chunk: int,
                reduce_input_grad: bool):
        rows = sl.rows(y)
        acc = acc_dtype(x.dtype)
        stats = x.new_empty((x.shape[0], 4), dtype=acc)
        for s, e, z in LogitChunks(x, W, b, chunk):
            stats[s:e] = sl.local_stats(z, rows.chunk(s, e))
        ce, m, log_s = sl.combine(stats, rows)
        ctx.save_for_backward(x, W, b, m, log_s, *rows)
        ctx.slice, ctx.chunk, ctx.reduce_input_grad = sl, chunk, reduce_input_grad
        ctx.set_materialize_grads(False)
        return ce, m + log_s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Optional[Tensor], grad_lse: Optional[Tensor]):
        x, W, b, m, log_s, *rows = ctx.saved_tensors
        rows, sl = _Rows(*rows), ctx.slice
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
        g, h = sl.upstream(grad_ce, grad_lse, rows, m)
        grads = GradSums(x, W, b, mask)
        for s, e, z in LogitChunks(x, W, b, ctx.chunk):
            d = sl.slice_grad(g[s:e], h[s:e], z, rows.chunk(s, e), m[s:e], log_s[s:e], out=z)
            grads.add(d, x[s:e], W, s, e)
        gi, gw, gb = grads.tensors(x, W, b, final=True)
        if mask[0] and ctx.reduce_input_grad:  # the input's gradient is the sum over the slices
            dist.all_reduce(gi, group=sl.group)
        return (*(t if m else None for t, m in zip((gi, gw, gb), mask)), None, None, None, None)


def _prepare(local_checks, target, group, vocab_start_index, weight, smoothing_prior, ignore_index,
             reduction, label_smoothing, z_loss, softcap, backend, options=()):
    """The checks every rank agrees on (one small all_gather), then the call's constants.

    ``local_checks()`` checks what only this rank has and returns the dtype,
    width and device of its logits. Returns ``(slice, y, w)``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("lsce: the vocabulary-parallel losses need torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("lsce: this process is not a member of the process group passed as group")

    own_error, device = None, None
    try:
        dtype, width, device = local_checks()
        checks.check_options(None, device, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
        if vocab_start_index is not None and (
            isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int) or vocab_start_index < 0
        ):
            raise ValueError(f"lsce: vocab_start_index must be None or an int >= 0, got {vocab_start_index!r}")
        ignore_index = checks.as_ignore_index(ignore_index)
    except (TypeError, ValueError, IndexError) as e:
        own_error = e
    meta = [0, -1, -1, -1, -1, -1, -1, 0]
    if own_error is None:
        every = (ignore_index, reduction, float(label_smoothing), float(z_loss), float(softcap or 0.0),
                 weight is None, smoothing_prior is None) + tuple(options)
        meta[1:] = [
            target.numel(), width, -1 if vocab_start_index is None else vocab_start_index,
            -1 if weight is None else weight.shape[0],
            -1 if smoothing_prior is None else smoothing_prior.shape[0],
            checks.FLOAT_DTYPES.index(dtype), _fingerprint(every),
        ]
    else:
        meta[0] = next(code for code, kind in enumerate(_ERRORS) if kind and isinstance(own_error, kind))
    meta_t = torch.tensor(meta, dtype=torch.int64, device=_meta_device(group, device))
    K, start = _agree(_all_gather(meta_t, group, world).tolist(), rank, own_error)

    acc = acc_dtype(dtype)
    y = target.reshape(-1).to(torch.int64)
    prior = None if smoothing_prior is None else smoothing_prior.to(acc).contiguous()
    checks.check_values(y, prior, K, ignore_index)
    eps = float(label_smoothing)
    coef = coefficients(K, weight, prior, eps, acc, device)
    sl = _Slice(start, width, coef, eps, float(softcap or 0.0), ignore_index, backend, group, world, acc, device)
    return sl, y, coef.weight


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
    out_dtype: Optional[torch.dtype] = None,
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
        out_dtype: the loss's dtype, as in :func:`lsce.cross_entropy`.

    Every rank returns the same loss; backward gives the gradient of this
    rank's slice. Collectives: see the module docstring (two small
    all_gathers in forward, none in backward).
    """
    def local_checks():
        _check_slice(local_logits, target)
        return local_logits.dtype, local_logits.shape[-1], local_logits.device

    sl, y, w = _prepare(local_checks, target, group, vocab_start_index, weight, smoothing_prior, ignore_index,
                        reduction, label_smoothing, z_loss, softcap, backend, options=(bool(return_lse),))
    z = local_logits.reshape(-1, sl.width)
    if z.stride(-1) != 1:
        z = z.contiguous()
    ce, lse = _VocabParallelRows.apply(z, y.contiguous(), sl)
    out = _reduce(ce, lse, y, w, sl, float(z_loss), reduction, target.shape).to(out_dtype or local_logits.dtype)
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
    out_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
):
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

    Other arguments (``out_dtype`` and ``return_lse`` included): as in :func:`vocab_parallel_cross_entropy`.
    """
    ignore_index = -100 if ignore_index is None else ignore_index  # as lsce.linear_cross_entropy

    def local_checks():
        K_r, _ = check_linear_arguments(input, local_linear_weight, target, local_linear_bias)
        checks.check_chunk_size(chunk_size)
        return input.dtype, K_r, input.device

    grad_input = torch.is_grad_enabled() and isinstance(input, Tensor) and input.requires_grad
    sl, y, w = _prepare(local_checks, target, group, vocab_start_index, weight, smoothing_prior, ignore_index,
                        reduction, label_smoothing, z_loss, softcap, "auto",
                        options=(bool(reduce_input_grad) and grad_input, bool(return_lse)))
    x = input.reshape(-1, input.shape[-1])
    chunk = default_chunk_size(x.shape[0], x.shape[1], sl.width, x.dtype) if chunk_size is None else chunk_size
    ce, lse = _VocabParallelLinearRows.apply(x, local_linear_weight, local_linear_bias, y.contiguous(), sl, chunk,
                                             bool(reduce_input_grad))
    out = _reduce(ce, lse, y, w, sl, float(z_loss), reduction, target.shape).to(out_dtype or input.dtype)
    return (out, lse.reshape(target.shape)) if return_lse else out


def check_agreement(groups, own_error: Optional[Exception], options, device: Optional[torch.device] = None) -> None:
    """The same verdict on every rank of a mesh before any collective of a call:
    raises on every rank if one of them failed its own checks (``own_error``,
    raised as is where it happened) or the ranks' ``options`` differ.

    ``groups`` are the process groups of a device mesh's dimensions (one per
    dimension): one all_gather of 4 int64 per group, in order; each passes on
    what the previous ones found, so after the last every rank of the mesh
    has heard of every other (lsce.dtensor calls this before the collectives
    of its reductions over the batch dimensions, which a failing rank would
    otherwise leave its peers waiting in).
    """
    code = 0 if own_error is None else next(c for c, kind in enumerate(_ERRORS) if kind and isinstance(own_error, kind))
    me = dist.get_rank()
    # error code, the global rank it came from (-1: none), options differ (0/1), options fingerprint
    meta = [code, me if code else -1, 0, _fingerprint(options)]
    for group in groups:
        world = dist.get_world_size(group)
        t = torch.tensor(meta, dtype=torch.int64, device=_meta_device(group, device))
        rows = _all_gather(t, group, world).tolist()
        failed = [m for m in rows if m[0]]
        if failed and not meta[0]:
            meta[0], meta[1] = failed[0][0], failed[0][1]
        meta[2] = int(any(m[2] for m in rows) or len({m[3] for m in rows}) > 1)
    if own_error is not None:
        raise own_error
    if meta[0]:
        raise _ERRORS[meta[0]](
            f"lsce: rank {meta[1]} failed its argument checks (its own error says why); every rank raises so "
            "that none is left waiting in a collective")
    if meta[2]:
        raise ValueError("lsce: the ranks of the device mesh were called with different options (ignore_index, "
                         "reduction, label_smoothing, z_loss, softcap, weight/smoothing_prior given or not, "
                         "return_lse, chunk_size) or with different kinds of placements")
