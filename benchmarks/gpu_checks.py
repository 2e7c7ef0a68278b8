#!/usr/bin/env python
"""The checks that benchmarks/gpu_check.sh runs on one NVIDIA GPU.

    python benchmarks/gpu_checks.py [--out DIR] [--quick]

Run it with the interpreter that has lsce installed (as bench.py), not with the
source folder on PYTHONPATH. Every check runs, in this order, even after one
fails:

  environment   the GPU and versions; lsce's "auto" backend on CUDA must be its Triton kernels
  triton_tests  the per-row kernel conformance suite on CUDA (tests/test_conformance.py)
  aot           tests/test_triton_aot.py, every variant (slow ones included)
  aot_vs_jit    the kernels Triton compiled for this GPU in real launches, against the
                ahead-of-time compilation (tests/test_triton_aot.py) of the same launches:
                the same registers and no spills; and the AOT test's launches made from
                meta tensors specialise as the real ones do
  opcheck       torch.library.opcheck of lsce's two ops on CUDA tensors
  compile       a training step under torch.compile(fullgraph=True) equals eager, on CUDA
  host_sync     torch.cuda.set_sync_debug_mode("error") around forward + backward of
                lsce.cross_entropy and lsce.linear_cross_entropy: no host synchronisation
  cuda_graph    a training step captured in a CUDA graph and replayed on new data equals eager
  sweep         benchmarks/bench.py on CUDA: lsce, eager, torch.compile, Liger-Kernel when
                installed; every lsce row must pass bench.py's own check
  fused_head    benchmarks/bench_linear.py on CUDA, one LLM-sized case

Writes DIR/summary.md (the table printed at the end, with the GPU's name),
DIR/summary.json and one log per check, next to the sweep's and fused head's own
outputs. Exit status: 0 when every check passed, 1 when one failed, 2 when
there is no CUDA GPU. ``--quick`` shrinks the sweep to 8192×128256 bf16.

``--cpu-smoke`` runs what can run without a GPU (Triton's interpreter, tiny
sizes, CUDA-only checks left out) and proves nothing about a GPU: it exists to
test this script on a machine without one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, List, Optional
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
import torch  # noqa: E402

import lsce  # noqa: E402

# The sweep's headline case (the target) and the fused head's case.
HEADLINE = "8192x128256"
LINEAR_CASE = "8192x4096x128256"
EPS = 0.1


class Failed(Exception):
    """A check's verdict, with the reason."""


class Check:
    def __init__(self, name: str, fn: Callable, cuda_only: bool = False):
        self.name, self.fn, self.cuda_only = name, fn, cuda_only
        self.status, self.seconds, self.detail = "not run", 0.0, ""


class Context:
    def __init__(self, out: Path, quick: bool, smoke: bool):
        self.out, self.quick, self.smoke = out, quick, smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.backend = "triton" if smoke else "auto"
        self.log: Optional[io.TextIOBase] = None
        self.facts: dict = {}

    def say(self, *parts):
        print(*parts, file=self.log, flush=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------- helpers
def run_logged(ctx: Context, cmd: List[str], timeout: float, env: Optional[dict] = None) -> int:
    """Runs cmd from the repository root with its output in the check's log; the return code."""
    ctx.say("$ " + " ".join(cmd))
    ctx.log.flush()
    try:
        return subprocess.run(cmd, cwd=ROOT, stdout=ctx.log, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **(env or {})}).returncode
    except subprocess.TimeoutExpired:
        raise Failed(f"timed out after {timeout:.0f} s") from None


# pytest from this interpreter without the repository root on sys.path (which would import the
# source folder's lsce, not the installed one): what `bash run.sh test` gets from plain pytest.
_PYTEST = ("import os, sys; cwd = os.getcwd(); sys.path[:] = [p for p in sys.path if p not in ('', cwd)]; "
           "import pytest; sys.exit(pytest.main(sys.argv[1:]))")


def run_pytest(ctx: Context, name: str, args: List[str], timeout: float) -> str:
    xml = ctx.out / f"{name}.xml"
    rc = run_logged(ctx, [sys.executable, "-c", _PYTEST, *args, "-q", "-rfEs", "-p", "no:cacheprovider",
                          f"--junitxml={xml}"], timeout)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    summary = (f"{counts['tests']} tests, {counts['failures'] + counts['errors']} failed, "
               f"{counts['skipped']} skipped/xfailed")
    if rc != 0:
        raise Failed(f"pytest exit {rc}: {summary}")
    if counts["tests"] == 0:
        raise Failed("pytest ran no test")
    return summary


def problem(N, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, K, generator=g) * 3).to(dtype).to(device)
    y = torch.randint(0, K, (N,), generator=g)
    y[::7] = -100
    return z, y.to(device)


def options(name: str, K: int, device) -> dict:
    """lsce keyword arguments of an option set (all with label smoothing)."""
    g = torch.Generator().manual_seed(K)
    w = (torch.rand(K, generator=g) + 0.5).to(device)
    prior = torch.softmax(torch.randn(K, generator=g), 0).to(device)
    every = dict(weight=w, smoothing_prior=prior, z_loss=1e-4, softcap=30.0)
    chosen = {"plain": {}, "weight": {"weight": w}, "prior": {"smoothing_prior": prior}, "z_loss": {"z_loss": 1e-4},
              "softcap": {"softcap": 30.0}, "all": every}[name]
    return dict(label_smoothing=EPS, **chosen)


OPTION_SETS = ["plain", "weight", "prior", "z_loss", "softcap", "all"]


def close(a, b, what, rtol, atol):
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    except AssertionError as e:
        raise Failed(f"{what}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- the checks
def check_environment(ctx: Context) -> str:
    facts = ctx.facts
    facts.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                 lsce=getattr(lsce, "__version__", "?"), lsce_path=str(Path(lsce.__file__).parent))
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as e:
        raise Failed(f"triton does not import: {e}") from None
    if ctx.smoke:
        facts.update(gpu="none (cpu smoke)")
    else:
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}",
                     sms=p.multi_processor_count, memory_gb=round(p.total_memory / 1e9, 1))
        try:
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            facts["driver"] = "?"
    ctx.say(json.dumps(facts, indent=1))
    if (ROOT / "lsce") == Path(lsce.__file__).parent:
        raise Failed("lsce imported from the source folder, not the installed package")
    from lsce import ops
    from lsce.triton_kernels import cross_entropy as ce

    if ops.row_kernels(ctx.backend, ctx.device) is not ce:
        raise Failed(f"lsce backend {ctx.backend!r} on {ctx.device} is not its Triton kernels")
    return ", ".join(f"{k} {facts[k]}" for k in ("gpu", "capability", "torch", "cuda", "triton") if k in facts)


def check_triton_tests(ctx: Context) -> str:
    path = ROOT / "tests" / "test_conformance.py"
    return f"{path.name}: " + run_pytest(ctx, "triton_tests", [str(path)], timeout=240)


def check_aot(ctx: Context) -> str:
    args = [str(ROOT / "tests" / "test_triton_aot.py")] + (["-m", "not slow"] if ctx.smoke else [])
    return run_pytest(ctx, "aot", args, timeout=240)


def _aot_module():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_triton_aot

    return test_triton_aot


def _launch_key(aot, spec, ignore=("grad_loss_stride", "grad_lse_stride")) -> str:
    """What a compilation depends on (tests/test_triton_aot.py's Spec.key) without the arguments ``ignore``."""
    names = list(getattr(aot.ce, spec.kernel).arg_names)
    skip = {(names.index(n),) for n in ignore if n in names}
    return repr((spec.kernel, sorted((k, v) for k, v in spec.signature.items() if k not in ignore),
                 sorted((k, repr(v)) for k, v in spec.constexprs.items() if k not in skip),
                 sorted((k, v) for k, v in spec.attrs.items() if k not in skip), spec.options["num_warps"]))


def check_aot_vs_jit(ctx: Context) -> str:
    aot = _aot_module()
    from lsce.triton_kernels import cross_entropy as ce

    if ctx.smoke:  # an H100's configuration, small sizes, the interpreter: no registers to compare
        cc, sms = 90, 132
        runs = [("bf16", "plain", 64, 1000), ("fp32", "all", 2, 5000)]
    else:
        p = torch.cuda.get_device_properties(0)
        cc, sms = 10 * p.major + p.minor, p.multi_processor_count
        runs = [("bf16", "plain", 8192, 128256), ("bf16", "all", 8192, 128256), ("fp32", "plain", 4, 128256),
                ("bf16", "plain", 8192, 50257)]
    recorded = []

    class Proxy:
        def __init__(self, name):
            self.name, self.real = name, getattr(ce, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiled = self.real[grid](*args, **kwargs)
                recorded.append((self.name, args, kwargs, compiled))
                return compiled

            return launch

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    with contextlib.ExitStack() as stack:
        for name in ("_forward_kernel", "_combine_kernel", "_backward_kernel"):
            stack.enter_context(mock.patch.object(ce, name, Proxy(name)))
        if ctx.smoke:
            stack.enter_context(mock.patch.object(ce, "_target_programs", lambda device: 4 * sms))
        for dtype, opt, N, K in runs:
            z, y = problem(N, K, dtypes[dtype], ctx.device)
            z.requires_grad_(True)
            lsce.cross_entropy(z, y, backend=ctx.backend, **options(opt, K, ctx.device)).backward()
            del z
    ctx.sync()
    mismatches, lines = [], []
    specs = [aot.specialise(aot.Launch(name, "", (), args, kwargs), cc) for name, args, kwargs, _ in recorded]
    built = aot.build_all({str(i): s for i, s in enumerate(specs)})
    for i, (name, args, kwargs, compiled) in enumerate(recorded):
        if compiled is not None and getattr(compiled, "n_regs", None) is None:
            compiled._init_handles()
        res = built[str(i)]
        gpu = "-" if compiled is None else f"{compiled.n_regs} regs {compiled.n_spills} spills"
        line = (f"{name} BLOCK/warps {kwargs.get('BLOCK', kwargs.get('SPLITS_BLOCK'))}/{kwargs.get('num_warps')}: "
                f"GPU {gpu}; AOT {res.regs} regs, {res.stl} STL")
        lines.append(line)
        if res.error or res.stl or (compiled is not None and (res.regs != compiled.n_regs or compiled.n_spills)):
            mismatches.append(line + (f" ({res.error.splitlines()[-1]})" if res.error else ""))
    # The AOT test's own launches (meta tensors, its SM count) against these real ones, but for
    # the upstream gradients' strides (0 for an expanded scalar, else 1: either may come).
    arch = next((a for a in aot.ARCHES if a.cc == cc), None)
    shapes = {(c.N, c.K): c.name for c in aot.CASES}
    if arch is not None and arch.sms == sms and all((N, K) in shapes for _, _, N, K in runs):
        real = {_launch_key(aot, aot.specialise(aot.Launch(n, "", (), a, k), cc)) for n, a, k, _ in recorded}
        for dtype, opt, N, K in runs:
            meta = {_launch_key(aot, aot.specialise(launch, cc))
                    for launch in aot.launches(aot.Variant(cc, dtype, opt, shapes[(N, K)]))
                    if launch.label != "backward+lse"}
            if not meta <= real:
                mismatches.append(f"the AOT test's launches for {dtype} {opt} {shapes[(N, K)]} specialise "
                                  f"differently from the real ones ({len(meta - real)} of {len(meta)})")
    else:
        lines.append(f"(the AOT test has no sm_{cc} with {sms} SMs or not these shapes: launches not compared)")
    for line in lines:
        ctx.say(line)
    if mismatches:
        raise Failed("; ".join(mismatches))
    return f"{len(recorded)} launches: " + ("compiled ahead of time" if ctx.smoke else "registers equal, no spills")


def check_opcheck(ctx: Context) -> str:
    n = 0
    for dtype in (torch.float32, torch.bfloat16):
        for opt in ("plain", "all"):
            K = 1000 if not ctx.smoke else 37
            z, y = problem(6, K, dtype, ctx.device)
            kw = options(opt, K, ctx.device)
            w = kw.get("weight")
            prior = kw.get("smoothing_prior")
            args = (z, y, w, prior, -100, EPS, kw.get("z_loss", 0.0), kw.get("softcap", 0.0), ctx.backend)
            torch.library.opcheck(torch.ops.lsce.cross_entropy_forward, args)
            loss, lse, m, log_s = torch.ops.lsce.cross_entropy_forward(*args)
            bargs = (torch.rand_like(loss), torch.rand_like(lse), *args[:4], m, log_s, *args[4:])
            torch.library.opcheck(torch.ops.lsce.cross_entropy_backward, bargs)
            n += 2
    return f"{n} opchecks passed (fp32, bf16 × plain, all)"


def check_compile(ctx: Context) -> str:
    n = 0
    K = 32000 if not ctx.smoke else 37
    for dtype, opt, reduction in [(torch.float32, "plain", "mean"), (torch.bfloat16, "plain", "mean"),
                                  (torch.float32, "all", "mean"), (torch.float32, "plain", "none")]:
        torch._dynamo.reset()
        z, y = problem(64, K, dtype, ctx.device)
        kw = options(opt, K, ctx.device)

        def step(x, t):
            return lsce.cross_entropy(x, t, reduction=reduction, backend=ctx.backend, **kw).float().sum() * 2.0

        results = []
        for fn in (step, torch.compile(step, fullgraph=True)):
            x = z.clone().requires_grad_(True)
            out = fn(x, y)
            out.backward()
            results.append((out.detach(), x.grad))
        what = f"{dtype} {opt} {reduction}"
        # Inductor may fuse the reduction after the op differently: an ulp of the logits' dtype.
        tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
        close(results[1][0], results[0][0], f"loss {what}", tol, tol)
        close(results[1][1], results[0][1], f"grad {what}", tol, tol)
        n += 1
    return f"{n} compiled steps equal eager (fullgraph)"


def check_host_sync(ctx: Context) -> str:
    n = 0
    N, K = 512, 32000
    for dtype in (torch.bfloat16, torch.float32):
        for opt in OPTION_SETS:
            for reduction in ("mean", "sum", "none"):
                z, y = problem(N, K, dtype, ctx.device)
                kw = options(opt, K, ctx.device)
                for checked in (False, True):  # the first call compiles the kernels
                    x = z.clone().requires_grad_(True)
                    torch.cuda.set_sync_debug_mode("error" if checked else "default")
                    try:
                        loss = lsce.cross_entropy(x, y, reduction=reduction, **kw)
                        loss.sum().backward()
                    except RuntimeError as e:
                        raise Failed(f"{dtype} {opt} {reduction}: {str(e).splitlines()[0]}") from None
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                n += 1
    # The fused head: chunks of the LM head with the loss, no N×K logits.
    H = 1024
    x = torch.randn(N, H, device=ctx.device, dtype=torch.bfloat16)
    W = (torch.randn(K, H, device=ctx.device, dtype=torch.bfloat16) / H**0.5)
    y = torch.randint(0, K, (N,), device=ctx.device)
    for checked in (False, True):
        xs, Ws = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            lsce.linear_cross_entropy(xs, Ws, y, label_smoothing=EPS).backward()
        except RuntimeError as e:
            raise Failed(f"linear_cross_entropy: {str(e).splitlines()[0]}") from None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ctx.sync()
    return f"{n} cross_entropy steps (bf16, fp32 × 6 option sets × 3 reductions) and linear_cross_entropy: no sync"


def check_cuda_graph(ctx: Context) -> str:
    done = []
    for N, K, dtype, opt in [(1024, 32000, torch.bfloat16, "plain"), (4, 128256, torch.float32, "all")]:
        kw = options(opt, K, ctx.device)
        z, y = problem(N, K, dtype, ctx.device, seed=1)
        x = z.clone().requires_grad_(True)

        def step():
            x.grad = None
            loss = lsce.cross_entropy(x, y, **kw)
            loss.backward()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up (kernels compiled, allocator pools) outside the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        x.grad = None
        with torch.cuda.graph(graph):
            static_loss = lsce.cross_entropy(x, y, **kw)
            static_loss.backward()
        static_grad = x.grad
        # New data into the same tensors, replay, compare with an eager step on copies.
        z2, y2 = problem(N, K, dtype, ctx.device, seed=2)
        with torch.no_grad():
            x.copy_(z2)
        y.copy_(y2)
        graph.replay()
        torch.cuda.synchronize()
        ref_x = z2.clone().requires_grad_(True)
        ref_loss = lsce.cross_entropy(ref_x, y2, **kw)
        ref_loss.backward()
        what = f"{N}x{K} {dtype} {opt}"
        close(static_loss, ref_loss.detach(), f"replayed loss {what}", 0, 0)
        close(static_grad, ref_x.grad, f"replayed grad {what}", 0, 0)
        done.append(what)
    return "captured, replayed on new data, bitwise equal to eager: " + "; ".join(done)


def _model_us(case: str, dtype: str, provider: str, gpu: str):
    """The model's fwd+bwd µs (low end) for the sweep's case on this GPU (benchmarks/gpu_model.py)."""
    sys.path.insert(0, str(HERE))
    import gpu_model

    name = next((g for g in gpu_model.GPUS if g in gpu), None)
    if name is None:
        return None, None
    N, K = (int(v) for v in case.split("x"))
    for r in gpu_model.rows([(N, K)], [dtype]):
        if r["provider"] == provider:
            return name, r["step"]["us"][name][0]
    return name, None


def check_sweep(ctx: Context) -> str:
    out = ctx.out / "sweep"
    if ctx.smoke:
        args = ["--device", "cpu", "--quick", "--providers", "lsce,torch", "--no-memory", "--options", "none",
                "--modes", "fwd+bwd"]
    else:
        args = ["--device", "cuda", "--repeats", "10", "--budget", "1"]
        if ctx.quick:
            args += ["--cases", HEADLINE, "--dtypes", "bf16"]
    rc = run_logged(ctx, [sys.executable, str(HERE / "bench.py"), *args, "--out", str(out)], timeout=420)
    if rc != 0:
        raise Failed(f"bench.py exit {rc}")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    bad = [f"{r['case']} {r['dtype']} {r['mode']} {r['option'] or 'plain'}: {r['status']}" for r in rows
           if r["provider"] == "lsce" and r["status"] != "ok"]
    providers = sorted({r["provider"] for r in rows})
    head = [r for r in rows if r["case"] == HEADLINE and r["dtype"] == "bf16" and r["mode"] == "fwd+bwd"
            and not r["option"] and r.get("median_ms")]
    ctx.facts["headline"] = {r["provider"]: float(r["median_ms"]) for r in head}
    if bad:
        raise Failed("lsce failed bench.py's check: " + "; ".join(bad))
    return f"{len(rows)} rows, providers {', '.join(providers)}; table in sweep/table.txt"


def check_fused_head(ctx: Context) -> str:
    out = ctx.out / "linear.csv"
    if ctx.smoke:
        args = ["--device", "cpu", "--quick", "--dtypes", "fp32", "--providers", "lsce_linear,torch"]
    else:
        args = ["--device", "cuda", "--cases", LINEAR_CASE, "--dtypes", "bf16", "--reps", "5"]
    rc = run_logged(ctx, [sys.executable, str(HERE / "bench_linear.py"), *args, "--out", str(out)], timeout=300)
    if rc != 0:
        raise Failed(f"bench_linear.py exit {rc}")
    with open(out) as f:
        rows = list(csv.DictReader(f))
    failed = [f"{r['provider']}: {r['error']}" for r in rows if r.get("error")]
    lsce_rows = [r for r in rows if r["provider"].startswith("lsce") and not r.get("error")]
    if not lsce_rows:
        raise Failed("no lsce row: " + "; ".join(failed))
    if any(r["provider"].startswith("lsce") for r in rows if r.get("error")):
        raise Failed("; ".join(failed))
    ctx.facts["fused_head_case"] = "quick sizes fp32" if ctx.smoke else f"{LINEAR_CASE} bf16"
    ctx.facts["fused_head"] = {r["provider"]: dict(ms=float(r["time_min_ms"]), peak_mb=float(r["peak_mb"]))
                               for r in rows if not r.get("error")}
    return f"{len(rows)} providers at {LINEAR_CASE if not ctx.smoke else 'quick sizes'}" + (
        f" ({len(failed)} others failed: see fused_head.log)" if failed else "")


CHECKS = [
    Check("environment", check_environment),
    Check("triton_tests", check_triton_tests, cuda_only=True),
    Check("aot", check_aot),
    Check("aot_vs_jit", check_aot_vs_jit),
    Check("opcheck", check_opcheck),
    Check("compile", check_compile),
    Check("host_sync", check_host_sync, cuda_only=True),
    Check("cuda_graph", check_cuda_graph, cuda_only=True),
    Check("sweep", check_sweep),
    Check("fused_head", check_fused_head),
]


# ----------------------------------------------------------------------------- summary
def summary(ctx: Context, checks: List[Check], total: float) -> str:
    f = ctx.facts
    lines = [f"# lsce GPU check: {f.get('gpu', '?')}", ""]
    lines += [", ".join(f"{k} {f[k]}" for k in ("capability", "sms", "memory_gb", "driver", "torch", "cuda",
                                                    "triton", "python") if k in f),
              f"commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, total {total:.0f} s", ""]
    lines += ["| check | status | s | detail |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.status} | {c.seconds:.0f} | {c.detail.replace('|', '/')} |")
    head = f.get("headline")
    if head:
        lines += ["", f"{HEADLINE} bf16, forward + backward (bench.py median; model: benchmarks/gpu_model.py at the "
                      "GPU's peak bandwidth):", "", "| provider | ms | model ms | × model |", "|---|---|---|---|"]
        for provider, ms in sorted(head.items(), key=lambda kv: kv[1]):
            gpu, us = _model_us(HEADLINE, "bf16", provider, f.get("gpu", ""))
            model = f"{us / 1e3:.3f}" if us else "-"
            ratio = f"{ms / (us / 1e3):.2f}" if us else "-"
            lines.append(f"| {provider} | {ms:.3f} | {model} | {ratio} |")
    fused = f.get("fused_head")
    if fused:
        lines += ["", f"Fused head, {f['fused_head_case']} (bench_linear.py, fastest step):", "",
                  "| provider | ms | peak MB |", "|---|---|---|"]
        lines += [f"| {p} | {v['ms']:.1f} | {v['peak_mb']:.0f} |" for p, v in fused.items()]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "out" / time.strftime("gpu-check-%Y%m%d-%H%M%S"))
    p.add_argument("--quick", action="store_true", help=f"the sweep at {HEADLINE} bf16 only")
    p.add_argument("--only", help="comma-separated check names (default: all)")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_checks: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              "these checks need one NVIDIA GPU", file=sys.stderr)
        return 2
    ctx = Context(args.out, args.quick, args.cpu_smoke)
    ctx.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    checks = [c for c in CHECKS if only is None or c.name in only or c.name == "environment"]
    started = time.perf_counter()
    for c in checks:
        if ctx.smoke and c.cuda_only:
            c.status = "not run (cpu smoke)"
            continue
        print(f"[{time.perf_counter() - started:6.0f} s] {c.name} ...", flush=True)
        t0 = time.perf_counter()
        with open(ctx.out / f"{c.name}.log", "w") as ctx.log:
            try:
                c.detail = c.fn(ctx) or ""
                c.status = "passed"
            except Failed as e:
                c.status, c.detail = "FAILED", str(e)
            except Exception as e:  # noqa: BLE001 (a crash is a failure of that check)
                c.status, c.detail = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ctx.say(traceback.format_exc())
        c.seconds = time.perf_counter() - t0
        print(f"         {c.status} ({c.seconds:.0f} s) {c.detail}", flush=True)
        if c.status == "FAILED":
            tail = (ctx.out / f"{c.name}.log").read_text().splitlines()[-25:]
            print("         " + "\n         ".join(tail), flush=True)
    ctx.log = None
    text = summary(ctx, checks, time.perf_counter() - started)
    (ctx.out / "summary.md").write_text(text + "\n")
    (ctx.out / "summary.json").write_text(json.dumps(
        dict(facts=ctx.facts, checks=[dict(name=c.name, status=c.status, seconds=c.seconds, detail=c.detail)
                                      for c in checks]), indent=1) + "\n")
    print("\n" + text + f"\n\nresults in {ctx.out}")
    failed = [c.name for c in checks if c.status == "FAILED"]
    if failed:
        print(f"\ngpu_checks: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # not in the AOT build's worker processes, which re-run this module
    if "--cpu-smoke" in sys.argv:  # before triton is imported: lsce's Triton kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
