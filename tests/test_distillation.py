"""lsce.distillation_loss against PyTorch's own pieces: F.kl_div for the
divergences, F.cross_entropy for the label-smoothed term, autograd's
gradcheck for the gradients, the dense teacher for its top-k forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lsce
import lsce.distillation as distillation
from lsce import reference
from _util import assert_compiled_matches_eager


def logits(N=6, K=11, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g, dtype=dtype) * scale).requires_grad_()


def kl(log_p, log_q):
    """KL(p ‖ q) per row, by PyTorch: F.kl_div(input=log q, target=log p)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def skew_jsd(log_t, log_s, beta):
    """The module docstring's D_β, from F.kl_div and the mixture's probabilities."""
    m = beta * log_t.exp() + (1 - beta) * log_s.exp()
    return (1 - beta) * kl(log_t, m.log()) + beta * kl(log_s, m.log())


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_divergence_is_kl_at_the_ends_and_the_skew_jsd_between(beta, temperature):
    s, t = logits(), logits(seed=1).detach()
    kd = lsce.distillation_loss(s, teacher_logits=t, alpha=1.0, beta=beta, temperature=temperature,
                                reduction="none")
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    expected = {0.0: kl(log_t, log_s), 1.0: kl(log_s, log_t)}.get(beta, skew_jsd(log_t, log_s, beta))
    torch.testing.assert_close(kd, temperature ** 2 * expected)
    grad, = torch.autograd.grad(kd.sum(), s)
    expected_grad, = torch.autograd.grad((temperature ** 2 * expected).sum(), s)
    torch.testing.assert_close(grad, expected_grad)


def test_the_divergence_is_continuous_at_both_ends():
    s, t = logits(), logits(seed=1).detach()
    ends = {b: lsce.distillation_loss(s, teacher_logits=t, alpha=1.0, beta=b, reduction="none").detach()
            for b in (0.0, 1e-7, 1 - 1e-7, 1.0)}
    torch.testing.assert_close(ends[1e-7], ends[0.0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ends[1 - 1e-7], ends[1.0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_mix_with_label_smoothed_cross_entropy(reduction, weighted):
    """alpha·T²·KL + (1 − alpha)·F.cross_entropy(label_smoothing, weight,
    ignore_index); ignored rows in neither term; mean: KL over counted rows,
    CE with PyTorch's own mean."""
    N, K, T, alpha, eps = 8, 13, 2.0, 0.7, 0.1
    s, t = logits(N, K), logits(N, K, seed=1).detach()
    y = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(2))
    y[[1, 5]] = -100
    w = torch.rand(K, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5 if weighted else None
    out, kd, ce = lsce.distillation_loss(s, y, teacher_logits=t, temperature=T, alpha=alpha, label_smoothing=eps,
                                         weight=w, reduction=reduction, return_parts=True)
    valid = y != -100
    kl_rows = torch.where(valid, T ** 2 * kl(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)), 0)
    ce_rows = F.cross_entropy(s, y, w, reduction="none", label_smoothing=eps)
    expected = {
        "none": alpha * kl_rows + (1 - alpha) * ce_rows,
        "sum": alpha * kl_rows.sum() + (1 - alpha) * ce_rows.sum(),
        "mean": alpha * kl_rows.sum() / valid.sum() + (1 - alpha) * F.cross_entropy(s, y, w, label_smoothing=eps),
    }[reduction]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(kd, kl_rows.detach())
    torch.testing.assert_close(ce, ce_rows.detach())
    assert not kd.requires_grad and not ce.requires_grad
    torch.testing.assert_close(torch.autograd.grad(out.sum(), s)[0], torch.autograd.grad(expected.sum(), s)[0])


def test_alpha_one_needs_no_target_and_alpha_zero_is_lsce_cross_entropy():
    s, t = logits(), logits(seed=1).detach()
    y = torch.randint(0, s.shape[1], (s.shape[0],), generator=torch.Generator().manual_seed(2))
    kd = lsce.distillation_loss(s, teacher_logits=t, alpha=1.0)
    torch.testing.assert_close(kd, kl(F.log_softmax(t, -1), F.log_softmax(s, -1)).mean())
    ce = lsce.distillation_loss(s, y, teacher_logits=t, alpha=0.0, label_smoothing=0.2)
    torch.testing.assert_close(ce, F.cross_entropy(s, y, label_smoothing=0.2))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_top_k_renormalized_equals_the_dense_teacher_restricted_to_the_k(beta, temperature):
    """k = K (ids in any order): the dense divergence. k < K: the dense
    divergence of both distributions restricted to the ids and renormalised."""
    N, K, k = 5, 9, 4
    s, t = logits(N, K), logits(N, K, seed=1).detach()
    lp = F.log_softmax(t, -1)
    perm = torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(i)) for i in range(N)])
    full = lsce.distillation_loss(s, teacher_topk_ids=perm, teacher_topk_logprobs=lp.gather(1, perm), alpha=1.0,
                                  beta=beta, temperature=temperature, reduction="none")
    dense = lsce.distillation_loss(s, teacher_logits=t, alpha=1.0, beta=beta, temperature=temperature,
                                   reduction="none")
    torch.testing.assert_close(full, dense)
    ids = perm[:, :k]
    top = lsce.distillation_loss(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp.gather(1, ids), alpha=1.0,
                                 beta=beta, temperature=temperature, reduction="none")
    restricted = lsce.distillation_loss(s.gather(1, ids), teacher_logits=t.gather(1, ids), alpha=1.0, beta=beta,
                                        temperature=temperature, reduction="none")
    torch.testing.assert_close(top, restricted)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_top_k_remainder_is_the_divergence_over_k_plus_one_buckets(beta):
    """The classes outside the top k merged into one bucket, for both models,
    summed from the dense distributions."""
    N, K, k = 5, 12, 3
    s, t = logits(N, K), logits(N, K, seed=1).detach()
    log_t = F.log_softmax(t, -1)
    ids = log_t.topk(k, -1).indices
    out = lsce.distillation_loss(s, teacher_topk_ids=ids, teacher_topk_logprobs=log_t.gather(1, ids), alpha=1.0,
                                 beta=beta, topk_mass="remainder", reduction="none")
    outside = torch.ones(N, K, dtype=torch.bool).scatter(1, ids, False)

    def buckets(log_p):
        p = log_p.exp()
        return torch.cat([p.gather(1, ids), (p * outside).sum(-1, keepdim=True)], -1).log()

    log_s = F.log_softmax(s, -1)
    expected = {0.0: kl(buckets(log_t), buckets(log_s)), 1.0: kl(buckets(log_s), buckets(log_t))}.get(
        beta, skew_jsd(buckets(log_t), buckets(log_s), beta))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), s)[0], torch.autograd.grad(expected.sum(), s)[0])


@pytest.mark.parametrize("teacher", ["dense", "topk renormalize", "topk remainder"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_and_no_gradient_to_the_teacher(teacher, beta):
    N, K, k = 4, 7, 3
    s = logits(N, K)
    t = logits(N, K, seed=1)  # requires grad: none may reach it
    y = torch.tensor([1, -100, 6, 0])
    if teacher == "dense":
        kw = dict(teacher_logits=t)
    else:
        lp = F.log_softmax(t, -1)
        ids = lp.topk(k, -1).indices
        kw = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp.gather(1, ids), topk_mass=teacher.split()[1])
    temperature = 1.0 if teacher == "topk remainder" else 1.7
    before = {n: v.detach().clone() for n, v in kw.items() if torch.is_tensor(v)}

    def f(x):
        return lsce.distillation_loss(x, y, temperature=temperature, beta=beta, label_smoothing=0.1, **kw)

    assert torch.autograd.gradcheck(f, (s,))
    f(s).backward()
    assert t.grad is None
    for n, v in before.items():
        assert torch.equal(kw[n], v)


def test_row_chunks_give_the_same_loss_and_gradient(monkeypatch):
    """A top-k teacher runs in checkpointed row chunks (a dense one is one call of the op)."""
    s, t = logits(N=37, K=19), logits(N=37, K=19, seed=1).detach()
    y = torch.randint(0, 19, (37,), generator=torch.Generator().manual_seed(2))
    lp, ids = F.log_softmax(t, -1).topk(5, -1)
    kw = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp, beta=0.5, temperature=2.0)
    one = lsce.distillation_loss(s, y, **kw)
    g_one, = torch.autograd.grad(one, s)
    monkeypatch.setattr(distillation, "_CHUNK_ELEMS", 19 * 5)  # 8 chunks, the last of 2 rows
    chunked = lsce.distillation_loss(s, y, **kw)
    g_chunked, = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, one, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_chunked, g_one, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_no_further_from_fp64_than_pytorchs_kl_div(dtype):
    s64, t64 = logits(N=16, K=300, scale=4.0).detach(), logits(N=16, K=300, seed=1, scale=4.0).detach()
    truth = kl(F.log_softmax(t64, -1), F.log_softmax(s64, -1)).mean()
    s, t = s64.to(dtype), t64.to(dtype)
    ours = lsce.distillation_loss(s, teacher_logits=t, alpha=1.0).double()
    theirs = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True).double()
    assert (ours - truth).abs() <= (theirs - truth).abs() + 1e-6 * truth.abs()


def _args(**over):
    s, t = logits(), logits(seed=1).detach()
    y = torch.zeros(s.shape[0], dtype=torch.int64)
    kw = dict(student_logits=s, target=y, teacher_logits=t)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, error, match", [
    (dict(teacher_logits=None), ValueError, "give either a dense teacher"),
    (dict(teacher_topk_ids=torch.zeros(6, 2, dtype=torch.int64)), ValueError, "give either a dense teacher"),
    (dict(teacher_logits=torch.zeros(6, 10, dtype=torch.float64)), ValueError, "teacher_logits must be"),
    (dict(teacher_logits=None, teacher_topk_ids=torch.zeros(6, 2, dtype=torch.int64)), ValueError, "go together"),
    (dict(teacher_logits=None, teacher_topk_ids=torch.full((6, 2), 11), teacher_topk_logprobs=torch.zeros(6, 2)),
     IndexError, "out of range"),
    (dict(teacher_logits=None, teacher_topk_ids=torch.zeros(6, 2, dtype=torch.int64),
          teacher_topk_logprobs=torch.zeros(6, 2), topk_mass="remainder", temperature=2.0), ValueError,
     "needs temperature=1"),
    (dict(teacher_logits=None, teacher_topk_ids=torch.zeros(6, 2, dtype=torch.int64),
          teacher_topk_logprobs=torch.zeros(6, 2), topk_mass="other"), ValueError, "topk_mass"),
    (dict(teacher_logits=None, teacher_topk_ids=torch.zeros(6, 2, dtype=torch.int64),
          teacher_topk_logprobs=torch.full((6, 2), 0.5, dtype=torch.float64)), ValueError, "log-probabilities"),
    (dict(teacher_logits=logits(6, 12).detach()), ValueError, "teacher_logits must be"),  # another vocabulary
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(alpha=1.5), ValueError, "alpha and beta"),
    (dict(beta=-0.1), ValueError, "alpha and beta"),
    (dict(target=None), ValueError, "target is needed"),
    (dict(student_logits=torch.zeros(6)), ValueError, "student_logits"),
])
def test_bad_input_raises_before_anything_and_changes_nothing(over, error, match):
    kw = _args(**over)
    before = {n: v.detach().clone() for n, v in kw.items() if torch.is_tensor(v)}
    with pytest.raises(error, match=match):
        lsce.distillation_loss(**kw)
    for n, v in before.items():
        assert torch.equal(kw[n], v)


def heads(N=9, H=5, Ht=7, K=13, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return (r(N, H).requires_grad_(), r(K, H).requires_grad_(), r(K).requires_grad_(),
            r(N, Ht).requires_grad_(), r(K, Ht).requires_grad_(), r(K).requires_grad_())


@pytest.mark.parametrize("chunk_size", [None, 2, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_linear_variant_equals_the_loss_of_the_heads_logits(chunk_size, reduction, beta):
    """Same loss and the same gradients of the student's hidden states, weight
    and bias as distillation_loss on materialised logits; nothing reaches the
    teacher's hidden states, weight or bias."""
    h, W, b, th, tW, tb = heads()
    y = torch.randint(0, 13, (9,), generator=torch.Generator().manual_seed(5))
    y[3] = -100
    kw = dict(temperature=1.5, beta=beta, alpha=0.6, label_smoothing=0.1, reduction=reduction, return_parts=True)
    out, kd, ce = lsce.linear_distillation_loss(h, W, y, teacher_hidden=th, teacher_weight=tW, student_bias=b,
                                                teacher_bias=tb, chunk_size=chunk_size, **kw)
    ref, ref_kd, ref_ce = lsce.distillation_loss(F.linear(h, W, b), y, teacher_logits=F.linear(th, tW, tb).detach(),
                                                 **kw)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(kd, ref_kd)
    torch.testing.assert_close(ce, ref_ce)
    got = torch.autograd.grad(out.sum(), (h, W, b), retain_graph=True)
    for g_ours, g_ref in zip(got, torch.autograd.grad(ref.sum(), (h, W, b))):
        torch.testing.assert_close(g_ours, g_ref)
    out.sum().backward()
    assert th.grad is None and tW.grad is None and tb.grad is None


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_linear_variant_other_upstreams_and_a_second_derivative(teacher):
    """The gradients computed in the forward (mean on CPU) are for a unit upstream
    only: a scaled loss recomputes them; create_graph=True gives the materialised
    logits' second derivatives."""
    h, W, b, th, tW, tb = heads(N=10, K=11)
    y = torch.randint(0, 11, (10,), generator=torch.Generator().manual_seed(2))
    y[4] = -100
    if teacher == "dense":
        kw = dict(teacher_hidden=th, teacher_weight=tW, teacher_bias=tb)
        ref_kw = dict(teacher_logits=F.linear(th, tW, tb).detach())
    else:
        top = F.log_softmax(F.linear(th, tW, tb), -1).detach().topk(4, -1)
        kw = ref_kw = dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)
    opts = dict(temperature=2.0, beta=0.3, alpha=0.4, label_smoothing=0.1, weight=torch.rand(11, dtype=torch.float64))
    out = lsce.linear_distillation_loss(h, W, y, student_bias=b, chunk_size=3, **kw, **opts)
    ref = lsce.distillation_loss(F.linear(h, W, b), y, **ref_kw, **opts)
    plain = torch.autograd.grad(3 * out, (h, W, b), retain_graph=True)
    got = torch.autograd.grad(3 * out, (h, W, b), create_graph=True)
    want = torch.autograd.grad(3 * ref, (h, W, b), create_graph=True)
    for g_plain, g_ours, g_ref in zip(plain, got, want):
        torch.testing.assert_close(g_plain, g_ref)
        torch.testing.assert_close(g_ours, g_ref)
    v = [torch.randn_like(g) for g in got]
    second = torch.autograd.grad(sum((g * u).sum() for g, u in zip(got, v)), (h, W, b))
    second_ref = torch.autograd.grad(sum((g * u).sum() for g, u in zip(want, v)), (h, W, b))
    for g_ours, g_ref in zip(second, second_ref):
        torch.testing.assert_close(g_ours, g_ref)


def test_linear_variant_with_an_offline_top_k_and_gradcheck():
    h, W, b, th, tW, tb = heads(N=5, K=9)
    lp = F.log_softmax(F.linear(th, tW, tb), -1).detach()
    top = lp.topk(3, -1)
    y = torch.tensor([0, 4, -100, 8, 2])
    kw = dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values, topk_mass="remainder", beta=0.3,
              label_smoothing=0.2)

    def f(h, W, b):
        return lsce.linear_distillation_loss(h, W, y, student_bias=b, chunk_size=2, **kw)

    torch.testing.assert_close(f(h, W, b), lsce.distillation_loss(F.linear(h, W, b), y, **kw))
    assert torch.autograd.gradcheck(f, (h, W, b))


@pytest.mark.parametrize("over, match", [
    (dict(teacher_weight=None), "a live teacher needs"),
    (dict(teacher_hidden=torch.zeros(8, 7, dtype=torch.float64)), "teacher_hidden must be"),
    (dict(teacher_weight=torch.zeros(12, 7, dtype=torch.float64)), "teacher_weight must be"),
    (dict(student_weight=torch.zeros(13, 4, dtype=torch.float64)), "student_weight must be"),
    (dict(student_bias=torch.zeros(12, dtype=torch.float64)), "student_bias must be"),
    (dict(target=torch.zeros(8, dtype=torch.int64)), "target must have shape"),
])
def test_linear_variant_bad_input(over, match):
    h, W, b, th, tW, tb = heads()
    kw = dict(student_hidden=h, student_weight=W, target=torch.zeros(9, dtype=torch.int64), teacher_hidden=th,
              teacher_weight=tW, student_bias=b, teacher_bias=tb)
    kw.update(over)
    before = {n: v.detach().clone() for n, v in kw.items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=match):
        lsce.linear_distillation_loss(**kw)
    for n, v in before.items():
        assert torch.equal(kw[n], v)


def test_linear_variant_keeps_no_logits_for_the_backward():
    """What autograd keeps for the backward: the inputs, and no logits of more
    rows than a chunk's (the chunks are recomputed), so no N×K tensor of either model."""
    N, K = 64, 50
    h, W, b, th, tW, tb = heads(N=N, K=K)
    y = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = lsce.linear_distillation_loss(h, W, y, teacher_hidden=th, teacher_weight=tW, student_bias=b,
                                            teacher_bias=tb, chunk_size=8, beta=0.5, reduction="none").sum()
    assert saved and not [s for s in saved if len(s) == 2 and s[1] == K and s[0] > 8], saved
    out.backward()
    assert h.grad is not None and W.grad is not None


# ------------------------------------------------------------------ the kernels behind the dense teacher

BACKENDS = ["auto", "cpu", "torch"]


def dense_case(N=23, K=517, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, K, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(N, K, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, K, (N,), generator=g)
    y[::5] = -100
    w = torch.rand(K, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return s, t, y, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta,temperature", [(0.0, 2.0), (0.5, 1.0), (1.0, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_backend_is_the_reference_statement(backend, reduction, beta, temperature, dtype):
    """The public call (the fused CPU step where it applies: 'auto'/'cpu' with a
    reduction) against lsce.reference.distillation_loss on the same inputs in fp64:
    loss, gradient, and the parts."""
    s, t, y, w = dense_case(dtype=dtype)
    kw = dict(teacher_logits=t, temperature=temperature, alpha=0.3, beta=beta, label_smoothing=0.1, weight=w,
              reduction=reduction)
    leaf = s.clone().requires_grad_()
    loss, kd, ce = lsce.distillation_loss(leaf, y, backend=backend, return_parts=True, **kw)
    up = torch.randn(loss.shape, dtype=dtype)
    grad, = torch.autograd.grad((loss * up).sum(), leaf)
    kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    ref_leaf = s.double().requires_grad_()
    ref = reference.distillation_loss(ref_leaf, y, **kw64)
    ref_grad, = torch.autograd.grad((ref * up.double()).sum(), ref_leaf)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    ref_kd = reference.distillation_loss(s.double(), y, **{**kw64, "alpha": 1.0, "reduction": "none"})
    torch.testing.assert_close(kd.double(), ref_kd, **tol)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_other_upstreams_and_a_second_backward(backend):
    """An upstream other than the one the fused step predicted (the loss scaled,
    as a GradScaler does) and a second backward (retain_graph) give the op's gradient."""
    s, t, y, w = dense_case()
    kw = dict(teacher_logits=t, temperature=2.0, beta=0.5, label_smoothing=0.1, weight=w)
    want_leaf = s.clone().requires_grad_()
    want, = torch.autograd.grad(3.0 * lsce.distillation_loss(want_leaf, y, backend="torch", **kw), want_leaf)
    leaf = s.clone().requires_grad_()
    loss = lsce.distillation_loss(leaf, y, backend=backend, **kw)
    first, = torch.autograd.grad(loss, leaf, retain_graph=True)
    scaled, = torch.autograd.grad(3.0 * loss, leaf, retain_graph=True)
    again, = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(scaled, want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(3 * first, want, rtol=2e-5, atol=2e-6)


def test_double_backward_goes_through_the_statement():
    """create_graph=True: a Hessian-vector product equal to the reference's."""
    s, t, y, w = dense_case(N=5, K=13, dtype=torch.float64)
    v = torch.randn_like(s)
    hvps = []
    for fn in (lsce.distillation_loss, reference.distillation_loss):
        leaf = s.clone().requires_grad_()
        loss = fn(leaf, y, teacher_logits=t, temperature=2.0, beta=0.5, label_smoothing=0.1, weight=w)
        g, = torch.autograd.grad(loss, leaf, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), leaf)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_target", [True, False])
def test_compiles_fullgraph_as_one_op(with_target):
    s, t, y, w = dense_case()
    y = y if with_target else None
    alpha = 0.5 if with_target else 1.0

    def step(student, teacher):
        return lsce.distillation_loss(student, y, teacher_logits=teacher, alpha=alpha, temperature=2.0, beta=0.3,
                                      label_smoothing=0.1, weight=w)

    assert_compiled_matches_eager(step, torch.compile(step, fullgraph=True, backend="aot_eager"), [s, t], [0])
