"""The distillation functions of the per-row kernel interface (lsce/interface.py):
``distill_forward`` / ``distill_backward`` on every backend present.

Backends as in tests/test_conformance.py (C++ "cpu", the reference "torch",
Triton "triton" — under the interpreter without a GPU). Each is compared with
lsce.reference's ROWS evaluated in fp64 on the same rounded inputs, and the
reference itself with autograd of ``lsce.reference.distillation_loss`` (the
statement of the loss).
"""

import itertools

import pytest
import torch

from test_conformance import _id, over_backends, over_dtypes  # importing it sets TRITON_INTERPRET
from lsce import interface, reference
from lsce.interface import DistillOptions
from _util import assert_grad_close, assert_same_nonfinite

OPTION_SETS = [dict(beta=b, temperature=t, eps=e, weight=w, target=tg)
               for (b, t), (e, w, tg) in itertools.product(
                   [(0.0, 1.0), (0.0, 2.0), (0.3, 0.5), (0.5, 4.0), (1.0, 1.0), (1.0, 2.0)],
                   [(0.0, False, "ignore"), (0.1, True, "ignore"), (0.1, False, None)])]
SHAPES = [(1, 1), (3, 3), (7, 50), (5, 1000), (2, 5000)]
GRID = [(o, SHAPES[i % len(SHAPES)]) for i, o in enumerate(OPTION_SETS)]
GRID_IDS = [f"b{o['beta']}-T{o['temperature']}-e{o['eps']}{'-w' if o['weight'] else ''}-{o['target']}-{s[0]}x{s[1]}"
            for o, s in GRID]


def make_case(N, K, dtype, teacher_dtype, device, *, beta=0.0, temperature=1.0, eps=0.0, weight=False,
              target="ignore", seed=0, scale=3.0):
    """Student and teacher logits (N, K), a target with every third row ignored
    (``target="ignore"``) or None, a class weight, and the call's options."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, K, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    u = (torch.randn(N, K, generator=gen, dtype=torch.float64) * scale).to(teacher_dtype).to(device)
    y = None
    if target is not None:
        y = torch.randint(0, K, (N,), generator=gen)
        y[::3] = -100
        y = y.to(device)
    acc = interface.acc_dtype(dtype)
    w = (torch.rand(K, generator=gen, dtype=torch.float64) * 1.5 + 0.25) if weight else None
    W = float(K) if w is None else float(w.sum())
    opts = DistillOptions(float(temperature), float(beta), float(eps), -100, W)
    return z, u, y, None if w is None else w.to(acc).to(device), opts


def _rows_close(got, want, dtype, scale, what):
    """Per-row values accumulated in fp32 (fp64) against fp64: relative to the row's terms' size."""
    assert got.dtype == interface.acc_dtype(dtype) and got.shape == want.shape, what
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_same_nonfinite(got, want, what)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def check_all(backend, z, u, y, w, opts, seed=1):
    """distill_forward against the fp64 reference on the same rounded inputs, then
    distill_backward (random upstreams, an expanded scalar, a zero kd upstream)
    against the reference's gradient."""
    dtype, kernels = z.dtype, backend.kernels
    w64 = None if w is None else w.double()
    kd, ce, stats = kernels.distill_forward(z, u, y, w, opts)
    rkd, rce, rstats = reference.ROWS.distill_forward(z.double(), u.double(), y, w64, opts)
    T2 = opts.temperature ** 2
    big = 1.0 + (z.double().abs().max().item() + u.double().abs().max().item() if z.numel() else 0.0)
    wmax = 1.0 if w is None else max(1.0, w.abs().max().item())
    _rows_close(kd, rkd, dtype, big * max(T2, 1.0), "kd")
    _rows_close(ce, rce, dtype, big * wmax, "ce")
    assert stats.shape == (6, z.shape[0])
    for i, name in enumerate(("m", "log_s1", "log_sT", "mt", "log_st", "Q")):
        _rows_close(stats[i], rstats[i], dtype, big / min(opts.temperature, 1.0), name)
    N, acc = z.shape[0], interface.acc_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, generator=gen).to(acc).to(z.device)
    h = torch.randn(N, generator=gen).to(acc).to(z.device)
    scalar = torch.tensor(0.37, dtype=acc, device=z.device).expand(N)
    for gk, gc in ((g, h), (scalar, scalar), (torch.zeros_like(g), h)):
        grad = kernels.distill_backward(gk, gc, z, u, y, w, opts, stats)
        ref = reference.ROWS.distill_backward(gk.double(), gc.double(), z.double(), u.double(), y, w64, opts,
                                              rstats)
        magnitude = (4 * opts.temperature * gk.abs().max().item() + 2 * wmax * gc.abs().max().item()) if N else 0.0
        assert_grad_close(grad, ref, dtype, magnitude)
    return kd, ce, stats


# ---------------------------------------------------------------- the reference is the statement


@pytest.mark.parametrize("opts,shape", GRID, ids=GRID_IDS)
def test_reference_rows_are_the_statement(opts, shape):
    """ROWS' kd and ce are the two terms of reference.distillation_loss (alpha = 1
    and alpha = 0), and its gradient is autograd's of Σ g·kd + Σ h·ce, in fp64."""
    z, u, y, w, o = make_case(*shape, torch.float64, torch.float64, "cpu", **opts)
    kd, ce, stats = reference.ROWS.distill_forward(z, u, y, w, o)
    leaf = z.clone().requires_grad_()
    kw = dict(teacher_logits=u, temperature=o.temperature, beta=o.beta, label_smoothing=o.label_smoothing, weight=w,
              reduction="none")
    want_kd = reference.distillation_loss(leaf, y, alpha=1.0, **kw)
    torch.testing.assert_close(kd, want_kd.detach(), rtol=1e-12, atol=1e-12)
    g, h = torch.randn(shape[0], dtype=torch.float64), torch.randn(shape[0], dtype=torch.float64)
    objective = (g * want_kd).sum()
    if y is not None:
        want_ce = reference.distillation_loss(leaf, y, alpha=0.0, **kw)
        torch.testing.assert_close(ce, want_ce.detach(), rtol=1e-12, atol=1e-12)
        objective = objective + (h * want_ce).sum()
    else:
        assert not ce.any()
    want_grad, = torch.autograd.grad(objective, leaf)
    grad = reference.ROWS.distill_backward(g, h, z, u, y, w, o, stats)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- every backend against the reference


@over_dtypes
@pytest.mark.parametrize("opts,shape", GRID, ids=GRID_IDS)
@over_backends
def test_distill_matches_reference(backend, opts, shape, dtype):
    check_all(backend, *make_case(*shape, dtype, dtype, backend.device, **opts))


@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float64), (torch.float64, torch.float16)],
                         ids=_id)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@over_backends
def test_distill_mixed_dtypes(backend, dtype, teacher_dtype, beta):
    """The teacher in another dtype than the student."""
    check_all(backend, *make_case(4, 300, dtype, teacher_dtype, backend.device, beta=beta, temperature=2.0, eps=0.1,
                                  weight=True))


@over_dtypes
@pytest.mark.parametrize("beta", [0.0, 0.3])
@over_backends
def test_distill_strided_rows_overwrite_and_no_mutation(backend, dtype, beta):
    """Rows of student and teacher with padding (row strides > K) are read as such
    and never written; a gradient written over the student is bitwise the one
    written into a new tensor."""
    N, K = 5, 700
    z, u, y, w, o = make_case(N, K, dtype, dtype, backend.device, beta=beta, temperature=2.0, eps=0.1, weight=True)
    wz = torch.zeros(N, K + 9, dtype=dtype, device=backend.device)
    wu = torch.zeros(N, K + 3, dtype=dtype, device=backend.device)
    wz[:, :K], wu[:, :K] = z, u
    before = (wz.clone(), wu.clone(), y.clone())
    check_all(backend, wz[:, :K], wu[:, :K], y, w, o)
    assert torch.equal(wz, before[0]) and torch.equal(wu, before[1]) and torch.equal(y, before[2]), \
        "the kernels modified their input"
    kd, ce, stats = backend.kernels.distill_forward(z, u, y, w, o)
    g = torch.rand(N, dtype=interface.acc_dtype(dtype), device=backend.device)
    expected = backend.kernels.distill_backward(g, g, z, u, y, w, o, stats)
    buffer = z.clone()
    got = backend.kernels.distill_backward(g, g, buffer, u, y, w, o, stats, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, expected)


@over_backends
def test_distill_empty_batch_and_all_ignored(backend):
    z, u, y, w, o = make_case(0, 50, torch.float32, torch.float32, backend.device, eps=0.1)
    kd, ce, stats = backend.kernels.distill_forward(z, u, y, w, o)
    assert kd.shape == ce.shape == (0,) and stats.shape == (6, 0)
    assert backend.kernels.distill_backward(kd, ce, z, u, y, w, o, stats).shape == (0, 50)
    z, u, y, w, o = make_case(4, 300, torch.float32, torch.float32, backend.device, beta=0.5, eps=0.1, weight=True)
    y = torch.full_like(y, o.ignore_index)
    kd, ce, stats = backend.kernels.distill_forward(z, u, y, w, o)
    assert not kd.any() and not ce.any()
    g = torch.ones(4, device=backend.device)
    assert not backend.kernels.distill_backward(g, g, z, u, y, w, o, stats).any()


@over_dtypes
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@over_backends
def test_distill_nonfinite_rows(backend, dtype, beta):
    """Row 0: a NaN student logit; row 1: a student of only −inf; row 2: −inf
    student and teacher logits in the same columns (t = s = 0 there: finite);
    row 3: −inf student logits where the teacher has mass (KL(t‖s) = +inf at
    β = 0); row 4: finite. kd, ce and the gradient's NaN/inf pattern and finite
    values against the fp64 reference."""
    N, K = 5, 64
    z, u, y, w, o = make_case(N, K, dtype, dtype, backend.device, beta=beta, eps=0.1, target="ignore")
    y[:] = torch.arange(N) + 1
    z[0, 7] = float("nan")
    z[1] = float("-inf")
    z[2, 1::2] = float("-inf")
    u[2, 1::2] = float("-inf")
    z[3, :5] = float("-inf")
    y[3] = 10
    kd, ce, stats = backend.kernels.distill_forward(z, u, y, w, o)
    rkd, rce, _ = reference.ROWS.distill_forward(z.double(), u.double(), y, None, o)
    _rows_close(kd, rkd, dtype, 10.0, "kd")
    _rows_close(ce, rce, dtype, 10.0, "ce")
    assert torch.isfinite(kd[[2, 4]]).all() and torch.isnan(kd[0])
