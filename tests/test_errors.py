"""Bad input: a clear exception naming the argument, raised before any kernel runs,
and every tensor the caller passed left unchanged."""

import pytest
import torch

import lsce

K = 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "input": torch.randn(4, K, generator=g),
        "target": torch.tensor([0, 1, 4, -100]),
        "weight": torch.rand(K, generator=g),
        "smoothing_prior": torch.full((K,), 1.0 / K),
    }


def _with(**changes):
    kw = _inputs()
    kw.update(changes)
    return kw


BAD_CALLS = [
    # (id, keyword arguments, exception, text the message must contain)
    ("target out of range", _with(target=torch.tensor([0, 1, 5, 2])), IndexError, "target 5"),
    ("negative target", _with(target=torch.tensor([0, -1, 2, 2])), IndexError, "target -1"),
    ("float target", _with(target=torch.rand(4)), TypeError, "class indices"),
    ("bool target", _with(target=torch.tensor([True, False, True, False])), TypeError, "target"),
    ("integer logits", _with(input=torch.ones(4, K, dtype=torch.int64)), TypeError, "input"),
    ("target shape", _with(target=torch.tensor([0, 1, 2])), ValueError, "target shape"),
    ("scalar input", _with(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "at least 1 dimension"),
    ("no classes", _with(input=torch.randn(4, 0)), ValueError, "0 classes"),
    ("weight length", _with(weight=torch.rand(K + 1)), ValueError, "weight"),
    ("weight dtype", _with(weight=torch.ones(K, dtype=torch.int64)), TypeError, "weight"),
    ("weight on meta", _with(weight=torch.rand(K, device="meta")), ValueError, "weight"),
    ("target on meta", _with(target=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "target"),
    ("prior length", _with(smoothing_prior=torch.rand(K - 1)), ValueError, "smoothing_prior"),
    ("prior sum", _with(smoothing_prior=torch.full((K,), 0.5)), ValueError, "smoothing_prior"),
    ("prior negative", _with(smoothing_prior=torch.tensor([1.5, -0.5, 0.0, 0.0, 0.0])), ValueError, "smoothing_prior"),
    ("prior NaN", _with(smoothing_prior=torch.tensor([float("nan"), 1.0, 0.0, 0.0, 0.0])), ValueError, "smoothing_prior"),
    ("eps negative", _with(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("eps above 1", _with(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("eps NaN", _with(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    ("reduction", _with(reduction="avg"), ValueError, "reduction"),
    ("backend", _with(backend="cuda"), ValueError, "backend"),
    ("z_loss negative", _with(z_loss=-1.0), ValueError, "z_loss"),
    ("z_loss inf", _with(z_loss=float("inf")), ValueError, "z_loss"),
    ("softcap zero", _with(softcap=0.0), ValueError, "softcap"),
    ("softcap negative", _with(softcap=-3.0), ValueError, "softcap"),
    ("softcap NaN", _with(softcap=float("nan")), ValueError, "softcap"),
    ("size_average", _with(size_average=True), TypeError, "size_average"),
    ("reduce", _with(reduce=False), TypeError, "reduce"),
    ("out_dtype integer", _with(out_dtype=torch.int64), TypeError, "out_dtype"),
]


@pytest.mark.parametrize("kwargs,exc,text", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input_raises_and_changes_nothing(kwargs, exc, text, backend):
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    before = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v) and v.device.type != "meta"}
    with pytest.raises(exc, match=text):
        lsce.cross_entropy(**kwargs)
    for k, v in before.items():
        torch.testing.assert_close(kwargs[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{k} was modified")


def test_module_rejects_deprecated_arguments():
    with pytest.raises(TypeError, match="size_average"):
        lsce.CrossEntropyLoss(size_average=False)


def test_valid_call_changes_nothing():
    kw = _with(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    x = kw["input"].clone().requires_grad_(True)
    kw["input"] = x
    before = {k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}
    lsce.cross_entropy(**kw).backward()
    for k, v in before.items():
        assert torch.equal(kw[k].detach(), v), f"{k} was modified"
    assert x.grad is not None and torch.isfinite(x.grad).all()
