"""The registered op under torch.library.opcheck, torch.compile(fullgraph=True)
and torch.export (on the C++ CPU kernel; design.md §3)."""

import pytest
import torch

import lsce
from _util import assert_compiled_matches_eager, make_options, make_problem

OPTION_SETS = [(), ("weight",), ("z_loss", "softcap"), ("weight", "z_loss", "softcap", "prior")]


@pytest.mark.parametrize("options", OPTION_SETS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(options, dtype):
    logits, target = make_problem((6, 11), dtype, ignore_frac=0.3)
    opts = make_options(11, options)
    acc = torch.float32
    w = opts.get("weight")
    prior = opts.get("smoothing_prior")
    w = None if w is None else w.to(acc)
    prior = None if prior is None else prior.to(acc)
    args = (logits, target, w, prior, -100, 0.1, opts.get("z_loss", 0.0), opts.get("softcap", 0.0), "auto")
    torch.library.opcheck(torch.ops.lsce.cross_entropy_forward, args)
    loss, lse, m, log_s = torch.ops.lsce.cross_entropy_forward(*args)
    g = torch.rand_like(loss)
    bargs = (g, torch.rand_like(lse), logits, target, w, prior, m, log_s, -100, 0.1,
             opts.get("z_loss", 0.0), opts.get("softcap", 0.0), "auto")
    torch.library.opcheck(torch.ops.lsce.cross_entropy_backward, bargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS, ids="+".join)
def test_compile_fullgraph_matches_eager(reduction, options):
    torch._dynamo.reset()
    logits, target = make_problem((3, 4, 9), torch.float32, ignore_frac=0.3)
    opts = make_options(4, options)

    def step(z, t):
        loss = lsce.cross_entropy(z, t, reduction=reduction, label_smoothing=0.1, **opts)
        return loss.sum() * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    assert_compiled_matches_eager(step, compiled, (logits, target), leaves=(0,))


def test_compile_no_graph_break_with_module():
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 16)
    crit = lsce.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
    x = torch.randn(5, 8)
    t = torch.tensor([1, 2, -100, 15, 0])

    def step(x, t):
        return crit(model(x), t)

    explanation = torch._dynamo.explain(step)(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x, t), step(x, t))


def test_export_keeps_one_node():
    class Loss(torch.nn.Module):
        def forward(self, z, t):
            return lsce.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3)

    logits, target = make_problem((6, 10), torch.float32)
    program = torch.export.export(Loss(), (logits, target))
    ours = [n for n in program.graph.nodes if n.op == "call_function" and "lsce" in str(n.target)]
    assert [str(n.target) for n in ours] == ["lsce.cross_entropy_forward.default"]
    torch.testing.assert_close(program.module()(logits, target), Loss()(logits, target))


@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("options", [(), ("z_loss", "softcap")], ids="+".join)
def test_compile_dynamic_shapes(entry, options):
    """torch.compile(dynamic=True) passes float options as SymFloats: the
    argument checks must trace them (math.isfinite cannot) and one graph must
    serve several batch sizes."""
    torch._dynamo.reset()
    H, K = 6, 9
    opts = make_options(K, options)
    head = torch.randn(K, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).float()

    def step(x, t, W):
        if entry == "cross_entropy":
            return lsce.cross_entropy(x, t, label_smoothing=0.1, **opts)
        return lsce.linear_cross_entropy(x, W, t, label_smoothing=0.1, **opts)

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    for n in (5, 8, 13):
        x, t = make_problem((n, K), torch.float32, ignore_frac=0.3, seed=n)
        if entry == "linear_cross_entropy":
            x = x[:, :H].contiguous()
        # (No W.grad for cross_entropy, which does not use W.)
        assert_compiled_matches_eager(step, compiled, (x, t, head), leaves=(0, 2))


# ---------------------------------------------------------------- probability targets


@pytest.mark.parametrize("options", [(), ("weight", "z_loss", "softcap")], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_opcheck(options, dtype):
    """lsce::soft_cross_entropy_forward / _backward under torch.library.opcheck
    (schema, fake impls, autograd registration), with and without the target's gradient."""
    logits, _ = make_problem((6, 11), dtype)
    target = torch.softmax(torch.randn(6, 11), 1).to(dtype)
    opts = make_options(11, options)
    w = opts.get("weight")
    w = None if w is None else w.float()
    args = (logits, target, w, 0.1, opts.get("z_loss", 0.0), opts.get("softcap", 0.0), "auto")
    torch.library.opcheck(torch.ops.lsce.soft_cross_entropy_forward, args)
    loss, lse, stats = torch.ops.lsce.soft_cross_entropy_forward(*args)
    for target_grad in (False, True):
        bargs = (torch.rand_like(loss), torch.rand_like(lse), logits, target, w, stats, 0.1,
                 opts.get("z_loss", 0.0), opts.get("softcap", 0.0), "auto", target_grad)
        torch.library.opcheck(torch.ops.lsce.soft_cross_entropy_backward, bargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
def test_soft_compile_fullgraph_matches_eager(reduction, entry):
    """Probability targets under torch.compile(fullgraph=True): one opaque op, the
    same loss and gradients as eager (the logits' and the target's for cross_entropy)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    if entry == "cross_entropy":
        z = torch.randn(3, 4, 9, generator=g)
        t = torch.softmax(torch.randn(3, 4, 9, generator=g), 1)

        def step(z, t):
            return lsce.cross_entropy(z, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3).sum() * 2.0

        assert_compiled_matches_eager(step, torch.compile(step, fullgraph=True), (z, t), leaves=(0, 1))
    else:
        x, W = torch.randn(5, 6, generator=g), torch.randn(9, 6, generator=g)
        t = torch.softmax(torch.randn(5, 9, generator=g), 1)

        def step(x, W, t):
            return lsce.linear_cross_entropy(x, W, t, reduction=reduction, label_smoothing=0.1).sum() * 2.0

        assert_compiled_matches_eager(step, torch.compile(step, fullgraph=True), (x, W, t), leaves=(0, 1))
