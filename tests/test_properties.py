"""Property-based tests (hypothesis) over the whole contract of lsce.cross_entropy.

Each example draws a problem — shape (K = 1, N = 0, K next to the block and
vector widths and to the C++ split-row threshold 2·8192), dtype, layout (row-
and column-sliced views with NaN in the gaps, transposed, expanded rows, a
strided target, 1-D and (N, K, d) inputs), ε, weight, prior, ignore_index in
and out of the class range, reduction, z_loss, softcap, return_lse, logits with
huge values, near-ties, a confident class, ±inf and NaN — and checks one
backend (the C++ kernel, the reference, or Triton under its interpreter on tiny
shapes) against:

* lsce/reference.py evaluated in fp64 on the same (rounded) values, within a
  floating-point error bound derived from the sizes of the terms (below);
* torch.nn.functional.cross_entropy in fp64 on the same values where it has
  the options: the same values, and NaN / ±inf in exactly the same places of
  the loss and of the gradient;
* F.cross_entropy at the input dtype: the same result dtype and shape.

The error bound: lsce accumulates in fp32 (fp64 for fp64 input), so a value
whose terms have magnitude T may be off by T·(64·u·M + u·(64 + K/8)) — u the unit
roundoff, M = 1 + the largest |logit| or |lse| of the row (an exp of z − lse
inherits the absolute rounding error of z − lse), K/8 for sums of K terms —
plus one rounding to the output dtype. A wrong formula, a lost term or a
misread element is off by far more than that.

Deterministic and bounded: ``derandomize=True``, fixed ``max_examples``, no
example database.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lsce  # noqa: E402
from lsce import reference  # noqa: E402
from _util import ULP, assert_same_nonfinite, fp64, loss_lse_and_grad  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Unit roundoff of the accumulation and the subnormal spacing of the output (one ulp of it: _util.ULP).
ACC_U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float16: 2.0**-24, torch.float64: 2.0**-53}
OUT_TINY = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}

# Class counts next to the C++ kernel's vector widths (8, 16 lanes), its 4096-element
# blocks, its 64-element block alignment and the split-row threshold (K >= 2·8192 with
# fewer than 64 rows), and Triton's power-of-two blocks.
SMALL_K = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]
BIG_K = [16383, 4097, 4096, 4095, 8193, 8192, 8191, 12289]
SPLIT_K = [16385, 16384, 24577, 32769]  # the C++ kernel splits rows of >= 2·8192 when N < 64
TRITON_K = [1, 2, 3, 15, 16, 17, 31, 33, 63, 64, 65]

SPECIALS = ("huge", "ties", "confident")           # finite
NONFINITE = ("nan", "+inf", "-inf", "all-inf", "masked", "nan-run")


@dataclass
class Problem:
    dtype: torch.dtype
    N: int
    K: int
    layout: str
    values: torch.Tensor                  # (N, K) float64, already rounded to dtype
    target: torch.Tensor                  # (N,) int64
    target_dtype: torch.dtype
    strided_target: bool
    ignore_index: int
    eps: float
    reduction: str
    weight: Optional[torch.Tensor]
    prior: Optional[torch.Tensor]
    z_loss: float
    softcap: Optional[float]
    return_lse: bool
    upstream: torch.Tensor                # float64, exactly representable in dtype
    upstream_lse: Optional[torch.Tensor]  # float64, exactly representable in the lse dtype
    rows: list = field(default_factory=list)  # what each row was drawn as (for the report)

    def kwargs(self):
        kw = dict(ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.eps)
        if self.weight is not None:
            kw["weight"] = self.weight
        if self.z_loss:
            kw["z_loss"] = self.z_loss
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        if self.prior is not None:
            kw["smoothing_prior"] = self.prior
        return kw

    def torch_has_options(self):
        return not self.z_loss and self.softcap is None and self.prior is None and not self.return_lse


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float64)


@st.composite
def problems(draw, *, small_k=SMALL_K, big_k=BIG_K, split_k=SPLIT_K, max_n=8, nonfinite=False, layouts=None):
    dtype = draw(st.sampled_from(DTYPES))
    size = draw(st.sampled_from(["split", "big", "small", "any"] if big_k else ["small", "any"]))
    if size == "split":
        K = draw(st.sampled_from(split_k))
    elif size == "big":
        K = draw(st.sampled_from(big_k))
    elif size == "small":
        K = draw(st.sampled_from(small_k))
    else:
        K = draw(st.integers(1, max(small_k) if not big_k else 300))
    n_cap = max_n if K <= 300 else 3           # few rows for large K: cheap, and the split-row path
    N = min(draw(st.sampled_from([3, 2, 1, 5, 8, 4, 0])), n_cap)  # (hypothesis favours the first)
    layout = draw(st.sampled_from(layouts or ["contiguous", "rows", "cols", "transposed", "1d", "3d", "expanded"]))
    if layout == "1d":
        N = 1
    if layout == "3d" and N % 2:
        N += 1                                 # (N/2, K, 2)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 20.0]))
    values = torch.randn(N, K, generator=g, dtype=torch.float64) * scale
    kinds = SPECIALS + (NONFINITE if nonfinite else ())
    target = torch.randint(0, K, (N,), generator=g)
    row_kinds = []
    for i in range(N):
        kind = draw(st.sampled_from(("plain",) * 2 + kinds))
        row_kinds.append(kind)
        pos = int(torch.randint(0, K, (), generator=g))
        y = int(target[i])
        big = 1e4
        if kind == "huge":
            values[i, pos] = big if pos % 2 else -big
            values[i, (pos + 1) % K] = big
        elif kind == "ties":
            values[i] = values[i, 0] + torch.randn(K, generator=g, dtype=torch.float64) * 1e-7
        elif kind == "confident":
            values[i, y] = 40.0
        elif kind == "nan":
            values[i, pos] = math.nan
        elif kind == "+inf":
            values[i, pos] = math.inf
        elif kind == "-inf":
            values[i, pos] = -math.inf
        elif kind == "all-inf":
            values[i] = -math.inf
        elif kind == "masked":           # -inf on part of the vocabulary but the target
            lo = int(torch.randint(0, K, (), generator=g))
            values[i, lo:] = -math.inf
            values[i, y] = 1.0
        elif kind == "nan-run":          # whole 4096-blocks of NaN when K is large
            values[i, pos:] = math.nan
    if layout == "expanded" and N > 1:
        values[1:] = values[0]
    values = _round(values, dtype)

    ignore_index = draw(st.sampled_from([-100, -1, K, 0, K - 1]))
    if N and draw(st.booleans()):
        mask = torch.rand(N, generator=g) < draw(st.sampled_from([0.3, 1.0]))
        target = torch.where(mask, torch.full_like(target, ignore_index), target)
    target_dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32]))
    strided_target = draw(st.booleans())

    # (An ε below fp32's smallest subnormal rounds to 0 in an fp32 kernel: not a use.)
    eps = draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(1e-6, 1.0)))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    weight = prior = None
    if draw(st.booleans()):
        weight = _round(torch.rand(K, generator=g, dtype=torch.float64) * 2, torch.float32)
        if K > 1 and draw(st.booleans()):
            weight[int(torch.randint(0, K, (), generator=g))] = 0.0
        weight = weight.to(draw(st.sampled_from([torch.float32, torch.float64])))
    if draw(st.booleans()):
        prior = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
        prior = (prior / prior.sum()).to(torch.float32)
    z_loss = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1]))
    softcap = draw(st.sampled_from([None, None, 1.0, 5.0, 30.0]))
    return_lse = draw(st.booleans())

    loss_shape = (N,) if reduction == "none" else ()
    upstream = _round(torch.randn(loss_shape, generator=g, dtype=torch.float64), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    upstream_lse = _round(torch.randn(N, generator=g, dtype=torch.float64), acc) if return_lse else None
    return Problem(dtype, N, K, layout, values, target, target_dtype, strided_target, ignore_index, eps,
                   reduction, weight, prior, z_loss, softcap, return_lse, upstream, upstream_lse, row_kinds)


# ------------------------------------------------------------------ layouts


def _arrange(p: Problem):
    """(storage, input, target): the input is a view of the problem's layout into
    ``storage`` (a leaf that requires grad), row i holding p.values[i]."""
    x = p.values.to(p.dtype)
    N, K = x.shape
    if p.layout == "rows":                     # every other row of a taller tensor, NaN between
        storage = torch.full((2 * N, K), float("nan"), dtype=p.dtype)
        storage[::2] = x
        view = lambda s: s[::2]
    elif p.layout == "cols":                   # a slice of wider rows, NaN around it
        storage = torch.full((N, K + 7), float("nan"), dtype=p.dtype)
        storage[:, 3 : 3 + K] = x
        view = lambda s: s[:, 3 : 3 + K]
    elif p.layout == "transposed":             # column-major: unit stride along the batch
        storage = x.t().contiguous()
        view = lambda s: s.t()
    elif p.layout == "expanded" and N > 1:     # one row in memory, row stride 0
        storage = x[:1].clone()
        view = lambda s: s.expand(N, K)
    elif p.layout == "1d":
        storage = x.clone()
        view = lambda s: s[0]
    elif p.layout == "3d":                     # (N/2, K, 2): classes on dim 1
        storage = x.clone()
        view = lambda s: s.reshape(N // 2, 2, K).transpose(1, 2)
    else:
        storage = x.clone()
        view = lambda s: s
    storage.requires_grad_(True)
    t = p.target.to(p.target_dtype)
    if p.strided_target:
        tt = torch.full((max(N, 1), 3), 10**6, dtype=torch.int64)  # out-of-range poison between the entries
        tt[:N, 1] = t
        t = tt[:N, 1].to(p.target_dtype) if p.target_dtype != torch.int64 else tt[:N, 1]
    if p.layout == "1d":
        t = t[0]
    elif p.layout == "3d":
        t = t.reshape(N // 2, 2)
    return storage, view(storage), t


def _rows(grad: torch.Tensor, p: Problem) -> torch.Tensor:
    """A gradient of the problem's input layout back as (N, K) rows."""
    if p.layout == "1d":
        return grad.reshape(1, -1)
    if p.layout == "3d":
        return grad.transpose(1, 2).reshape(p.N, p.K)
    return grad


# ------------------------------------------------------------------ expectations


def _expected(p: Problem):
    """The contract in fp64: (loss rows or scalar, lse, grad rows) from lsce/reference.py
    on the same values as (N, K) rows, with PyTorch's whole-row NaN gradient for a row
    holding +inf (its log_softmax is NaN there; autograd of the reference gives NaN only
    at the +inf itself)."""
    up = p.upstream.double().reshape(-1) if p.reduction == "none" else p.upstream.double()
    up_lse = None if p.upstream_lse is None else p.upstream_lse.double()
    loss, lse, grad = loss_lse_and_grad(reference.cross_entropy, p.values, p.target, up, up_lse,
                                        return_lse=p.return_lse, **fp64(p.kwargs()))
    zc = p.values if p.softcap is None else p.softcap * torch.tanh(p.values / p.softcap)
    grad[torch.isposinf(zc).any(1)] = float("nan")
    return loss, lse, grad


# The error bound below (and _close) stays here rather than among the fixed rules of
# tests/_util.py: it is derived for each drawn example from the sizes of its terms
# (the module docstring), not a tolerance per dtype, and no other test uses it.
def _bounds(p: Problem, loss_rows: torch.Tensor):
    """Per-row error scale of the loss and per-element tolerance of the gradient (fp64)."""
    x = p.values
    N, K = x.shape
    u = ACC_U[p.dtype]
    zc = x if p.softcap is None else p.softcap * torch.tanh(x / p.softcap)
    finite = torch.isfinite(zc)
    zc0 = torch.where(finite, zc, 0.0)
    lse = torch.logsumexp(torch.where(torch.isnan(zc), -math.inf, zc), 1).nan_to_num(0.0, 0.0, 0.0)
    if N:
        lse = torch.where(torch.isfinite(lse), lse, 0.0)
    M = 1 + torch.maximum(zc0.abs().amax(1) if K and N else torch.zeros(N, dtype=torch.float64), lse.abs())
    rel = 64 * u * M + u * (64 + K / 8)                                    # (N,)
    valid = p.target != p.ignore_index
    ys = torch.where(valid, p.target, 0)
    w = torch.ones(K, dtype=torch.float64) if p.weight is None else p.weight.double()
    wy = w[ys] * valid
    prior = torch.full((K,), 1.0 / K, dtype=torch.float64) if p.prior is None else p.prior.double()
    c = prior * w
    C = c.sum()
    eps, lam = p.eps, p.z_loss
    mag = (1 - eps) * wy * (lse.abs() + zc0.gather(1, ys[:, None]).squeeze(1).abs()) \
        + eps * (C * lse.abs() + (c * zc0).abs().sum(1)) + lam * lse * lse
    mag = mag * valid
    loss_tol_rows = mag * rel

    # Upstream gradient of each row's loss under the reduction (an upper bound).
    up = p.upstream.double().abs()
    if p.reduction == "none":
        g = up
    elif p.reduction == "sum":
        g = up.expand(N)
    else:
        den = min(float(wy.sum()), float(valid.sum())) if lam else float(wy.sum())
        g = (up / den if den > 0 else torch.zeros(())).expand(N)
        if lam and den > 0:  # mean with z-loss: the z-loss part is divided by the row count
            g = g * 2
    h = torch.zeros(N, dtype=torch.float64) if p.upstream_lse is None else p.upstream_lse.double().abs()
    A = g * ((1 - eps) * wy + eps * C + 2 * lam * lse.abs()) + h
    pk = torch.exp(zc0 - lse[:, None]) * finite
    terms = A[:, None] * pk + (g * eps)[:, None] * c + torch.zeros(N, K, dtype=torch.float64).scatter(
        1, ys[:, None], ((1 - eps) * wy * g)[:, None])
    floor = OUT_TINY[p.dtype] + (A[:, None] * 2.0**-125 if p.dtype != torch.float64 else 0.0)
    grad_tol = terms * rel[:, None] + floor

    # The loss after the reduction.
    if p.reduction == "none":
        loss_tol = loss_tol_rows
    else:
        n_u = N * u * float(loss_rows.abs().nan_to_num(0.0, 0.0, 0.0).sum())
        total = float(loss_tol_rows.sum()) + n_u
        if p.reduction == "mean":
            den = min(float(wy.sum()), float(valid.sum())) if lam else float(wy.sum())
            total = total / den if den > 0 else 0.0
        loss_tol = torch.tensor(total, dtype=torch.float64)
    return loss_tol, grad_tol, rel


def _close(actual, expected, tol, p: Problem, what):
    """|actual − expected| <= tol + one rounding to the output dtype, where expected is finite."""
    actual, expected = actual.double(), expected.double()
    finite = torch.isfinite(expected) & torch.isfinite(expected.to(p.dtype))  # not what overflows the dtype
    err = (actual - expected).abs()
    bound = tol + ULP[p.dtype] * expected.abs() + OUT_TINY[p.dtype]
    bad = finite & ~(err <= bound)
    if bad.any():
        idx = bad.nonzero()[:4].tolist()
        raise AssertionError(
            f"{what}: off by more than the error bound at {idx}: got {actual[bad][:4].tolist()}, "
            f"expected {expected[bad][:4].tolist()}, bound {torch.as_tensor(bound).expand_as(err)[bad][:4].tolist()}")


def _flat(loss: torch.Tensor, p: Problem) -> torch.Tensor:
    return loss.reshape(-1) if p.reduction == "none" else loss


def check(p: Problem, backend: str):
    # Shown by pytest --hypothesis-show-statistics: what the examples covered.
    event(f"K {'>= 16384 (split rows)' if p.K >= 16384 else '> 4096' if p.K > 4096 else '> 64' if p.K > 64 else '<= 64'}")
    event(f"N {min(p.N, 2)}{'+' if p.N > 2 else ''}")
    event(f"layout {p.layout}")
    for kind in set(p.rows):
        event(f"row {kind}")
    storage, x, t = _arrange(p)
    before = storage.detach().clone(), t.clone()
    kwargs = p.kwargs()
    loss, lse, grad = loss_lse_and_grad(lsce.cross_entropy, x, t, p.upstream.to(p.dtype), p.upstream_lse,
                                        backend=backend, return_lse=p.return_lse, **kwargs)
    grad = _rows(grad, p)
    # Nothing the caller passed is modified (the NaN padding of sliced views included).
    assert torch.equal(storage.detach().isnan(), before[0].isnan())
    assert torch.equal(storage.detach().nan_to_num(), before[0].nan_to_num()) and torch.equal(t, before[1])

    e_loss, e_lse, e_grad = _expected(p)
    assert loss.dtype == p.dtype and grad.dtype == p.dtype
    loss = _flat(loss, p)
    assert loss.shape == e_loss.shape, (loss.shape, e_loss.shape)

    if p.torch_has_options():
        # PyTorch at the input dtype: the same result dtype and shape.
        tkw = dict(kwargs)
        if "weight" in tkw:
            tkw["weight"] = tkw["weight"].to(p.dtype)
        same = F.cross_entropy(x.detach(), t.long(), **tkw)
        assert same.dtype == p.dtype and _flat(same, p).shape == loss.shape
        # PyTorch in fp64 on the same values: values, NaN and ±inf.
        if "weight" in tkw:
            tkw["weight"] = kwargs["weight"].double()
        up = p.upstream.double().reshape(-1) if p.reduction == "none" else p.upstream.double()
        f_loss, _, f_grad = loss_lse_and_grad(F.cross_entropy, p.values, p.target, up, None, **tkw)
        # The contract agrees with PyTorch (lsce/reference.py states what it claims) ...
        assert_same_nonfinite(e_loss, f_loss, "reference loss vs F.cross_entropy")
        assert_same_nonfinite(e_grad, f_grad, "reference grad vs F.cross_entropy")
        # ... and so does lsce, at the output dtype (inf where the fp64 value overflows it).
        assert_same_nonfinite(loss, f_loss.to(p.dtype), "loss vs F.cross_entropy")
        assert_same_nonfinite(grad, f_grad, "grad vs F.cross_entropy")

    loss_rows = reference.cross_entropy(p.values, p.target, **{**fp64(kwargs), "reduction": "none"})
    loss_tol, grad_tol, rel = _bounds(p, loss_rows)
    assert_same_nonfinite(loss, e_loss.to(p.dtype), "loss vs reference")
    assert_same_nonfinite(grad, e_grad, "grad vs reference")
    _close(loss, e_loss, loss_tol, p, "loss")
    _close(grad, e_grad, grad_tol, p, "grad")
    if p.return_lse:
        assert lse.dtype == (torch.float64 if p.dtype == torch.float64 else torch.float32)
        lse, e_lse = lse.reshape(-1).double(), e_lse.reshape(-1)
        assert_same_nonfinite(lse, e_lse, "lse vs reference")
        ok = ~torch.isfinite(e_lse) | ((lse - e_lse).abs() <= rel + 2 * ACC_U[p.dtype] * e_lse.abs())
        assert ok.all(), f"lse: got {lse[~ok][:4].tolist()}, expected {e_lse[~ok][:4].tolist()}"


COMMON = dict(derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=300, **COMMON)
@given(p=problems())
def test_cpp_finite_logits_match_reference_and_torch(p):
    check(p, "cpu")


@settings(max_examples=300, **COMMON)
@given(p=problems(nonfinite=True))
def test_cpp_nan_and_inf_propagate_like_torch(p):
    check(p, "cpu")


@settings(max_examples=100, **COMMON)
@given(p=problems(nonfinite=True))
def test_reference_backend(p):
    check(p, "torch")


@settings(max_examples=60, **COMMON)
@given(p=problems(small_k=TRITON_K, big_k=[], max_n=4, nonfinite=True))
def test_triton_interpreted_tiny(p):
    pytest.importorskip("triton")
    check(p, "triton")


# ---------------------------------------------------------------- probability (soft) targets
#
# The same rules for a floating-point target of the logits' shape: against the
# fp64 reference (reference.soft_cross_entropy) within a bound from the sizes
# of the terms, against F.cross_entropy in fp64 (values, NaN and ±inf at the
# same places) where it has the options, and one-hot soft targets against
# class-index targets. The target rows sum to anything: probabilities, zeros,
# values of any sign, one-hot.

SOFT_TARGETS = ["prob", "zeros", "any", "onehot", "scaled"]


@dataclass
class SoftProblem:
    values: torch.Tensor  # fp64 logits, already rounded to dtype
    target: torch.Tensor  # fp64 target, already rounded to target_dtype
    dtype: torch.dtype
    target_dtype: torch.dtype
    shape: tuple
    kind: str
    eps: float
    weight: Optional[torch.Tensor]
    reduction: str
    z_loss: float
    softcap: Optional[float]
    nonfinite: bool
    upstream: torch.Tensor = field(repr=False, default=None)

    def kwargs(self):
        kw = dict(reduction=self.reduction, label_smoothing=self.eps)
        if self.weight is not None:
            kw["weight"] = self.weight
        if self.z_loss:
            kw["z_loss"] = self.z_loss
        if self.softcap:
            kw["softcap"] = self.softcap
        return kw


@st.composite
def soft_problems(draw, *, ks=(1, 2, 3, 7, 16, 17, 100, 4095, 4097, 9000), max_n=6, nonfinite=False):
    dtype = draw(st.sampled_from(DTYPES))
    target_dtype = draw(st.sampled_from([dtype, dtype, torch.float32, torch.float64, torch.bfloat16]))
    K = draw(st.sampled_from(ks))
    N = draw(st.integers(0, max_n if K < 4000 else 2))
    layout = draw(st.sampled_from(["2d", "2d", "1d", "3d"]))
    shape = (K,) if layout == "1d" else (N, K) if layout == "2d" else (N, K, 2)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 3.0, 30.0]))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):
        x = x + draw(st.sampled_from([-1e4, 1e3, 1e4]))
    kind = draw(st.sampled_from(SOFT_TARGETS))
    cdim = 0 if layout == "1d" else 1
    if kind == "prob":
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, cdim)
    elif kind == "zeros":
        t = torch.zeros(shape, dtype=torch.float64)
    elif kind == "any":
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    elif kind == "onehot":
        idx = torch.randint(0, K, (1,) + shape[1:] if layout != "1d" else (1,), generator=gen)
        t = torch.zeros(shape, dtype=torch.float64)
        t.scatter_(cdim, idx.expand(*((shape[0],) if layout != "1d" else ()), *idx.shape[1:])
                   if layout != "1d" else idx, 1.0)
    else:  # rows summing to 3.5
        t = 3.5 * torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), cdim)
    if nonfinite and x.numel():
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, flat.numel() - 1))
            flat[i] = draw(st.sampled_from([float("-inf"), float("inf"), float("nan")]))
    weight = None
    if draw(st.booleans()):
        weight = (torch.rand(K, generator=gen, dtype=torch.float64) * 2).to(dtype).double()
    p = SoftProblem(
        values=x.to(dtype).double(), target=t.to(target_dtype).double(), dtype=dtype, target_dtype=target_dtype,
        shape=shape, kind=kind, eps=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])), weight=weight,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3])), softcap=draw(st.sampled_from([None, None, 5.0])),
        nonfinite=nonfinite,
    )
    out_shape = () if layout == "1d" else (shape[0],) + shape[2:]
    p.upstream = torch.randn(out_shape if p.reduction == "none" else (), generator=gen, dtype=torch.float64)
    event(f"soft {dtype} target {target_dtype} {kind} {layout}")
    return p


def _soft_call(p: SoftProblem, backend):
    """lsce's loss and lse, and its gradients for logits and target, from the problem's dtypes."""
    x = p.values.to(p.dtype).requires_grad_(True)
    t = p.target.to(p.target_dtype).requires_grad_(True)
    kw = p.kwargs()
    if "weight" in kw:
        kw["weight"] = kw["weight"].to(p.dtype)
    loss, lse = lsce.cross_entropy(x, t, backend=backend, return_lse=True, **kw)
    assert loss.dtype == torch.promote_types(p.dtype, p.target_dtype)
    gx, gt = torch.autograd.grad((loss.double() * p.upstream).sum(), (x, t), allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    gt = torch.zeros_like(t) if gt is None else gt
    return loss, lse, gx, gt


def _soft_truth(p: SoftProblem, fn):
    x = p.values.clone().requires_grad_(True)
    t = p.target.clone().requires_grad_(True)
    loss = fn(x, t, **p.kwargs())
    gx, gt = torch.autograd.grad((loss * p.upstream).sum(), (x, t), allow_unused=True)
    return (loss.detach(), torch.zeros_like(x) if gx is None else gx, torch.zeros_like(t) if gt is None else gt)


def _soft_bound(p: SoftProblem):
    """Per element a bound of the fp32 (fp64) evaluation: the largest term size
    T = Σ|a|·M (M = 1 + the largest |logit| and |lse|) times u·(64 + K/8), times
    the upstream; plus one ulp of each output dtype (added by the caller)."""
    u = ACC_U[p.dtype]
    K = p.shape[0] if len(p.shape) == 1 else p.shape[1]
    fin = p.values[torch.isfinite(p.values)]
    M = 1.0 + (fin.abs().max().item() if fin.numel() else 0.0) + math.log(max(K, 1))
    if p.softcap:
        M = 1.0 + p.softcap + math.log(max(K, 1))
    w = 1.0 if p.weight is None else max(1.0, p.weight.abs().max().item())
    tmax = max(1.0, p.target.abs().max().item() if p.target.numel() else 0.0)
    rows = max(1, p.values.numel() // max(K, 1))
    T = w * (tmax * K + 1.0) * M * (1 + p.z_loss * M)
    up = p.upstream.abs().max().item() if p.upstream.numel() else 0.0
    per_row = u * (64 + K / 8) * T * 4
    loss_tol = per_row * (rows if p.reduction == "sum" else 1)
    grad_tol = u * (64 + K / 8) * w * tmax * M * 4 * max(up, 1.0) * (1.0 / rows if p.reduction == "mean" else 1)
    return loss_tol * max(up, 1.0), grad_tol + u * 64 * w * M * max(up, 1.0)


def _soft_close(actual, expected, tol, dtype, what):
    a, e = actual.double(), expected.double()
    assert_same_nonfinite(a, e.to(actual.dtype).double() if actual.dtype != torch.float64 else e, what)
    fin = torch.isfinite(e) & torch.isfinite(a)
    err = (a[fin] - e[fin]).abs()
    # Two ulps of the stored dtype: the store's rounding (a truncation under the Triton
    # interpreter) and the upstream gradient, which reaches the kernels rounded to the
    # loss's dtype (bf16/fp16 for such targets and logits), as it reaches PyTorch's.
    allowed = tol + 2 * ULP[dtype] * e[fin].abs() + (2.0 ** -133 if dtype == torch.bfloat16 else 0.0)
    assert (err <= allowed).all(), f"{what}: error {err.max().item()} beyond the bound {tol}"


def soft_check(p: SoftProblem, backend: str):
    loss, lse, gx, gt = _soft_call(p, backend)
    e_loss, e_gx, e_gt = _soft_truth(p, reference.soft_cross_entropy)
    loss_tol, grad_tol = _soft_bound(p)
    out_dtype = torch.promote_types(p.dtype, p.target_dtype)
    _soft_close(loss, e_loss, loss_tol, out_dtype, "loss")
    _soft_close(gx, e_gx, grad_tol, p.dtype, "logits grad")
    _soft_close(gt, e_gt, grad_tol * (1 + p.values.abs()[torch.isfinite(p.values)].max().item()
                                      if p.values.numel() and torch.isfinite(p.values).any() else 1.0),
                p.target_dtype if p.target_dtype != torch.float64 or p.dtype == torch.float64 else torch.float32,
                "target grad")
    if not p.z_loss and not p.softcap:
        # The contract agrees with PyTorch, NaN and ±inf at the same places.
        f_loss, f_gx, f_gt = _soft_truth(p, F.cross_entropy)
        assert_same_nonfinite(e_loss, f_loss, "reference loss vs F.cross_entropy")
        assert_same_nonfinite(e_gx, f_gx, "reference grad vs F.cross_entropy")
        assert_same_nonfinite(e_gt, f_gt, "reference target grad vs F.cross_entropy")
        torch.testing.assert_close(e_loss, f_loss, rtol=1e-9, atol=1e-9, equal_nan=True)


@settings(max_examples=200, **COMMON)
@given(p=soft_problems())
def test_soft_cpp_matches_reference_and_torch(p):
    soft_check(p, "cpu")


@settings(max_examples=150, **COMMON)
@given(p=soft_problems(nonfinite=True))
def test_soft_nan_and_inf_propagate_like_torch(p):
    soft_check(p, "cpu")


@settings(max_examples=60, **COMMON)
@given(p=soft_problems())
def test_soft_reference_backend(p):
    soft_check(p, "torch")


@settings(max_examples=25, **COMMON)
@given(p=soft_problems(ks=(1, 3, 16, 17, 40), max_n=3))
def test_soft_triton_interpreted_tiny(p):
    pytest.importorskip("triton")
    soft_check(p, "triton")


@settings(max_examples=100, **COMMON)
@given(dtype=st.sampled_from(DTYPES), K=st.sampled_from([1, 5, 100, 5000]), N=st.integers(0, 6),
       eps=st.sampled_from([0.0, 0.1, 1.0]), weighted=st.booleans(), reduction=st.sampled_from(["sum", "none"]),
       seed=st.integers(0, 2**31 - 1), backend=st.sampled_from(["cpu", "torch"]))
def test_soft_onehot_equals_index_target(dtype, K, N, eps, weighted, reduction, seed, backend):
    """A one-hot probability target gives the class-index target's loss and
    gradient (weight and smoothing included: (1 − ε)·onehot + ε/K, weighted, is
    what both paths compute); ``mean`` differs by design (rows vs Σ w_y), so
    sum and none are compared, and mean without weight."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, generator=gen, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, K, (N,), generator=gen)
    onehot = torch.nn.functional.one_hot(y, K).to(dtype)
    w = (torch.rand(K, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    kw = dict(weight=w, label_smoothing=eps, backend=backend)
    reductions = [reduction] + ([] if weighted else ["mean"])
    for red in reductions:
        a, ga = loss_lse_and_grad(lsce.cross_entropy, x, onehot, None, None, reduction=red, **kw)[::2]
        b, gb = loss_lse_and_grad(lsce.cross_entropy, x, y, None, None, reduction=red, **kw)[::2]
        tol = dict(rtol=2e-5, atol=2e-5) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)
        if dtype in (torch.bfloat16, torch.float16):
            tol = dict(rtol=ULP[dtype] * 2, atol=ULP[dtype] * 2 * max(1.0, b.double().abs().max().item()
                                                                       if b.numel() else 1.0))
        torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **tol)
        torch.testing.assert_close(ga.double(), gb.double(), equal_nan=True, **tol)
