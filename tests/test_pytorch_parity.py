"""lsce's four entry points against PyTorch's (F.cross_entropy, nn.CrossEntropyLoss,
F.linear_cross_entropy, nn.LinearCrossEntropyLoss) in everything but the numbers
the other test files check: every autograd mode, the scalar types of options,
autocast's result dtype, the K-dimensional head, PyTorch's module constructor
and state dict. fp64 throughout, so results must agree to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad, gradcheck, gradgradcheck
from torch.func import functional_call, grad, jacfwd, jvp, vmap

import lsce
from lsce import reference

N, K, H = 4, 5, 6
F64 = torch.float64
API = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss"]
REDUCTIONS = ["mean", "sum", "none"]
# PyTorch's options (ignore_index hits one row of the target below).
OPTIONS = {"plain": {}, "smoothed+weight": {"label_smoothing": 0.1, "weight": "w", "ignore_index": 3}}
# lsce's own options: checked against lsce.reference's differentiable statement and by gradcheck.
LSCE_OPTIONS = {"z_loss+softcap+prior": {"label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.0, "smoothing_prior": "p"}}


def _problem(api, seed=0):
    """The leaves to differentiate (logits; or hidden states, head weight and bias) and the target."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    y[1] = 3  # the ignore_index of OPTIONS' second set
    if "linear" in api.lower():
        leaves = tuple(torch.randn(shape, generator=g, dtype=F64) for shape in ((N, H), (K, H), (K,)))
    else:
        leaves = (torch.randn(N, K, generator=g, dtype=F64),)
    return leaves, y


_G = torch.Generator().manual_seed(5)
_PRIOR = torch.rand(K, generator=_G, dtype=F64) + 0.1
NAMED = {"w": torch.rand(K, generator=_G, dtype=F64) + 0.2, "p": _PRIOR / _PRIOR.sum()}


def _resolve(options):
    return {k: NAMED[v] if isinstance(v, str) else v for k, v in options.items()}


def _loss_fn(api, lib, y, reduction, options):
    """A function of the leaves: the API of ``lib`` (lsce or torch) with these settings."""
    kw = dict(_resolve(options), reduction=reduction)
    if api == "cross_entropy":
        fn = lsce.cross_entropy if lib is lsce else F.cross_entropy
        return lambda z: fn(z, y, **kw)
    if api == "CrossEntropyLoss":
        module = (lsce.CrossEntropyLoss if lib is lsce else torch.nn.CrossEntropyLoss)(**kw)
        return lambda z: module(z, y)
    if api == "linear_cross_entropy":
        fn = lsce.linear_cross_entropy if lib is lsce else F.linear_cross_entropy
        return lambda x, W, b: fn(x, W, y, linear_bias=b, **kw)
    cls = lsce.LinearCrossEntropyLoss if lib is lsce else torch.nn.LinearCrossEntropyLoss
    module = cls(H, K, bias=True, dtype=F64, **kw)
    return lambda x, W, b: functional_call(module, {"linear.weight": W, "linear.bias": b}, (x, y))


def _reference_fn(api, y, reduction, options):
    """lsce.reference's statement of the same loss (for lsce's own options)."""
    kw = _resolve(options)
    ignore_index = kw.pop("ignore_index", -100)
    eps = kw.pop("label_smoothing", 0.0)
    ref = lambda z: reference.cross_entropy(z, y, kw.pop("weight", None), ignore_index, reduction, eps, **kw)  # noqa: E731
    return ref if "linear" not in api.lower() else (lambda x, W, b: ref(F.linear(x, W, b)))


def _cases(options_sets, reductions=REDUCTIONS):
    """Each function with each reduction and option set; a module (whose forward is the
    function's call) with each reduction and one option set."""
    for api in API:
        for reduction in reductions:
            for name, options in options_sets.items():
                if api[0].isupper() and name != "smoothed+weight":
                    continue
                yield pytest.param(api, reduction, options, id=f"{api}-{reduction}-{name}")


def _expected_fn(api, y, reduction, options):
    if set(options) & {"z_loss", "softcap", "smoothing_prior"}:
        return _reference_fn(api, y, reduction, options)
    return _loss_fn(api, torch, y, reduction, options)


def _scalar(out):
    return out.sum() if out.dim() else out


# ------------------------------------------------------------------ autograd modes


# sum is mean times a constant: finite differences of mean and none cover it (and it is compared with PyTorch below).
@pytest.mark.parametrize("api,reduction,options", list(_cases({**OPTIONS, **LSCE_OPTIONS}, ["mean", "none"])))
def test_gradcheck_and_gradgradcheck(api, reduction, options):
    """First and second derivatives against finite differences (reverse mode, forward mode,
    forward-over-reverse)."""
    leaves, y = _problem(api)
    leaves = tuple(t.requires_grad_() for t in leaves)
    fn = _loss_fn(api, lsce, y, reduction, options)
    assert gradcheck(fn, leaves, check_forward_ad=True)
    assert gradgradcheck(fn, leaves, check_fwd_over_rev=True)


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_gradients(api, reduction):
    """vmap over the backward (autograd.grad(is_grads_batched=True)), as gradcheck's batched check does."""
    leaves, y = _problem(api)
    leaves = tuple(t.requires_grad_() for t in leaves)
    fn = _loss_fn(api, lsce, y, reduction, OPTIONS["smoothed+weight"])
    assert gradcheck(fn, leaves, check_batched_grad=True, check_batched_forward_grad=True, check_forward_ad=True)
    assert gradgradcheck(fn, leaves, check_batched_grad=True)


@pytest.mark.parametrize("api,reduction,options", list(_cases({**OPTIONS, **LSCE_OPTIONS})))
def test_gradient_penalty_hessian_and_hvp(api, reduction, options):
    """create_graph=True: a gradient penalty trains the same weights (the issue measured
    norm 0.658 against 0.915); hessian and hvp as PyTorch's (they were zeros)."""
    leaves, y = _problem(api)
    ours, theirs = _loss_fn(api, lsce, y, reduction, options), _expected_fn(api, y, reduction, options)

    def penalised(fn):
        ls = tuple(t.clone().requires_grad_() for t in leaves)
        loss = _scalar(fn(*ls))
        g = torch.autograd.grad(loss, ls[0], create_graph=True)[0]
        return torch.autograd.grad(loss + (g * g).sum(), ls)

    for a, b in zip(penalised(ours), penalised(theirs)):
        torch.testing.assert_close(a, b)
    first = lambda fn: lambda x: _scalar(fn(x, *leaves[1:]))  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.hessian(first(ours), leaves[0]),
                               torch.autograd.functional.hessian(first(theirs), leaves[0]))
    v = torch.randn_like(leaves[0])
    torch.testing.assert_close(torch.autograd.functional.hvp(first(ours), leaves[0], v),
                               torch.autograd.functional.hvp(first(theirs), leaves[0], v))


@pytest.mark.parametrize("api,reduction,options", list(_cases({**OPTIONS, **LSCE_OPTIONS})))
def test_forward_mode_and_torch_func(api, reduction, options):
    """jvp, jacfwd, dual tensors, grad and vmap(grad) as PyTorch's (the tangent was 0)."""
    leaves, y = _problem(api)
    ours, theirs = _loss_fn(api, lsce, y, reduction, options), _expected_fn(api, y, reduction, options)
    tangents = tuple(torch.randn_like(t) for t in leaves)
    for fn in (ours, theirs):
        fn.jvp = jvp(fn, leaves, tangents)
        fn.jacfwd = jacfwd(fn, argnums=tuple(range(len(leaves))))(*leaves)
        with forward_ad.dual_level():
            fn.dual = forward_ad.unpack_dual(fn(*(forward_ad.make_dual(t, d) for t, d in zip(leaves, tangents))))
        fn.grad = grad(lambda *ls: _scalar(fn(*ls)), argnums=tuple(range(len(leaves))))(*leaves)
    torch.testing.assert_close(ours.jvp, theirs.jvp)
    torch.testing.assert_close(ours.jacfwd, theirs.jacfwd)
    torch.testing.assert_close((ours.dual.primal, ours.dual.tangent), (theirs.dual.primal, theirs.dual.tangent))
    torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("api", API)
def test_vmap_over_a_batch_of_problems(api):
    """torch.func.vmap of the loss and of its gradient over a leading batch dimension."""
    batch = [_problem(api, seed) for seed in range(3)]
    leaves = tuple(torch.stack(ts) for ts in zip(*(b[0] for b in batch)))
    y = torch.stack([b[1] for b in batch])
    per_problem = {}
    for lib in (lsce, torch):
        def loss(*args, lib=lib):
            *ls, t = args
            return _loss_fn(api, lib, t, "mean", {"label_smoothing": 0.1})(*ls)
        # randomness="same": the modules' nn.Linear initialises its (replaced) weight.
        per_problem[lib] = (vmap(loss, randomness="same")(*leaves, y),
                            vmap(grad(loss, argnums=tuple(range(len(leaves)))), randomness="same")(*leaves, y))
    torch.testing.assert_close(per_problem[lsce], per_problem[torch])


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_scalar_options_as_numpy_or_tensor(api, kind):
    """label_smoothing, z_loss, softcap and ignore_index as NumPy or 0-d tensor scalars
    give what Python numbers give (PyTorch takes them for label_smoothing and ignore_index)."""
    leaves, y = _problem(api)
    as_kind = {"numpy": lambda v: np.float32(v) if isinstance(v, float) else np.int64(v),
               "tensor": lambda v: torch.tensor(v)}[kind]
    plain = {"label_smoothing": 0.25, "z_loss": 0.5, "softcap": 3.0, "ignore_index": 3}
    ours = _loss_fn(api, lsce, y, "mean", {k: as_kind(v) for k, v in plain.items()})(*leaves)
    exact = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in plain.items()}
    torch.testing.assert_close(ours, _loss_fn(api, lsce, y, "mean", exact)(*leaves))
    torch_kw = {"label_smoothing": as_kind(0.25), "ignore_index": as_kind(3)}
    torch.testing.assert_close(_loss_fn(api, lsce, y, "sum", torch_kw)(*leaves),
                               _loss_fn(api, torch, y, "sum", torch_kw)(*leaves))


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_autocast_result_dtype_like_torch(api, dtype, device):
    """Under torch.autocast the loss has PyTorch's dtype (fp32 for bf16 logits; F.cross_entropy is
    on the fp32 list) and, for bf16 logits, is the fp32 value (not rounded to bf16)."""
    leaves, y = _problem(api)
    leaves, y = tuple(t.to(device, dtype) for t in leaves), y.to(device)
    kw = {"label_smoothing": 0.1}
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = _loss_fn(api, lsce, y, "mean", kw)(*leaves)
        theirs = _loss_fn(api, torch, y, "mean", kw)(*leaves)
        none = _loss_fn(api, lsce, y, "none", kw)(*leaves)
    assert ours.dtype == theirs.dtype and none.dtype == theirs.dtype
    if dtype == torch.bfloat16 and "linear" not in api.lower():
        unrounded = lsce.cross_entropy(leaves[0], y, out_dtype=torch.float32, **kw)
        assert torch.equal(ours, unrounded)


# ------------------------------------------------------------------ the linear family


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("out_features", [(2,), (2, 3)], ids=["d1", "d1xd2"])
def test_k_dimensional_head_like_torch(reduction, options, out_features):
    """A (K, d1, ..., H) weight and (K, d1, ...) bias: loss and gradients as F.linear_cross_entropy's."""
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(s, generator=g, dtype=F64, requires_grad=True)
               for s in ((N, H), (K, *out_features, H), (K, *out_features)))
    y = torch.randint(0, K, (N, *out_features), generator=g)
    y.view(-1)[::4] = 3
    kw = dict(_resolve(OPTIONS[options]), reduction=reduction)
    results = []
    for fn in (lsce.linear_cross_entropy, F.linear_cross_entropy):
        out = fn(x, W, y, linear_bias=b, **kw)
        results.append((out, *torch.autograd.grad(_scalar(out), (x, W, b))))
    torch.testing.assert_close(*results)


def test_one_dimensional_input_and_no_features():
    """(H,) input with a () target; H = 0 gives log K, as PyTorch's."""
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(H, generator=g, dtype=F64), torch.randn(K, H, generator=g, dtype=F64), torch.randn(K, dtype=F64)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(lsce.linear_cross_entropy(x, W, torch.tensor(2), linear_bias=b, reduction=reduction),
                                   F.linear_cross_entropy(x, W, torch.tensor(2), linear_bias=b, reduction=reduction))
    x0, W0 = torch.randn(N, 0, dtype=F64, requires_grad=True), torch.randn(K, 0, dtype=F64, requires_grad=True)
    y = torch.randint(0, K, (N,))
    ours, theirs = lsce.linear_cross_entropy(x0, W0, y), F.linear_cross_entropy(x0, W0, y)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, torch.tensor(K, dtype=F64).log())
    ours.backward()
    assert x0.grad.shape == (N, 0) and W0.grad.shape == (K, 0)


@pytest.mark.parametrize("api", API)
def test_zero_class_weights_give_nan_gradients_and_no_rows_zero(api):
    """All-zero class weights: NaN loss and NaN gradients (0/0), as PyTorch (gradient NaN checks
    see it); all rows ignored: NaN loss, zero gradients, as PyTorch."""
    leaves, y = _problem(api)
    for options, target in (({"weight": torch.zeros(K, dtype=F64)}, y), ({}, torch.full((N,), -100))):
        results = []
        for lib in (lsce, torch):
            ls = tuple(t.clone().requires_grad_() for t in leaves)
            out = _loss_fn(api, lib, target, "mean", options)(*ls)
            results.append((out, *torch.autograd.grad(out, ls)))
        torch.testing.assert_close(*results, equal_nan=True)


def test_ignore_index_none_is_pytorchs_default():
    (x, W, b), y = _problem("linear_cross_entropy")
    y = y.clone()
    y[0] = -100
    for kw in ({}, {"ignore_index": None}):
        torch.testing.assert_close(lsce.linear_cross_entropy(x, W, y, **kw), F.linear_cross_entropy(x, W, y, **kw))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_return_lse(reduction):
    """return_lse as lsce.cross_entropy's on the materialised logits, with its gradient."""
    (x, W, b), y = _problem("linear_cross_entropy")
    leaves = tuple(t.requires_grad_() for t in (x, W, b))
    results = []
    for fn in (lambda: lsce.linear_cross_entropy(x, W, y, linear_bias=b, reduction=reduction, return_lse=True,
                                                 label_smoothing=0.1, z_loss=0.01),
               lambda: lsce.cross_entropy(F.linear(x, W, b), y, reduction=reduction, return_lse=True,
                                          label_smoothing=0.1, z_loss=0.01)):
        loss, lse = fn()
        results.append((loss, lse, *torch.autograd.grad(_scalar(loss) + (lse * lse).sum(), leaves)))
    torch.testing.assert_close(*results)


def test_module_state_dicts_interchangeable_with_torch():
    """Same parameters and buffers under the same names: either module loads the other's
    state dict, and then computes the same loss and gradients."""
    w = torch.rand(K, dtype=F64) + 0.5
    kw = dict(out_features=(2,), bias=True, dtype=F64, reduction="sum", weight=w, label_smoothing=0.1)
    ours, theirs = lsce.LinearCrossEntropyLoss(H, K, **kw), torch.nn.LinearCrossEntropyLoss(H, K, **kw)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(N, H, dtype=F64)
    y = torch.randint(0, K, (N, 2))
    results = []
    for module in (ours, theirs):
        out = module(x, y)
        results.append((out, *torch.autograd.grad(out, list(module.parameters()))))
    torch.testing.assert_close(*results)


def test_module_constructor_is_torchs():
    """PyTorch's parameters in PyTorch's order and kinds, with the same defaults;
    lsce's own are keyword-only and come after them."""
    import inspect

    theirs = inspect.signature(torch.nn.LinearCrossEntropyLoss.__init__).parameters
    ours = inspect.signature(lsce.LinearCrossEntropyLoss.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in theirs.values()] == \
        [(p.name, p.kind, p.default) for p in list(ours.values())[: len(theirs)]]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(ours.values())[len(theirs):])


def test_options_batch_chunk_size_is_the_chunk_size(monkeypatch):
    """PyTorch's LinearCrossEntropyOptions: its batch_chunk_size reaches lsce's chunk loop."""
    from lsce import linear

    seen = []
    real = linear.LogitChunks.__init__

    def spy(self, x, W, b, chunk_size):
        seen.append(chunk_size)
        real(self, x, W, b, chunk_size)

    monkeypatch.setattr(linear.LogitChunks, "__init__", spy)
    (x, W, b), y = _problem("linear_cross_entropy")
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    module = lsce.LinearCrossEntropyLoss(H, K, dtype=F64, options=options)
    module(x, y)
    torch.testing.assert_close(lsce.linear_cross_entropy(x, W, y, options=options), lsce.linear_cross_entropy(x, W, y))
    assert seen[:2] == [3, 3]


@pytest.mark.parametrize("api", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
@pytest.mark.parametrize("setting", [{"label_smoothing": 2.0}, {"reduction": "avg"}, {"z_loss": -1.0},
                                     {"label_smoothing": "0.1"}, {"out_dtype": torch.int64}])
def test_modules_check_settings_at_construction(api, setting):
    """A bad setting fails when the module is made, with the message of the call."""
    cls = getattr(lsce, api)
    args = (H, K) if "Linear" in api else ()
    leaves, y = _problem(api)
    fn = lsce.linear_cross_entropy if "Linear" in api else lsce.cross_entropy
    with pytest.raises((ValueError, TypeError)) as at_call:
        fn(*leaves[:2], y, **setting) if "Linear" in api else fn(leaves[0], y, **setting)
    with pytest.raises(type(at_call.value), match=None) as made:
        cls(*args, **setting)
    assert str(made.value) == str(at_call.value)
    assert isinstance(made.value, RuntimeError)  # what PyTorch's modules raise


def test_fused_head_keeps_no_hidden_states_alive_and_says_when_double_backward_needs_them():
    """mean/sum hold (x, W, b) weakly: an ordinary step frees the hidden states after the
    forward; a later create_graph=True backward then raises a clear error instead of a
    constant (wrong) gradient, and so does one after the hidden states changed in place."""
    import weakref

    (x, W, b), y = _problem("linear_cross_entropy")
    W.requires_grad_()
    a = x.clone().requires_grad_()
    hidden = a * 2.0  # not a leaf: the graph holds no reference to it
    ref = weakref.ref(hidden)
    loss = lsce.linear_cross_entropy(hidden, W, y, label_smoothing=0.1)
    del hidden
    assert ref() is None
    with pytest.raises(RuntimeError, match="hidden states, which were freed"):
        torch.autograd.grad(loss, W, create_graph=True)
    hidden = a * 2.0
    loss = lsce.linear_cross_entropy(hidden, W, y, label_smoothing=0.1)
    with torch.no_grad():
        hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, W, create_graph=True)


def test_fused_head_double_backward_with_three_dimensional_hidden_states():
    """(B, T, H) hidden states reach the op as a view of rows; it is rebuilt from the caller's tensor."""
    (x, W, b), y = _problem("linear_cross_entropy")
    x3, y3 = x.reshape(2, 2, H).clone().requires_grad_(), y.reshape(2, 2)
    W.requires_grad_()
    results = []
    for fn in (lsce.linear_cross_entropy, lambda h, w, t, **kw: F.cross_entropy(F.linear(h, w).flatten(0, 1),
                                                                                 t.flatten(), **kw)):
        loss = fn(x3, W, y3, label_smoothing=0.1)
        g = torch.autograd.grad(loss, x3, create_graph=True)[0]
        results.append(torch.autograd.grad(loss + (g * g).sum(), (x3, W)))
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_head_backend_option(backend, reduction):
    """backend= on the fused head and its module: the same loss and gradients as "auto"."""
    (x, W, b), y = _problem("linear_cross_entropy")
    results = []
    for bk in ("auto", backend):
        leaves = tuple(t.clone().requires_grad_() for t in (x, W, b))
        out = lsce.linear_cross_entropy(*leaves[:2], y, linear_bias=leaves[2], reduction=reduction,
                                        label_smoothing=0.1, backend=bk)
        results.append((out, *torch.autograd.grad(_scalar(out), leaves)))
    torch.testing.assert_close(*results)
    module = lsce.LinearCrossEntropyLoss(H, K, bias=True, dtype=F64, backend=backend, reduction=reduction)
    out = functional_call(module, {"linear.weight": W, "linear.bias": b}, (x, y))
    torch.testing.assert_close(out, lsce.linear_cross_entropy(x, W, y, linear_bias=b, reduction=reduction))
    with pytest.raises(ValueError, match="backend"):
        lsce.LinearCrossEntropyLoss(H, K, backend="gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional_head_below_fp64(dtype, reduction):
    """fp32: PyTorch's values up to the order of fp32 operations (design.md §1); bf16/fp16:
    loss and gradients no further from the fp64 truth than PyTorch's at the same dtype."""
    from _util import assert_matches, assert_no_worse_than_torch

    g = torch.Generator().manual_seed(1)
    x, W, b = (torch.randn(s, generator=g, dtype=F64).to(dtype) for s in ((16, 32), (50, 3, 32), (50, 3)))
    y = torch.randint(0, 50, (16, 3), generator=g)
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=torch.rand(50, generator=g, dtype=F64).to(dtype) + 0.5)
    outs = {}
    for name, fn, cast in (("lsce", lsce.linear_cross_entropy, dtype), ("torch", F.linear_cross_entropy, dtype),
                           ("truth", F.linear_cross_entropy, F64)):
        leaves = tuple(t.to(cast).requires_grad_() for t in (x, W, b))
        out = fn(*leaves[:2], y, linear_bias=leaves[2], **{**kw, "weight": kw["weight"].to(cast)})
        outs[name] = (out.detach(), *torch.autograd.grad(_scalar(out), leaves))
    for i, what in enumerate(("loss", "grad input", "grad weight", "grad bias")):
        if dtype == torch.float32:
            assert_matches(outs["lsce"][i], outs["torch"][i], what=what)
        else:
            assert_no_worse_than_torch(outs["lsce"][i], outs["torch"][i], outs["truth"][i], dtype, what=what,
                                       matmul=i > 0)
