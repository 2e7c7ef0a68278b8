"""The per-row kernel interface (lsce/interface.py): one conformance suite, run on
every backend present.

The backends: the C++ kernel ("cpu", on CPU tensors), the Triton kernels
("triton": on the GPU where there is one, otherwise on CPU tensors under the
Triton interpreter, TRITON_INTERPRET=1, set below before triton is imported)
and the reference ("torch"; on the GPU too where there is one). Each is called
through ``lsce.ops.row_kernels(name, device)`` with the Coefficients and
RowOptions a caller hands it, and compared with lsce.reference evaluated in
fp64 on the same rounded inputs (the backend's own coefficients, in fp64): the
tolerances only allow for fp32 accumulation (fp64 for fp64 logits) and one
rounding of the gradient to the logits' dtype — one ulp of it, since the
interpreter truncates fp32 → bf16 stores instead of rounding. The reference
itself is checked against the formulas of lsce/interface.py's docstring,
written out below in plain fp64 PyTorch.

Interpreted Triton is slow: its shapes stay small.
"""

import importlib.util
import math
import os
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import lsce  # noqa: E402
from lsce import interface, reference  # noqa: E402
from lsce.interface import Coefficients, RowOptions  # noqa: E402
from _util import (  # noqa: E402
    assert_close_to_truth, assert_grad_close, assert_rows_close, loss_and_grad, make_options, make_problem, ulp,
)

HAVE_CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


class Backend(NamedTuple):
    name: str  # as lsce.ops.row_kernels takes it
    device: str

    def __str__(self):
        return self.name if self.device == "cpu" or self.name == "triton" else f"{self.name}-{self.device}"

    @property
    def kernels(self):
        return lsce.ops.row_kernels(self.name, torch.device(self.device))


BACKENDS = [Backend("cpu", "cpu"), Backend("torch", "cpu")]
if HAVE_CUDA:
    BACKENDS.append(Backend("torch", "cuda"))
if HAVE_TRITON:
    BACKENDS.append(Backend("triton", "cuda" if HAVE_CUDA else "cpu"))
TRITON = [b for b in BACKENDS if b.name == "triton"]


def _id(x):
    return str(x).replace("torch.", "")


over_backends = pytest.mark.parametrize("backend", BACKENDS, ids=_id)
over_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=_id)


# ---------------------------------------------------------------- inputs


class Case(NamedTuple):
    """One call of the interface, and the same inputs in fp64 for the reference."""

    logits: torch.Tensor
    target: torch.Tensor
    coef: Coefficients
    opts: RowOptions

    @property
    def coef64(self):
        return Coefficients(*(t.double() if torch.is_tensor(t) else t for t in self.coef))


def make_case(N, K, dtype, device, *, eps=0.0, weight=False, prior=False, z_loss=0.0, softcap=0.0, ignore=None,
              outside=False, uniform_over=None, C=None, c=False, seed=0, scale=3.0):
    """Random logits (N, K) in dtype and the coefficients and options of one call.

    ``ignore``: None, "inside" (ignore_index is a class id) or "outside"
    (ignore_index = −100), on every other row. ``outside``: some targets lie
    outside [0, K) without being ignore_index (the true class is in another
    slice), above and below. Without ``c``, ``uniform_over`` and ``C``, the
    coefficients are lsce.interface.coefficients' for full rows; with them,
    a caller's own: ``uniform_over`` classes (a multiple of K plus one) with a
    float C, or an explicit ``c`` with a 0-d tensor C that is not Σc."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, K, (N,), generator=gen)
    ignore_index = -100
    if outside:
        y[1::5] = K + 3
        y[3::5] = -7
    if ignore == "outside":
        y[::2] = ignore_index
    elif ignore == "inside":
        ignore_index = (K - 1) // 2
        y[::2] = ignore_index
    w = (torch.rand(K, generator=gen) * 1.5 + 0.25) if weight else None
    pi = torch.softmax(torch.randn(K, generator=gen, dtype=torch.float64) * 2, 0).float() if prior else None
    acc = interface.acc_dtype(dtype)
    if c or uniform_over or C is not None:
        assert not prior
        w = None if w is None else w.to(acc).to(device)
        if c:
            cv = torch.rand(K, generator=gen, dtype=torch.float64) * 2 / K
            cv[::4] = 0.0
            coef = Coefficients(w, cv.to(acc).to(device), torch.tensor(C, dtype=acc, device=device), K)
        else:
            coef = Coefficients(w, None, float(C), uniform_over * K + 1)
    else:
        dev = lambda t: None if t is None else t.to(device)
        coef = interface.coefficients(K, dev(w), dev(pi), eps, acc, torch.device(device))
    opts = RowOptions(ignore_index, float(eps), float(z_loss), float(softcap))
    return Case(x.to(device), y.to(device), coef, opts)


def _acc(case):
    return interface.acc_dtype(case.logits.dtype)


# ---------------------------------------------------------------- the checks


def check_forward(backend, case):
    """The backend's (loss, m, log_s) against the reference's in fp64 (m only on
    rows whose log_s is a number: with a NaN in the row, the max may or may not
    see it). Returns both (m, log_s) pairs, for the backward."""
    dtype = case.logits.dtype
    loss, m, log_s = backend.kernels.forward(case.logits, case.target, case.coef, case.opts)
    ref_loss, ref_m, ref_log_s = reference.rows_forward(case.logits.double(), case.target, case.coef64, case.opts)
    assert_rows_close(m + log_s, ref_m + ref_log_s, dtype, "lse")
    assert_rows_close(log_s, ref_log_s, dtype, "log_s")
    known = ~torch.isnan(ref_log_s)
    assert_rows_close(m[known], ref_m[known], dtype, "m")
    assert_rows_close(loss, ref_loss, dtype, "loss")
    return (m, log_s), (ref_m, ref_log_s)


def _magnitude(case, grad_loss, grad_lse):
    """The largest |g|·(w, C or c) + |h|: the size of the terms a gradient element adds."""
    if not grad_loss.numel():
        return 0.0
    coef = case.coef
    scales = [1.0] + [float(t.abs().max()) if torch.is_tensor(t) and t.numel() else abs(float(t))
                      for t in (coef.weight, coef.c, coef.C) if t is not None]
    h_max = 0.0 if grad_lse is None else grad_lse.abs().max().item()
    return grad_loss.abs().max().item() * max(scales) + h_max


def check_backward(backend, case, stats, ref_stats, grad_loss, grad_lse):
    dtype = case.logits.dtype
    grad = backend.kernels.backward(grad_loss, grad_lse, case.logits, case.target, case.coef, case.opts, *stats)
    ref = reference.rows_backward(grad_loss.double(), None if grad_lse is None else grad_lse.double(),
                                  case.logits.double(), case.target, case.coef64, case.opts, *ref_stats)
    assert_grad_close(grad, ref, dtype, _magnitude(case, grad_loss, grad_lse))
    return grad


def check_all(backend, case, seed=1):
    """Forward, then backward with random (g, h), random g alone and an expanded scalar g."""
    stats, ref_stats = check_forward(backend, case)
    N = case.logits.shape[0]
    acc, device = _acc(case), case.logits.device
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, generator=gen).to(acc).to(device)
    h = torch.randn(N, generator=gen).to(acc).to(device)
    check_backward(backend, case, stats, ref_stats, g, h)
    check_backward(backend, case, stats, ref_stats, g, None)
    scalar = torch.tensor(0.37, dtype=acc, device=device).expand(N)
    assert scalar.stride(0) == 0
    check_backward(backend, case, stats, ref_stats, scalar, scalar)


# ---------------------------------------------------------------- the option grid

SHAPES = [(1, 1), (3, 3), (7, 50), (5, 1000), (2, 5000), (6, 333)]
# Each option set runs with every dtype on two shapes, so every option meets
# every dtype and most shapes; the last of the first block turns everything on at once.
OPTION_SETS = [
    dict(),
    dict(eps=0.1),
    dict(eps=1.0),
    dict(eps=0.1, weight=True),
    dict(weight=True, ignore="inside"),
    dict(eps=0.2, prior=True),
    dict(eps=0.1, weight=True, prior=True, ignore="outside"),
    dict(z_loss=1e-2),
    dict(eps=0.1, z_loss=1e-3, softcap=5.0, ignore="outside"),
    dict(softcap=2.0, ignore="inside"),
    dict(eps=1.0, weight=True, prior=True, z_loss=1e-2, softcap=10.0, ignore="inside"),
]
GRID = [(opts, SHAPES[(i + j) % len(SHAPES)]) for i, opts in enumerate(OPTION_SETS) for j in (0, 3)]
# The contract points of vocabulary slices (lsce.distributed): targets outside
# [0, K) among in-range and ignored rows; the uniform prior over more classes
# than these columns with a float C != 1; an explicit c with a C that is not Σc.
SLICE_SETS = [
    (dict(eps=0.1, outside=True, ignore="outside"), [(6, 333), (2, 5000)]),
    (dict(eps=0.2, weight=True, outside=True, uniform_over=3, C=0.7, z_loss=1e-3), [(3, 3), (2, 5000)]),
    (dict(eps=0.3, weight=True, c=True, C=1.7, softcap=5.0, outside=True, ignore="inside"), [(7, 50), (2, 5000)]),
]
GRID += [(opts, shape) for opts, shapes in SLICE_SETS for shape in shapes]
GRID_IDS = [f"{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}-{s[0]}x{s[1]}" for o, s in GRID]


@over_dtypes
@pytest.mark.parametrize("opts,shape", GRID, ids=GRID_IDS)
@over_backends
def test_matches_reference(backend, opts, shape, dtype):
    check_all(backend, make_case(*shape, dtype, backend.device, **opts))


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_grid_covers_split_path_for_every_option():
    """The grid above covers the Triton split path, ragged blocks and K = 1 with smoothing,
    weight, prior, z_loss, softcap, both kinds of ignore_index and the slice options
    (guards against the grid being trimmed)."""
    tk = importlib.import_module("lsce.triton_kernels.cross_entropy")
    device = torch.device(TRITON[0].device)
    split = {s for s in SHAPES if tk._launch_config(*s, torch.float32, device)[2] > 1}
    assert split, "no shape of the grid takes the split path"
    for key in ("eps", "weight", "prior", "z_loss", "softcap", "ignore", "outside", "uniform_over", "c"):
        shapes = {s for o, s in GRID if o.get(key)}
        assert shapes & split, key
        assert len(shapes) >= 2, key


# ---------------------------------------------------------------- the reference is the interface's formula


def interface_formula(logits, target, coef, opts, g, h):
    """Per-row loss, m and log_s, and the gradient of Σ g·loss + Σ h·lse, written out
    from lsce/interface.py's docstring in fp64 on CPU tensors: the loss term by term;
    the gradient both as the docstring states it and by autograd of that loss with m
    held constant (they must agree)."""
    N, K = logits.shape
    z = logits.double().detach().requires_grad_(True)
    eps, lam, cap = opts.label_smoothing, opts.z_loss, opts.softcap
    zc = cap * torch.tanh(z / cap) if cap else z
    m = zc.detach().amax(1)
    log_s = torch.log(torch.exp(zc - m[:, None]).sum(1))
    lse = m + log_s
    p = torch.exp((zc - m[:, None]) - log_s[:, None])
    valid = target != opts.ignore_index
    own = valid & (target >= 0) & (target < K)
    y = torch.where(own, target, 0)
    w = torch.ones(K, dtype=torch.float64) if coef.weight is None else coef.weight.double()
    w_y = w[y] * own
    c = torch.full((K,), 1.0 / coef.uniform_over, dtype=torch.float64) if coef.c is None else coef.c.double()
    C = float(coef.C)
    zc_y = zc[torch.arange(N), y]
    loss = (1 - eps) * w_y * ((m - zc_y) + log_s) + eps * (C * log_s + ((m[:, None] - zc) * c).sum(1)) \
        + lam * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    g = torch.where(valid, g.double(), 0.0)
    h = torch.zeros(N, dtype=torch.float64) if h is None else h.double()
    (auto,) = torch.autograd.grad((g * loss).sum() + (h * lse).sum(), z)
    with torch.no_grad():
        A = g * ((1 - eps) * w_y + eps * C + 2 * lam * lse) + h
        d = A[:, None] * p - (g * eps)[:, None] * c
        d[torch.arange(N), y] -= g * (1 - eps) * w_y
        if cap:
            d = d * (1 - (zc / cap) ** 2)
    torch.testing.assert_close(d, auto, rtol=1e-10, atol=1e-12, msg=lambda m: f"the docstring's gradient: {m}")
    return loss.detach(), m, log_s.detach(), d


@pytest.mark.parametrize("opts", [o for o, _ in GRID[::2]], ids=[i.rsplit("-", 1)[0] for i in GRID_IDS[::2]])
def test_reference_is_the_interface_formula(opts):
    """lsce.reference (the closed form every backend is compared with) against the
    interface's formulas written out in fp64, on every option set of the grid."""
    for shape in [(7, 50), (3, 3)]:
        case = make_case(*shape, torch.float64, "cpu", **opts)
        g, h = torch.randn(2, shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        f_loss, f_m, f_log_s, f_grad = interface_formula(case.logits, case.target, case.coef, case.opts, g, h)
        loss, m, log_s = reference.rows_forward(case.logits, case.target, case.coef64, case.opts)
        grad = reference.rows_backward(g, h, case.logits, case.target, case.coef64, case.opts, m, log_s)
        for what, got, want in [("loss", loss, f_loss), ("m", m, f_m), ("log_s", log_s, f_log_s),
                                ("grad", grad, f_grad)]:
            assert_close_to_truth(got, want, torch.float64, what=f"{shape} {what}")


# ---------------------------------------------------------------- block, split and chunk layouts

# Each backend's own ways of cutting a row or the rows: Triton's blocks of
# _BLOCK_BYTES (64 here: 16 elements, 32 for 16-bit dtypes, 8 → 16 for fp64, so
# that small rows run many loop iterations with a ragged last block), split or
# whole rows (_target_programs); the C++ kernel's 4096-element blocks and its
# split rows (K >= 2·8192 with fewer than 64 rows); the reference's row chunks.
LAYOUTS = {
    "triton": {"split": (3, 1000), "whole-row": (3, 1000)},
    "cpu": {"split-rows": (3, 20000), "blocks": (3, 9000)},
    "torch": {"row-chunks": (7, 1000)},
}


def _use_layout(backend, layout, dtype, N, K, monkeypatch):
    if backend.name == "triton":
        tk = importlib.import_module("lsce.triton_kernels.cross_entropy")
        monkeypatch.setattr(tk, "_BLOCK_BYTES", 64)
        monkeypatch.setattr(tk, "_target_programs", lambda device: 64 if layout == "split" else 1)
        block, _, n_splits, cols_per_split = tk._launch_config(N, K, dtype, torch.device(backend.device))
        assert K % block != 0 and cols_per_split > block  # several blocks per program, the last one ragged
        assert (n_splits > 1) == (layout == "split")
    elif backend.name == "torch":
        monkeypatch.setattr(reference, "_CHUNK_ELEMS", 3 * K)  # chunks of 3, 3 and 1 rows


@over_dtypes
@pytest.mark.parametrize("opts", [dict(), dict(eps=0.1, weight=True, prior=True, z_loss=1e-3, softcap=4.0,
                                               ignore="outside")], ids=["plain", "all-options"])
@pytest.mark.parametrize("backend,layout", [(b, lay) for b in BACKENDS for lay in LAYOUTS[b.name]], ids=_id)
def test_many_blocks(backend, layout, opts, dtype, monkeypatch):
    N, K = LAYOUTS[backend.name][layout]
    _use_layout(backend, layout, dtype, N, K, monkeypatch)
    check_all(backend, make_case(N, K, dtype, backend.device, **opts))


# ---------------------------------------------------------------- edge cases


@over_dtypes
@over_backends
def test_non_contiguous_rows_and_no_mutation(backend, dtype):
    N, K = 6, 300
    case = make_case(N, K, dtype, backend.device, eps=0.1, weight=True, z_loss=1e-3)
    wide = torch.randn(N, K + 37, dtype=torch.float64).to(dtype).to(backend.device)
    wide[:, :K] = case.logits
    case = case._replace(logits=wide[:, :K])
    assert not case.logits.is_contiguous() and case.logits.stride() == (K + 37, 1)
    before = wide.clone()
    check_all(backend, case)
    assert torch.equal(wide, before), "the kernels modified their input"


@over_dtypes
@pytest.mark.parametrize("shape", [(4, 50), (2, 5000)])
@over_backends
def test_all_rows_ignored(backend, shape, dtype):
    case = make_case(*shape, dtype, backend.device, eps=0.1, z_loss=1e-2, ignore="outside")
    case.target.fill_(case.opts.ignore_index)
    loss, *stats = backend.kernels.forward(case.logits, case.target, case.coef, case.opts)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.isfinite(stats[0] + stats[1]).all()
    # Only the lse gradient flows through ignored rows; without it the gradient is exactly zero.
    g = torch.randn(shape[0]).to(_acc(case)).to(backend.device)
    grad = backend.kernels.backward(g, None, case.logits, case.target, case.coef, case.opts, *stats)
    assert torch.equal(grad, torch.zeros_like(grad))
    check_all(backend, case)


@over_dtypes
@over_backends
def test_empty_batch(backend, dtype):
    case = make_case(0, 7, dtype, backend.device, eps=0.1)
    got = backend.kernels.forward(case.logits, case.target, case.coef, case.opts)
    ref = reference.rows_forward(case.logits, case.target, case.coef, case.opts)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (0,) and a.dtype == b.dtype
    g = torch.empty(0, dtype=_acc(case), device=backend.device)
    grad = backend.kernels.backward(g, None, case.logits, case.target, case.coef, case.opts, *got[1:])
    assert grad.shape == case.logits.shape and grad.dtype == dtype


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(4, 1), (5, 40), (3, 5000)])
@over_dtypes
@over_backends
def test_minus_inf_logits_except_target(backend, dtype, shape, eps):
    """Rows of −inf but a few classes (the target among them; one row keeps only the
    target) give a finite loss at ε = 0, +inf at ε > 0 (as the reference), and never NaN."""
    N, K = shape
    case = make_case(N, K, dtype, backend.device, eps=eps)
    x, y = case.logits, case.target
    keep = torch.zeros(N, K, dtype=torch.bool, device=x.device)
    keep[torch.arange(N, device=x.device), y] = True
    keep[1:, ::7] = True  # row 0: the target alone
    x.masked_fill_(~keep, float("-inf"))
    loss, *stats = backend.kernels.forward(x, y, case.coef, case.opts)
    assert not torch.isnan(loss).any() and not torch.isnan(stats[0] + stats[1]).any()
    if eps == 0.0 or K == 1:
        assert torch.isfinite(loss).all()
    g = torch.ones(N, dtype=_acc(case), device=x.device)
    grad = backend.kernels.backward(g, None, x, y, case.coef, case.opts, *stats)
    assert not torch.isnan(grad).any()
    check_all(backend, case)


@pytest.mark.parametrize("shape", [(3, 50), (2, 5000)])
@over_dtypes
@over_backends
def test_nan_logit_gives_nan_loss(backend, dtype, shape):
    case = make_case(*shape, dtype, backend.device, eps=0.1)
    case.logits[0, shape[1] // 3] = float("nan")
    loss, m, log_s = backend.kernels.forward(case.logits, case.target, case.coef, case.opts)
    assert torch.isnan(loss[0]) and torch.isnan(m[0] + log_s[0])
    assert torch.isfinite(loss[1:]).all()
    check_all(backend, case)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(4, 100), (2, 5000)])
@over_backends
def test_confident_bf16_gradient_at_target(backend, shape, eps):
    """p_y ≈ 1 in bf16 (Liger-Kernel 1329): p_y − 1 must be formed in fp32 before the store.

    The target logit is set so that 1 − p_y ≈ 3e-3: below bf16's resolution at 1
    (2⁻⁸), so rounding p_y to bf16 before subtracting loses most of it, yet far
    above the fp32 rounding of lse, so the kernel can get it to 1 ulp."""
    N, K = shape
    case = make_case(N, K, torch.bfloat16, backend.device, eps=eps, scale=1.0)
    rows = torch.arange(N, device=backend.device)
    case.logits[rows, case.target] = math.log(1.65 * K / 3e-3)
    stats, ref_stats = check_forward(backend, case)
    g = torch.ones(N, device=backend.device)
    grad = check_backward(backend, case, stats, ref_stats, g, None)
    ref = reference.rows_backward(g.double(), None, case.logits.double(), case.target, case.coef64, case.opts,
                                  *ref_stats)
    got_y, ref_y = grad[rows, case.target].double(), ref[rows, case.target]
    # 1 ulp, plus a sliver for the fp32 rounding of lse (≈ 2e-5 relative here).
    tol = ulp(ref_y, torch.bfloat16) + 1e-4 * ref_y.abs()
    assert ((got_y - ref_y).abs() <= tol).all(), (got_y, ref_y)
    if eps == 0.0:
        # The regime this test is about: p_y rounded to bf16 first would miss by far more.
        p_y = torch.exp(case.logits.double()[rows, case.target] - sum(ref_stats))
        rounded_first = p_y.to(torch.bfloat16).double() - 1.0
        assert ((rounded_first - ref_y).abs() > 4 * tol).any()


@pytest.mark.parametrize("offset", [0.0, 1e6, -1e30])
@pytest.mark.parametrize("shape", [(3, 50), (2, 9000)])
@over_dtypes
@over_backends
def test_m_is_the_row_max_and_log_s_is_relative_to_it(backend, dtype, shape, offset):
    """The forward's m is exactly the row's largest logit (without softcap), on
    rows at any offset, and log_s = log Σ exp(z − m) lies in [0, log K]: the
    max's own term is 1 (docs/design.md §1, Precision)."""
    if offset and dtype == torch.float16:
        offset = 3e4 if offset > 0 else -6e4  # within fp16's range
    case = make_case(*shape, dtype, backend.device, eps=0.1, weight=True)
    x = (case.logits.double() + offset).to(dtype)
    loss, m, log_s = backend.kernels.forward(x, case.target, case.coef, case.opts)
    assert torch.equal(m, x.to(m.dtype).amax(1))
    assert bool((log_s >= 0).all()) and bool((log_s <= math.log(shape[1]) + 1e-6).all()), log_s
    ref = reference.rows_forward(x.double(), case.target, case.coef64, case.opts)
    for what, got, want in zip(("loss", "m", "log_s"), (loss, m, log_s), ref):
        assert_rows_close(got, want, dtype, what)


@over_backends
def test_rejects_unsupported_dtype(backend):
    """Integer logits are refused with a TypeError (lsce.checks refuses them above
    the backends; a backend must not compute an integer gradient)."""
    x = torch.zeros(2, 3, dtype=torch.int32, device=backend.device)
    y = torch.zeros(2, dtype=torch.int64, device=backend.device)
    with pytest.raises(TypeError):
        backend.kernels.forward(x, y, Coefficients(None, None, 1.0, 3), RowOptions(-100, 0.0, 0.0, 0.0))


@over_backends
def test_strided_columns_refused_or_read_as_strided(backend):
    """Logits whose columns are not adjacent are outside the interface (lsce.ops
    makes them contiguous first): a backend refuses them with a ValueError, or
    reads them as the view they are — never K adjacent elements from each row start."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(backend.device)[:, ::2]
    y = torch.tensor([0, 3, 1], device=backend.device)
    coef, opts = Coefficients(None, None, 1.0, 4), RowOptions(-100, 0.1, 0.0, 0.0)
    try:
        got = backend.kernels.forward(x, y, coef, opts)
    except ValueError:
        return
    ref = reference.rows_forward(x.contiguous().double(), y, coef, opts)
    for what, a, b in zip(("loss", "m", "log_s"), got, ref):
        assert_rows_close(a, b, x.dtype, what)


@over_backends
def test_more_than_2_to_the_31_elements(backend):
    """int64 row offsets: the last rows lie beyond element 2**31 of the logits and of the gradient."""
    if backend.device != "cuda":
        pytest.skip("needs a GPU with ~10 GiB free (on CPU: tests/test_reliability.py's slow test)")
    K = 32768
    N = (1 << 31) // K + 4
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * N * K * 2:
        pytest.skip("not enough GPU memory")
    x = torch.empty(N, K, dtype=torch.bfloat16, device=backend.device)
    tail = torch.randn(8, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(backend.device)
    x[:-8] = 0.0
    x[-8:] = tail
    y = torch.randint(0, K, (N,), device=backend.device)
    coef = interface.coefficients(K, None, None, 0.1, torch.float32, x.device)
    opts = RowOptions(-100, 0.1, 0.0, 0.0)
    got = backend.kernels.forward(x, y, coef, opts)
    ref = reference.rows_forward(x[-8:].double(), y[-8:], coef, opts)
    for what, a, b in zip(("loss", "m", "log_s"), got, ref):
        assert_rows_close(a[-8:], b, torch.bfloat16, what)
    g = torch.ones(N, device=backend.device)
    grad = backend.kernels.backward(g, None, x, y, coef, opts, *got[1:])
    ref = reference.rows_backward(g[-8:].double(), None, x[-8:].double(), y[-8:], coef, opts, *ref[1:])
    assert_grad_close(grad[-8:], ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
@pytest.mark.parametrize("shape", [(6, 50), (3, 20000)], ids=["rows", "split_rows"])
@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap", "prior")], ids=lambda o: "+".join(o) or "plain")
@over_backends
def test_backward_over_its_own_logits(backend, dtype, shape, options):
    """A gradient written over the logits (out=logits, as lsce.linear does for each
    chunk) is bitwise the gradient written into a new tensor: every kernel reads
    each logit (the target's too) before storing that element. (3, 20000) takes
    the C++ kernel's split-row path (N < 64, K >= 16384) and splits the Triton
    rows into several programs."""
    device = backend.device
    kernels = backend.kernels
    logits, target = make_problem(shape, dtype, ignore_frac=0.3, device=device)
    acc = interface.acc_dtype(dtype)
    opts = {k: v.to(acc) if isinstance(v, torch.Tensor) else v for k, v in make_options(shape[1], options).items()}
    w, prior = (None if opts.get(k) is None else opts[k].to(device) for k in ("weight", "smoothing_prior"))
    options = (interface.coefficients(shape[1], w, prior, 0.1, acc, logits.device),
               interface.RowOptions(-100, 0.1, opts.get("z_loss", 0.0), opts.get("softcap", 0.0)))
    loss, *stats = kernels.forward(logits, target, *options)
    g = torch.rand(shape[0], dtype=acc, generator=torch.Generator().manual_seed(5)).to(device)
    h = torch.rand(shape[0], dtype=acc, generator=torch.Generator().manual_seed(6)).to(device)
    for grad_lse in (None, h):
        expected = kernels.backward(g, grad_lse, logits, target, *options, *stats)
        buffer = logits.clone()
        got = kernels.backward(g, grad_lse, buffer, target, *options, *stats, out=buffer)
        assert got.data_ptr() == buffer.data_ptr()
        assert torch.equal(got, expected)
        coef64 = interface.coefficients(shape[1], w, prior, 0.1, torch.float64, logits.device)
        truth = reference.rows_backward(g, grad_lse, logits.double(), target, coef64, options[1],
                                        *(t.double() for t in stats))
        torch.testing.assert_close(got, truth.to(dtype), atol=1e-6, rtol=0.02 if dtype == torch.bfloat16 else 1e-4)


# ---------------------------------------------------------------- the public API on each backend


@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap", "prior")], ids="+".join)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@over_backends
def test_public_api(backend, reduction, options):
    """lsce.cross_entropy(backend=...) end to end (checks, op, autograd, reduction)
    against the reference backend."""
    logits, target = make_problem((3, 20, 2), torch.float32, ignore_frac=0.2, device=backend.device)
    opts = make_options(20, options, device=backend.device)
    up = torch.randn(target.shape if reduction == "none" else (), device=backend.device)
    kw = dict(reduction=reduction, label_smoothing=0.1, **opts)
    loss, grad = loss_and_grad(lsce.cross_entropy, logits, target, up, backend=backend.name, **kw)
    ref_loss, ref_grad = loss_and_grad(lsce.cross_entropy, logits, target, up, backend="torch", **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- probability targets (soft_forward / soft_backward)

SOFT_OPTION_SETS = [
    dict(),
    dict(eps=0.1),
    dict(eps=0.2, weight=True),
    dict(z_loss=1e-2, softcap=5.0),
    dict(eps=1.0, weight=True, z_loss=1e-3, softcap=3.0),
]
SOFT_SHAPES = [(1, 1), (3, 3), (7, 50), (5, 1000), (2, 5000), (3, 9000)]
SOFT_GRID = [(o, SOFT_SHAPES[(i + j) % len(SOFT_SHAPES)]) for i, o in enumerate(SOFT_OPTION_SETS) for j in (0, 2, 4)]
SOFT_IDS = [f"{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}-{s[0]}x{s[1]}" for o, s in SOFT_GRID]


def make_soft_case(N, K, dtype, target_dtype, device, *, eps=0.0, weight=False, z_loss=0.0, softcap=0.0, seed=0,
                   scale=3.0, target="prob"):
    """Random logits (N, K) and a probability target (rows summing to 1, some
    classes 0; or ``target="any"``: values of any sign and sum) of its own dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if target == "prob":
        t = torch.softmax(torch.randn(N, K, generator=gen, dtype=torch.float64) * 2, 1)
        t[:, ::5] = 0.0
    else:
        t = torch.randn(N, K, generator=gen, dtype=torch.float64) * 2
    w = (torch.rand(K, generator=gen, dtype=torch.float64) * 1.5 + 0.25) if weight else None
    acc = interface.acc_dtype(dtype)
    opts = RowOptions(-100, float(eps), float(z_loss), float(softcap))
    return x.to(device), t.to(target_dtype).to(device), None if w is None else w.to(acc).to(device), opts


def soft_check_all(backend, x, t, w, opts, seed=1):
    """soft_forward against the fp64 reference on the same rounded inputs, then
    soft_backward (with and without the lse upstream and the target gradient, and
    an expanded scalar upstream) against the fp64 reference's gradients."""
    dtype = x.dtype
    kernels = backend.kernels
    w64 = None if w is None else w.double()
    loss, m, log_s, mass = kernels.soft_forward(x, t, w, opts)
    ref = reference.rows_soft_forward(x.double(), t.double(), w64, opts)
    for name, got, want in zip(("loss", "m", "log_s", "mass"), (loss, m, log_s, mass), ref):
        assert_rows_close(got, want, dtype, name)
    N = x.shape[0]
    acc = _acc_of(dtype)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, generator=gen).to(acc).to(x.device)
    h = torch.randn(N, generator=gen).to(acc).to(x.device)
    scalar = torch.tensor(0.37, dtype=acc, device=x.device).expand(N)
    for gl, gh, tg in ((g, h, True), (g, None, False), (scalar, scalar, True)):
        grad, grad_t = kernels.soft_backward(gl, gh, x, t, w, opts, m, log_s, mass, target_grad=tg)
        rgrad, rgrad_t = reference.rows_soft_backward(gl.double(), None if gh is None else gh.double(), x.double(),
                                                      t.double(), w64, opts, *ref[1:], target_grad=True)
        magnitude = (gl.abs().max().item() * (1.0 if w is None else max(1.0, w.abs().max().item()))
                     * max(1.0, t.double().abs().max().item()) + (0.0 if gh is None else gh.abs().max().item())
                     if N else 0.0)
        assert_grad_close(grad, rgrad, dtype, magnitude)
        if tg:
            assert grad_t.dtype == t.dtype and grad_t.shape == t.shape
            # Computed in the logits' accumulation dtype: an fp64 target of fp32 logits gets fp32's precision.
            tdt = torch.float32 if t.dtype == torch.float64 and dtype != torch.float64 else t.dtype
            rt = rgrad_t.to(tdt).double() if tdt != torch.float64 else rgrad_t
            assert_grad_close(grad_t.to(tdt), rt, tdt, None)
        else:
            assert grad_t is None
    return loss, m, log_s, mass


def _acc_of(dtype):
    return interface.acc_dtype(dtype)


@over_dtypes
@pytest.mark.parametrize("opts,shape", SOFT_GRID, ids=SOFT_IDS)
@over_backends
def test_soft_matches_reference(backend, opts, shape, dtype):
    x, t, w, o = make_soft_case(*shape, dtype, dtype, backend.device, **opts)
    soft_check_all(backend, x, t, w, o)


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.bfloat16), (torch.float64, torch.float16)],
                         ids=_id)
@over_backends
def test_soft_mixed_dtypes_and_any_target(backend, dtype, target_dtype):
    """The target in another dtype than the logits (PyTorch accepts it), with
    values of any sign and row sum."""
    x, t, w, o = make_soft_case(4, 300, dtype, target_dtype, backend.device, eps=0.1, weight=True, target="any")
    soft_check_all(backend, x, t, w, o)


@over_dtypes
@over_backends
def test_soft_strided_rows_overwrite_and_no_mutation(backend, dtype):
    """Rows of logits and target with padding (row strides > K) are read as such
    and never written; a logits' gradient written over the logits is bitwise the
    one written into a new tensor."""
    N, K = 5, 700
    x, t, w, o = make_soft_case(N, K, dtype, dtype, backend.device, eps=0.1, weight=True, softcap=4.0)
    wx = torch.zeros(N, K + 9, dtype=dtype, device=backend.device)
    wt = torch.zeros(N, K + 3, dtype=dtype, device=backend.device)
    wx[:, :K], wt[:, :K] = x, t
    before = (wx.clone(), wt.clone())
    xs, ts = wx[:, :K], wt[:, :K]
    soft_check_all(backend, xs, ts, w, o)
    assert torch.equal(wx, before[0]) and torch.equal(wt, before[1]), "the kernels modified their input"
    loss, m, log_s, mass = backend.kernels.soft_forward(x, t, w, o)
    g = torch.rand(N, dtype=_acc_of(dtype), device=backend.device)
    expected, _ = backend.kernels.soft_backward(g, None, x, t, w, o, m, log_s, mass)
    buffer = x.clone()
    got, _ = backend.kernels.soft_backward(g, None, buffer, t, w, o, m, log_s, mass, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, expected)


@over_dtypes
@over_backends
def test_soft_nonfinite_rows(backend, dtype):
    """Row 0: −inf logits where the target is 0 but smoothing gives them mass (loss
    +inf, as PyTorch); row 1: a NaN logit (NaN loss); row 2: only −inf (NaN loss,
    m = log_s = −inf); row 3: −inf where the target is positive (+inf);
    row 4: finite. Loss and m/log_s against the fp64 reference."""
    N, K = 5, 64
    x, t, w, o = make_soft_case(N, K, dtype, dtype, backend.device, eps=0.1)
    x[0, 1::2] = float("-inf")
    t[0, 1::2] = 0.0
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    x[3, :5] = float("-inf")
    loss, m, log_s, mass = backend.kernels.soft_forward(x, t, w, o)
    ref = reference.rows_soft_forward(x.double(), t.double(), w, o)
    assert torch.isposinf(loss[0]) and torch.isposinf(ref[0][0])
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isposinf(loss[3])
    assert torch.isneginf(m[2]) and torch.isneginf(log_s[2])
    assert torch.isfinite(loss[4]) and torch.isfinite(m[[0, 3, 4]]).all()
    assert_rows_close(loss[[0, 3, 4]], ref[0][[0, 3, 4]], dtype, "loss")
    assert_rows_close(m[[0, 3, 4]] + log_s[[0, 3, 4]], (ref[1] + ref[2])[[0, 3, 4]], dtype, "lse")
    g = torch.ones(N, dtype=_acc_of(dtype), device=backend.device)
    grad, _ = backend.kernels.soft_backward(g, None, x, t, w, o, m, log_s, mass)
    assert torch.isfinite(grad[[0, 3, 4]]).all() and torch.isnan(grad[1]).all()


@over_dtypes
@over_backends
def test_soft_empty_batch(backend, dtype):
    x, t, w, o = make_soft_case(0, 7, dtype, dtype, backend.device, eps=0.1)
    out = backend.kernels.soft_forward(x, t, w, o)
    assert all(v.shape == (0,) and v.dtype == _acc_of(dtype) for v in out)
    g = torch.empty(0, dtype=_acc_of(dtype), device=backend.device)
    grad, grad_t = backend.kernels.soft_backward(g, None, x, t, w, o, *out[1:], target_grad=True)
    assert grad.shape == x.shape and grad_t.shape == t.shape and grad_t.dtype == t.dtype


@pytest.mark.parametrize("offset", [1e4, 1e6])
@over_backends
def test_soft_large_offsets_relative_to_the_row_max(backend, offset):
    """fp32 rows of randn + c: loss and gradient as exact as at c = 0 (no absolute lse
    anywhere): the gradient rows sum to 0 within fp32 rounding of p, the losses
    within fp32 rounding of the row's terms."""
    x, t, w, o = make_soft_case(6, 500, torch.float32, torch.float32, backend.device, scale=1.0)
    x = x + offset
    loss, m, log_s, mass = backend.kernels.soft_forward(x, t, w, o)
    ref = reference.rows_soft_forward(x.double(), t.double(), None, o)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-6, atol=1e-6)
    g = torch.ones(6, device=backend.device)
    grad, _ = backend.kernels.soft_backward(g, None, x, t, w, o, m, log_s, mass)
    assert grad.double().sum(1).abs().max().item() < 1e-6


def soft_interface_formula(x, t, w, opts, g, h):
    """The soft rows of lsce/interface.py's docstring in fp64: loss term by term
    and its gradients for the logits and the target by autograd, checked against
    the docstring's closed forms."""
    z = x.double().detach().requires_grad_(True)
    tt = t.double().detach().requires_grad_(True)
    eps, lam, cap = opts.label_smoothing, opts.z_loss, opts.softcap
    K = z.shape[1]
    zc = cap * torch.tanh(z / cap) if cap else z
    m = zc.max(1).values
    log_s = torch.log(torch.exp(zc - m[:, None]).sum(1))
    w64 = torch.ones(K, dtype=torch.float64) if w is None else w.double()
    a = w64 * ((1 - eps) * tt + eps / K)
    A = a.sum(1)
    loss = (a * (m[:, None] - zc)).sum(1) + A * log_s + lam * (m + log_s) ** 2
    gz, gt = torch.autograd.grad((g * loss).sum() + (h * (m + log_s)).sum(), (z, tt))
    with torch.no_grad():
        p = torch.exp((zc - m[:, None]) - log_s[:, None])
        d = (g * (A + 2 * lam * (m + log_s)) + h)[:, None] * p - g[:, None] * a
        if cap:
            d = d * (1 - (zc / cap) ** 2)
        dt = (g[:, None] * (1 - eps) * w64) * ((m[:, None] - zc) + log_s[:, None])
    torch.testing.assert_close(d, gz, rtol=1e-10, atol=1e-12, msg=lambda s: f"the docstring's logits gradient: {s}")
    torch.testing.assert_close(dt, gt, rtol=1e-10, atol=1e-12, msg=lambda s: f"the docstring's target gradient: {s}")
    return loss.detach(), m.detach(), log_s.detach(), A.detach(), d, dt


@pytest.mark.parametrize("opts", SOFT_OPTION_SETS, ids=[i.rsplit("-", 1)[0] for i in SOFT_IDS[::3]])
def test_soft_reference_is_the_interface_formula(opts):
    """lsce.reference's soft rows (what the backends are compared with) against the
    interface's formulas, and against PyTorch's F.cross_entropy with probability targets."""
    for shape in [(7, 50), (3, 3)]:
        x, t, w, o = make_soft_case(*shape, torch.float64, torch.float64, "cpu", target="any", **opts)
        g, h = torch.randn(2, shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        want = soft_interface_formula(x, t, w, o, g, h)
        fwd = reference.rows_soft_forward(x, t, w, o)
        got = (*fwd, *reference.rows_soft_backward(g, h, x, t, w, o, *fwd[1:], target_grad=True))
        for name, a, b in zip(("loss", "m", "log_s", "A", "grad", "target grad"), got, want):
            assert_close_to_truth(a, b, torch.float64, what=f"{shape} {name}")
        if not o.z_loss and not o.softcap:
            pt = torch.nn.functional.cross_entropy(x, t, weight=w, label_smoothing=o.label_smoothing,
                                                   reduction="none")
            assert_close_to_truth(fwd[0], pt, torch.float64, what=f"{shape} against F.cross_entropy")


@over_dtypes
@pytest.mark.parametrize("opts", [dict(), dict(eps=0.1, weight=True, z_loss=1e-3, softcap=4.0)],
                         ids=["plain", "all-options"])
@over_backends
def test_soft_many_blocks(backend, opts, dtype, monkeypatch):
    """Several loop blocks per row, the last ragged: Triton's blocks of 16/32
    elements (_BLOCK_BYTES = 64), the C++ kernel's 4096-element blocks, the
    reference's row chunks."""
    N, K = (3, 1000) if backend.name != "cpu" else (3, 9000)
    if backend.name == "triton":
        monkeypatch.setattr(importlib.import_module("lsce.triton_kernels.cross_entropy"), "_BLOCK_BYTES", 64)
    elif backend.name == "torch":
        monkeypatch.setattr(reference, "_CHUNK_ELEMS", 2 * K)
    x, t, w, o = make_soft_case(N, K, dtype, dtype, backend.device, **opts)
    # The row max in the last block and the first block's entries far below it:
    # the running references must be re-based without losing the early terms.
    x[:, -3] = 40.0
    soft_check_all(backend, x, t, w, o)
