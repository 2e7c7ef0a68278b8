"""lsce.cross_entropy on CPU (the C++ kernel, and the reference backend) against
lsce/reference.py in fp64 and against torch.nn.functional.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

import lsce
from _util import (
    ULP, assert_close_to_truth, assert_matches, assert_no_worse_than_torch, loss_and_grad,
    make_options, make_problem, torch_cross_entropy, torch_supports, truth, upstream_for,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(13,), (37, 53), (4, 7, 5), (6, 1), (9, 3), (3, 6, 2, 2)]
OPTIONS = [(), ("weight",), ("z_loss",), ("softcap",), ("prior",), ("weight", "z_loss", "softcap", "prior")]
REDUCTIONS = ["mean", "sum", "none"]


def check(logits, target, backend="auto", **kwargs):
    """lsce against the fp64 reference and, where it has the options, F.cross_entropy."""
    dtype = logits.dtype
    up = upstream_for(target, kwargs.get("reduction", "mean"))
    loss, grad = loss_and_grad(lsce.cross_entropy, logits, target, up.to(torch.float32), backend=backend, **kwargs)
    t_loss, t_grad = truth(logits, target, up.to(torch.float32).double(), **kwargs)
    assert loss.dtype == dtype and grad.dtype == dtype
    if torch_supports(kwargs):
        p_loss, p_grad = loss_and_grad(torch_cross_entropy, logits, target, up.to(torch.float32), **kwargs)
        assert p_loss.dtype == loss.dtype and p_loss.shape == loss.shape
        if dtype != torch.float64:
            # fp32 too: lsce forms p relative to the row max, PyTorch from
            # exp(log_softmax), whose fp32 rounding at |logp| ≈ 40 costs p 4e-6
            # relative (test_very_confident_logits): "as close as PyTorch" would
            # fail where lsce is closer to the truth.
            assert_no_worse_than_torch(loss, p_loss, t_loss, dtype, what="loss vs torch")
            assert_no_worse_than_torch(grad, p_grad, t_grad, dtype, what="grad vs torch")
        else:
            assert_matches((loss, grad), (p_loss, p_grad), what="vs torch", rtol=1e-12, atol_floor=1e-7)
    assert_close_to_truth(loss, t_loss, dtype, what="loss")
    assert_close_to_truth(grad, t_grad, dtype, what="grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("options", OPTIONS, ids="+".join)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_and_torch(dtype, shape, eps, options, reduction):
    ignore = len(shape) > 1  # 1-D input has a single target: keep it
    logits, target = make_problem(shape, dtype, ignore_frac=0.25 if ignore else 0.0)
    K = shape[0] if len(shape) == 1 else shape[1]
    check(logits, target, reduction=reduction, label_smoothing=eps, **make_options(K, options))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("options", OPTIONS, ids="+".join)
def test_backends_agree(backend, options):
    logits, target = make_problem((19, 41), torch.float32, ignore_frac=0.2)
    check(logits, target, backend=backend, label_smoothing=0.1, **make_options(41, options))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(3, 50257), (70, 4099), (2, 40000), (1, 1), (5, 3)])
@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap", "prior")], ids="+".join)
def test_odd_and_large_vocabularies(dtype, N, K, options):
    # (2, 40000) takes the split-row path (few rows, many classes).
    logits, target = make_problem((N, K), dtype, ignore_frac=0.2)
    check(logits, target, label_smoothing=0.1, **make_options(K, options))


@pytest.mark.parametrize("ignore_index", [-100, 2, 0])
@pytest.mark.parametrize("weighted", [False, True])
def test_ignore_index_inside_class_range(ignore_index, weighted):
    logits, target = make_problem((30, 6), torch.float32)
    target[::3] = ignore_index
    opts = make_options(6, ("weight",) if weighted else ())
    for red in REDUCTIONS:
        check(logits, target, ignore_index=ignore_index, reduction=red, label_smoothing=0.2, **opts)


@pytest.mark.parametrize("weighted", [False, True])
def test_all_rows_ignored_and_empty_batch(weighted):
    opts = {"weight": torch.rand(5)} if weighted else {}
    logits, _ = make_problem((4, 5), torch.float32)
    ignored = torch.full((4,), -100)
    empty_logits, empty_target = torch.empty(0, 5), torch.empty(0, dtype=torch.int64)
    for z, t in [(logits, ignored), (empty_logits, empty_target)]:
        for red in REDUCTIONS:
            ours = lsce.cross_entropy(z, t, reduction=red, label_smoothing=0.1, **opts)
            theirs = F.cross_entropy(z, t, reduction=red, label_smoothing=0.1, **opts)
            torch.testing.assert_close(ours, theirs, equal_nan=True)
    x = logits.clone().requires_grad_(True)
    lsce.cross_entropy(x, ignored, reduction="sum", label_smoothing=0.1).backward()
    assert torch.equal(x.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8])
def test_target_dtypes(tdtype):
    logits, target = make_problem((12, 9), torch.float32)
    ours = lsce.cross_entropy(logits, target.to(tdtype), label_smoothing=0.1)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=0.1))


def test_non_contiguous_inputs():
    base, target = make_problem((40, 30), torch.float32, ignore_frac=0.1)
    wide = torch.randn(40, 64)
    wide[:, 5:35] = base
    views = [wide[:, 5:35], base.t().contiguous().t(), base[::2], torch.randn(30, 40).t()]
    for z in views:
        t = target[: z.shape[0]]
        check(z, t, label_smoothing=0.1)
        check(z, t, label_smoothing=0.1, reduction="none", **make_options(30, ("weight", "prior")))
    # classes on dim 1 of a 3-D input
    z3, t3 = make_problem((3, 11, 7), torch.float32)
    check(z3.transpose(0, 2).contiguous().transpose(0, 2), t3, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_infinite_and_nan_logits_like_torch(dtype):
    logits, target = make_problem((6, 20), dtype)
    logits[0, :] = float("-inf")                       # all -inf: NaN in PyTorch
    logits[1, :] = float("-inf")
    logits[1, target[1]] = 2.0                         # -inf but the target
    logits[2, 3] = float("nan")
    logits[3, 4] = float("inf")
    logits[4, :10] = float("-inf")                     # masked part of the vocabulary
    target[4] = 12
    for eps in [0.0, 0.1]:
        ours = lsce.cross_entropy(logits, target, reduction="none", label_smoothing=eps)
        theirs = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=eps).to(dtype)
        torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=ULP[dtype] if dtype != torch.float32 else 1e-5, atol=1e-5)
        assert torch.isfinite(ours[1]) or eps > 0


def test_row_of_minus_inf_but_target_has_finite_gradient():
    logits, target = make_problem((5, 30000), torch.float32)
    logits[:, :] = float("-inf")
    logits[torch.arange(5), target] = 1.0
    x = logits.clone().requires_grad_(True)
    loss = lsce.cross_entropy(x, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_very_confident_logits(dtype):
    # p_y ≈ 1: the true-class gradient p_y − (1 − ε) − ε/K must not cancel in bf16.
    logits, target = make_problem((16, 1000), dtype, scale=1.0)
    logits[torch.arange(16), target] = 40.0
    check(logits, target, label_smoothing=0.1, reduction="none")
    check(logits, target, label_smoothing=0.0, reduction="sum")


def test_return_lse_and_its_gradient():
    logits, target = make_problem((8, 4, 10), torch.float64, ignore_frac=0.3)
    loss, lse = lsce.cross_entropy(logits, target, label_smoothing=0.1, return_lse=True, reduction="none")
    ref_loss, ref_lse = lsce.reference.cross_entropy(logits, target, label_smoothing=0.1, return_lse=True, reduction="none")
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1))
    f = lambda z: lsce.cross_entropy(z, target, label_smoothing=0.1, z_loss=0.01, softcap=5.0, return_lse=True)
    x = logits[:2, :, :3].clone().requires_grad_(True)
    t = target[:2, :3]
    g = lambda z: sum(v.sum() for v in lsce.cross_entropy(z, t, label_smoothing=0.1, return_lse=True, softcap=5.0, z_loss=0.01))
    assert torch.autograd.gradcheck(g, (x,))
    assert f(logits)[1].dtype == torch.float64


@pytest.mark.parametrize(
    "options", [(), ("weight",), ("z_loss",), ("softcap",), ("prior",), ("weight", "z_loss", "softcap", "prior")], ids="+".join
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(options, reduction):
    logits, target = make_problem((5, 7), torch.float64, ignore_frac=0.2)
    opts = make_options(7, options)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: lsce.cross_entropy(z, target, reduction=reduction, label_smoothing=0.15, **opts), (x,)
    )
    assert torch.autograd.gradgradcheck is not None  # second derivatives are not provided (as Liger, flash-attn)


def test_module_matches_functional_and_holds_buffers():
    logits, target = make_problem((10, 12), torch.float32, ignore_frac=0.2)
    w = torch.rand(12)
    crit = lsce.CrossEntropyLoss(w, ignore_index=-100, reduction="sum", label_smoothing=0.2, z_loss=1e-3)
    torch.testing.assert_close(
        crit(logits, target),
        lsce.cross_entropy(logits, target, w, reduction="sum", label_smoothing=0.2, z_loss=1e-3),
    )
    assert "weight" in dict(crit.named_buffers())
    ref = torch.nn.CrossEntropyLoss(w, reduction="sum", label_smoothing=0.2)
    crit0 = lsce.CrossEntropyLoss(w, reduction="sum", label_smoothing=0.2)
    torch.testing.assert_close(crit0(logits, target), ref(logits, target))


def test_positional_arguments_like_torch():
    logits, target = make_problem((10, 12), torch.float32, ignore_index=3, ignore_frac=0.2)
    w = torch.rand(12)
    # input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
    args = (w, None, 3, None, "sum", 0.3)
    target[0] = 3
    torch.testing.assert_close(lsce.cross_entropy(logits, target, *args), F.cross_entropy(logits, target, *args))


def test_deterministic_and_thread_count_independent():
    logits, target = make_problem((4, 70000), torch.float32)  # split rows
    big, big_t = make_problem((300, 3000), torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for n in [1, 2, 3]:
            torch.set_num_threads(n)
            results.append([loss_and_grad(lsce.cross_entropy, z, t, torch.tensor(1.0), label_smoothing=0.1)
                            for z, t in [(logits, target), (big, big_t)]])
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for (l0, g0), (l1, g1) in zip(results[0], r):
            assert torch.equal(l0, l1) and torch.equal(g0, g1)


def test_strided_and_expanded_targets():
    # A strided target used to be read by the kernel as if it were contiguous.
    logits, target = make_problem((40, 30), torch.float32, ignore_frac=0.1)
    wide_target = torch.stack([target, torch.full_like(target, 10**6)], dim=1)  # out of range if misread
    strided = wide_target[:, 0]
    assert not strided.is_contiguous()
    check(logits, strided, label_smoothing=0.1, reduction="none")
    expanded = torch.tensor(7).expand(40)
    check(logits, expanded, label_smoothing=0.1)
    # the registered op directly, with a strided target and a transposed block of logits
    z = torch.randn(30, 40).t()
    loss, lse, m, log_s = torch.ops.lsce.cross_entropy_forward(z, strided, None, None, -100, 0.1, 0.0, 0.0, "auto")
    coef = lsce.interface.coefficients(z.shape[1], None, None, 0.1, torch.float32, z.device)
    ref_loss, ref_m, ref_log_s = lsce.reference.rows_forward(z.contiguous(), strided, coef,
                                                             lsce.interface.RowOptions(-100, 0.1, 0.0, 0.0))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(lse, ref_m + ref_log_s)
    torch.testing.assert_close((m, log_s), (ref_m, ref_log_s))


@pytest.mark.parametrize("K", [5, 16385, 40000])
def test_empty_batch_with_large_vocabulary_and_expanded_rows(K):
    # N = 0 with a K large enough for the split-row path used to divide by zero;
    # rows expanded from one (row stride 0) used to be refused.
    empty = torch.empty(0, K)
    for red in REDUCTIONS:
        torch.testing.assert_close(
            lsce.cross_entropy(empty, torch.empty(0, dtype=torch.int64), reduction=red, label_smoothing=0.1),
            F.cross_entropy(empty, torch.empty(0, dtype=torch.int64), reduction=red, label_smoothing=0.1),
            equal_nan=True,
        )
    row, target = make_problem((1, K), torch.float32)
    check(row.expand(3, K), torch.tensor([0, K - 1, K // 2]), label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused_head", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_out_dtype_keeps_the_fp32_reduction_unrounded(reduction, fused_head):
    """bf16 input, out_dtype=float32: the fp32 value whose bf16 rounding is the
    default result (to the same digit), close to F.cross_entropy on fp32 logits;
    the gradient does not depend on out_dtype."""
    g = torch.Generator().manual_seed(5)
    h, W = torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g) / 4
    y = torch.randint(0, 300, (37,), generator=g)
    y[3] = -100
    h, W = h.bfloat16().requires_grad_(), W.bfloat16()
    if fused_head:
        def loss_fn(**kw):
            return lsce.linear_cross_entropy(h, W, y, reduction=reduction, label_smoothing=0.1, **kw)
    else:
        def loss_fn(**kw):
            return lsce.cross_entropy(h @ W.t(), y, reduction=reduction, label_smoothing=0.1, **kw)
    default, unrounded = loss_fn(), loss_fn(out_dtype=torch.float32)
    assert default.dtype == torch.bfloat16 and unrounded.dtype == torch.float32
    assert torch.equal(unrounded.to(torch.bfloat16), default)
    expected = F.cross_entropy((h @ W.t()).float(), y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(unrounded, expected, rtol=2e-5, atol=1e-5)
    (g_default,) = torch.autograd.grad(default.float().sum(), h)
    (g_unrounded,) = torch.autograd.grad(unrounded.sum(), h)
    assert torch.equal(g_default, g_unrounded)
