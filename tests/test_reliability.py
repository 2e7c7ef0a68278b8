"""Reliability: no wrong answer, no crash, no corruption, under any input
(bad input, raised before any kernel runs, is tests/test_errors.py's).

* Inputs PyTorch accepts that once went wrong: strided targets, overlapping
  rows (expanded logits), an empty batch with a large vocabulary, NaN runs,
  +inf logits, ignored rows holding NaN, all rows ignored, K = 1 with odd
  strides — each checked against F.cross_entropy.
* Precision relative to the row max (issue 15): rows at large offsets
  (randn + 1e6), rows of −1e30 (and mixed with finite ones), logits near the
  dtype's largest finite value, confident rows with mixed-sign class weights —
  loss, gradient and gradient row sums no further from the fp64 truth than
  PyTorch, on every backend, reduction and option.
* More than 2³¹ logits (int64 offsets), bf16 on CPU.
* Concurrency: Python threads calling lsce at once give the serial results;
  results are bitwise the same from run to run and for 1..4 torch threads;
  the kernels run without the GIL.
"""

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lsce  # noqa: E402
from lsce import _C, reference  # noqa: E402
from _util import (  # noqa: E402
    ULP, assert_close_to_truth, assert_like_torch, assert_no_worse_than_torch, fp64, loss_and_grad,
    loss_lse_and_grad, make_options, make_problem, torch_composed, torch_cross_entropy, torch_supports, truth, upstream_for,
)

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

BACKENDS = ["cpu", "torch"] + (["triton"] if HAVE_TRITON else [])


def test_hypothesis_is_installed():
    """tests/test_properties.py skips itself without hypothesis; the suite must not."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        pytest.fail("hypothesis is not installed, so tests/test_properties.py was skipped: "
                    "pip install '.[test]' (or pip install hypothesis)")


# ======================================================== precision relative to the row max (issue 15)

# ε and the options of each check (make_options' names); every one meets every input below.
PRECISION_OPTIONS = [
    (0.0, ()), (0.1, ()), (0.1, ("weight",)), (0.1, ("z_loss",)), (0.1, ("softcap",)), (0.1, ("prior",)),
    (0.1, ("weight", "z_loss", "softcap", "prior")),
]
# Interpreted Triton is slow: it runs the first two and the last.
TRITON_PRECISION_OPTIONS = [PRECISION_OPTIONS[i] for i in (0, 1, -1)]


def _precision_input(kind, dtype, N, K, seed=0):
    """Logits (N, K) in dtype and targets (a quarter of the rows ignored) for one input kind."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=gen, dtype=torch.float64) * 3
    top = float(torch.finfo(dtype).max)
    if kind.startswith("offset"):  # randn + c: an absolute lse rounded to fp32 costs p up to ulp(c)
        x = x + float(kind[len("offset"):])
    elif kind == "minus_1e30":  # masking: every logit −1e30 (PyTorch: loss log K, p = 1/K)
        x = torch.full_like(x, -1e30)
    elif kind == "mixed_1e30":  # −1e30 in part of each row, ordinary logits elsewhere
        x[:, ::2] = -1e30
    elif kind == "near_max":  # within 10% of the dtype's largest finite value; row 0 all the same
        x = top * (0.9 + 0.05 * torch.rand(N, K, generator=gen, dtype=torch.float64))
        x[0] = 0.9 * top
    y = torch.randint(0, K, (N,), generator=gen)
    if kind == "mixed_1e30":
        y = y // 2 * 2 + 1  # a finite target logit
    y[3::4] = -100  # (row 0, the all-equal one near the max, is not ignored)
    return x.to(dtype), y


def _precision_check(backend, x, t, reduction, kw):
    """lsce (backend) no further from the fp64 truth than PyTorch at the same
    dtype (F.cross_entropy, or tests/_util.torch_composed for lsce's options):
    loss, gradient and each row's gradient sum; finite wherever the truth and
    PyTorch are."""
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    up = upstream_for(t, reduction).to(acc)
    loss, grad = loss_and_grad(lsce.cross_entropy, x, t, up, backend=backend, reduction=reduction, **kw)
    t_loss, t_grad = truth(x, t, up.double(), reduction=reduction, **kw)
    torch_fn = torch_cross_entropy if torch_supports(kw) else torch_composed
    p_loss, p_grad = loss_and_grad(torch_fn, x, t, up, reduction=reduction, **kw)
    for what, ours, theirs, exact in (("loss", loss, p_loss, t_loss), ("grad", grad, p_grad, t_grad),
                                      ("grad row sums", grad.double().sum(1), p_grad.double().sum(1),
                                       t_grad.sum(1))):
        overflow = torch.isfinite(exact) & ~torch.isfinite(ours.double()) & torch.isfinite(theirs.double())
        assert not overflow.any(), f"{what}: not finite where the truth and PyTorch are: {ours[overflow][:4]}"
        if what == "grad row sums":
            # A few ulps per element (its exp and its rounding to the dtype) may
            # add up along the row, and the true-class element cancels terms as
            # large as the row's upstream times its class weight.
            w = kw["weight"].abs().max().item() if "weight" in kw else 1.0
            terms = t_grad.abs().sum(1) + up.double().abs().expand(t_grad.shape[0]) * w
            slack = 4 * ULP[dtype] * terms + 1e-30
            ours_err, theirs_err = (ours - exact).abs(), (theirs - exact).abs()
            bad = ours_err > theirs_err + slack
            assert not bad.any(), f"{what}: lsce error {ours_err[bad][:4].tolist()} > torch error " \
                                  f"{theirs_err[bad][:4].tolist()} (+ {slack[bad][:4].tolist()})"
        else:
            fin = torch.isfinite(exact)
            assert_no_worse_than_torch(ours.double()[fin], theirs.double()[fin], exact[fin], dtype, what=what)


PRECISION_INPUTS = (
    [(f"offset{c:g}", d) for c in (1e2, 1e4, 1e6) for d in (torch.float32, torch.float64, torch.bfloat16)]
    + [(k, d) for k in ("minus_1e30", "mixed_1e30") for d in (torch.float32, torch.float64, torch.bfloat16)]
    + [("near_max", d) for d in (torch.float32, torch.bfloat16, torch.float16)]
)


def _precision_cases(backends):
    for backend in backends:
        for kind, dtype in PRECISION_INPUTS:
            for eps, names in (TRITON_PRECISION_OPTIONS if backend == "triton" else PRECISION_OPTIONS):
                if kind == "near_max" and "z_loss" in names:
                    continue  # lse² is beyond every dtype's range there (and beyond PyTorch's)
                for reduction in ("none", "mean"):
                    yield pytest.param(backend, kind, dtype, eps, names, reduction,
                                       id=f"{backend}-{kind}-{str(dtype)[6:]}-eps{eps}-{'+'.join(names) or 'plain'}-"
                                          f"{reduction}")


@pytest.mark.parametrize("backend,kind,dtype,eps,names,reduction", list(_precision_cases(BACKENDS)))
def test_precision_relative_to_row_max(backend, kind, dtype, eps, names, reduction):
    """The issue-15 inputs on (8, 100) rows; the C++ kernel's multi-block rows
    in the next test."""
    x, t = _precision_input(kind, dtype, 8, 100)
    kw = dict(make_options(100, names), label_smoothing=eps)
    _precision_check(backend, x, t, reduction, kw)


@pytest.mark.parametrize("kind", ["offset1e6", "mixed_1e30", "near_max"])
@pytest.mark.parametrize("names", [(), ("weight", "z_loss", "softcap", "prior")], ids=lambda n: "+".join(n) or "plain")
@pytest.mark.parametrize("shape", [(3, 9000), (2, 20000)], ids=["blocks", "split-rows"])
def test_precision_relative_to_row_max_long_rows(shape, names, kind):
    """Rows of several 4096-element blocks and split rows (C++): the max moves
    between blocks, and each block's Σc·(max − z) is moved to the row's max."""
    if kind == "near_max" and "z_loss" in names:
        names = ("weight", "softcap", "prior")
    x, t = _precision_input(kind, torch.float32, *shape, seed=1)
    kw = dict(make_options(shape[1], names), label_smoothing=0.1)
    _precision_check("cpu", x, t, "none", kw)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("names", [("weight",), ("weight", "z_loss", "softcap", "prior")], ids="+".join)
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_rows_with_mixed_sign_weights(backend, offset, names, eps):
    """Near p_y ≈ 1 the per-row loss is small, and with class weights of both
    signs the true-class and smoothing terms cancel: the issue measured a row
    loss of −0.0078753 come out −0.0078728 in fp32 (PyTorch: 1.2e-7 off) when it
    was formed as lse − z_y. (m − z_y) + log_s keeps it exact."""
    N, K = 16, 100
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, K, generator=gen, dtype=torch.float64) + offset
    t = torch.randint(0, K, (N,), generator=gen)
    x[torch.arange(N), t] += 10 + 4 * torch.rand(N, generator=gen, dtype=torch.float64)  # 1 − p_y ≈ 1e-4 .. 4e-3
    kw = dict(make_options(K, names), label_smoothing=eps)
    kw["weight"] = torch.rand(K, generator=gen, dtype=torch.float64) * 2 - 1
    for dtype in (torch.float32, torch.float64):
        _precision_check(backend, x.to(dtype), t, "none", kw)


# ======================================================== inputs that once went wrong


def _like_torch(x, t, backend, up=None, **kw):
    """lsce (backend) against F.cross_entropy in fp64 on the same values."""
    red = kw.get("reduction", "mean")
    if up is None:
        up = torch.linspace(-1, 2, t.numel(), dtype=torch.float64).reshape(t.shape) if red == "none" else \
            torch.tensor(1.5, dtype=torch.float64)
    # (loss_and_grad's leaf is a view of x: its strides, even 0, are what lsce gets.)
    ours = loss_and_grad(lsce.cross_entropy, x, t, up, backend=backend, **kw)
    theirs = loss_and_grad(F.cross_entropy, x.double(), t.long(), up, **fp64(kw))
    for what, a, b in zip(("loss", "grad"), ours, theirs):
        assert_like_torch(a, b, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_target(backend):
    """A target that is a strided view: the kernels read target[i] with unit stride;
    (N, 2)[:, 0] held the other column's values, out-of-range ones included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g)
    both = torch.tensor([[1, 9999], [2, -100], [3, 77], [4, -5], [5, 10**9], [6, 8]])
    t = both[:, 0]
    assert t.stride() == (2,)
    for red in ["none", "sum", "mean"]:
        _like_torch(x, t, backend, reduction=red, label_smoothing=0.1)
    # 3-D input with a strided (N, d) target
    x3 = torch.randn(3, 10, 4, generator=g)
    t3 = torch.randint(0, 10, (3, 8), generator=g)[:, ::2]
    _like_torch(x3, t3, backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_rows(backend):
    """Logits whose rows share memory (row stride 0 from expand, 1 from unfold) are
    valid PyTorch input; lsce raised "bad sizes or row stride"."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, 3, 4])
    expanded = torch.randn(10, generator=g).expand(4, 10)
    sliding = torch.randn(13, generator=g).unfold(0, 10, 1)  # (4, 10), strides (1, 1)
    assert expanded.stride() == (0, 1) and sliding.stride() == (1, 1)
    for x in (expanded, sliding):
        for red in ["none", "mean"]:
            _like_torch(x, t, backend, reduction=red, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_class_with_any_strides(backend):
    """K = 1: every stride of the class dimension is valid (Triton refused a stride != 1)."""
    t = torch.zeros(4, dtype=torch.long)
    for x in (torch.randn(1, 4).t(), torch.randn(4, 3)[:, 1:2], torch.randn(0, 1) * 3):
        tt = t[: x.shape[0]]
        for red in ["none", "sum"]:
            _like_torch(x, tt, backend, reduction=red, label_smoothing=0.1)


def test_empty_batch_with_large_vocabulary_does_not_crash():
    """N = 0 rows and K >= 2·8192: blocks_per_row divided by N (SIGFPE). In a child
    process, so that a crash fails this test instead of killing the test run."""
    code = textwrap.dedent("""
        import torch, lsce
        for K in [16383, 16384, 16385, 70000]:
            for red in ["none", "sum", "mean"]:
                x = torch.randn(0, K, requires_grad=True)
                loss = lsce.cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction=red,
                                          label_smoothing=0.1, backend="cpu")
                loss.sum().backward()
                assert x.grad.shape == (0, K)
                print(K, red, loss.item() if loss.numel() == 1 else tuple(loss.shape), flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0, f"child exited with {r.returncode} (-8 is SIGFPE):\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_runs_are_not_dropped(backend):
    """A row whose NaNs fill whole 4096-element blocks of the C++ kernel gave a finite
    loss (the block's max is -inf, so its NaN sum was skipped); an all-NaN row gave lse -inf."""
    if backend == "triton":
        K_, split = 40, 20     # the interpreter is slow: the same property on a small row
    else:
        K_, split = 5000, 4096
    x = torch.randn(3, K_)
    x[0, :split] = float("nan")                          # target in the finite part
    x[1, :] = float("nan")
    x[2, split:] = float("nan")
    t = torch.tensor([K_ - 1, 0, 0])
    for eps in [0.0, 0.1]:
        _like_torch(x, t, backend, reduction="none", label_smoothing=eps)
    _, lse = lsce.cross_entropy(x, t, reduction="none", return_lse=True, backend=backend)
    assert torch.isnan(lse).all(), f"lse of rows holding NaN: {lse.tolist()} (torch.logsumexp: NaN)"
    if backend == "cpu":  # the split-row path (few rows, K >= 2·8192)
        x = torch.randn(2, 40000)
        x[:, 16384:32768] = float("nan")
        _like_torch(x, torch.tensor([5, 39999]), backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logit_gives_nan_row_like_torch(backend):
    """A +inf logit makes PyTorch's log_softmax NaN over the row: loss NaN (not inf when
    ε = 0) and the whole row's gradient NaN (not only at the +inf); lse NaN on every backend."""
    x = torch.randn(3, 17)
    x[0, 4] = float("inf")
    x[1, :] = float("inf")
    t = torch.tensor([0, 3, 5])
    for eps in [0.0, 0.1]:
        for red in ["none", "sum"]:
            _like_torch(x, t, backend, reduction=red, label_smoothing=eps)
    _, lse = lsce.cross_entropy(x, t, reduction="none", return_lse=True, backend=backend)
    assert torch.isnan(lse[:2]).all() and torch.isfinite(lse[2]), lse


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_nan_or_inf_like_torch(backend):
    """PyTorch's gradient of an ignored row is 0·exp(log_softmax): NaN where the row holds
    NaN or +inf, or is all -inf. The C++ kernel wrote zeros there (the reference and
    Triton did not), so the backends disagreed."""
    x = torch.randn(5, 9)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    x[2, :] = float("-inf")
    x[3, 4] = float("-inf")                               # a masked but finite row: 0 gradient
    t = torch.full((5,), -100)
    t[4] = 1
    for red in ["none", "sum", "mean"]:
        _like_torch(x, t, backend, reduction=red, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_mean_gradient(backend):
    """mean over no row is NaN, its gradient 0 as PyTorch's (the reference backend gave
    NaN: g = (1/0)·valid = inf·0)."""
    x = torch.randn(4, 6)
    t = torch.full((4,), -100)
    for w in [None, torch.rand(6) + 0.1]:
        _like_torch(x, t, backend, reduction="mean", label_smoothing=0.1, **({} if w is None else {"weight": w}))


# =========================================================== more than 2**31 logits


@pytest.mark.slow
def test_more_than_2_pow_31_logits_bf16():
    """N·K = 2³¹ + 131072 bf16 logits (4.3 GB; 8.6 GB with the gradient): loss and gradient
    of sampled rows — the last ones entirely past element 2³¹ — against the reference
    on those rows alone."""
    N, K_ = 16385, 131072
    assert N * K_ > 2**31 and (N - 1) * K_ >= 2**31
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, K_, dtype=torch.bfloat16)
    step = 256
    for s in range(0, N, step):  # in place, in row blocks: no fp32/fp64 copy of the whole tensor
        x[s : s + step].normal_(0.0, 3.0, generator=g)
    t = torch.randint(0, K_, (N,), generator=g)
    t[::7] = -100
    rows = torch.tensor([0, 1, 4097, 8192, N - 3, N - 2, N - 1])
    t[N - 1] = K_ - 1                                     # the very last element is the target
    t[N - 2] = 0
    up = torch.randn(N, generator=g)
    opts = dict(label_smoothing=0.1, reduction="none", z_loss=1e-4)
    x.requires_grad_(True)
    try:
        loss = lsce.cross_entropy(x, t, **opts)
        (grad,) = torch.autograd.grad((loss.float() * up).sum(), x)
        got_loss, got_grad = loss[rows].detach().clone(), grad[rows].clone()
        del grad, loss
    finally:
        x.requires_grad_(False)
    sub = x[rows].clone()
    del x
    gc.collect()
    xs = sub.double().requires_grad_(True)
    ref = reference.cross_entropy(xs, t[rows], **opts)
    (ref_grad,) = torch.autograd.grad((ref * up[rows].double()).sum(), xs)
    assert_close_to_truth(got_loss, ref.detach(), torch.bfloat16, what="loss")
    assert_close_to_truth(got_grad, ref_grad, torch.bfloat16, what="grad")


# ===================================================================== concurrency


def _problems():
    """Problems that take each path of the C++ kernel: many rows, split rows, options."""
    out = []
    for i, (shape, dtype, opts) in enumerate([
        ((300, 3000), torch.float32, {}),
        ((4, 70000), torch.float32, {"z_loss": 1e-3}),                    # split rows
        ((2, 16385), torch.bfloat16, {"softcap": 20.0}),                 # split rows, just
        ((64, 4097), torch.float16, {"weight": True}),
        ((37, 129), torch.float64, {"prior": True, "z_loss": 0.1}),
        ((1000, 33), torch.bfloat16, {"weight": True, "prior": True, "softcap": 5.0}),
    ]):
        x, t = make_problem(shape, dtype, ignore_frac=0.1, seed=i)
        kw = {"label_smoothing": 0.1}
        K_ = shape[1]
        if opts.pop("weight", False):
            kw["weight"] = torch.rand(K_, generator=torch.Generator().manual_seed(i)) + 0.1
        if opts.pop("prior", False):
            p = torch.rand(K_, generator=torch.Generator().manual_seed(i + 100)) + 0.1
            kw["smoothing_prior"] = p / p.sum()
        kw.update(opts)
        out.append((x, t, kw))
    return out


def _compute(x, t, kw, reduction):
    """(loss, lse, gradient) of one call; the upstream of reduction='none' is a ramp."""
    up = torch.linspace(-1, 1, t.numel()).reshape(t.shape).to(x.dtype) if reduction == "none" else None
    return loss_lse_and_grad(lsce.cross_entropy, x, t, up, reduction=reduction, return_lse=True, **kw)


def _bits(u):
    return u.detach().contiguous().reshape(-1).view(torch.uint8)


def _bitwise_equal(a, b):
    return all(u.dtype == v.dtype and u.shape == v.shape and torch.equal(_bits(u), _bits(v)) for u, v in zip(a, b))


def test_python_threads_give_serial_results():
    problems = _problems()
    jobs = [(i, red) for i in range(len(problems)) for red in ("none", "mean")]
    serial = {job: _compute(*problems[job[0]], job[1]) for job in jobs}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(job, pool.submit(_compute, *problems[job[0]], job[1])) for job in jobs * 3]
        for job, f in futures:
            assert _bitwise_equal(f.result(), serial[job]), f"thread result differs for problem {job}"


def test_bitwise_identical_across_runs_and_thread_counts():
    before = torch.get_num_threads()
    problems = _problems()
    try:
        results = {}
        for n in [1, 2, 3, 4, 2]:
            torch.set_num_threads(n)
            for i, (x, t, kw) in enumerate(problems):
                for red in ("none", "sum", "mean"):
                    r = _compute(x, t, kw, red)
                    if (i, red) in results:
                        assert _bitwise_equal(r, results[(i, red)]), f"{n} threads: problem {i} {red} differs"
                    else:
                        results[(i, red)] = r
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("weighted", [False, True])
def test_reduction_over_many_rows_independent_of_thread_count(weighted):
    """More than 32768 rows: torch.sum splits its input across threads, so a mean or sum
    taken with loss.sum() changed in the last bits with the thread count — and so did the
    gradient under a weighted mean (its divisor is such a sum)."""
    x, t = make_problem((100003, 3), torch.float32, ignore_frac=0.1, seed=5)
    kw = {"label_smoothing": 0.1}
    if weighted:
        kw["weight"] = torch.tensor([0.3, 1.7, 0.9])
    before = torch.get_num_threads()
    results = []
    try:
        for n in [1, 2, 3, 4]:
            torch.set_num_threads(n)
            results.append([_compute(x, t, kw, red) for red in ("sum", "mean")])
    finally:
        torch.set_num_threads(before)
    for n, r in zip([2, 3, 4], results[1:]):
        for red, a, b in zip(("sum", "mean"), r, results[0]):
            assert _bitwise_equal(a, b), f"{red} with {n} threads differs from 1 thread: {a[0].item()!r} vs {b[0].item()!r}"


def test_kernels_release_the_gil():
    """While one thread is inside the C++ kernel, another runs Python: the binding
    releases the GIL. (Counts loop iterations, not time: no speed is asserted.)"""
    x = torch.randn(2048, 32000)
    t = torch.randint(0, 32000, (2048,))
    loss, m, log_s = torch.empty(2048), torch.empty(2048), torch.empty(2048)
    args = dict(dtype=0, logits=x.data_ptr(), N=2048, K=32000, row_stride=32000, target=t.data_ptr(),
                ignore_index=-100, weight=0, c=0, C=1.0, uniform_over=32000, eps=0.1, z_loss=0.0, softcap=0.0,
                loss=loss.data_ptr(), m=m.data_ptr(), log_s=log_s.data_ptr(), nthreads=1)
    _C.forward(**args)  # warm

    # Python steps per second on this thread, alone (the same loop as below).
    stop = threading.Event()
    timer = threading.Timer(0.1, stop.set)
    n, t0 = 0, time.perf_counter()
    timer.start()
    while not stop.is_set():
        n += 1
    alone = n / (time.perf_counter() - t0)

    inside = threading.Event()
    done = threading.Event()

    def worker():
        for _ in range(3):
            inside.set()
            _C.forward(**args)
        done.set()

    steps, t_in = 0, 0.0
    th = threading.Thread(target=worker)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        th.start()
        inside.wait()
        t0 = time.perf_counter()
        while not done.is_set():
            steps += 1
        t_in = time.perf_counter() - t0
    finally:
        th.join()
        sys.setswitchinterval(old)
    # With the GIL held for the kernel, this loop would run only between the calls
    # (microseconds of each switch interval); released, at a fair share of its own speed.
    assert t_in > 0 and steps / t_in > 0.1 * alone, (steps, t_in, alone)
