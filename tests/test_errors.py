"""Bad input: a clear exception of lsce's own naming the argument, raised before any
kernel runs, and every tensor the caller passed left unchanged — for
lsce.cross_entropy with each backend and for lsce.CrossEntropyLoss (one table,
one test). lsce.linear_cross_entropy's own table is in tests/test_linear.py."""

import importlib.util
import math
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsce  # noqa: E402
from _util import assert_raises_and_changes_nothing  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None

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


def _soft(**changes):
    """A valid probability-target call (no smoothing_prior), with ``changes``."""
    g = torch.Generator().manual_seed(1)
    kw = _with(target=torch.softmax(torch.randn(4, K, generator=g), 1), smoothing_prior=None)
    kw.update(changes)
    return kw


BAD_CALLS = [
    # (id, keyword arguments, exception, text the message must contain)
    ("target out of range", _with(target=torch.tensor([0, 1, 5, 2])), IndexError, "target 5"),
    ("negative target", _with(target=torch.tensor([0, -1, 2, 2])), IndexError, "target -1"),
    # A floating-point target of another shape than the input is neither class indices nor
    # probabilities: PyTorch raises a RuntimeError; lsce's error is a ValueError and a RuntimeError.
    ("float target", _with(target=torch.rand(4)), RuntimeError, "class indices"),
    ("bool target", _with(target=torch.tensor([True, False, True, False])), TypeError, "target"),
    ("integer logits", _with(input=torch.ones(4, K, dtype=torch.int64)), NotImplementedError, "input"),
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
    ("out_dtype integer", _with(out_dtype=torch.int64), TypeError, "out_dtype"),
    # wrong ranks and shapes
    ("target with a class dim", _with(target=torch.tensor([[0], [1], [2], [3]])), ValueError, "target shape"),
    ("3-D input, 1-D target", _with(input=torch.randn(4, K, 3)), ValueError, "target shape"),
    ("1-D input, 1-D target", _with(input=torch.randn(K), target=torch.tensor([1])), ValueError, "target shape"),
    ("4-D input, target rank 2", _with(input=torch.randn(4, K, 2, 3), target=torch.zeros(4, 2, dtype=torch.long)),
     ValueError, "target shape"),
    ("2-D weight (K, 1)", _with(weight=torch.rand(K, 1)), ValueError, "weight"),
    ("2-D weight (1, K)", _with(weight=torch.rand(1, K)), ValueError, "weight"),
    ("scalar weight", _with(weight=torch.tensor(1.0)), ValueError, "weight"),
    ("2-D prior", _with(smoothing_prior=torch.full((K, 1), 1.0 / K)), ValueError, "smoothing_prior"),
    # devices and dtypes
    ("input on meta", _with(input=torch.randn(4, K, device="meta")), ValueError, "input is on meta"),
    ("prior on meta", _with(smoothing_prior=torch.full((K,), 0.2, device="meta")), ValueError, "smoothing_prior"),
    ("complex logits", _with(input=torch.randn(4, K, dtype=torch.complex64)), NotImplementedError, "input"),
    ("bool logits", _with(input=torch.ones(4, K, dtype=torch.bool)), NotImplementedError, "input"),
    ("integer prior", _with(smoothing_prior=torch.ones(K, dtype=torch.int64)), TypeError, "smoothing_prior"),
    ("complex weight", _with(weight=torch.ones(K, dtype=torch.complex64)), TypeError, "weight"),
    # targets
    ("target = K, int32", _with(target=torch.tensor([0, 1, K, 2], dtype=torch.int32)), IndexError, f"target {K}"),
    ("target 2**40", _with(target=torch.tensor([0, 1, 2**40, 2])), IndexError, "out of bounds"),
    ("uint8 target 255", _with(target=torch.tensor([0, 1, 255, 2], dtype=torch.uint8)), IndexError, "target 255"),
    ("out of range beside ignore_index in range",
     _with(target=torch.tensor([0, 1, 9, 2]), ignore_index=1), IndexError, "target 9"),
    ("3-D target out of range", _with(input=torch.randn(2, K, 3), target=torch.tensor([[0, 1, 2], [3, 4, 5]])),
     IndexError, "target 5"),
    ("1-D input, target out of range", _with(input=torch.randn(K), target=torch.tensor(K)), IndexError, "target"),
    ("float target, 1-D input", _with(input=torch.randn(K), target=torch.tensor(1.0)), RuntimeError, "class indices"),
    ("half target", _with(target=torch.zeros(4, dtype=torch.float16)), RuntimeError, "class indices"),
    ("complex target", _with(target=torch.zeros(4, dtype=torch.complex64)), TypeError, "target"),
    # label_smoothing
    ("eps inf", _with(label_smoothing=math.inf), ValueError, "label_smoothing"),
    ("eps string", _with(label_smoothing="0.1"), TypeError, "label_smoothing"),
    ("eps None", _with(label_smoothing=None), TypeError, "label_smoothing"),
    ("eps 1-D tensor", _with(label_smoothing=torch.tensor([0.1])), TypeError, "label_smoothing"),
    ("eps numpy 1.5", _with(label_smoothing=np.float32(1.5)), ValueError, "label_smoothing"),
    ("eps tensor 1.5", _with(label_smoothing=torch.tensor(1.5)), ValueError, "label_smoothing"),
    ("eps complex tensor", _with(label_smoothing=torch.tensor(0.1j)), TypeError, "label_smoothing"),
    ("z_loss tensor -1", _with(z_loss=torch.tensor(-1.0)), ValueError, "z_loss"),
    ("softcap numpy 0", _with(softcap=np.float64(0.0)), ValueError, "softcap"),
    # prior values
    ("prior sums to 1.001", _with(smoothing_prior=torch.tensor([0.2, 0.2, 0.2, 0.2, 0.201])), ValueError,
     "smoothing_prior"),
    ("prior all zero", _with(smoothing_prior=torch.zeros(K)), ValueError, "smoothing_prior"),
    ("prior with inf", _with(smoothing_prior=torch.tensor([math.inf, 0.0, 0.0, 0.0, 0.0])), ValueError,
     "smoothing_prior"),
    # reduction, backend
    ("reduction None", _with(reduction=None), ValueError, "reduction"),
    ("reduction 'Mean'", _with(reduction="Mean"), ValueError, "reduction"),
    ("reduction elementwise_mean", _with(reduction="elementwise_mean"), ValueError, "reduction"),
    ("backend None", _with(backend=None), ValueError, "backend"),
    ("backend 'CPU'", _with(backend="CPU"), ValueError, "backend"),
    # z_loss, softcap
    ("z_loss NaN", _with(z_loss=math.nan), ValueError, "z_loss"),
    ("z_loss -inf", _with(z_loss=-math.inf), ValueError, "z_loss"),
    ("z_loss None", _with(z_loss=None), TypeError, "z_loss"),
    ("z_loss string", _with(z_loss="0.1"), TypeError, "z_loss"),
    ("softcap inf", _with(softcap=math.inf), ValueError, "softcap"),
    ("softcap -0.0", _with(softcap=-0.0), ValueError, "softcap"),
    ("softcap string", _with(softcap="30"), TypeError, "softcap"),
    # non-Tensor arguments
    ("input list", _with(input=[[0.0] * K] * 4), TypeError, "input"),
    ("target list", _with(target=[0, 1, 2, 3]), TypeError, "target"),
    ("target numpy", _with(target=np.array([0, 1, 2, 3])), TypeError, "target"),
    ("input numpy", _with(input=np.zeros((4, K), dtype=np.float32)), TypeError, "input"),
    ("weight list", _with(weight=[1.0] * K), TypeError, "weight"),
    ("prior tuple", _with(smoothing_prior=(0.2,) * K), TypeError, "smoothing_prior"),
    # ignore_index not an int (F.cross_entropy: TypeError) — lsce truncated 1.5 to 1 and parsed "1"
    ("ignore_index 1.5", _with(ignore_index=1.5), TypeError, "ignore_index"),
    ("ignore_index '1'", _with(ignore_index="1"), TypeError, "ignore_index"),
    ("ignore_index None", _with(ignore_index=None), TypeError, "ignore_index"),
    # tensors lsce computes no gradient for (F.cross_entropy fails in backward for weight;
    # lsce gave weight no gradient, or under mean a partial one)
    ("weight requires grad", _with(weight=torch.rand(K, requires_grad=True)), ValueError, "weight"),
    ("prior requires grad", _with(smoothing_prior=torch.full((K,), 0.2, requires_grad=True)), ValueError,
     "smoothing_prior"),
    # probability (soft) targets: a float target of the input's shape
    ("soft target shape (N, K+1)", _soft(target=torch.rand(4, K + 1)), RuntimeError, "input's shape"),
    ("soft target (N, K, 1)", _soft(target=torch.rand(4, K, 1)), RuntimeError, "input's shape"),
    ("soft target (K,) for (N, K)", _soft(target=torch.rand(K)), RuntimeError, "input's shape"),
    ("soft (1, K) target, 1-D input", _soft(input=torch.randn(K), target=torch.rand(1, K)), RuntimeError,
     "input's shape"),
    ("soft 3-D target transposed", _soft(input=torch.randn(4, K, 3), target=torch.rand(4, 3, K)), RuntimeError,
     "input's shape"),
    ("soft ignore_index 0", _soft(ignore_index=0), RuntimeError, "ignore_index"),
    ("soft ignore_index 7", _soft(ignore_index=7), RuntimeError, "ignore_index"),
    ("soft ignore_index 1.5", _soft(ignore_index=1.5), TypeError, "ignore_index"),
    ("soft smoothing_prior", _soft(smoothing_prior=torch.full((K,), 1.0 / K)), RuntimeError, "smoothing_prior"),
    ("soft target on meta", _soft(target=torch.rand(4, K, device="meta")), RuntimeError, "target is on meta"),
    ("soft integer logits", _soft(input=torch.ones(4, K, dtype=torch.int64)), TypeError, "input"),
    ("soft weight length", _soft(weight=torch.rand(K + 1)), ValueError, "weight"),
    ("soft weight requires grad", _soft(weight=torch.rand(K, requires_grad=True)), ValueError, "weight"),
    ("soft eps above 1", _soft(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("soft reduction", _soft(reduction="avg"), ValueError, "reduction"),
    ("soft z_loss negative", _soft(z_loss=-1.0), ValueError, "z_loss"),
    ("soft softcap zero", _soft(softcap=0.0), ValueError, "softcap"),
    ("soft backend", _soft(backend="cuda"), ValueError, "backend"),
    ("soft out_dtype integer", _soft(out_dtype=torch.int64), TypeError, "out_dtype"),
]

MODULE_ARGS = ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing", "z_loss", "softcap",
               "smoothing_prior", "return_lse", "backend")
CALLERS = ["auto", "cpu", "torch"] + (["triton"] if HAVE_TRITON else []) + ["module"]
# Calls known to fail a check, with why; strict: the marker goes once lsce is fixed.
def _calls():
    """Each bad call made through lsce.cross_entropy with each backend and, where it
    takes every argument of the call, through lsce.CrossEntropyLoss."""
    for name, kwargs, exc, text in BAD_CALLS:
        for caller in CALLERS:
            if caller == "module" and not set(kwargs) - {"input", "target"} <= set(MODULE_ARGS):
                continue
            yield pytest.param(kwargs, exc, text, caller, id=f"{name}-{caller}")


def _module_call(input, target, **ctor):
    # Either the constructor or the call may raise; neither may run a kernel.
    return lsce.CrossEntropyLoss(**ctor)(input, target)


_TORCH_ARGS = {"input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"}


_LSCE_ONLY = object()


def _torch_outcome(kwargs):
    """What F.cross_entropy raises for the same call (None where it takes the call or
    the call has lsce's own arguments); lsce's exception must be an instance of its type,
    so code that catches PyTorch's errors catches lsce's. The table's uniform
    smoothing_prior is PyTorch's own smoothing."""
    prior = kwargs.get("smoothing_prior")
    if (torch.is_tensor(prior) and not prior.requires_grad and prior.shape == (K,) and prior.device.type == "cpu"
            and torch.equal(prior, torch.full((K,), 1.0 / K))):
        kwargs = {k: v for k, v in kwargs.items() if k != "smoothing_prior"}
    if not set(kwargs) <= _TORCH_ARGS:
        return _LSCE_ONLY
    target = kwargs.get("target")
    if torch.is_tensor(target) and target.dtype in (torch.int32, torch.int16, torch.int8):
        kwargs = dict(kwargs, target=target.long())  # lsce takes these dtypes; compare the values' error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # size_average / reduce
            F.cross_entropy(**{k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    except Exception as e:  # noqa: BLE001 (any type PyTorch raises is the expectation)
        return e
    return None


def _torch_error(kwargs):
    outcome = _torch_outcome(kwargs)
    return None if outcome is _LSCE_ONLY else outcome


@pytest.mark.parametrize("kwargs,exc,text,caller", list(_calls()))
def test_bad_input_raises_before_any_kernel_and_changes_nothing(kwargs, exc, text, caller, monkeypatch):
    torch_error = _torch_error(kwargs)
    kwargs = dict(kwargs)
    if caller != "module":
        kwargs.setdefault("backend", caller)
    call = _module_call if caller == "module" else lsce.cross_entropy
    err = assert_raises_and_changes_nothing(call, kwargs, exc, text, monkeypatch)
    if torch_error is not None:
        assert isinstance(err, type(torch_error)), f"PyTorch raises {torch_error!r}, lsce {err!r}"


# Calls of the table that F.cross_entropy takes and lsce refuses, each with why
# (README, "Differences from PyTorch").
ACCEPTED_BY_PYTORCH = {
    "eps negative": "a negative smoothing is no smoothing PyTorch documents ([0, 1]); nn.LinearCrossEntropyLoss refuses it",
    "eps NaN": "PyTorch computes a NaN loss",
    "reduction elementwise_mean": "a name deprecated since PyTorch 0.4",
    "1-D input, 1-D target": "PyTorch reads (K,) logits with a (1,) target as one row; lsce wants the target's shape ()",
    "soft smoothing_prior": "lsce's own prior has no meaning beside a probability target: mix it into the target",
}


def test_pytorch_refuses_the_rest_of_the_table():
    """The type comparison above runs for every call PyTorch can take except the listed ones."""
    comparable = {name: kw for name, kw, _, _ in BAD_CALLS if _torch_outcome(kw) is not _LSCE_ONLY}
    accepted = {name for name, kw in comparable.items() if _torch_error(kw) is None}
    assert accepted == set(ACCEPTED_BY_PYTORCH)
    assert len(comparable) > 50


@pytest.mark.parametrize("name", ["weight", "reduction", "label_smoothing", "z_loss", "softcap", "backend",
                                  "ignore_index", "out_dtype", "smoothing_prior"])
def test_module_checks_settings_at_construction_with_the_call_message(name):
    bad = {"weight": torch.rand(K, 1), "reduction": "avg", "label_smoothing": 2.0, "z_loss": -1.0, "softcap": 0.0,
           "backend": "gpu", "ignore_index": 1.5, "out_dtype": torch.int32,
           "smoothing_prior": torch.ones(K, dtype=torch.int64)}[name]
    with pytest.raises(Exception) as at_call:
        lsce.cross_entropy(**_with(**{name: bad}))
    with pytest.raises(type(at_call.value)) as at_construction:
        lsce.CrossEntropyLoss(**{name: bad})
    assert str(at_construction.value) == str(at_call.value)


@pytest.mark.parametrize("legacy", [dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)],
                         ids=["size_average", "reduce", "both"])
def test_deprecated_reduction_arguments_like_torch(legacy):
    """size_average / reduce: PyTorch's meaning and its deprecation warning, function and module."""
    kw = _with(label_smoothing=0.1)
    kw.pop("smoothing_prior")
    with pytest.warns(UserWarning, match="deprecated"):
        expected = F.cross_entropy(**kw, **legacy)
    with pytest.warns(UserWarning, match="deprecated"):
        torch.testing.assert_close(lsce.cross_entropy(**kw, **legacy), expected)
    with pytest.warns(UserWarning, match="deprecated"):
        module = lsce.CrossEntropyLoss(kw.pop("weight"), **legacy, label_smoothing=0.1)
    torch.testing.assert_close(module(kw["input"], kw["target"]), expected)


@pytest.mark.parametrize("ignore_index", [-100, -1, np.int64(-5)])
def test_soft_negative_ignore_index_accepted_like_torch(ignore_index):
    """PyTorch refuses only an ignore_index >= 0 with probability targets; a negative one is unused."""
    x, t = torch.randn(4, K), torch.softmax(torch.randn(4, K), 1)
    torch.testing.assert_close(lsce.cross_entropy(x, t, ignore_index=ignore_index),
                               F.cross_entropy(x, t, ignore_index=int(ignore_index)))


@pytest.mark.parametrize("base", [_with, _soft], ids=["index", "soft"])
def test_valid_call_changes_nothing(base):
    """The bad calls' bases (class indices; probability targets) are valid and change nothing."""
    kw = base(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    x = kw["input"].clone().requires_grad_(True)
    kw["input"] = x
    before = {k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}
    lsce.cross_entropy(**kw).backward()
    for k, v in before.items():
        assert torch.equal(kw[k].detach(), v), f"{k} was modified"
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("ignore_index", [np.int64(2), torch.tensor(2), 2], ids=["numpy", "tensor", "int"])
def test_integer_like_ignore_index_accepted_like_torch(ignore_index):
    x = torch.randn(4, K)
    t = torch.tensor([0, 2, 4, 2])
    torch.testing.assert_close(lsce.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=0.1),
                               F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=0.1))


def test_input_requiring_grad_unchanged_after_error():
    x = torch.randn(4, K, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(IndexError):
        lsce.cross_entropy(x, torch.tensor([0, 1, 2, 7]), label_smoothing=0.1)
    assert torch.equal(x.detach(), before) and x.grad is None
