"""The fused training step on CPU (lsce.ops.FusedStep): the forward writes the
gradient for the upstream a reduced loss gets from loss.backward(); backward
hands it out, or recomputes it when the upstream is another one."""

import pytest
import torch

import lsce
from lsce import _C, ops, reference
from _util import assert_close_to_truth, loss_and_grad, loss_lse_and_grad, make_options, make_problem, truth


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused forwards and the backward-kernel calls."""
    n = {"fused": 0, "backward": 0}
    forward, backward = _C.forward, _C.backward

    def count_forward(**kw):
        n["fused"] += bool(kw.get("grad"))  # the forward kernel writing the gradient too
        return forward(**kw)

    def count_backward(**kw):
        n["backward"] += 1
        return backward(**kw)

    monkeypatch.setattr(_C, "forward", count_forward)
    monkeypatch.setattr(_C, "backward", count_backward)
    return n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [(), ("weight",), ("z_loss", "softcap", "prior")], ids="+".join)
def test_backward_hands_out_the_forward_gradient(calls, dtype, reduction, options):
    logits, target = make_problem((40, 300), dtype, ignore_frac=0.2)
    opts = make_options(300, options)
    loss, g = loss_and_grad(lsce.cross_entropy, logits, target, label_smoothing=0.1, reduction=reduction, **opts)
    assert calls == {"fused": 1, "backward": 0}
    t_loss, t_g = truth(logits, target, torch.tensor(1.0), label_smoothing=0.1, reduction=reduction, **opts)
    assert_close_to_truth(g, t_g, dtype, what="fused grad")
    with torch.no_grad():
        assert torch.equal(loss, lsce.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction, **opts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_other_upstream_recomputes(calls, dtype, reduction):
    """A scaled loss (gradient accumulation, AMP) gets the backward kernel's gradient."""
    logits, target = make_problem((40, 300), dtype, ignore_frac=0.2)
    scale = torch.tensor(0.25)
    _, g = loss_and_grad(lsce.cross_entropy, logits, target, scale, label_smoothing=0.1, reduction=reduction)
    assert calls == {"fused": 1, "backward": 1}
    _, t_g = truth(logits, target, scale, label_smoothing=0.1, reduction=reduction)
    assert_close_to_truth(g, t_g, dtype, what="scaled grad")


def test_differentiated_lse_recomputes(calls):
    logits, target = make_problem((30, 200), torch.float32, ignore_frac=0.2)
    up_lse = torch.full((30,), 0.3)
    _, _, g = loss_lse_and_grad(lsce.cross_entropy, logits, target, None, up_lse, label_smoothing=0.1)
    assert calls["backward"] == 1
    _, _, t_g = loss_lse_and_grad(reference.cross_entropy, logits.double(), target, None, up_lse.double(),
                                  label_smoothing=0.1)
    assert_close_to_truth(g, t_g, torch.float32, what="grad with lse")


def test_second_backward_gets_its_own_buffer_with_the_same_bits():
    logits, target = make_problem((30, 200), torch.float32)
    x = logits.clone().requires_grad_(True)
    loss = lsce.cross_entropy(x, target, label_smoothing=0.1)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    kept = g1.clone()
    (g2,) = torch.autograd.grad(loss, x)
    assert g1.data_ptr() != g2.data_ptr()
    assert torch.equal(g1, kept) and torch.equal(g1, g2)


def test_not_fused_without_grad_or_for_none():
    logits, target = make_problem((4, 10), torch.float32)
    x = logits.clone().requires_grad_(True)
    assert ops.fusable(x, "auto") and ops.fusable(x, "cpu")
    assert not ops.fusable(logits, "auto")  # no requires_grad
    assert not ops.fusable(x, "torch")
    with torch.no_grad():
        assert not ops.fusable(x, "auto")
    assert lsce.functional._fused_upstream(x, target, None, -100, 0.0, "none", "auto") is None
    w = torch.rand(10)
    assert lsce.functional._fused_upstream(x, target, w, -100, 1e-3, "mean", "auto") is None  # two scales


# ---------------------------------------------------------------- probability targets (ops.FusedSoftStep)

@pytest.fixture
def soft_calls(monkeypatch):
    """Counts the fused soft forwards and the soft backward-kernel calls."""
    n = {"fused": 0, "backward": 0}
    forward, backward = _C.soft_forward, _C.soft_backward

    def count_forward(**kw):
        n["fused"] += bool(kw.get("grad"))
        return forward(**kw)

    def count_backward(**kw):
        n["backward"] += 1
        return backward(**kw)

    monkeypatch.setattr(_C, "soft_forward", count_forward)
    monkeypatch.setattr(_C, "soft_backward", count_backward)
    return n


def _soft_problem(shape, dtype, seed=0):
    logits, _ = make_problem(shape, dtype, seed=seed)
    t = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64), 1)
    return logits, t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [(), ("weight",), ("z_loss", "softcap")], ids="+".join)
@pytest.mark.parametrize("K", [300, 9000])
def test_soft_backward_hands_out_the_forward_gradient(soft_calls, dtype, reduction, options, K):
    """Soft targets, mean or sum: one fused forward and no backward kernel; the
    gradient and the loss as the fp64 reference's (K = 9000: several kernel blocks)."""
    logits, t = _soft_problem((24, K), dtype)
    opts = make_options(K, options)
    opts.pop("smoothing_prior", None)
    loss, g = loss_and_grad(lsce.cross_entropy, logits, t, label_smoothing=0.1, reduction=reduction, **opts)
    assert soft_calls == {"fused": 1, "backward": 0}
    t_loss, t_g = truth(logits, t.double(), torch.tensor(1.0), label_smoothing=0.1, reduction=reduction, **opts)
    assert_close_to_truth(loss, t_loss, dtype, what="fused soft loss")
    assert_close_to_truth(g, t_g, dtype, what="fused soft grad")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_soft_other_upstream_and_second_backward(soft_calls, reduction):
    """A scaled upstream gets the soft backward kernel's gradient; a second backward
    (retain_graph) gets its own buffer with the same bits; a target that requires
    grad is not fused (the op path gives its gradient)."""
    logits, t = _soft_problem((30, 200), torch.float32)
    scale = torch.tensor(0.25)
    _, g = loss_and_grad(lsce.cross_entropy, logits, t, scale, label_smoothing=0.1, reduction=reduction)
    assert soft_calls == {"fused": 1, "backward": 1}
    _, t_g = truth(logits, t.double(), scale, label_smoothing=0.1, reduction=reduction)
    assert_close_to_truth(g, t_g, torch.float32, what="scaled soft grad")
    x = logits.clone().requires_grad_(True)
    loss = lsce.cross_entropy(x, t, reduction=reduction)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    kept = g1.clone()
    (g2,) = torch.autograd.grad(loss, x)
    assert g1.data_ptr() != g2.data_ptr() and torch.equal(g1, kept) and torch.equal(g1, g2)
    before = dict(soft_calls)
    tt = t.clone().requires_grad_(True)
    lsce.cross_entropy(logits.clone().requires_grad_(True), tt, reduction=reduction).backward()
    assert soft_calls["fused"] == before["fused"] and tt.grad is not None
