"""pytest-benchmark suite: forward + backward of every provider on the cases of bench.py.

Not part of the normal test run (pyproject.toml's testpaths is ["tests"]); run it
explicitly, with the pytest of the environment lsce is installed in (`bash run.sh bench`
makes .venv; plain `pytest`, not `python -m pytest`, which would put the repository root,
lsce's source without its compiled _C, first on sys.path):

    .venv/bin/pytest benchmarks/test_bench.py                    # small shapes (bench.py --quick's)
    LSCE_BENCH_FULL=1 .venv/bin/pytest benchmarks/test_bench.py  # the full default cases of bench.py
    .venv/bin/pytest benchmarks/test_bench.py -k "lsce or copy" --benchmark-columns=median,iqr,rounds

Each case is its own benchmark group, holding the providers and the out.copy_(logits) floor.
The device is CUDA when available, else CPU. Providers, cases and inputs come from bench.py.
An optional provider that cannot run here is skipped; lsce (bench.py's required provider)
fails instead, e.g. when its compiled lsce._C does not import.

The last tests are not benchmarks: a smoke run of bench_distill.py --quick (its providers
must agree and its CSV hold every row), its check and its memory worker.
"""

import csv
import itertools
import os

import pytest
import torch

import bench
import bench_distill
from measure import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("LSCE_BENCH_FULL", "0") not in ("", "0")
SHAPES = bench.DEFAULT_CASES[DEVICE.type] if FULL else bench.QUICK_CASES
CASES = [bench.Case(n, k, dtype) for n, k in SHAPES for dtype in bench.DEFAULT_DTYPES[DEVICE.type]]
CASES += [bench.Case(*SHAPES[0], "fp32", option) for option in bench.OPTIONS]


def _case_id(case):
    return f"{case.shape}-{case.dtype}" + (f"-{case.option}" if case.option else "")


def _setup(benchmark, case):
    benchmark.group = _case_id(case)
    benchmark.extra_info.update(N=case.N, K=case.K, dtype=case.dtype, option=case.option,
                                logits_bytes=case.logits_bytes)
    return bench.make_inputs(case, DEVICE)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("provider", list(bench.PROVIDERS))
def test_fwd_bwd(benchmark, provider, case):
    p = bench.PROVIDERS[provider]
    if why := p.unavailable(DEVICE):
        if p.required:  # the subject: a broken install (no lsce._C) must not pass as a skip
            pytest.fail(f"{provider} cannot run on {DEVICE.type}: {why}")
        pytest.skip(why)
    if case.option and not p.extensions:
        pytest.skip(f"{provider} has no {case.option}; the options group is lsce only")
    z, y, kw = _setup(benchmark, case)
    z, fn = p.logits_for(z), p.make(kw)

    def step():
        loss = fn(z, y)
        (grad,) = torch.autograd.grad(loss, z)
        synchronize(DEVICE)
        return loss, grad

    loss, grad = step()  # compiles (torch.compile) and warms up outside the timing
    assert torch.isfinite(loss) and grad.shape == z.shape
    benchmark(step)


@pytest.mark.parametrize("case", [c for c in CASES if not c.option], ids=_case_id)
def test_floor_copy(benchmark, case):
    """out.copy_(logits) into memory already mapped: one read and one write of the
    logits, the floor the sweep's tables use (≈ 2/3 of a training step). Not
    clone(), whose fresh memory pays a page fault per 4 KiB on CPU."""
    z, _, _ = _setup(benchmark, case)
    flat = z.detach()
    out = torch.empty_like(flat)
    out.copy_(flat)  # maps the pages before the timing

    def copy():
        out.copy_(flat)
        synchronize(DEVICE)
        return out

    benchmark(copy)


# ----------------------------------------------------------------------------- bench_distill.py
def test_distill_quick(tmp_path):
    """bench_distill.py --quick (timing only): a CSV row for every form, teacher and provider,
    each passing its check against the fp64 composition, and the providers' losses agree."""
    out = tmp_path / "distill.csv"
    bench_distill.main(["--quick", "--no-memory", "--out", str(out)])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    keys = [(r["form"], r["teacher"], r["provider"]) for r in rows]
    assert sorted(keys) == sorted(itertools.product(bench_distill.FORMS, bench_distill.TEACHERS,
                                                    bench_distill.PROVIDERS))
    for r in rows:
        assert r["status"] == "ok" and not r["error"], r
        assert float(r["time_ms"]) > 0 and float(r["loss_err"]) <= bench_distill.TOL["fp32"], r
        eager = next(e for e in rows if (e["form"], e["teacher"], e["provider"]) == (r["form"], r["teacher"], "torch"))
        assert float(r["loss"]) == pytest.approx(float(eager["loss"]), rel=1e-5), r


def test_distill_check_fails_on_another_loss(monkeypatch):
    """The check before timing catches a provider whose loss differs (alpha 0.4 instead of
    0.5), and such a provider is not timed."""
    real = bench_distill.loss_fn
    monkeypatch.setattr(bench_distill, "loss_fn",
                        lambda p, s, t: real(p, dict(s, alpha=0.4) if p == "lsce" else s, t))
    spec = dict(bench_distill.case_spec("materialised", "topk"), providers=["lsce", "torch"], reps=1)
    result = bench_distill.time_worker(spec)
    assert result["lsce"]["status"].startswith("FAILED") and "time_ms" not in result["lsce"]
    assert result["torch"]["status"] == "ok" and result["torch"]["time_ms"] > 0


def test_distill_memory_worker():
    """The memory worker (a fresh process) sees its calibration buffer and, in lsce's step, at
    least the gradient that step must return."""
    spec = dict(bench_distill.case_spec("materialised", "dense"), provider="lsce")
    r = bench_distill.in_subprocess("memory", spec)
    assert "error" not in r, r
    assert r["calibration_seen_mb"] == pytest.approx(bench_distill.CALIBRATION_BYTES / 2**20, rel=0.05)
    assert r["peak_mb"] >= bench_distill.grad_bytes(spec) / 2**20
