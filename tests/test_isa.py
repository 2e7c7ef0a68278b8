"""Every instruction-set build of the C++ kernel (generic, AVX2, AVX-512) that this
CPU can run gives the reference's results; the generic one always runs."""

import pytest
import torch

import lsce
from lsce import _C
from lsce.interface import coefficients
from _util import assert_close_to_truth, loss_and_grad, make_options, make_problem, truth

ISAS = [isa for isa in ("generic", "avx2", "avx512") if _C.set_isa(isa)]
_C.set_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request):
    assert _C.set_isa(request.param)
    assert _C.active_isa() == request.param
    yield request.param
    _C.set_isa("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(33, 300), (2, 40000), (5, 17)], ids=str)
@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap", "prior")], ids="+".join)
def test_each_isa_matches_reference(isa, dtype, shape, options):
    logits, target = make_problem(shape, dtype, ignore_frac=0.2)
    opts = make_options(shape[1], options)
    up = torch.randn(shape[0], dtype=torch.float32)
    loss, grad = loss_and_grad(lsce.cross_entropy, logits, target, up, reduction="none", label_smoothing=0.1, **opts)
    t_loss, t_grad = truth(logits, target, up.double(), reduction="none", label_smoothing=0.1, **opts)
    assert_close_to_truth(loss, t_loss, dtype, what=f"{isa} loss")
    assert_close_to_truth(grad, t_grad, dtype, what=f"{isa} grad")


def test_unknown_isa_is_refused():
    assert not _C.set_isa("sse9")
    assert _C.active_isa() in ("generic", "avx2", "avx512")


_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _raw_call(z, target, *, softcap=0.0, weight=None, grad_loss=None, grad=None, fused=False):
    """lsce._C's forward, then its backward into `grad` (a fresh buffer when None);
    the upstream per row is grad_loss (ones when None). fused: the forward
    writes the gradient itself (the fused training step)."""
    N, K = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss, m, log_s = (torch.empty(N, dtype=acc) for _ in range(3))
    up = torch.ones(N, dtype=acc) if grad_loss is None else grad_loss.to(acc)
    grad = torch.empty_like(z) if grad is None else grad
    coef = coefficients(K, weight, None, 0.1, acc, z.device)
    common = dict(dtype=_CODE[z.dtype], logits=z.data_ptr(), N=N, K=K, row_stride=z.stride(0),
                  target=target.data_ptr(), ignore_index=-100, weight=0 if weight is None else weight.data_ptr(),
                  c=0 if coef.c is None else coef.c.data_ptr(), C=float(coef.C), uniform_over=coef.uniform_over,
                  eps=0.1, z_loss=1e-3, softcap=softcap, nthreads=torch.get_num_threads())
    if fused:
        _C.forward(**common, loss=loss.data_ptr(), m=m.data_ptr(), log_s=log_s.data_ptr(), grad=grad.data_ptr(),
                   grad_loss=up.data_ptr(), grad_loss_stride=1)
        return loss, grad
    _C.forward(**common, loss=loss.data_ptr(), m=m.data_ptr(), log_s=log_s.data_ptr())
    _C.backward(**common, m=m.data_ptr(), log_s=log_s.data_ptr(), grad_loss=up.data_ptr(), grad_loss_stride=1, grad_lse=0,
                grad_lse_stride=0, grad=grad.data_ptr())
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 1000), (3, 40001), (5, 17)], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("fused", [False, True], ids=["backward", "fused"])
def test_gradient_written_over_the_logits(isa, dtype, shape, softcap, fused):
    """The backward kernel (and the fused forward) reads each logit before it
    writes that element's gradient and never after, so the gradient may go into
    the logits' own storage (lsce.linear reuses a chunk's logits buffer that
    way): same bits as into a fresh buffer, on every path (split rows, the true
    class, ignored rows)."""
    logits, target = make_problem(shape, dtype, ignore_frac=0.2)
    weight = torch.rand(shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.1
    up = torch.randn(shape[0])
    loss, expected = _raw_call(logits, target, softcap=softcap, weight=weight, grad_loss=up, fused=fused)
    z = logits.clone()
    got_loss, got = _raw_call(z, target, softcap=softcap, weight=weight, grad_loss=up, grad=z, fused=fused)
    assert got.data_ptr() == z.data_ptr()
    assert torch.equal(got_loss, loss)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), f"{isa}: in-place gradient differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(70, 1000), (3, 40001), (5, 17)], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_fused_forward_gradient(isa, dtype, shape, softcap):
    """The fused forward (the gradient from the exp values it keeps, or the
    backward kernel after it for split rows) gives the plain forward's loss bits
    and the fp64 truth's gradient, as the backward kernel does."""
    logits, target = make_problem(shape, dtype, ignore_frac=0.2)
    logits[0, :3] = -float("inf")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(shape[1], dtype=acc) + 0.1
    up = torch.randn(shape[0])
    plain_loss, grad = _raw_call(logits, target, softcap=softcap, weight=weight, grad_loss=up)
    fused_loss, fused_grad = _raw_call(logits, target, softcap=softcap, weight=weight, grad_loss=up, fused=True)
    assert torch.equal(plain_loss, fused_loss)
    _, t_grad = truth(logits, target, up.double(), reduction="none", label_smoothing=0.1, z_loss=1e-3,
                      weight=weight, **({"softcap": softcap} if softcap else {}))
    assert_close_to_truth(fused_grad, t_grad, dtype, what=f"{isa} fused grad")
    assert_close_to_truth(grad, t_grad, dtype, what=f"{isa} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_gradient_same_bits_as_small(isa, dtype):
    """A gradient of 16 MiB or more is written with non-temporal stores where the
    build has them; its values are those of the same rows computed alone."""
    N, K = 300, 30011  # odd K: rows start unaligned, so both store kinds mix in a row
    logits, target = make_problem((N, K), dtype, ignore_frac=0.1)
    assert logits.numel() * logits.element_size() >= 16 << 20
    _, big = _raw_call(logits, target)
    rows = [_raw_call(logits[i:i + 100], target[i:i + 100])[1] for i in range(0, N, 100)]  # 100 rows: < 16 MiB
    assert torch.equal(big.view(torch.uint8), torch.cat(rows).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [(), ("weight", "prior")], ids="+".join)
def test_later_blocks_far_from_the_first(isa, dtype, options):
    """The AVX-512 forward sums a 4096-element block after the first in one pass,
    relative to the earlier blocks' max, and redoes it in two when its values
    jump more than 16 above: rows that jump, fall, start or end at -inf or hold
    NaN give the reference's loss and gradient, fused or not."""
    K = 3 * 4096 + 5
    logits, target = make_problem((7, K), dtype)
    logits[0, 4096:8192] += 100  # one pass would overflow: exp(100) > fp32 max
    logits[1, 8192:] += 17
    logits[2, :4096] = -float("inf")
    logits[3, 5000] = float("nan")
    logits[4, 8192:] = -float("inf")  # (+inf is tests/test_reliability.py's)
    logits[5, 4096:] -= 100
    logits[6, 4096:8192] += 15
    opts = make_options(K, options)
    up = torch.randn(7)
    t_loss, t_grad = truth(logits, target, up.double(), reduction="none", label_smoothing=0.1, **opts)
    for red, scale in (("none", up), ("sum", torch.ones(()))):  # sum with upstream 1: the fused step
        loss, grad = loss_and_grad(lsce.cross_entropy, logits, target, scale, reduction=red, label_smoothing=0.1, **opts)
        if red == "none":
            assert_close_to_truth(loss, t_loss, dtype, what=f"{isa} loss")
            assert_close_to_truth(grad, t_grad, dtype, what=f"{isa} grad")
        else:
            _, s_grad = truth(logits, target, torch.ones(()).double(), reduction="sum", label_smoothing=0.1, **opts)
            assert_close_to_truth(grad, s_grad, dtype, what=f"{isa} fused grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(33, 300), (2, 9000), (5, 17)], ids=str)
@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap")], ids="+".join)
@pytest.mark.parametrize("fused", [False, True], ids=["op", "fused"])
def test_each_isa_soft_targets_match_reference(isa, dtype, shape, options, fused):
    """The probability-target kernels of each instruction set, through
    lsce.cross_entropy: the registered op (reduction none, with the target's
    gradient) or the fused step (reduction sum), against the fp64 reference."""
    logits, _ = make_problem(shape, dtype)
    target = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64), 1)
    target = target.to(dtype)
    opts = make_options(shape[1], options)
    kw = dict(reduction="sum" if fused else "none", label_smoothing=0.1, **opts)
    up = torch.tensor(1.0) if fused else torch.randn(shape[0], dtype=torch.float64)
    x = logits.detach().requires_grad_(True)
    t = target.detach().requires_grad_(not fused)
    loss = lsce.cross_entropy(x, t, **kw)
    grads = torch.autograd.grad((loss.double() * up).sum(), [x] + ([] if fused else [t]))
    x64 = logits.double().requires_grad_(True)
    t64 = target.double().requires_grad_(True)
    t_loss = lsce.reference.cross_entropy(x64, t64, **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    t_grads = torch.autograd.grad((t_loss * up).sum(), [x64, t64])
    assert_close_to_truth(loss, t_loss.detach(), dtype, what=f"{isa} soft loss")
    for what, g, tg in zip(("grad", "target grad"), grads, t_grads):
        assert_close_to_truth(g, tg, dtype, what=f"{isa} soft {what}", atol_frac=2e-6 if dtype != torch.float64 else None)
