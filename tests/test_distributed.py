"""lsce.distributed on real process groups.

A module fixture spawns W worker processes (gloo on CPU; W = 2 and 4, unequal
slices) that run every option combination, the linear variant and the
mismatch errors in one go and save what each rank got; the tests then compare
each rank's loss and gradient with single-process ``lsce.cross_entropy`` /
``lsce.linear_cross_entropy`` on the full problem and with the fp64 reference.
The workers' slices are column views of the full logits (row stride K, not
K_r), which the kernels read in place. A hang fails the test through gloo's timeout
and the parent's deadline instead of blocking the run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import lsce
from lsce import reference

from _util import (
    assert_close_to_lsce, fp64, linear_loss_and_grads, loss_lse_and_grad, make_options, make_problem,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared benchmarks/measure.py
from measure import free_port  # noqa: E402

# Unequal slices of K = 37 classes.
WIDTHS = {2: [13, 24], 4: [5, 12, 9, 11]}
ROWS = 20
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
OPTION_SETS = {
    "plain": (),
    "weight": ("weight",),
    "z_loss": ("z_loss",),
    "softcap": ("softcap",),
    "prior": ("prior",),
    "all": ("weight", "prior", "z_loss", "softcap"),
}
SPAWN_DEADLINE_S = 75
GLOO_TIMEOUT_S = 30
HAVE_TRITON = importlib.util.find_spec("triton") is not None



def _cases(world):
    """(name, spec) for every combination run on a group of ``world`` ranks."""
    cases = []
    for dtype in ("fp32", "fp64"):
        for eps in (0.0, 0.1, 1.0):
            for reduction in ("mean", "sum", "none"):
                for opts in OPTION_SETS:
                    cases.append(dict(dtype=dtype, eps=eps, reduction=reduction, opts=opts,
                                      return_lse=opts in ("all", "plain")))
    base = dict(dtype="fp64", eps=0.1, reduction="none", opts="weight", return_lse=False)
    extras = {
        "ignore_index is class 0": dict(ignore_index=0),
        "(B, T, K_r) logits": dict(shape="3d", reduction="mean", opts="all", return_lse=True),
        "zero weight on rank 1's slice": dict(zero_slice="weight", opts="all"),
        "zero weight on rank 1's slice, eps 1": dict(zero_slice="weight", eps=1.0, reduction="sum"),
        "zero prior on rank 1's slice": dict(zero_slice="prior", opts="prior", reduction="mean"),
        "all rows ignored, mean": dict(ignore_all=True, reduction="mean"),
        "all rows ignored, sum": dict(ignore_all=True, reduction="sum", opts="all"),
        "all rows ignored, lse returned": dict(ignore_all=True, reduction="mean", opts="all", return_lse=True),
        "no rows": dict(rows=0, reduction="mean"),
        "no rows, none": dict(rows=0, reduction="none"),
        "int32 target": dict(target_dtype=torch.int32, dtype="fp32"),
        # (lsce.reference computes ε·Σ logp even for ε = 0: 0·(−∞) there, not here.)
        "-inf padding, eps 0": dict(pad_inf=True, eps=0.0, opts="plain", reduction="mean", no_reference=True),
        "bf16": dict(dtype="bf16", opts="all", reduction="mean"),
        "vocab_start_index given": dict(given_starts=True, opts="all", dtype="fp32"),
        # Precision relative to the row max (issue 15): each slice's terms relative to its
        # own max, moved to the global one; never the difference of two absolute lse.
        "rows at offset 1e6": dict(offset=1e6, dtype="fp32", opts="weight"),
        "rows at offset 1e6, every option": dict(offset=1e6, dtype="fp32", opts="all", return_lse=True),
        "rows at offset 1e4, fp64": dict(offset=1e4, opts="prior", reduction="mean"),
        "rows of -1e30 in every other column": dict(minus_1e30="mixed", dtype="fp32", opts="all"),
        "rows of only -1e30": dict(minus_1e30="all", dtype="fp32", opts="prior", return_lse=True),
    }
    if world == 2:
        if HAVE_TRITON:  # the Triton kernels (interpreted on CPU, so few cases): what runs on CUDA
            for dtype in ("fp32", "fp64"):
                for eps, opts in ((0.0, "plain"), (0.1, "weight"), (1.0, "all"), (0.1, "all")):
                    extras[f"triton {dtype} eps={eps} {opts}"] = dict(
                        backend="triton", dtype=dtype, eps=eps, opts=opts, return_lse=opts == "all")
        extras["slices in reverse rank order"] = dict(given_starts="reversed", opts="all")
    for name, change in extras.items():
        cases.append({**base, **change, "name": name})
    return [(c.get("name") or f"{c['dtype']} eps={c['eps']} {c['reduction']} {c['opts']}", c) for c in cases]


def _seed(spec):
    """A seed of its own for each case, the same in every process."""
    return zlib.crc32(repr(sorted(spec.items())).encode())


def _starts(world, order="rank"):
    widths = WIDTHS[world]
    ranks = list(range(world)) if order == "rank" else list(reversed(range(world)))
    starts, s = [0] * world, 0
    for r in ranks:
        starts[r], s = s, s + widths[r]
    return starts


def _problem(world, spec):
    """Full logits, target, keyword options and upstream gradients of one case (same on every process)."""
    widths = WIDTHS[world]
    K = sum(widths)
    dtype = DTYPES[spec["dtype"]]
    ignore_index = spec.get("ignore_index", -100)
    rows = spec.get("rows", ROWS)
    logits, target = make_problem((rows, K), dtype, ignore_index=ignore_index, ignore_frac=0.25, seed=_seed(spec))
    starts = _starts(world, "reversed" if spec.get("given_starts") == "reversed" else "rank")
    if rows:
        # A target in every rank's slice, at both of its ends.
        for r in range(world):
            target[2 * r], target[2 * r + 1] = starts[r], starts[r] + widths[r] - 1
        if ignore_index >= 0:
            target[-1] = ignore_index
            target[-2] = (ignore_index + 1) % K
    if spec.get("ignore_all"):
        target[:] = ignore_index
    if spec.get("offset"):
        logits = logits + spec["offset"]
    if spec.get("minus_1e30") == "mixed":
        logits[:, 1::2] = -1e30
        target = target // 2 * 2  # a finite target logit
    elif spec.get("minus_1e30") == "all":
        logits[:] = -1e30
    if spec.get("pad_inf"):
        logits[:, K - 3:] = float("-inf")
        target = torch.where((target >= K - 3), 0, target)
    kwargs = make_options(K, OPTION_SETS[spec["opts"]])
    kwargs.update(label_smoothing=spec["eps"], reduction=spec["reduction"], ignore_index=ignore_index)
    if spec.get("zero_slice"):
        key = "weight" if spec["zero_slice"] == "weight" else "smoothing_prior"
        v = kwargs.get(key, torch.ones(K, dtype=torch.float64)).clone()
        v[starts[1]:starts[1] + widths[1]] = 0
        kwargs[key] = v / v.sum() if key == "smoothing_prior" else v
    if spec.get("target_dtype"):
        target = target.to(spec["target_dtype"])
    if spec.get("shape") == "3d":
        logits, target = logits.reshape(4, rows // 4, K), target.reshape(4, rows // 4)
    g = torch.Generator().manual_seed(7)
    up_shape = () if spec["reduction"] != "none" else target.shape
    upstream = torch.rand(up_shape, generator=g, dtype=torch.float64) + 0.5
    up_lse = torch.randn(target.shape, generator=g, dtype=torch.float64) if spec["return_lse"] else None
    return logits, target, kwargs, upstream, up_lse, starts


HIDDEN = 8


def _linear_cases():
    """(name, spec) for vocab_parallel_linear_cross_entropy (chunks of 7 rows: 3 chunks of 20)."""
    cases = [dict(dtype=dtype, eps=eps, reduction=reduction, opts=opts)
             for dtype in ("fp32", "fp64") for eps in (0.0, 0.1) for reduction in ("mean", "none")
             for opts in ("plain", "all")]
    cases.append(dict(dtype="fp64", eps=0.1, reduction="sum", opts="weight", reduce_input_grad=False))
    cases.append(dict(dtype="fp64", eps=1.0, reduction="mean", opts="all", no_bias=True))
    return [(f"linear {c['dtype']} eps={c['eps']} {c['reduction']} {c['opts']}"
             + (" own input grad" if "reduce_input_grad" in c else "") + (" no bias" if "no_bias" in c else ""), c)
            for c in cases]


def _linear_problem(world, spec):
    """Hidden states, the full head (K, H) and bias, target, options and upstream of one linear case."""
    K = sum(WIDTHS[world])
    dtype = DTYPES[spec["dtype"]]
    g = torch.Generator().manual_seed(_seed(spec))
    x = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(K, HIDDEN, generator=g, dtype=torch.float64) / 2).to(dtype)
    b = None if spec.get("no_bias") else torch.randn(K, generator=g, dtype=torch.float64).to(dtype)
    _, target = make_problem((ROWS, K), dtype, ignore_frac=0.25, seed=1)
    kwargs = make_options(K, OPTION_SETS[spec["opts"]])
    kwargs.update(label_smoothing=spec["eps"], reduction=spec["reduction"], chunk_size=7)
    upstream = torch.rand(() if spec["reduction"] != "none" else (ROWS,), generator=g, dtype=torch.float64) + 0.5
    return x, W, b, target, kwargs, upstream


# ---------------------------------------------------------------------------
# The worker: one process per rank.

def _error_calls(world, rank):
    """(name, expected exception, text every rank's message has, call) for the mismatch errors."""
    from lsce.distributed import vocab_parallel_cross_entropy as vpce
    from lsce.distributed import vocab_parallel_linear_cross_entropy as vplce

    widths, K = WIDTHS[world], sum(WIDTHS[world])
    start = sum(widths[:rank])
    logits, target = make_problem((ROWS, K), torch.float32, seed=3)
    mine = logits[:, start:start + widths[rank]]
    last = rank == world - 1
    more = torch.cat([mine, mine[:1]]), torch.cat([target, target[:1]])
    shifted = [0] + [sum(widths[:r]) - 1 for r in range(1, world)]
    gap = [0] + [sum(widths[:r]) + 1 for r in range(1, world)]
    bad_prior = torch.full((K,), 2.0 / K)
    return [
        ("rows differ on the last rank", ValueError, "same rows",
         lambda: vpce(*(more if last else (mine, target)))),
        ("slices overlap", ValueError, "do not tile", lambda: vpce(mine, target, vocab_start_index=shifted[rank])),
        ("slices leave a gap", ValueError, "do not tile", lambda: vpce(mine, target, vocab_start_index=gap[rank])),
        ("start given on rank 0 only", ValueError, "vocab_start_index",
         lambda: vpce(mine, target, vocab_start_index=0 if rank == 0 else None)),
        ("weight of the local width", ValueError, "weight",
         lambda: vpce(mine, target, weight=torch.ones(widths[rank]))),
        ("weight length wrong on rank 0", ValueError, "weight",
         lambda: vpce(mine, target, weight=torch.ones(K + (rank == 0)))),
        ("float target on rank 1", TypeError, "",
         lambda: vpce(mine, target.float() if rank == 1 else target)),
        ("dtype differs on rank 0", TypeError, "dtype", lambda: vpce(mine.double() if rank == 0 else mine, target)),
        ("label_smoothing differs", ValueError, "different options",
         lambda: vpce(mine, target, label_smoothing=0.1 if rank == 0 else 0.2)),
        ("target out of range", IndexError, f"target {K}",
         lambda: vpce(mine, torch.where(target == target[0], K, target))),
        ("prior does not sum to 1", ValueError, "smoothing_prior",
         lambda: vpce(mine, target, smoothing_prior=bad_prior)),
        ("bad reduction", ValueError, "reduction", lambda: vpce(mine, target, reduction="avg")),
    ] + ([
        ("linear: hidden size differs on rank 1", ValueError, "features",
         lambda: vplce(torch.randn(ROWS, HIDDEN), torch.randn(widths[rank], HIDDEN + (rank == 1)), target)),
    ])


def _worker(rank, world, port, out_dir):
    from datetime import timedelta

    import torch.distributed as dist

    from lsce.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    widths = WIDTHS[world]
    results = {"cases": {}, "errors": {}}
    for name, spec in _cases(world):
        logits, target, kwargs, upstream, up_lse, starts = _problem(world, spec)
        mine = logits[..., starts[rank]:starts[rank] + widths[rank]]
        before = mine.clone()
        if spec.get("given_starts"):
            kwargs["vocab_start_index"] = starts[rank]
        if spec.get("backend"):
            kwargs["backend"] = spec["backend"]
        try:
            loss, lse, grad = loss_lse_and_grad(vocab_parallel_cross_entropy, mine, target, upstream, up_lse, **kwargs)
            results["cases"][name] = dict(loss=loss, lse=lse, grad=grad, unchanged=torch.equal(before, mine))
        except Exception as e:  # reported by the parent with the case's name
            results["cases"][name] = dict(error=f"{type(e).__name__}: {e}")
    from lsce.distributed import vocab_parallel_linear_cross_entropy

    def linear_on_slice(x, W, target, linear_bias=None, **kwargs):
        """This rank's rows of the full head W (and bias): their gradients come back full-size."""
        cols = slice(starts[rank], starts[rank] + widths[rank])
        bias = None if linear_bias is None else linear_bias[cols]
        return vocab_parallel_linear_cross_entropy(x, W[cols], target, local_linear_bias=bias, **kwargs)

    starts = _starts(world)
    for name, spec in _linear_cases():
        x, W, b, target, kwargs, upstream = _linear_problem(world, spec)
        if "reduce_input_grad" in spec:
            kwargs["reduce_input_grad"] = spec["reduce_input_grad"]
        try:
            loss, grads = linear_loss_and_grads(linear_on_slice, x, W, b, target, upstream, **kwargs)
            gx, gW, gb = (*grads, None)[:3]
            results["cases"][name] = dict(loss=loss, grad_input=gx, grad_weight=gW, grad_bias=gb)
        except Exception as e:
            results["cases"][name] = dict(error=f"{type(e).__name__}: {e}")
    if world == 4:  # two tensor-parallel groups of 2 ranks, each with a problem of its own
        from lsce.distributed import vocab_parallel_cross_entropy as vpce

        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        group, group_rank = pairs[rank // 2], rank % 2
        for name, spec in _subgroup_cases(rank // 2):
            logits, target, kwargs, upstream, up_lse, starts = _problem(2, spec)
            cols = slice(starts[group_rank], starts[group_rank] + WIDTHS[2][group_rank])
            loss, lse, grad = loss_lse_and_grad(vpce, logits[:, cols], target, upstream, up_lse, group=group, **kwargs)
            results["cases"][name] = dict(loss=loss, lse=lse, grad=grad)
    for name, _, _, call in _error_calls(world, rank):
        try:
            call()
            results["errors"][name] = None
        except Exception as e:
            results["errors"][name] = ([c.__name__ for c in type(e).__mro__], str(e))
    # After all the errors the group is still in step: one more good call.
    logits, target = make_problem((ROWS, sum(widths)), torch.float32, seed=5)
    start = sum(widths[:rank])
    results["after errors"] = vocab_parallel_cross_entropy(logits[:, start:start + widths[rank]], target)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(world, tmp_path, module="test_distributed", deadline_s=SPAWN_DEADLINE_S):
    """Runs ``module``'s ``_worker(rank, world, port, out_dir)`` (a test file's)
    on ``world`` processes; returns each rank's results (its rank{r}.pt)."""
    port = free_port()
    here = Path(__file__).resolve().parent
    # The workers import the lsce this process imported, and _util from here.
    paths = [str(here), str(Path(lsce.__file__).resolve().parent.parent)] + [os.path.abspath(p) for p in sys.path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), TRITON_INTERPRET="1")
    code = f"import sys, {module} as t; t._worker(*map(int, sys.argv[1:4]), sys.argv[4])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), str(world), str(port), str(tmp_path)],
                         cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    deadline = time.monotonic() + deadline_s
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"world {world}: the workers did not finish within {deadline_s} s (a hang?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} exited with {p.returncode}:\n{out[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"world{world}"))


# ---------------------------------------------------------------------------
# The comparisons, in the parent.

def test_every_option_matches_single_process(run):
    world, results = run
    widths = WIDTHS[world]
    failures = []
    for name, spec in _cases(world):
        logits, target, kwargs, upstream, up_lse, starts = _problem(world, spec)
        dtype = logits.dtype
        loss, lse, grad = loss_lse_and_grad(lsce.cross_entropy, logits.movedim(-1, 1), target, upstream, up_lse, **kwargs)
        grad = grad.movedim(1, -1)
        t_loss, t_lse, t_grad = loss_lse_and_grad(reference.cross_entropy, logits.double().movedim(-1, 1), target,
                                               upstream, up_lse, **fp64(kwargs))
        t_grad = t_grad.movedim(1, -1)
        try:
            for r, res in enumerate(results):
                got = res["cases"][name]
                assert "error" not in got, got.get("error")
                assert got["unchanged"], "the caller's logits were modified"
                assert got["loss"].dtype == loss.dtype and got["loss"].shape == loss.shape
                assert torch.equal(got["loss"].isnan(), results[0]["cases"][name]["loss"].isnan())
                torch.testing.assert_close(got["loss"], results[0]["cases"][name]["loss"], rtol=0, atol=0,
                                           equal_nan=True, msg="ranks disagree on the loss")
                cols = slice(starts[r], starts[r] + widths[r])
                assert_close_to_lsce(got["loss"], loss, dtype, what=f"rank {r} loss vs lsce")
                assert_close_to_lsce(got["grad"], grad[..., cols], dtype, what=f"rank {r} grad vs lsce")
                if dtype not in (torch.bfloat16, torch.float16) and not spec.get("no_reference"):
                    assert_close_to_lsce(got["loss"], t_loss, dtype, what=f"rank {r} loss vs reference")
                    assert_close_to_lsce(got["grad"], t_grad[..., cols], dtype, what=f"rank {r} grad vs reference")
                if lse is not None:
                    assert_close_to_lsce(got["lse"], lse, torch.float32 if dtype != torch.float64 else dtype, what="lse")
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, f"{len(failures)} of {len(_cases(world))} cases failed:\n" + "\n".join(failures[:10])


def test_linear_matches_single_process(run):
    world, results = run
    widths, starts = WIDTHS[world], _starts(world)
    failures = []
    for name, spec in _linear_cases():
        x, W, b, target, kwargs, upstream = _linear_problem(world, spec)
        loss, grads = linear_loss_and_grads(lsce.linear_cross_entropy, x, W, b, target, upstream, **kwargs)
        gx, gW, gb = (*grads, None)[:3]
        try:
            got = [res["cases"][name] for res in results]
            for r, res in enumerate(got):
                assert "error" not in res, res.get("error")
                cols = slice(starts[r], starts[r] + widths[r])
                assert_close_to_lsce(res["loss"], loss, x.dtype, what=f"rank {r} loss")
                assert_close_to_lsce(res["grad_weight"][cols], gW[cols], x.dtype, what=f"rank {r} weight grad")
                if gb is not None:
                    assert_close_to_lsce(res["grad_bias"][cols], gb[cols], x.dtype, what=f"rank {r} bias grad")
                if spec.get("reduce_input_grad", True):
                    assert_close_to_lsce(res["grad_input"], gx, x.dtype, what=f"rank {r} input grad")
            if not spec.get("reduce_input_grad", True):  # each rank has its share: they add up
                assert_close_to_lsce(sum(res["grad_input"] for res in got), gx, x.dtype, what="input grad shares")
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures[:10])


def _subgroup_cases(pair):
    return [(f"subgroup {pair}, {opts}", dict(dtype="fp64", eps=0.1 * (pair + 1), reduction="none", opts=opts,
                                              return_lse=True)) for opts in ("plain", "all")]


@pytest.mark.parametrize("run", [4], indirect=True, ids=["world4"])
def test_process_subgroups(run):
    """The 4-rank group split in two 2-rank subgroups, each its own vocabulary split."""
    world, results = run
    for pair in (0, 1):
        for name, spec in _subgroup_cases(pair):
            logits, target, kwargs, upstream, up_lse, starts = _problem(2, spec)
            loss, lse, grad = loss_lse_and_grad(lsce.cross_entropy, logits, target, upstream, up_lse, **kwargs)
            for group_rank in (0, 1):
                got = results[2 * pair + group_rank]["cases"][name]
                cols = slice(starts[group_rank], starts[group_rank] + WIDTHS[2][group_rank])
                assert_close_to_lsce(got["loss"], loss, logits.dtype, what=f"{name}: rank {group_rank} loss")
                assert_close_to_lsce(got["grad"], grad[:, cols], logits.dtype, what=f"{name}: rank {group_rank} grad")


def test_edge_cases_behave_like_pytorch(run):
    _, results = run
    for res in results:
        cases = res["cases"]
        assert cases["all rows ignored, mean"]["loss"].isnan()
        assert cases["all rows ignored, sum"]["loss"] == 0
        assert not cases["all rows ignored, sum"]["grad"].any()
        assert cases["no rows"]["loss"].isnan() and cases["no rows"]["grad"].shape[0] == 0
        assert cases["(B, T, K_r) logits"]["grad"].dim() == 3


def test_mismatches_raise_on_every_rank(run):
    world, results = run
    for name, exc, text, _ in _error_calls(world, 0):
        for r, res in enumerate(results):
            got = res["errors"][name]
            assert got is not None, f"{name}: rank {r} raised nothing"
            assert exc.__name__ in got[0], f"{name}: rank {r} raised {got}"  # that type or a subclass
            assert text in got[1] or "failed its argument checks" in got[1], f"{name}: rank {r}: {got[1]}"
    # The rank with the bad argument says what it is; the others point at it.
    assert "class indices" in results[1]["errors"]["float target on rank 1"][1]
    assert "rank 1" in results[0]["errors"]["float target on rank 1"][1]
    for res in results:
        assert torch.isfinite(res["after errors"])


def test_needs_an_initialised_process_group():
    from lsce.distributed import vocab_parallel_cross_entropy

    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
