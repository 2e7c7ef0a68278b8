"""The Triton kernels (lsce.triton_kernels.cross_entropy) against lsce.reference.

Without CUDA the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set below before triton is imported); with CUDA the same
tests run on the GPU. The reference is evaluated in fp64 on the same input
values, so the tolerances only allow for the kernels' fp32 accumulation and
the final rounding of the gradient to the logits' dtype.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from lsce import reference  # noqa: E402
from lsce.triton_kernels import cross_entropy as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Mantissa bits: one ulp of x in a dtype is 2**(exponent(x) − bits).
_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


# ---------------------------------------------------------------- helpers


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value of x (fp64), subnormal spacing at 0."""
    _, e = torch.frexp(x.abs())  # |x| = m · 2**e with m in [0.5, 1)
    fi = torch.finfo(dtype)
    spacing = torch.ldexp(torch.ones_like(x), e - 1 - _MANTISSA_BITS[dtype])
    return spacing.clamp_min(fi.tiny * fi.eps)


def assert_rows_close(got, ref, dtype, what):
    """Per-row loss/lse: fp32 accumulation (fp64 for fp64 logits) against fp64."""
    assert got.dtype == reference.acc_dtype(dtype), what
    assert got.shape == ref.shape, what
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_grad_close(got, ref, dtype, magnitude=None):
    """Gradient in the logits' dtype: one ulp of that dtype (the interpreter truncates
    fp32 → bf16 stores instead of rounding), plus fp32 rounding of the terms, whose
    size is ``magnitude`` (the largest |g|·w + |h|; the largest |ref| if not given) —
    a gradient that cancels to about 0 is only as exact as the terms that cancel."""
    assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous()
    got = got.double()
    if dtype == torch.float64:
        rtol, scale = 1e-12, 1e-13
    else:
        rtol, scale = 1e-5, 1e-6
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), "NaN pattern differs"
    assert torch.equal(got[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)]), "inf values differ"
    r = ref[finite]
    if magnitude is None:
        magnitude = r.abs().max().item() if r.numel() else 0.0
    atol = scale * magnitude
    tol = rtol * r.abs() + atol + (ulp(r, dtype) if dtype != torch.float64 else 0.0)
    err = (got[finite] - r).abs()
    worst = (err - tol).argmax() if err.numel() else None
    assert bool((err <= tol).all()), f"grad: max excess at {worst}: got {got[finite][worst]}, ref {r[worst]}, tol {tol[worst]}"


def make_inputs(N, K, dtype, *, eps=0.0, weight=False, prior=False, z_loss=0.0, softcap=0.0, ignore=None, seed=0,
                scale=3.0):
    """Random logits (N, K) in dtype and the options of one call; ``ignore`` is None, "inside"
    (ignore_index is a class id) or "outside" (ignore_index = −100)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, K, (N,), generator=gen)
    ignore_index = -100
    if ignore == "outside":
        y[::2] = ignore_index
    elif ignore == "inside":
        ignore_index = (K - 1) // 2
        y[::2] = ignore_index
    w = (torch.rand(K, generator=gen) * 1.5 + 0.25) if weight else None
    pi = torch.softmax(torch.randn(K, generator=gen, dtype=torch.float64) * 2, 0).float() if prior else None
    dev = lambda t: None if t is None else t.to(DEVICE)
    return dict(logits=x.to(DEVICE), target=y.to(DEVICE), weight=dev(w), prior=dev(pi), ignore_index=ignore_index,
                label_smoothing=float(eps), z_loss=float(z_loss), softcap=float(softcap))


def _ref_args(args):
    """The same inputs for the fp64 reference."""
    return dict(args, logits=args["logits"].double(),
                weight=None if args["weight"] is None else args["weight"].double(),
                prior=None if args["prior"] is None else args["prior"].double())


def _opts(args):
    return [args[k] for k in ("ignore_index", "label_smoothing", "z_loss", "softcap")]


def check_forward(args):
    dtype = args["logits"].dtype
    loss, lse = tk.forward(args["logits"], args["target"], args["weight"], args["prior"], *_opts(args))
    r = _ref_args(args)
    ref_loss, ref_lse = reference.rows_forward(r["logits"], r["target"], r["weight"], r["prior"], *_opts(r))
    assert_rows_close(lse, ref_lse, dtype, "lse")
    assert_rows_close(loss, ref_loss, dtype, "loss")
    return lse, ref_lse


def check_backward(args, lse, ref_lse, grad_loss, grad_lse):
    dtype = args["logits"].dtype
    grad = tk.backward(grad_loss, grad_lse, args["logits"], args["target"], args["weight"], args["prior"], lse,
                       *_opts(args))
    r = _ref_args(args)
    ref = reference.rows_backward(grad_loss.double(), None if grad_lse is None else grad_lse.double(), r["logits"],
                                  r["target"], r["weight"], r["prior"], ref_lse, *_opts(r))
    w_max = 1.0 if args["weight"] is None else max(1.0, args["weight"].abs().max().item())
    h_max = 0.0 if grad_lse is None else grad_lse.abs().max().item()
    magnitude = grad_loss.abs().max().item() * w_max + h_max if grad_loss.numel() else 0.0
    assert_grad_close(grad, ref, dtype, magnitude)
    return grad


def check_all(args, seed=1):
    """Forward, then backward with random (g, h), random g alone and an expanded scalar g."""
    lse, ref_lse = check_forward(args)
    N = args["logits"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, generator=gen).to(DEVICE)
    h = torch.randn(N, generator=gen).to(DEVICE)
    check_backward(args, lse, ref_lse, g, h)
    check_backward(args, lse, ref_lse, g, None)
    scalar = torch.tensor(0.37, device=DEVICE).expand(N)
    assert scalar.stride(0) == 0
    check_backward(args, lse, ref_lse, scalar, scalar)


def _id(dtype):
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- the option grid

SHAPES = [(1, 1), (3, 3), (7, 50), (5, 1000), (2, 5000), (6, 333)]
# Each option set runs with every dtype on two shapes, so every option meets
# every dtype and most shapes; the last set turns everything on at once.
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


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("opts,shape", GRID, ids=[f"{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}-{s[0]}x{s[1]}"
                                                  for o, s in GRID])
def test_matches_reference(dtype, opts, shape):
    check_all(make_inputs(*shape, dtype, **opts))


def test_grid_covers_split_path_for_every_option():
    """The grid above covers the split path, ragged blocks and K = 1 with smoothing, weight, prior,
    z_loss, softcap and both kinds of ignore_index (guards against the grid being trimmed)."""
    split = {s for s in SHAPES if tk._launch_config(*s, torch.float32, torch.device(DEVICE))[2] > 1}
    assert split, "no shape of the grid takes the split path"
    for key in ("eps", "weight", "prior", "z_loss", "softcap", "ignore"):
        shapes = {s for o, s in GRID if o.get(key)}
        assert shapes & split, key
        assert len(shapes) >= 2, key


# ---------------------------------------------------------------- block and split layouts


@pytest.fixture
def tiny_blocks(monkeypatch):
    """16-element blocks (32 for 16-bit dtypes, 8 → 16 for fp64) so that small rows run many loop
    iterations with a ragged last block."""
    monkeypatch.setattr(tk, "_BLOCK_BYTES", 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layout", ["split", "whole-row"])
@pytest.mark.parametrize("opts", [dict(), dict(eps=0.1, weight=True, prior=True, z_loss=1e-3, softcap=4.0, ignore="outside")],
                         ids=["plain", "all-options"])
def test_many_blocks(tiny_blocks, monkeypatch, dtype, layout, opts):
    N, K = 3, 1000
    monkeypatch.setattr(tk, "_target_programs", lambda device: 64 if layout == "split" else 1)
    block, _, n_splits, cols_per_split = tk._launch_config(N, K, dtype, torch.device(DEVICE))
    assert K % block != 0 and cols_per_split > block  # several blocks per program, the last one ragged
    assert (n_splits > 1) == (layout == "split")
    check_all(make_inputs(N, K, dtype, **opts))


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_non_contiguous_rows_and_no_mutation(dtype):
    N, K = 6, 300
    args = make_inputs(N, K, dtype, eps=0.1, weight=True, z_loss=1e-3)
    wide = torch.randn(N, K + 37, dtype=torch.float64).to(dtype).to(DEVICE)
    wide[:, :K] = args["logits"]
    args["logits"] = wide[:, :K]
    assert not args["logits"].is_contiguous() and args["logits"].stride() == (K + 37, 1)
    before = wide.clone()
    check_all(args)
    assert torch.equal(wide, before), "the kernels modified their input"


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(4, 50), (2, 5000)])
def test_all_rows_ignored(dtype, shape):
    args = make_inputs(*shape, dtype, eps=0.1, z_loss=1e-2, ignore="outside")
    args["target"].fill_(args["ignore_index"])
    loss, lse = tk.forward(args["logits"], args["target"], None, None, *_opts(args))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.isfinite(lse).all()
    N = shape[0]
    # Only the lse gradient flows through ignored rows; without it the gradient is exactly zero.
    g = torch.randn(N).to(DEVICE)
    grad = tk.backward(g, None, args["logits"], args["target"], None, None, lse, *_opts(args))
    assert torch.equal(grad, torch.zeros_like(grad))
    check_all(args)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_empty_batch(dtype):
    K = 7
    x = torch.empty(0, K, dtype=dtype, device=DEVICE)
    y = torch.empty(0, dtype=torch.int64, device=DEVICE)
    loss, lse = tk.forward(x, y, None, None, -100, 0.1, 0.0, 0.0)
    ref_loss, ref_lse = reference.rows_forward(x, y, None, None, -100, 0.1, 0.0, 0.0)
    for got, ref in ((loss, ref_loss), (lse, ref_lse)):
        assert got.shape == ref.shape == (0,) and got.dtype == ref.dtype
    grad = tk.backward(torch.empty(0, device=DEVICE), None, x, y, None, None, lse, -100, 0.1, 0.0, 0.0)
    assert grad.shape == x.shape and grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(4, 1), (5, 40), (3, 5000)])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_minus_inf_logits_except_target(dtype, shape, eps):
    """Rows of −inf but a few classes (the target among them; one row keeps only the
    target) give a finite loss at ε = 0, +inf at ε > 0 (as the reference), and never NaN."""
    N, K = shape
    args = make_inputs(N, K, dtype, eps=eps)
    x, y = args["logits"], args["target"]
    keep = torch.zeros(N, K, dtype=torch.bool, device=DEVICE)
    keep[torch.arange(N, device=DEVICE), y] = True
    keep[1:, ::7] = True  # row 0: the target alone
    x.masked_fill_(~keep, float("-inf"))
    loss, lse = tk.forward(x, y, None, None, *_opts(args))
    assert not torch.isnan(loss).any() and not torch.isnan(lse).any()
    if eps == 0.0 or K == 1:
        assert torch.isfinite(loss).all()
    grad = tk.backward(torch.ones(N, device=DEVICE), None, x, y, None, None, lse, *_opts(args))
    assert not torch.isnan(grad).any()
    check_all(args)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(3, 50), (2, 5000)])
def test_nan_logit_gives_nan_loss(dtype, shape):
    args = make_inputs(*shape, dtype, eps=0.1)
    args["logits"][0, shape[1] // 3] = float("nan")
    loss, lse = tk.forward(args["logits"], args["target"], None, None, *_opts(args))
    assert torch.isnan(loss[0]) and torch.isnan(lse[0])
    assert torch.isfinite(loss[1:]).all()
    check_all(args)


@pytest.mark.parametrize("shape", [(4, 100), (2, 5000)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_confident_bf16_gradient_at_target(shape, eps):
    """p_y ≈ 1 in bf16 (Liger-Kernel 1329): p_y − 1 must be formed in fp32 before the store.

    The target logit is set so that 1 − p_y ≈ 3e-3: below bf16's resolution at 1
    (2⁻⁸), so rounding p_y to bf16 before subtracting loses most of it, yet far
    above the fp32 rounding of lse, so the kernel can get it to 1 ulp."""
    N, K = shape
    args = make_inputs(N, K, torch.bfloat16, eps=eps, scale=1.0)
    rows = torch.arange(N, device=DEVICE)
    args["logits"][rows, args["target"]] = math.log(1.65 * K / 3e-3)
    lse, ref_lse = check_forward(args)
    g = torch.ones(N, device=DEVICE)
    grad = check_backward(args, lse, ref_lse, g, None)
    r = _ref_args(args)
    ref = reference.rows_backward(g.double(), None, r["logits"], r["target"], None, None, ref_lse, *_opts(r))
    got_y, ref_y = grad[rows, args["target"]].double(), ref[rows, args["target"]]
    # 1 ulp, plus a sliver for the fp32 rounding of lse (≈ 2e-5 relative here).
    tol = ulp(ref_y, torch.bfloat16) + 1e-4 * ref_y.abs()
    assert ((got_y - ref_y).abs() <= tol).all(), (got_y, ref_y)
    if eps == 0.0:
        # The regime this test is about: p_y rounded to bf16 first would miss by far more.
        p_y = torch.exp(r["logits"][rows, args["target"]] - ref_lse)
        rounded_first = p_y.to(torch.bfloat16).double() - 1.0
        assert ((rounded_first - ref_y).abs() > 4 * tol).any()


def test_rejects_unsupported_dtype():
    x = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    y = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError):
        tk.forward(x, y, None, None, -100, 0.0, 0.0, 0.0)


def test_rejects_strided_columns():
    x = torch.randn(3, 8, device=DEVICE)[:, ::2]
    y = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError):
        tk.forward(x, y, None, None, -100, 0.0, 0.0, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with ~10 GiB free")
def test_more_than_2_to_the_31_elements():
    """int64 row offsets: the last rows lie beyond element 2**31 of the logits and of the gradient."""
    K = 32768
    N = (1 << 31) // K + 4
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * N * K * 2:
        pytest.skip("not enough GPU memory")
    x = torch.empty(N, K, dtype=torch.bfloat16, device=DEVICE)
    tail = torch.randn(8, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(DEVICE)
    x[:-8] = 0.0
    x[-8:] = tail
    y = torch.randint(0, K, (N,), device=DEVICE)
    loss, lse = tk.forward(x, y, None, None, -100, 0.1, 0.0, 0.0)
    ref_loss, ref_lse = reference.rows_forward(x[-8:].double(), y[-8:], None, None, -100, 0.1, 0.0, 0.0)
    assert_rows_close(loss[-8:], ref_loss, torch.bfloat16, "loss")
    assert_rows_close(lse[-8:], ref_lse, torch.bfloat16, "lse")
    g = torch.ones(N, device=DEVICE)
    grad = tk.backward(g, None, x, y, None, None, lse, -100, 0.1, 0.0, 0.0)
    ref = reference.rows_backward(g[-8:].double(), None, x[-8:].double(), y[-8:], None, None, ref_lse, -100, 0.1, 0.0, 0.0)
    assert_grad_close(grad[-8:], ref, torch.bfloat16)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap", "prior")], ids="+".join)
def test_public_api_on_triton_backend(reduction, options):
    """lsce.cross_entropy(backend="triton") end to end (checks, op, autograd, reduction)."""
    import lsce
    from _util import loss_and_grad, make_options, make_problem

    logits, target = make_problem((3, 20, 2), torch.float32, ignore_frac=0.2, device=DEVICE)
    opts = make_options(20, options, device=DEVICE)
    up = torch.randn(target.shape if reduction == "none" else (), device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1, **opts)
    loss, grad = loss_and_grad(lsce.cross_entropy, logits, target, up, backend="triton", **kw)
    ref_loss, ref_grad = loss_and_grad(lsce.cross_entropy, logits, target, up, backend="torch", **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
