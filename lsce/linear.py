"""``lsce.linear_cross_entropy``: the LM head's matmul fused with the loss.

``linear_cross_entropy(h, W, y, ...)`` equals ``lsce.cross_entropy(h @ W.T + b, y, ...)``
but never materialises the N×K logits: rows are processed in chunks, and per
chunk the logits (one matmul), the per-row forward and the logit gradient (the
kernels of ``lsce.cross_entropy``, through lsce.ops' kernel layer; the
gradient is written over the chunk's logits, so one (chunk, K) buffer serves
every chunk) and that chunk's share of the input and weight gradients (two
matmuls) are computed, then the buffer is reused for the next chunk.

Two strategies, registered as ops of their own so that
``torch.compile(fullgraph=True)`` sees one opaque node per call:

* ``mean``/``sum`` (``lsce::linear_cross_entropy_reduced``): the upstream
  gradient is one scalar, so the gradients for a unit upstream are computed in
  the forward chunks (3 matmuls in all) and backward only scales them, an
  O(N·H + K·H) pass.
* ``none`` (``lsce::linear_cross_entropy_rows`` + ``..._rows_backward``): the
  per-row upstream gradient is only known in backward, which recomputes each
  chunk's logits (4 matmuls in all) and folds the upstream into the kernel's
  single pass over the chunk.

Two designs of the loop, chosen per call by :func:`vocabulary_blocks`:

* **row chunks** (above): the weight (and bias) gradient is summed over chunks
  in fp32 (fp64 for fp64 input) whatever the input dtype, then rounded once.
  Below fp32 that K×H sum is a buffer of its own, twice the weight gradient.
* **vocabulary blocks** (bf16 where that sum would outweigh the logits saved):
  the same buffer first serves row chunks of full rows (logits, per-row
  forward, logit gradient, the chunk's input gradient: 2 matmuls), then
  blocks of classes over all rows (logits recomputed, the block's gradient
  with the rows' global m and log_s, and its rows of the weight gradient in one matmul over
  every row, written straight into the result: 2 matmuls). One matmul more
  than row chunks, no K×H sum, each gradient element rounded once. With
  ``mean``/``sum`` the first pass runs in forward with mean's 1/Σw folded into
  the logit gradients (bf16 has fp32's range) and the second in backward,
  where the true upstream is known (``lsce::..._rows_backward`` with the
  input's gradient masked off).
"""

from __future__ import annotations

import contextlib

import math
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import checks, ops
from .functional import cross_entropy, mean_denominators, needs_differentiable_statement, reduce_rows, result_dtype
from .interface import RowOptions, acc_dtype, coefficients

# Rows per chunk, at least: each chunk's matmuls stream all of W and its
# weight-gradient sum, a cost ∝ K·H per chunk that more rows hide; a bf16/fp16
# matmul is faster and needs more rows (measurements: benchmarks/RESULTS.md,
# "Chunk floors of lsce.linear").
MIN_CHUNK_ROWS = 512  # when the dtype is not given
_MIN_CHUNK_ROWS = {torch.float32: 384, torch.float64: 384, torch.bfloat16: 1024, torch.float16: 1024}
# Classes per block of a low-precision chunk's weight-gradient product: small
# enough that the block's product is still in cache when it is added to the
# fp32 sum (on CPU, bf16: 8192-class blocks took 2.4× as long as 2048).
_CLASS_BLOCK = 2048
# Rows per chunk, at least, with vocabulary blocks: their chunks hold no
# weight-gradient sum to amortise, so fewer rows (a smaller buffer) suffice;
# but never more than an eighth of the rows (blocked_chunk_floor).
_MIN_BLOCKED_ROWS = 256
# The kernels' targets in a vocabulary block: ignored rows, and rows whose
# true class lies in another block (lsce/interface.py: any target outside
# the columns that is not ignore_index).
_IGNORED, _ELSEWHERE = -2, -1


def default_chunk_size(N: int, H: int, K: int, dtype: Optional[torch.dtype] = None, *,
                       floor: Optional[int] = None) -> int:
    """Rows per chunk when ``chunk_size`` is None.

    A chunk holds one row-block of K values (its logits, then their gradient
    written over them), so ``ceil(N·H / K)`` rows keep that transient memory
    at about the size of ``input`` (N·H values). LM heads have K ≫ H, where
    that is only a few rows, so the chunk is never smaller than a floor
    (``_MIN_CHUNK_ROWS[dtype]``: 384 rows for fp32/fp64, 1024 for bf16/fp16;
    ``MIN_CHUNK_ROWS``, 512, without a dtype), below which the passes over W
    and the weight-gradient sum per chunk slow the step down. At most N; then evened
    out so that the last chunk is not a sliver (same number of chunks, smaller
    buffer).
    """
    if N <= 0:
        return 1
    floor = _MIN_CHUNK_ROWS.get(dtype, MIN_CHUNK_ROWS) if floor is None else floor
    rows = max(floor, -(-N * H // max(K, 1)))
    if rows >= N:
        return N
    chunks = -(-N // rows)
    return -(-N // chunks)


def blocked_chunk_floor(N: int) -> int:
    """The default chunk's floor with vocabulary blocks: 256 rows, at most N/8
    (the buffer then holds at most an eighth of the N×K logits, the blocks'
    point)."""
    return max(1, min(_MIN_BLOCKED_ROWS, -(-N // 8)))


def vocabulary_blocks(N: int, H: int, K: int, dtype: torch.dtype, chunk_size: Optional[int] = None) -> bool:
    """The design of a call: True for vocabulary blocks, False for row chunks
    (module docstring). ``chunk_size``: the caller's, or None for the default.

    Vocabulary blocks (one matmul more) for bf16 when the row chunks' extra
    memory — the fp32 K×H weight-gradient sum plus one chunk of K logits —
    would exceed a quarter of the N×K logits that fusing avoids (PyTorch holds
    at least two N×K tensors). fp32/fp64 sum into the result itself; fp16
    stays on row chunks, whose unit-upstream gradients and fp32 sum keep clear
    of its narrow range.
    """
    if dtype != torch.bfloat16:
        return False
    rows = default_chunk_size(N, H, K, dtype) if chunk_size is None else min(chunk_size, max(N, 1))
    return 4 * K * H + 2 * rows * K > 2 * N * K / 4


_WEIGHT_RELEASED = [0]  # depth of weight_released_after_forward() blocks (a plain int: torch.compile guards it)


@contextlib.contextmanager
def weight_released_after_forward():
    """In this block, a fused head with ``reduction`` mean or sum keeps no
    reference to its weight for the backward: it takes row chunks, whose
    gradients are computed in the forward, never vocabulary blocks (whose
    backward reads the weight again). For callers that free the weight's
    storage after the forward, as FSDP2's ``reshard()`` does (lsce.integrations.fsdp)."""
    _WEIGHT_RELEASED[0] += 1
    try:
        yield
    finally:
        _WEIGHT_RELEASED[0] -= 1


class LogitChunks:
    """The row chunks of the logits ``x @ W.T + b``, each computed into the
    front rows of one private (chunk_size, K) buffer, which the next chunk
    reuses. Iterating gives ``(start, end, z)``. A chunk's logit gradient may
    then be written over ``z`` (every kernel reads each logit before it stores
    that element's gradient; lsce.interface.grad_buffer), so a chunk holds one
    K-wide row block, not two. Serves lsce.linear and lsce.distributed."""

    def __init__(self, x: Tensor, W: Tensor, b: Optional[Tensor], chunk_size: int):
        self.x, self.W, self.b, self.chunk_size = x, W, b, chunk_size
        self.buffer = x.new_empty((min(chunk_size, x.shape[0]), W.shape[0]))

    def __iter__(self):
        for s in range(0, self.x.shape[0], self.chunk_size):
            e = min(s + self.chunk_size, self.x.shape[0])
            out = self.buffer[: e - s]
            if self.b is None:
                yield s, e, torch.mm(self.x[s:e], self.W.t(), out=out)
            else:
                yield s, e, torch.addmm(self.b, self.x[s:e], self.W.t(), out=out)


class _Chunks(LogitChunks):
    """LogitChunks with the per-row kernels of one call. The kernels are called
    directly (lsce.ops.row_kernels) rather than through
    ``torch.ops.lsce.cross_entropy_*``: those ops must not write into their
    inputs, whereas this buffer belongs to the enclosing linear op, which is
    opaque to autograd and torch.compile."""

    def __init__(self, x: Tensor, W: Tensor, b: Optional[Tensor], y: Tensor, weight: Optional[Tensor],
                 prior: Optional[Tensor], options: tuple, chunk_size: int):
        super().__init__(x, W, b, chunk_size)
        self.y, self.opts = y, RowOptions(*options)  # (ignore_index, label_smoothing, z_loss, softcap)
        self.coef = coefficients(W.shape[0], weight, prior, self.opts.label_smoothing, acc_dtype(x.dtype), x.device)
        self.kernels = ops.row_kernels("auto", x.device)

    def per_row(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Three empty (N,) vectors in the accumulation dtype, for the per-row (loss, m, log_s)."""
        return tuple(torch.empty(self.x.shape[0], dtype=acc_dtype(self.x.dtype), device=self.x.device) for _ in range(3))

    def forward(self, z: Tensor, s: int, e: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The chunk's per-row (loss, m, log_s) (lsce.interface: lse = m + log_s)."""
        return self.kernels.forward(z, self.y[s:e], self.coef, self.opts)

    def backward(self, z: Tensor, s: int, e: int, grad_loss: Tensor, grad_lse: Optional[Tensor],
                 m: Tensor, log_s: Tensor) -> Tensor:
        """The chunk's logit gradient, written over its logits ``z``."""
        return self.kernels.backward(grad_loss, grad_lse, z, self.y[s:e], self.coef, self.opts, m, log_s, out=z)

    def blocks(self):
        """Blocks of classes ``(k0, k1, z)``: ``z`` the (N, k1 − k0) logits of
        classes [k0, k1) of every row, in the chunk buffer (as many classes as
        its chunk_size·K values hold; at least one, N values, when chunk_size·K < N)."""
        N, K = self.x.shape[0], self.W.shape[0]
        if self.buffer.numel() < N:
            self.buffer = self.x.new_empty(N)
        width = K if N == 0 else min(K, self.buffer.numel() // N)
        flat = self.buffer.view(-1)
        for k0 in range(0, K, width):
            k1 = min(k0 + width, K)
            out, Wb = flat[: N * (k1 - k0)].view(N, k1 - k0), self.W[k0:k1].t()
            yield k0, k1, (torch.mm(self.x, Wb, out=out) if self.b is None
                           else torch.addmm(self.b[k0:k1], self.x, Wb, out=out))

    def class_grads(self, grad_loss: Tensor, grad_lse: Optional[Tensor], m: Tensor, log_s: Tensor,
                    weight: bool, bias: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(grad_weight, grad_bias) in the parameters' dtypes, block by block of
        classes: each block's rows of grad_weight in one matmul over all rows
        (fp32 accumulation inside it, rounded once), no K×H sum.

        A block's kernels see local targets (lsce/interface.py): the rows'
        global m and log_s (so that p is the full row's softmax), the block's
        class coefficients with the full vocabulary's ``C``,
        and, for rows whose true class is in another block, the true-class
        weight ``g·(1 − ε)·w_y`` in the lse upstream, where the kernels would
        have added it to ``A``."""
        x, W, b, y, opts, coef = self.x, self.W, self.b, self.y, self.opts, self.coef
        gw = torch.empty(W.shape, dtype=W.dtype, device=W.device) if weight else None
        gb = torch.empty(W.shape[:1], dtype=b.dtype, device=b.device) if bias else None
        if gw is None and gb is None:
            return gw, gb
        valid = y != opts.ignore_index
        g = torch.where(valid, grad_loss.to(m.dtype), 0)
        w_y = 1 if coef.weight is None else coef.weight[torch.where(valid, y, 0)]
        true_class = g * (1 - opts.label_smoothing) * w_y
        local_opts = opts._replace(ignore_index=_IGNORED)
        for k0, k1, z in self.blocks():
            own = valid & (y >= k0) & (y < k1)
            target = torch.where(own, y - k0, torch.where(valid, _ELSEWHERE, _IGNORED))
            h = torch.where(own | ~valid, 0, true_class)
            h = h if grad_lse is None else h + grad_lse
            local = coef._replace(weight=None if coef.weight is None else coef.weight[k0:k1],
                                  c=None if coef.c is None else coef.c[k0:k1])
            d = self.kernels.backward(g, h, z, target, local, local_opts, m, log_s, out=z)
            if gw is not None:
                torch.mm(d.t(), x, out=gw[k0:k1])
            if gb is not None:
                gb[k0:k1] = d.sum(0, dtype=m.dtype)
        return gw, gb


class GradSums:
    """Where each chunk's logit gradient ``d`` goes: its rows of grad_input, and
    running sums (fp32; fp64 for fp64) of the weight and bias gradients."""

    def __init__(self, x: Tensor, W: Tensor, b: Optional[Tensor], grad_mask: List[bool]):
        acc = acc_dtype(x.dtype)
        self.input = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad_mask[0] else None
        # The first chunk writes its product over the weight sum (_add_product), so
        # no K×H pass of zeros; only with no rows at all is it a sum of nothing.
        make = torch.zeros if x.shape[0] == 0 else torch.empty
        self.weight = make(W.shape, dtype=acc, device=W.device) if grad_mask[1] else None
        self.bias = (torch.zeros(W.shape[0], dtype=acc, device=W.device)
                     if grad_mask[2] and b is not None else None)
        self.wanted = any(t is not None for t in (self.input, self.weight, self.bias))

    def add(self, d: Tensor, x: Tensor, W: Tensor, start: int, end: int) -> None:
        if self.input is not None:
            torch.mm(d, W, out=self.input[start:end])
        if self.weight is not None:
            _add_product(self.weight, d, x, first=start == 0)
        if self.bias is not None:
            self.bias.add_(d.sum(0, dtype=self.bias.dtype))

    def tensors(self, x: Tensor, W: Tensor, b: Optional[Tensor], final: bool):
        """(grad_input, grad_weight, grad_bias); an empty tensor for each one not
        asked for. ``final`` rounds the sums to the parameters' dtypes."""
        gw, gb = self.weight, self.bias
        if final:
            gw = None if gw is None else gw.to(W.dtype)
            gb = None if gb is None else gb.to(b.dtype)
        # A fresh empty tensor for each: an op's outputs must not alias one another.
        return tuple(x.new_empty(0) if t is None else t for t in (self.input, gw, gb))


def _add_product(acc: Tensor, d: Tensor, x: Tensor, first: bool) -> None:
    """``acc += d.T @ x`` with ``acc`` in fp32 (fp64 for fp64): the weight
    gradient's sum over chunks, for bf16/fp16 chunks too. ``first``: ``acc =
    d.T @ x`` instead, over whatever ``acc`` holds (beta=0 ignores even NaN).

    CUDA's matmul writes bf16/fp16 products in fp32. CPU has no such matmul:
    for bf16 each block's product is a bf16 matmul (fp32 inside, rounded once
    per chunk) added in fp32, as fast as one bf16 matmul on an AMX CPU and 2 to
    5× faster than an fp32 matmul of upcast operands; fp16, whose range a
    chunk's product may exceed, is upcast.
    """
    beta = 0 if first else 1
    if d.dtype == acc.dtype:
        acc.addmm_(d.t(), x, beta=beta)
        return
    upcast = d.dtype == torch.float16 and not d.is_cuda
    if upcast:
        x = x.to(acc.dtype)
    for k in range(0, d.shape[1], _CLASS_BLOCK):
        rows, block = acc[k : k + _CLASS_BLOCK], d[:, k : k + _CLASS_BLOCK].t()
        if upcast:
            rows.addmm_(block.to(acc.dtype), x, beta=beta)
            continue
        product = torch.mm(block, x, out_dtype=acc.dtype) if d.is_cuda else torch.mm(block, x)
        if first:
            rows.copy_(product)
        else:
            rows.add_(product)


def _lse_upstream(lse: Tensor, y: Tensor, lse_coef: Optional[Tensor], ignore_index: int) -> Optional[Tensor]:
    """The lse's upstream per row that the reduced loss adds to the chunks'
    upstream 1 (in units of mean's 1/Σw): ``lse_coef·lse`` on non-ignored rows;
    None without a coefficient (:func:`_lse_coef`)."""
    return None if lse_coef is None else torch.where(y != ignore_index, lse_coef * lse, 0)


def _lse_coef(y: Tensor, weight: Optional[Tensor], ignore_index: int, z_loss: float, mean: bool,
              acc: torch.dtype) -> Optional[Tensor]:
    """With class weights ``mean`` averages the z-loss over the count, not Σw:
    the lse gradient makes up the difference, (Σw/count − 1)·2λ per row; None
    where there is no difference."""
    if not (mean and weight is not None and z_loss):
        return None
    _, count, total_weight = mean_denominators(y, weight, ignore_index, acc)
    return 2 * z_loss * (total_weight / count - 1)


def _reduced_impl(
    x: Tensor, W: Tensor, b: Optional[Tensor], y: Tensor, weight: Optional[Tensor], prior: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
    by_class: bool, mean: bool, grad_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reduced loss, and the gradients of the loss for a unit upstream
    gradient, up to the factor ``grad_scale``: (loss, grad_scale, grad_input,
    grad_weight, grad_bias, m, log_s), the last two per row (lsce.interface).
    Row chunks: grad_weight and grad_bias are sums in the accumulation dtype.
    Vocabulary blocks (``by_class``): grad_input has ``grad_scale`` folded in,
    and grad_weight and grad_bias are empty: backward computes them (the
    blocks' pass, with the rows' m and log_s), rounded once with the true
    upstream. The first five are lsce.linear_soft's reduced op's outputs too."""
    acc = acc_dtype(x.dtype)
    checks.check_values(y, prior, W.shape[0], ignore_index)
    _, count, total_weight = mean_denominators(y, weight, ignore_index, acc)
    one = torch.ones((), dtype=acc, device=x.device)
    # As F.cross_entropy: no row at all gives zero gradients, rows of weight 0 NaN (0/0).
    grad_scale = torch.where(count != 0, 1 / total_weight, 0) if mean else one
    # Row chunks get upstream 1 per row and mean's 1/Σw is applied in backward
    # (keeps fp16 chunk gradients clear of underflow); vocabulary blocks (bf16,
    # fp32's range) fold it in, so that grad_input is rounded once.
    upstream = grad_scale if by_class else one
    lse_coef = _lse_coef(y, weight, ignore_index, z_loss, mean, acc)
    chunks = _Chunks(x, W, b, y, weight, prior, (ignore_index, label_smoothing, z_loss, softcap), chunk_size)
    grads = GradSums(x, W, b, [grad_mask[0], False, False] if by_class else grad_mask)
    loss, m, log_s = chunks.per_row()
    for s, e, z in chunks:
        loss[s:e], m[s:e], log_s[s:e] = chunks.forward(z, s, e)
        if grads.wanted:
            h = _lse_upstream(m[s:e] + log_s[s:e], y[s:e], lse_coef, ignore_index)
            d = chunks.backward(z, s, e, upstream.expand(e - s), None if h is None else upstream * h,
                                m[s:e], log_s[s:e])
            grads.add(d, x[s:e], W, s, e)
    out = reduce_rows(loss, m + log_s, y, weight, ignore_index, z_loss, "mean" if mean else "sum", ())
    return (out, grad_scale, *grads.tensors(x, W, b, final=False), m, log_s)


def _rows_impl(
    x: Tensor, W: Tensor, b: Optional[Tensor], y: Tensor, weight: Optional[Tensor], prior: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int, by_class: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, m, log_s) of the logits ``x @ W.T + b``, chunk by
    chunk; the backward takes (m, log_s) (lsce.interface), lse = m + log_s is
    the differentiable one. The forward is the same for both designs."""
    checks.check_values(y, prior, W.shape[0], ignore_index)
    chunks = _Chunks(x, W, b, y, weight, prior, (ignore_index, label_smoothing, z_loss, softcap), chunk_size)
    loss, m, log_s = chunks.per_row()
    for s, e, z in chunks:
        loss[s:e], m[s:e], log_s[s:e] = chunks.forward(z, s, e)
    return loss, m + log_s, m, log_s


def _rows_backward_impl(
    grad_loss: Tensor, grad_lse: Optional[Tensor], x: Tensor, W: Tensor, b: Optional[Tensor], y: Tensor,
    weight: Optional[Tensor], prior: Optional[Tensor], m: Tensor, log_s: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int, by_class: bool,
    grad_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``Σ grad_loss·loss + Σ grad_lse·lse`` for (input, weight,
    bias), recomputing each chunk's (or block's) logits; empty where grad_mask is False."""
    chunks = _Chunks(x, W, b, y, weight, prior, (ignore_index, label_smoothing, z_loss, softcap), chunk_size)
    m, log_s = m.contiguous(), log_s.contiguous()  # the kernels index them as plain vectors
    grads = GradSums(x, W, b, [grad_mask[0], False, False] if by_class else grad_mask)
    for s, e, z in chunks if grads.wanted else ():
        h = None if grad_lse is None else grad_lse[s:e]
        grads.add(chunks.backward(z, s, e, grad_loss[s:e], h, m[s:e], log_s[s:e]), x[s:e], W, s, e)
    if not by_class:
        return grads.tensors(x, W, b, final=True)
    gw, gb = chunks.class_grads(grad_loss, grad_lse, m, log_s, grad_mask[1], grad_mask[2] and b is not None)
    return (grads.tensors(x, W, b, final=True)[0], *(x.new_empty(0) if t is None else t for t in (gw, gb)))


_reduced_op = torch.library.custom_op("lsce::linear_cross_entropy_reduced", _reduced_impl, mutates_args=())
_rows_op = torch.library.custom_op("lsce::linear_cross_entropy_rows", _rows_impl, mutates_args=())
_rows_backward_op = torch.library.custom_op(
    "lsce::linear_cross_entropy_rows_backward", _rows_backward_impl, mutates_args=())


def _fake_grads(x, W, b, grad_mask, acc: Optional[torch.dtype]):
    """Shapes of (grad_input, grad_weight, grad_bias): sums in ``acc``, or the
    parameters' dtypes when acc is None."""
    gi = x.new_empty(x.shape) if grad_mask[0] else x.new_empty(0)
    gw = W.new_empty(W.shape, dtype=acc or W.dtype) if grad_mask[1] else x.new_empty(0)
    gb = W.new_empty(W.shape[:1], dtype=acc or b.dtype) if grad_mask[2] and b is not None else x.new_empty(0)
    return gi, gw, gb


@_reduced_op.register_fake
def _(x, W, b, y, weight, prior, ignore_index, label_smoothing, z_loss, softcap, chunk_size, by_class, mean,
      grad_mask):
    acc = acc_dtype(x.dtype)
    grads = _fake_grads(x, W, b, [grad_mask[0], False, False] if by_class else grad_mask, acc)
    return (x.new_empty((), dtype=acc), x.new_empty((), dtype=acc), *grads,
            x.new_empty(x.shape[:1], dtype=acc), x.new_empty(x.shape[:1], dtype=acc))


@_rows_op.register_fake
def _(x, W, b, y, weight, prior, ignore_index, label_smoothing, z_loss, softcap, chunk_size, by_class):
    acc = acc_dtype(x.dtype)
    return tuple(x.new_empty(x.shape[:1], dtype=acc) for _ in range(4))


@_rows_backward_op.register_fake
def _(grad_loss, grad_lse, x, W, b, y, weight, prior, m, log_s, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, by_class, grad_mask):
    return _fake_grads(x, W, b, grad_mask, None)


def _graph_is_freed_after_backward(t: Tensor) -> bool:
    """True in an eager backward without retain_graph/create_graph: the saved
    pre-gradients are then used once only and may be scaled in place."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or type(t) is not Tensor or torch.compiler.is_compiling():
        return False  # tracing (torch.compile), or a torch without the query
    return not keep_graph()


def _scaled(t: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``t · scale`` rounded once to ``dtype``. When the graph is freed after
    this backward, in place on the private pre-gradient (then rounded), so the
    peak never holds a second full-precision copy of the weight gradient."""
    if _graph_is_freed_after_backward(t):
        return t.mul_(scale).to(dtype)
    return (t * scale).to(dtype)


def _reduced_setup_context(ctx, inputs, output):
    # options: the 4 of RowOptions and chunk_size, then by_class (class targets; lsce.linear_soft's op has none).
    x, W, b, y, weight, prior, *options, mean, grad_mask = inputs
    _, grad_scale, gi, gw, gb, *rows = output  # rows: (m, log_s), class targets only
    ctx.mark_non_differentiable(grad_scale, gi, gw, gb, *rows)
    ctx.set_materialize_grads(False)  # no K×H zeros for the unused gradient outputs
    ctx.by_class = len(options) > 5 and options[5]
    # Vocabulary blocks compute the parameters' gradients in backward, from the inputs and the rows' m, log_s.
    ctx.save_for_backward(grad_scale, gi, gw, gb, *((*rows, x, W, b, y, weight, prior) if ctx.by_class else ()))
    ctx.dtypes = (x.dtype, W.dtype, None if b is None else b.dtype)
    ctx.grad_mask, ctx.options, ctx.mean, ctx.n_inputs = grad_mask, options, mean, len(inputs)
    ctx.inputs = _WeakInputs((x, W, b))  # for create_graph=True
    ctx.rest = (y, weight, prior, *options[:5]), "mean" if mean else "sum"  # reduction


def _reduced_backward(ctx, grad_out, *_):
    grad_scale, gi, gw, gb, *inputs = ctx.saved_tensors
    grads = [None, None, None]
    if grad_out is None:
        pass
    elif torch.is_grad_enabled():  # create_graph=True
        (y, weight, prior, *options), reduction = ctx.rest
        grads = _differentiable_grads(grad_out, None, *ctx.inputs.get(), y, weight, prior, options, reduction,
                                      ctx.grad_mask)
    elif not ctx.by_class:
        scale = grad_out * grad_scale
        for i, (t, dtype) in enumerate(zip((gi, gw, gb), ctx.dtypes)):
            if ctx.grad_mask[i] and dtype is not None:
                grads[i] = _scaled(t, scale, dtype)
    else:
        if ctx.grad_mask[0]:
            grads[0] = _scaled(gi, grad_out, ctx.dtypes[0])  # grad_scale is in it
        m, log_s, x, W, b, y, weight, prior = inputs
        mask = [False, ctx.grad_mask[1], ctx.grad_mask[2] and b is not None]
        if mask[1] or mask[2]:
            scale = (grad_out * grad_scale).to(m.dtype)
            ignore_index, _, z_loss = ctx.options[:3]
            coef = _lse_coef(y, weight, ignore_index, z_loss, ctx.mean, m.dtype)
            h = _lse_upstream(m + log_s, y, coef, ignore_index)
            _, gw, gb = torch.ops.lsce.linear_cross_entropy_rows_backward(
                scale.expand(m.shape), None if h is None else scale * h, x, W, b, y, weight, prior, m, log_s,
                *ctx.options, mask)
            grads[1:] = [g if keep else None for g, keep in zip((gw, gb), mask[1:])]
    return (*grads, *[None] * (ctx.n_inputs - 3))  # y, weight, prior, the options, mean, grad_mask


_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)
# Shared with lsce.linear_soft's probability-target ops, whose reduced op has
# the same inputs less by_class (13) and the same first 5 outputs (no m, log_s).
REDUCED_AUTOGRAD = dict(backward=_reduced_backward, setup_context=_reduced_setup_context)
fake_grads = _fake_grads


def _rows_setup_context(ctx, inputs, output):
    x, W, b, y, weight, prior, *options = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.save_for_backward(x, W, b, y, weight, prior, output[2], output[3])
    ctx.options = options


def _rows_backward(ctx, grad_loss, grad_lse, _grad_m, _grad_log_s):
    x, W, b, y, weight, prior, m, log_s = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]]
    if grad_loss is None:
        grad_loss = torch.zeros_like(m)
    if torch.is_grad_enabled():  # create_graph=True
        grads = _differentiable_grads(grad_loss, grad_lse, x, W, b, y, weight, prior, ctx.options, "none", mask)
        return (*grads, *[None] * 9)
    gi, gw, gb = torch.ops.lsce.linear_cross_entropy_rows_backward(
        grad_loss, grad_lse, x, W, b, y, weight, prior, m, log_s, *ctx.options, mask)
    grads = [g if m else None for g, m in zip((gi, gw, gb), mask)]
    return (*grads, *[None] * 9)  # y, weight, prior, the 5 options, by_class


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup_context)


def _check_like_input(name: str, t: Tensor, input: Tensor) -> None:
    if t.dtype != input.dtype:
        raise checks.ArgumentTypeError(f"lsce: {name} is {t.dtype} but input is {input.dtype}; they must match")
    if t.device != input.device:
        raise checks.ArgumentError(f"lsce: {name} is on {t.device} but input is on {input.device}")


def check_linear_arguments(input, linear_weight, target, linear_bias, *, k_dim: bool = False) -> Tuple[int, int]:
    """The tensor checks of a fused head: hidden states ``(..., H)``, the
    linear layer ``(K, H)`` and ``(K,)``, targets of shape ``input.shape[:-1]``.
    ``k_dim``: also a K-dimensional layer ``(K, d1, ..., H)`` and ``(K, d1, ...)``
    with targets ``input.shape[:-1] + (d1, ...)``, as F.linear_cross_entropy takes. Returns (K, H)."""
    for name, t in (("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise checks.ArgumentTypeError(f"lsce: {name} must be a Tensor, got {type(t).__name__}")
    checks.check_float("input", input, "hidden states", "features")
    if linear_weight.dim() != 2 and not (k_dim and linear_weight.dim() > 2):
        expected = "(num_classes, [d1, ...,] in_features)" if k_dim else "2-D (num_classes, in_features)"
        raise checks.ArgumentError(
            f"lsce: linear_weight must be {expected}, got shape {tuple(linear_weight.shape)}")
    K, H, out_features = linear_weight.shape[0], linear_weight.shape[-1], tuple(linear_weight.shape[1:-1])
    if K < 1:
        raise checks.ArgumentError("lsce: linear_weight has 0 rows (classes); at least 1 is needed")
    if input.shape[-1] != H:
        raise checks.ArgumentError(
            f"lsce: input has {input.shape[-1]} features (its last dimension) but linear_weight "
            f"{tuple(linear_weight.shape)} expects {H}")
    _check_like_input("linear_weight", linear_weight, input)
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise checks.ArgumentTypeError(
                f"lsce: linear_bias must be a Tensor or None, got {type(linear_bias).__name__}")
        if tuple(linear_bias.shape) != (K, *out_features):
            raise checks.ArgumentError(f"lsce: linear_bias must have shape {(K, *out_features)} (linear_weight's "
                                       f"without in_features), got {tuple(linear_bias.shape)}")
        _check_like_input("linear_bias", linear_bias, input)
    if isinstance(target, Tensor) and target.is_floating_point():  # probabilities: one per class (lsce.linear_soft)
        checks.check_soft_logits(input.new_empty(input.shape[:-1] + (K,), device="meta"), target.to("meta"))
        if target.device != input.device:
            raise checks.SoftTargetError(f"lsce: target is on {target.device} but input is on {input.device}")
        return K, H
    expected = (*input.shape[:-1], *out_features)
    if tuple(target.shape) != expected:
        raise checks.ArgumentError(
            f"lsce: target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}"
            f"{f' and linear_weight shape {tuple(linear_weight.shape)}' if out_features else ''}: expected {expected} "
            f"(input's shape without the feature dimension{', then d1, ...' if out_features else ''})")
    checks.check_target(target, input.device)
    return K, H


def _options_chunk_size(chunk_size: Optional[int], options) -> Optional[int]:
    """lsce's chunk_size given PyTorch's ``LinearCrossEntropyOptions``: its
    ``batch_chunk_size`` is lsce's chunk_size. Its other fields have no
    counterpart and are ignored: ``acc_policy``/``acc_dtype`` (lsce always
    accumulates in fp32, fp64 for fp64), ``chunking_method`` (lsce sizes chunks
    by default_chunk_size), ``allow_retain_graph`` (lsce always allows it)."""
    rows = None if options is None else getattr(options, "batch_chunk_size", None)
    if rows is not None and chunk_size is not None and rows != chunk_size:
        raise checks.ArgumentError(f"lsce: chunk_size={chunk_size} and options.batch_chunk_size={rows} disagree")
    return chunk_size if rows is None else rows


class _WeakInputs:
    """Weak references to a reduced call's (x, W, b). Its backward hands out
    gradients computed in the forward for a unit upstream, which are constants
    to a backward that records a graph (create_graph=True: gradient penalties,
    Hessians); that backward recomputes them from these inputs instead. Weak, so
    that the usual step keeps no N×H input alive; a view (the hidden states
    reshaped to rows) is rebuilt from its base, which the caller holds."""

    def __init__(self, tensors):
        self.refs = []
        for t in tensors:
            base = t if t is None or t._base is None else t._base
            self.refs.append(None if t is None else
                             (weakref.ref(base), t is not base, t.size(), t.stride(), t.storage_offset(), t._version))

    def get(self):
        out = []
        for entry in self.refs:
            if entry is None:
                out.append(None)
                continue
            ref, is_view, size, stride, offset, version = entry
            base = ref()
            if base is None:
                raise RuntimeError(
                    "lsce: a backward with create_graph=True through linear_cross_entropy(reduction='mean' or "
                    "'sum') recomputes from the hidden states, which were freed: keep a reference to them until "
                    "then, or use reduction='none' and reduce the rows yourself")
            if base._version != version:
                raise RuntimeError("lsce: an input of linear_cross_entropy was modified in place after the call; "
                                   "a backward with create_graph=True needs it as it was")
            out.append(base.as_strided(size, stride, offset) if is_view else base)
        return out


def _differentiable_grads(grad_loss: Tensor, grad_lse: Optional[Tensor], x: Tensor, W: Tensor, b: Optional[Tensor],
                          y: Tensor, weight: Optional[Tensor], prior: Optional[Tensor], options, reduction: str,
                          mask: List[bool]) -> List[Optional[Tensor]]:
    """Gradients for (x, W, b) where ``mask`` says, as differentiable ops through
    the N×K logits (as nn.Linear's): for a backward that records a graph
    (create_graph=True), where the kernels' gradients would be constants."""
    mask = [m and t is not None for m, t in zip(mask, (x, W, b))]
    z = torch.nn.functional.linear(x, W, b)
    grads = iter(ops.differentiable_backward(grad_loss, grad_lse, z, y, weight, prior, *options[:4],
                                             reduction=reduction, inputs=[t for t, m in zip((x, W, b), mask) if m]))
    return [next(grads) if m else None for m in mask]


# The signature mirrors torch.nn.functional.linear_cross_entropy on purpose (a drop-in);
# LinearCrossEntropyLoss holds the same options, as torch.nn.LinearCrossEntropyLoss does.
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    smoothing_prior: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """``lsce.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    without the N×K logits; arguments as ``torch.nn.functional.linear_cross_entropy``'s.

    Args:
        input: hidden states ``(N, H)``, ``(H,)`` or, beyond PyTorch, any leading shape ``(B, T, H)``.
        linear_weight: ``(K, H)``, as ``nn.Linear.weight``, or ``(K, d1, ..., H)``
            (K-dimensional loss: target ``input.shape[:-1] + (d1, ...)``); same dtype and device as input.
        target: class indices of shape ``input.shape[:-1]`` (``+ (d1, ...)``), or class
            probabilities of shape ``input.shape[:-1] + (K,)`` (a float tensor; lsce/linear_soft.py).
        linear_bias: optional ``(K,)`` (``(K, d1, ...)``).
        ignore_index: None (PyTorch's default) means -100.
        options: PyTorch's ``LinearCrossEntropyOptions``; its ``batch_chunk_size``
            is ``chunk_size``, its other fields have no counterpart in lsce and are
            ignored (:func:`_options_chunk_size` says why).
        weight, reduction, label_smoothing, z_loss, softcap, smoothing_prior,
            out_dtype, return_lse: as in :func:`lsce.cross_entropy`.
        backend: as in :func:`lsce.cross_entropy`; the chunk loop runs the
            device's own kernels (``"auto"``), so another choice (``"torch"``,
            or ``"triton"`` on CPU tensors under ``TRITON_INTERPRET=1``)
            computes the logits and calls :func:`lsce.cross_entropy` with it.
        chunk_size: rows per chunk. The default, ``ceil(N·H / K)`` rows but at
            least 384 (fp32) or 1024 (bf16/fp16), capped at N and evened out
            (:func:`default_chunk_size`), keeps the transient chunk buffer
            (logits, then their gradient over them) near the size of ``input``
            while the matmuls stay compute-bound. With vocabulary blocks
            (:func:`vocabulary_blocks`) the floor is 256 rows but at most N/8
            (:func:`blocked_chunk_floor`), and the same
            buffer of chunk_size·K values then holds blocks of
            ``chunk_size·K / N`` classes of every row.

    Memory beyond the gradients themselves is O(chunk_size·K + N), plus, with
    row chunks below fp32, the K×H weight-gradient sum. Row chunks: with
    ``reduction`` mean or sum the gradients are computed during the forward
    (3 matmuls) and held, scaled in backward; with ``none`` (or ``return_lse``)
    backward recomputes the logits chunk by chunk (4 matmuls); the weight
    gradient is accumulated in fp32 (fp64) and rounded once. Vocabulary blocks
    (bf16 where that sum would cost more than the logits saved): 4 matmuls for
    mean/sum, 5 for ``none``; each weight-gradient element is one matmul over
    all rows with fp32 accumulation inside, rounded once. Gradients flow to
    input, linear_weight and linear_bias; class ``weight`` and ``smoothing_prior``
    are constants. A K-dimensional layer, forward-mode AD and the torch.func
    transforms compute the logits (as PyTorch does) and go through
    :func:`lsce.cross_entropy`; a backward with create_graph=True recomputes them.
    """
    if checks.any_dtensor(input, linear_weight, target, linear_bias, weight, smoothing_prior):
        from .dtensor import linear_cross_entropy as dtensor_linear_cross_entropy  # tensor parallelism

        return dtensor_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            smoothing_prior=smoothing_prior, chunk_size=chunk_size, out_dtype=out_dtype)
    ignore_index = -100 if ignore_index is None else checks.as_ignore_index(ignore_index)
    K, H = check_linear_arguments(input, linear_weight, target, linear_bias, k_dim=True)
    checks.check_chunk_size(chunk_size)
    chunk_size = _options_chunk_size(chunk_size, options)
    checks.check_chunk_size(chunk_size)
    checks.check_options(K, input.device, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
    checks.check_out_dtype(out_dtype)
    dtype = result_dtype(input.dtype, input.device, out_dtype)
    if target.is_floating_point():
        from .linear_soft import linear_soft_cross_entropy

        checks.check_soft_options(ignore_index, smoothing_prior)
        N = target.numel() // K
        chunk = default_chunk_size(N, H, K, input.dtype) if chunk_size is None else chunk_size
        return linear_soft_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                         label_smoothing, z_loss, softcap, chunk, out_dtype)
    ce_options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, smoothing_prior=smoothing_prior, return_lse=return_lse,
                      out_dtype=dtype, backend=backend)
    own_kernels = backend == "auto" or ops.row_kernels(backend, input.device) is ops.row_kernels("auto", input.device)
    if linear_weight.dim() > 2:  # K-dimensional: rows (..., d1, ..., K) of logits, a copy of W in that order
        W = linear_weight.movedim(0, -2).reshape(-1, H)
        b = None if linear_bias is None else linear_bias.movedim(0, -1).reshape(-1)
        rows = torch.nn.functional.linear(input, W, b).reshape(-1, K)
        out = cross_entropy(rows, target.reshape(-1), **ce_options)
        return _shaped(out, target.shape, reduction, return_lse)
    if not own_kernels or needs_differentiable_statement(input, linear_weight, linear_bias):
        rows = torch.nn.functional.linear(input, linear_weight, linear_bias).reshape(-1, K)
        return _shaped(cross_entropy(rows, target.reshape(-1), **ce_options), target.shape, reduction, return_lse)

    N = target.numel()
    acc = acc_dtype(input.dtype)
    x = input if input.dim() == 2 else input.reshape(N, H)  # the caller's own tensor when it can (_WeakInputs)
    y = target.reshape(-1).to(torch.int64).contiguous()
    w = None if weight is None else weight.to(acc).contiguous()
    prior = None if smoothing_prior is None else smoothing_prior.to(acc).contiguous()
    by_class = vocabulary_blocks(N, H, K, input.dtype, chunk_size) and not _WEIGHT_RELEASED[0]
    if chunk_size is not None:
        chunk = chunk_size
    else:
        chunk = default_chunk_size(N, H, K, input.dtype, floor=blocked_chunk_floor(N) if by_class else None)
    options = (ignore_index, float(label_smoothing), float(z_loss), 0.0 if softcap is None else float(softcap), chunk,
               by_class)

    if reduction == "none" or return_lse:
        loss, lse, _, _ = torch.ops.lsce.linear_cross_entropy_rows(x, linear_weight, linear_bias, y, w, prior,
                                                                   *options)
        out = reduce_rows(loss, lse, y, w, ignore_index, options[2], reduction, target.shape).to(dtype)
        return (out, lse.reshape(target.shape)) if return_lse else out
    grad_on = torch.is_grad_enabled()
    grad_mask = [grad_on and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)]
    loss, *_ = torch.ops.lsce.linear_cross_entropy_reduced(
        x, linear_weight, linear_bias, y, w, prior, *options, reduction == "mean", grad_mask)
    return loss.to(dtype)


def _shaped(out, shape, reduction: str, return_lse: bool):
    """cross_entropy's result on flattened rows, in the target's shape."""
    loss, lse = out if return_lse else (out, None)
    if reduction == "none":
        loss = loss.reshape(shape)
    return (loss, lse.reshape(shape)) if return_lse else loss


# The constructor mirrors torch.nn.LinearCrossEntropyLoss on purpose (a drop-in: the
# same parameters and buffers, so state dicts load either way).
class LinearCrossEntropyLoss(nn.Module):
    """An LM head and its loss: ``torch.nn.LinearCrossEntropyLoss``'s constructor
    and parameters (it owns ``self.linear``, an ``nn.Linear(in_features,
    num_classes·prod(out_features))`` whose weight is viewed as ``(num_classes,
    *out_features, in_features)``), computing :func:`linear_cross_entropy`,
    plus lsce's keyword-only options. ``weight`` and ``smoothing_prior`` are
    buffers (``smoothing_prior`` is absent from the state dict when None, so
    state dicts are interchangeable with PyTorch's module). ``options``
    (PyTorch's ``LinearCrossEntropyOptions``): its ``batch_chunk_size`` is
    ``chunk_size``, its other fields are ignored (lsce has no counterpart). To
    tie the head to an embedding, assign ``loss.linear.weight = embedding.weight``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: Tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        smoothing_prior: Optional[Tensor] = None,
        chunk_size: Optional[int] = None,
        out_dtype: Optional[torch.dtype] = None,
        return_lse: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # The checks of a call that need no input: a bad setting fails here, with the call's message.
        checks.check_options(num_classes, None, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
        checks.check_chunk_size(_options_chunk_size(chunk_size, options))
        checks.check_out_dtype(out_dtype)
        if ignore_index is not None:
            checks.as_ignore_index(ignore_index)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("smoothing_prior", smoothing_prior)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.out_dtype = out_dtype
        self.return_lse = return_lse
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor):
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return linear_cross_entropy(
            input, self.linear.weight.reshape(*shape, self.linear.in_features), target,
            linear_bias=None if bias is None else bias.reshape(shape), weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, options=self.options,
            z_loss=self.z_loss, softcap=self.softcap, smoothing_prior=self.smoothing_prior,
            chunk_size=self.chunk_size, out_dtype=self.out_dtype, return_lse=self.return_lse, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}")
