"""Shared by the test files: random problems and the comparison rules of design.md §1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsce import reference

LOW_PRECISION = (torch.bfloat16, torch.float16)
# One unit in the last place, relative: the rounding step of a store.
ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


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


def loss_and_grad(fn, logits, target, upstream, **kwargs):
    """fn(logits, target, **kwargs) and d(Σ upstream·loss)/d logits (logits not modified)."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, target, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad((loss.to(upstream.dtype) * upstream).sum(), x)
    return loss.detach(), grad


def truth(logits, target, upstream, **kwargs):
    """The fp64 reference loss and gradient from the same (rounded) inputs."""
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    return loss_and_grad(reference.cross_entropy, logits.double(), target, upstream.double(), **kw)


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


def assert_no_worse_than_torch(actual, torch_value, expected, dtype, *, what):
    """design.md §1 for bf16/fp16: no further from the fp64 truth than PyTorch at the
    same dtype, plus one ulp of that dtype."""
    actual, torch_value, expected = actual.double(), torch_value.double(), expected.double()
    ours = (actual - expected).abs()
    theirs = (torch_value - expected).abs()
    slack = ULP[dtype] * expected.abs() + 1e-6 * max(expected.abs().max().item(), 1.0)
    bad = ours > theirs + slack
    assert not bad.any(), f"{what}: lsce error {ours[bad][:4].tolist()} > torch error {theirs[bad][:4].tolist()}"


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
