"""Shared by the test files: random problems, the one way to take a loss and its
gradient, the comparison rules of design.md §1 and the bad-input check.

Every rule lives here once; tests/test_properties.py keeps its own error bound
(see its docstring: a bound derived per example from the sizes of the terms,
not a fixed tolerance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lsce import reference

LOW_PRECISION = (torch.bfloat16, torch.float16)
# One unit in the last place, relative: the rounding step of a store.
ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Mantissa bits: one ulp of x in a dtype is 2**(exponent(x) − bits).
_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


# ------------------------------------------------------------------ problems


def make_problem(shape, dtype, *, ignore_index=-100, ignore_frac=0.0, scale=3.0, seed=0, device="cpu"):
    """Logits of `shape` (classes on dim 1, or dim 0 for 1-D) and matching targets."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    K = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, K, tshape, generator=g)
    if ignore_frac:
        mask = torch.rand(tshape, generator=g) < ignore_frac
        target = torch.where(mask, torch.full_like(target, ignore_index), target)
    return logits.to(device), target.to(device)


def make_options(K, names, *, seed=1, device="cpu"):
    """Keyword arguments for the options named (weight, z_loss, softcap, prior)."""
    g = torch.Generator().manual_seed(seed)
    opts = {}
    if "weight" in names:
        opts["weight"] = (torch.rand(K, generator=g, dtype=torch.float64) + 0.1).to(device)
    if "z_loss" in names:
        opts["z_loss"] = 1e-2
    if "softcap" in names:
        opts["softcap"] = 4.0
    if "prior" in names:
        prior = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
        opts["smoothing_prior"] = (prior / prior.sum()).to(device)
    return opts


def upstream_for(target, reduction, seed=3):
    """A random fp64 upstream gradient for a loss with that target and reduction."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(target.shape if reduction == "none" else (), generator=g, dtype=torch.float64)


def fp64(kwargs):
    """The keyword arguments with every tensor in fp64 (for the reference)."""
    return {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}


# ------------------------------------------------------------------ loss and gradient


def _objective(out, upstream, upstream_lse):
    """Σ upstream·loss (+ Σ upstream_lse·lse) of fn's output, and the detached loss and lse."""
    loss, lse = out if isinstance(out, tuple) else (out, None)
    if upstream is None:
        objective = loss.sum()
    else:
        objective = (loss.to(upstream.dtype) * upstream.reshape(loss.shape)).sum()
    if upstream_lse is not None:
        objective = objective + (lse.to(upstream_lse.dtype) * upstream_lse.reshape(lse.shape)).sum()
    return objective, loss.detach(), None if lse is None else lse.detach()


def _gradients(objective, leaves):
    """d objective / d leaves; zeros for a leaf the objective does not depend on (no rows)."""
    grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


def loss_lse_and_grad(fn, logits, target, upstream=None, upstream_lse=None, **kwargs):
    """fn(logits, target, **kwargs)'s loss and lse (None unless fn returns it;
    ``return_lse=True`` is passed when ``upstream_lse`` is given) and
    d(Σ upstream·loss + Σ upstream_lse·lse)/d logits (upstream None: the loss
    summed). The leaf is a detached view of ``logits``: the same memory and
    strides (an expanded or overlapping layout stays one), never written."""
    if upstream_lse is not None:
        kwargs["return_lse"] = True
    x = logits.detach().requires_grad_(True)
    objective, loss, lse = _objective(fn(x, target, **kwargs), upstream, upstream_lse)
    return loss, lse, _gradients(objective, [x])[0]


def loss_and_grad(fn, logits, target, upstream=None, **kwargs):
    """:func:`loss_lse_and_grad` without the lse: (loss, grad)."""
    loss, _, grad = loss_lse_and_grad(fn, logits, target, upstream, **kwargs)
    return loss, grad


def linear_loss_and_grads(fn, x, W, b, target, upstream, **kwargs):
    """fn(x, W, target, linear_bias=b, **kwargs)'s loss and the gradients of
    Σ upstream·loss for x, W (and b when given), from detached leaves."""
    leaves = [t.detach().requires_grad_(True) for t in (x, W, b) if t is not None]
    bias = leaves[2] if b is not None else None
    objective, loss, _ = _objective(fn(leaves[0], leaves[1], target, linear_bias=bias, **kwargs), upstream, None)
    return loss, _gradients(objective, leaves)


def truth(logits, target, upstream, **kwargs):
    """The fp64 reference loss and gradient from the same (rounded) inputs."""
    return loss_and_grad(reference.cross_entropy, logits.double(), target, upstream.double(), **fp64(kwargs))


# ------------------------------------------------------------------ comparison rules


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value of x (fp64), subnormal spacing at 0."""
    _, e = torch.frexp(x.abs())  # |x| = m · 2**e with m in [0.5, 1)
    fi = torch.finfo(dtype)
    spacing = torch.ldexp(torch.ones_like(x), e - 1 - _MANTISSA_BITS[dtype])
    return spacing.clamp_min(fi.tiny * fi.eps)


def assert_same_nonfinite(actual, expected, what):
    """NaN, +inf and −inf at exactly the same places."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    for name, f in [("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)]:
        a, e = f(actual), f(expected)
        if not torch.equal(a, e):
            where = (a != e).nonzero()[:6].tolist()
            raise AssertionError(f"{what}: {name} at different places, e.g. {where}: "
                                 f"got {actual[a != e][:6].tolist()}, expected {expected[a != e][:6].tolist()}")


def assert_close_to_truth(actual, expected, dtype, *, what, rtol=None, atol_frac=None):
    """lsce's result against the fp64 truth: rounding of the computation in fp32
    (fp64) plus, for bf16/fp16 outputs, one ulp of the stored dtype."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern differs"
    inf = torch.isinf(expected)
    assert torch.equal(actual[inf], expected[inf]), f"{what}: infinities differ"
    finite = torch.isfinite(expected)
    if rtol is None:
        rtol = 2e-5 if dtype == torch.float32 else 1e-10 if dtype == torch.float64 else ULP[dtype]
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    atol = (atol_frac if atol_frac is not None else (1e-6 if dtype != torch.float64 else 1e-12)) * max(scale, 1.0)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_close_to_lsce(actual, expected, dtype, *, what):
    """Two lsce results that both accumulate in fp32 and were each rounded to a
    bf16/fp16 output (e.g. lsce.distributed against one process): one ulp of
    bf16 relative, half of one absolute; otherwise :func:`assert_close_to_truth`."""
    if dtype in LOW_PRECISION:
        assert_close_to_truth(actual, expected, dtype, what=what, rtol=2.0**-7, atol_frac=2.0**-8)
    else:
        assert_close_to_truth(actual, expected, dtype, what=what)


def assert_no_worse_than_torch(actual, torch_value, expected, dtype, *, what, matmul=False):
    """design.md §1 for bf16/fp16: no further from the fp64 truth than PyTorch at the
    same dtype, plus one ulp of that dtype.

    Elementwise by default. ``matmul``: for a gradient that is a matmul output,
    one ulp at the tensor's scale — each element sums K (or N) products of
    rounded values, so its error follows the largest values, not the element
    itself (which may have cancelled)."""
    actual, torch_value, expected = actual.double(), torch_value.double(), expected.double()
    ours = (actual - expected).abs()
    theirs = (torch_value - expected).abs()
    if matmul:
        slack = ULP[dtype] * expected.abs().max().item()
        excess = ours - theirs
        assert excess.max().item() <= slack, f"{what}: {excess.max().item()} beyond PyTorch's error, slack {slack}"
        return
    slack = ULP[dtype] * expected.abs() + 1e-6 * max(expected.abs().max().item(), 1.0)
    bad = ours > theirs + slack
    assert not bad.any(), f"{what}: lsce error {ours[bad][:4].tolist()} > torch error {theirs[bad][:4].tolist()}"


def assert_matches(actual, expected, *, what, rtol=1e-5, atol_floor=0.0):
    """The same computation in another order of fp32 (fp64) operations (lsce against
    PyTorch, fused against materialised): the same dtype and shape, NaN at the same
    places, within ``rtol`` of each element plus ``rtol`` of the largest finite
    |expected| (at least 1e-3) and ``atol_floor``. Tuples are compared item by item."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_matches(a, e, what=f"{what} [{i}]", rtol=rtol, atol_floor=atol_floor)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-3) + atol_floor, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_like_torch(actual, expected, what):
    """Against F.cross_entropy in fp64 on the same values: NaN and ±inf at the same
    places, the finite values within rtol 1e-5 and atol 1e-6."""
    actual, expected = actual.double(), expected.double()
    assert_same_nonfinite(actual, expected, what)
    fin = torch.isfinite(expected)
    torch.testing.assert_close(actual[fin], expected[fin], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def assert_rows_close(got, ref, dtype, what):
    """A kernel's per-row loss/lse: fp32 accumulation (fp64 for fp64 logits) against fp64."""
    assert got.dtype == reference.acc_dtype(dtype), what
    assert got.shape == ref.shape, what
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_grad_close(got, ref, dtype, magnitude=None):
    """A kernel's gradient in the logits' dtype: one ulp of that dtype (the Triton
    interpreter truncates fp32 → bf16 stores instead of rounding), plus fp32
    rounding of the terms, whose size is ``magnitude`` (the largest |g|·w + |h|;
    the largest |ref| if not given) — a gradient that cancels to about 0 is only
    as exact as the terms that cancel."""
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


# ------------------------------------------------------------------ compile and memory


def assert_compiled_matches_eager(step, compiled, args, leaves):
    """step(*args) and compiled(*args), each on fresh copies (requiring grad) of
    the args at the indices ``leaves``: the same output, and the same gradients
    after its backward (where eager gives one)."""
    results = []
    for fn in (step, compiled):
        a = [t.clone().requires_grad_(True) if i in leaves else t for i, t in enumerate(args)]
        out = fn(*a)
        out.backward()
        results.append([out.detach()] + [a[i].grad for i in leaves])
    for eager, comp in zip(*results):
        if eager is not None:
            torch.testing.assert_close(comp, eager)


class LargestTensor(TorchDispatchMode):
    """Records in ``largest`` the largest number of elements of any tensor an op
    returns or, with ``storage``, of the memory behind it (a view or an expand
    counts as its whole storage)."""

    def __init__(self, storage=False):
        super().__init__()
        self.storage = storage
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes() // t.element_size() if self.storage else t.numel()
                self.largest = max(self.largest, n)
        return out


# ------------------------------------------------------------------ bad input


def _snapshot(kwargs):
    return {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v) and v.device.type != "meta"}


def _assert_unchanged(kwargs, before):
    for k, v in before.items():
        after = kwargs[k]
        assert after.dtype == v.dtype and after.shape == v.shape, f"{k} was modified"
        assert torch.equal(after.detach().nan_to_num(), v.nan_to_num()), f"{k} was modified"
        assert torch.equal(after.detach().isnan(), v.isnan()), f"{k} was modified"
        assert after.grad is None, f"{k} got a .grad"


def assert_raises_and_changes_nothing(call, kwargs, exc, text, monkeypatch):
    """call(**kwargs) raises ``exc`` with lsce's own message, matching ``text``,
    before any kernel (C++, Triton or reference; the fused CPU step included)
    is reached, and leaves every tensor of kwargs as it was (no .grad either).
    Returns the exception."""
    import lsce.cpu
    import lsce.ops

    reached = []

    def refuse(*args, **kw):
        reached.append(args[:1])
        raise AssertionError(f"a kernel was reached ({args[:1]}) before the argument error")

    monkeypatch.setattr(lsce.ops, "row_kernels", refuse)
    monkeypatch.setattr(lsce.cpu, "forward", refuse)  # the fused CPU step calls it directly
    monkeypatch.setattr(lsce.cpu, "soft_forward", refuse)  # and the probability-target one this
    before = _snapshot(kwargs)
    with pytest.raises(exc, match=text) as info:
        call(**kwargs)
    assert str(info.value).startswith("lsce"), f"not lsce's own message: {info.value!r}"
    assert not reached, f"a kernel was reached: {reached}"
    _assert_unchanged(kwargs, before)
    return info.value


# ------------------------------------------------------------------ PyTorch


def torch_supports(kwargs):
    """True when F.cross_entropy has the same options (no lsce extensions)."""
    return not any(k in kwargs for k in ("z_loss", "softcap", "smoothing_prior"))


def torch_cross_entropy(logits, target, **kwargs):
    """F.cross_entropy with lsce's lenient argument handling mapped onto it."""
    kw = dict(kwargs)
    if "weight" in kw:
        kw["weight"] = kw["weight"].to(logits.dtype)
    t = target if target.dtype in (torch.int64, torch.uint8) else target.long()
    return F.cross_entropy(logits, t, **kw)


def torch_composed(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss=0.0, softcap=None, smoothing_prior=None):
    """What a PyTorch user writes for lsce's options, at the logits' dtype, on 2-D
    logits: F.cross_entropy of the soft-capped logits (with a prior: F.log_softmax
    and F.nll_loss), plus z_loss·logsumexp² per non-ignored row, reduced as lsce
    reduces (design.md §1). The PyTorch baseline of "no further from the fp64
    truth than PyTorch" where F.cross_entropy lacks an option."""
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    w = None if weight is None else weight.to(z.dtype)
    eps = float(label_smoothing)
    valid = target != ignore_index
    if smoothing_prior is None:
        ce = F.cross_entropy(z, target, w, ignore_index=ignore_index, reduction="none", label_smoothing=eps)
    else:
        logp = F.log_softmax(z, 1)
        c = smoothing_prior.to(z.dtype) * (1 if w is None else w)
        nll = F.nll_loss(logp, target, w, ignore_index=ignore_index, reduction="none")
        ce = torch.where(valid, (1 - eps) * nll - eps * (logp * c).sum(1), 0)
    zl = torch.where(valid, z_loss * torch.logsumexp(z, 1) ** 2, 0) if z_loss else torch.zeros_like(ce)
    if reduction == "none":
        return ce + zl
    if reduction == "sum":
        return (ce + zl).sum()
    w_y = torch.ones_like(ce) if w is None else w[torch.where(valid, target, 0)]
    return ce.sum() / torch.where(valid, w_y, 0).sum() + (zl.sum() / valid.sum() if z_loss else 0)
