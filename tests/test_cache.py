"""lsce's cache of freed CPU gradients (lsce/cache.py): a gradient still in use
is never handed out again, a freed one is reused, and reused memory holds
exactly the new gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lsce
from lsce import cache

from _util import loss_and_grad, make_problem

SHAPE = (64, 8192)  # 2 MiB in fp32: above the size the cache starts at


def _grad(logits, target, **kw):
    return loss_and_grad(lsce.cross_entropy, logits, target, label_smoothing=0.1, **kw)[1]


@pytest.fixture(autouse=True)
def fresh_cache():
    old = cache.set_limit(4 << 30)  # the default, whatever LSCE_GRAD_CACHE_MB says
    lsce.empty_cache()
    yield
    cache.set_limit(old)
    lsce.empty_cache()


def _poison_reused_memory(nbytes):
    """Leaves a freed, NaN-filled buffer of nbytes in the cache: the next
    gradient of that size is written over it."""
    stale = cache.empty((nbytes // 4,), torch.float32)
    stale.fill_(float("nan"))
    ptr = stale.data_ptr()
    del stale
    return ptr


def _reference_grad(logits, target, upstream=None, **kw):
    return loss_and_grad(F.cross_entropy, logits.double(), target, upstream, label_smoothing=0.1, **kw)[1]


def test_gradient_in_use_is_not_handed_out_again():
    logits, target = make_problem(SHAPE, torch.float32)
    g1 = _grad(logits, target)
    before = g1.clone()
    g2 = _grad(2 * logits, target)
    assert g2.data_ptr() != g1.data_ptr()
    assert torch.equal(g1, before)


def test_a_view_keeps_the_memory_in_use():
    logits, target = make_problem(SHAPE, torch.float32)
    g1 = _grad(logits, target)
    ptr, row = g1.data_ptr(), g1[5:7].clone()
    view = g1[5:7]
    del g1
    g2 = _grad(3 * logits, target)
    assert g2.data_ptr() != ptr
    assert torch.equal(view, row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_freed_gradient_is_reused_and_fully_overwritten(dtype):
    logits, target = make_problem(SHAPE, dtype, ignore_frac=0.3)
    g1 = _grad(logits, target)
    ptr = g1.data_ptr()
    g1.fill_(float("nan"))  # stale values must not survive into the next gradient
    del g1
    assert cache.cached_bytes() >= SHAPE[0] * SHAPE[1] * dtype.itemsize
    other = make_problem(SHAPE, dtype, ignore_frac=0.3, seed=7)[0]
    g2 = _grad(other, target)
    assert g2.data_ptr() == ptr
    want = _reference_grad(other, target)
    torch.testing.assert_close(g2.double(), want, rtol=0, atol=4 * 2.0 ** -8 * want.abs().max().item())


def test_smaller_gradient_reuses_a_larger_buffer_and_larger_does_not():
    logits, target = make_problem(SHAPE, torch.float32)
    g1 = _grad(logits, target)
    ptr = g1.data_ptr()
    del g1
    g2 = _grad(logits[:60], target[:60])  # 94% of the buffer
    assert g2.data_ptr() == ptr and g2.shape == (60, SHAPE[1])
    del g2
    big, big_target = make_problem((70, SHAPE[1]), torch.float32)
    assert _grad(big, big_target).data_ptr() != ptr


def test_limit_zero_keeps_nothing_and_empty_cache_frees():
    logits, target = make_problem(SHAPE, torch.float32)
    del_me = _grad(logits, target)
    del del_me
    assert cache.cached_bytes() > 0
    lsce.empty_cache()
    assert cache.cached_bytes() == 0
    old = cache.set_limit(0)
    try:
        g = _grad(logits, target)
        del g
        assert cache.cached_bytes() == 0
    finally:
        cache.set_limit(old)
    with pytest.raises(ValueError, match="cache limit"):
        cache.set_limit(-1)


def test_cached_gradients_accumulate_into_grad_and_behave_as_tensors():
    logits, target = make_problem(SHAPE, torch.float32)
    x = logits.clone().requires_grad_()
    for _ in range(3):
        lsce.cross_entropy(x, target, label_smoothing=0.1).backward()
    want = 3 * _grad(logits, target)
    torch.testing.assert_close(x.grad, want)
    x.grad.mul_(0.5).add_(1.0)  # in place on the .grad autograd kept
    assert x.grad.is_contiguous() and x.grad.shape == SHAPE
    x.grad = None


@pytest.mark.parametrize("shape", [SHAPE, (8, 65536)], ids=["rows", "split-rows"])
def test_reused_memory_fully_overwritten_by_the_backward_kernel(shape):
    """reduction='none' with a random upstream: the backward kernel (not the
    fused forward) writes the gradient, on whole rows and on rows split
    across threads."""
    logits, target = make_problem(shape, torch.float32, ignore_frac=0.25)
    upstream = torch.randn(shape[0], dtype=torch.float64)
    ptr = _poison_reused_memory(shape[0] * shape[1] * 4)
    x = logits.detach().requires_grad_()
    (g,) = torch.autograd.grad(lsce.cross_entropy(x, target, label_smoothing=0.1, reduction="none"), x,
                               upstream.float())
    assert g.data_ptr() == ptr
    want = _reference_grad(logits, target, upstream, reduction="none")
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-6)


def test_split_rows_fused_step_overwrites_reused_memory():
    logits, target = make_problem((8, 65536), torch.float32, ignore_frac=0.25)
    ptr = _poison_reused_memory(8 * 65536 * 4)
    g = _grad(logits, target)
    assert g.data_ptr() == ptr
    torch.testing.assert_close(g.double(), _reference_grad(logits, target), rtol=1e-4, atol=1e-7)


def test_memory_held_through_numpy_is_not_handed_out():
    logits, target = make_problem(SHAPE, torch.float32)
    g1 = _grad(logits, target)
    arr = g1.numpy()
    before = arr.copy()
    del g1
    g2 = _grad(2 * logits, target)
    assert g2.data_ptr() != arr.ctypes.data
    assert (arr == before).all()


def test_last_reference_dropped_on_another_thread():
    import threading

    logits, target = make_problem(SHAPE, torch.float32)
    box = [_grad(logits, target)]
    ptr = box[0].data_ptr()
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert _grad(logits, target).data_ptr() == ptr


@pytest.mark.parametrize("value", ["-3", "inf", "-inf", "nan", "lots"])
def test_environment_limit_is_checked(monkeypatch, value):
    monkeypatch.setenv("LSCE_GRAD_CACHE_MB", value)
    with pytest.raises(ValueError, match="LSCE_GRAD_CACHE_MB must be a finite number"):
        cache._limit_from_environment()


def test_bad_environment_limit_fails_at_import():
    """Where it is read: `import lsce`, not the first large gradient mid-training."""
    env = {**os.environ, "LSCE_GRAD_CACHE_MB": "inf"}
    run = subprocess.run([sys.executable, "-c", "import lsce"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "LSCE_GRAD_CACHE_MB must be a finite number" in run.stderr


def test_environment_limit_zero_turns_the_cache_off(monkeypatch):
    monkeypatch.setenv("LSCE_GRAD_CACHE_MB", "0")
    monkeypatch.setattr(cache, "_env_limit", cache._limit_from_environment())
    monkeypatch.setattr(cache, "_configured", False)
    cache.cached_bytes()
    logits, target = make_problem(SHAPE, torch.float32)
    g = _grad(logits, target)
    del g
    assert cache.cached_bytes() == 0
