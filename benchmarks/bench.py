#!/usr/bin/env python
"""Speed and memory sweep: lsce against F.cross_entropy (eager), torch.compile and Liger-Kernel.

    bash run.sh bench            # from the repository root: .venv with lsce installed, then this sweep
    bash run.sh bench --quick    # tiny shapes, few repeats: a smoke test
    .venv/bin/python benchmarks/bench.py --cases 4096x32000 --dtypes bf16 --modes fwd+bwd --providers lsce,torch

Writes a table to the terminal and to OUT/table.txt, one CSV row per measurement
to OUT/results.csv and plots to OUT/*.png. benchmarks/README.md explains the
columns and how time and peak memory are measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

try:
    import lsce
except ImportError:  # run from a checkout without PYTHONPATH: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import lsce
from lsce import reference
from measure import (CPU_MEMORY_ENV, FLOOR_COLUMN, Clock, PeakMemory, WorkerError, floor_stages, format_table, reply,
                     run_worker, time_stages, write_csv)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LOW_PRECISION = ("bf16", "fp16")
MODES = ("fwd", "bwd", "fwd+bwd")
PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # reads + writes of the N×K logits each mode must do
# With probability targets the (N, K) target is a second stream: the forward reads logits and
# target, the backward (or a fused step, forward and backward) reads both and writes the gradient.
SOFT_PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 3}
FLOOR = {"fwd": "sum", "bwd": "clone", "fwd+bwd": "clone"}  # the floor each mode is compared with
FLOOR_PASSES = {"sum": 1, "clone": 2}
EPS = 0.1
# Check tolerance, relative to |loss| and to max|grad| of the reference. For bf16/fp16 it
# comes on top of PyTorch's own error at that dtype (design.md §1).
TOL = {"fp64": 1e-9, "fp32": 1e-4, "bf16": 2.0**-7, "fp16": 2.0**-10}
DEFAULT_CASES = {
    "cpu": [(4096, 32000), (2048, 128256), (512, 256000), (8, 256000)],
    "cuda": [(8192, 32000), (8192, 128256), (4096, 256000), (8, 256000)],
}
DEFAULT_DTYPES = {"cpu": ["fp32", "bf16"], "cuda": ["bf16", "fp32"]}
QUICK_CASES = [(256, 8192), (8, 32000)]
# The "options" group: one extension at a time on top of plain ε, lsce only.
OPTIONS = {
    "weight": lambda K, dev: {"weight": torch.rand(K, device=dev) + 0.5},
    "z_loss": lambda K, dev: {"z_loss": 1e-4},
    "softcap": lambda K, dev: {"softcap": 30.0},
    "prior": lambda K, dev: {"smoothing_prior": torch.softmax(torch.randn(K, device=dev), 0)},
    # Probability targets (a teacher's distribution) instead of class ids, with plain ε: run by
    # every provider that takes them (lsce, torch, compile), not by the extensions' rule.
    "soft": lambda K, dev: {},
}
TARGET_OPTIONS = ("soft",)
MIB = 2.0**20


# ----------------------------------------------------------------------------- providers
@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[dict], Callable]  # case kwargs -> loss function of (logits, target)
    unavailable: Callable[[torch.device], Optional[str]] = lambda dev: None  # why it cannot run here
    extensions: bool = False  # takes z_loss / softcap / smoothing_prior: runs the options group
    writes_logits: bool = False  # stores its gradient in the logits: gets a private copy
    required: bool = False  # the subject: where it cannot run, the run fails instead of skipping it
    soft: bool = True  # takes probability targets: runs the "soft" option

    def logits_for(self, z):
        """The logits it runs on: its own copy if it writes its gradient into them, else z."""
        return z.detach().clone().requires_grad_() if self.writes_logits else z


def _missing(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (any import failure means "not here")
        return f"{module} does not import ({type(e).__name__})"
    return None


def _lsce_unavailable(dev):
    return _missing("triton") if dev.type == "cuda" else _missing("lsce._C")


def _compiled(kw):
    torch._dynamo.reset()  # each case compiles once, from scratch: no recompiles, no dynamic shapes
    fn = torch.compile(F.cross_entropy, dynamic=False)
    return lambda z, y: fn(z, y, **kw)


def _liger(kw):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    module = LigerCrossEntropyLoss(**kw)

    def fn(z, y):
        out = module(z, y)  # newer versions may return a tuple or an output object
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

    return fn


PROVIDERS = {
    p.name: p
    for p in [
        Provider("lsce", lambda kw: lambda z, y: lsce.cross_entropy(z, y, **kw), _lsce_unavailable, extensions=True,
                 required=True),
        Provider("torch", lambda kw: lambda z, y: F.cross_entropy(z, y, **kw)),
        Provider("compile", _compiled),
        Provider(
            "liger", _liger, writes_logits=True, soft=False,
            unavailable=lambda dev: "needs CUDA" if dev.type != "cuda" else _missing("liger_kernel.transformers"),
        ),
    ]
}


# ----------------------------------------------------------------------------- cases and inputs
@dataclass(frozen=True)
class Case:
    N: int
    K: int
    dtype: str
    option: str = ""  # "" for plain label smoothing, else a key of OPTIONS

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.K}"

    @property
    def logits_bytes(self) -> int:
        return self.N * self.K * DTYPES[self.dtype].itemsize


def make_inputs(case: Case, dev: torch.device):
    """Logits (requires grad), targets and the loss kwargs of a case; the same for the same case,
    and the same logits and targets whatever the option."""
    torch.manual_seed(case.N * 1_000_003 + case.K)
    z = (2 * torch.randn(case.N, case.K, device=dev, dtype=DTYPES[case.dtype])).requires_grad_()
    y = torch.randint(0, case.K, (case.N,), device=dev)
    return z, y, case_kwargs(case, dev)


def case_target(case: Case, z, y):
    """The target a case's providers get: the class ids y, or for the "soft" option a
    probability target of the logits' shape and dtype (the same for the same case)."""
    if case.option != "soft":
        return y
    gen = torch.Generator(device=z.device).manual_seed(case.N * 7 + case.K)
    return torch.softmax(torch.randn(z.shape, generator=gen, device=z.device), 1).to(z.dtype)


def runs(provider: Provider, case: Case) -> bool:
    """Whether a provider runs a case: every plain case; an extension, lsce only; probability targets, those taking them."""
    if case.option in TARGET_OPTIONS:
        return provider.soft
    return provider.extensions or not case.option


def case_kwargs(case: Case, dev: torch.device) -> dict:
    torch.manual_seed(case.K)
    return {"label_smoothing": EPS, **(OPTIONS[case.option](case.K, dev) if case.option else {})}


# ----------------------------------------------------------------------------- correctness
def _row_chunks(N: int, K: int):
    step = max(1, (1 << 22) // K)
    return [(s, min(N, s + step)) for s in range(0, N, step)]


def ground_truth(z, y, kw):
    """(loss, fp32 gradient) of the mean loss from lsce.reference, in row chunks to bound memory.

    fp64 for bf16/fp16 logits (the ground truth), the logits' own dtype otherwise. The mean is
    the chunks' sums over Σ w[y] (the row count without weight), which is the reference's
    mean whenever weight and z_loss are not combined (the options group sets one at a time).
    """
    if kw.get("weight") is not None and kw.get("z_loss"):
        raise NotImplementedError("the chunked check does not combine weight with z_loss")
    acc = torch.float64 if z.dtype in (torch.bfloat16, torch.float16) else z.dtype
    w = kw.get("weight")
    denom = float(len(y)) if w is None else float(w[y].sum())
    grad = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    loss = 0.0
    for s, e in _row_chunks(*z.shape):
        c = z[s:e].detach().to(acc).requires_grad_()
        chunk_loss = reference.cross_entropy(c, y[s:e], reduction="sum", **kw)
        (g,) = torch.autograd.grad(chunk_loss, c)
        loss += chunk_loss.item()
        grad[s:e] = g / denom
    return loss / denom, grad, float(grad.abs().max())


def errors(fn, z, y, truth):
    """|loss − reference| and max |grad − reference| of one fwd+bwd of fn."""
    loss = fn(z, y)
    (g,) = torch.autograd.grad(loss, z)
    loss = float(loss.detach())
    ref_loss, ref_grad, _ = truth
    g_err = max(float((g[s:e].float() - ref_grad[s:e]).abs().max()) for s, e in _row_chunks(*z.shape))
    return abs(loss - ref_loss), g_err


def check(errs, truth, case: Case, base) -> str:
    """'ok' or 'FAILED (...)': within TOL (plus PyTorch's own error `base` for bf16/fp16)."""
    tol = TOL[case.dtype]
    allow = (tol * max(1.0, abs(truth[0])) + base[0], tol * truth[2] + base[1])
    bad = [f"{what} err {e:.2e} > {a:.2e}" for what, e, a in zip(("loss", "grad"), errs, allow) if not e <= a]
    return f"FAILED ({'; '.join(bad)})" if bad else "ok"


# ----------------------------------------------------------------------------- peak memory
def _inference(fn, z, y):
    """The forward alone, as in evaluation: no graph, no gradient (lsce's CPU
    training forward also writes the gradient, which its backward then hands over)."""
    with torch.no_grad():
        return fn(z, y)


def peak_above(meter: PeakMemory, action) -> int:
    """Peak bytes above what was held before, while `action()` runs. lsce's cache of freed
    gradients is emptied first, so that a step allocates its gradient as a first step does
    and the peak counts it (between steps the cache keeps it)."""
    gc.collect()
    lsce.empty_cache()
    return meter.during(action)


def case_peaks(provider: Provider, case: Case, dev, meter: PeakMemory):
    """(forward peak, step peak) of one case, after one untimed warm-up step: the forward
    alone (no_grad), then a forward + backward step."""
    z, y, kw = make_inputs(case, dev)
    y = case_target(case, z, y)
    z, fn = provider.logits_for(z), provider.make(kw)
    torch.autograd.grad(fn(z, y), z)  # warm-up: compilation, thread pools, lazy initialisation
    return (peak_above(meter, lambda: _inference(fn, z, y)),
            peak_above(meter, lambda: torch.autograd.grad(fn(z, y), z)))


def probe(provider: Provider, cases, dev):
    """[case_peaks()] of each case in turn (the inputs of one are freed before the next)."""
    meter = PeakMemory(dev)
    return [case_peaks(provider, case, dev, meter) for case in cases]


def measure_memory(provider: Provider, cases, dev):
    """probe() of the cases; on CPU in a fresh child process, NaN (with the reason printed) on failure.

    CUDA: max_memory_allocated in this process. CPU: one fresh process per provider whose glibc
    returns every allocation of 64 KiB or more to the OS when it is freed (MALLOC_MMAP_THRESHOLD_),
    so that its resident set follows the live tensors; VmHWM is reset before each measured step.
    """
    if dev.type == "cuda":
        return probe(provider, cases, dev)
    spec = json.dumps({"provider": provider.name, "cases": [asdict(c) for c in cases]})
    try:
        return [tuple(p) for p in run_worker(__file__, ["--probe", spec], env=CPU_MEMORY_ENV,
                                             timeout=1800)]
    except WorkerError as e:  # report, do not stop the sweep
        print(f"\nmemory probe of {provider.name} failed: {e}", file=sys.stderr)
        return [(math.nan, math.nan)] * len(cases)


# ----------------------------------------------------------------------------- the sweep
def torch_error(case: Case, kw, z, y, truth):
    """PyTorch's own (loss, grad) error at a low-precision dtype, which the check allows on
    top of its tolerance; None where it does not apply (fp32/fp64, or an option torch lacks)."""
    torch_expressible = not any(k in kw for k in ("z_loss", "softcap", "smoothing_prior"))
    if case.dtype in LOW_PRECISION and torch_expressible:
        return errors(PROVIDERS["torch"].make(kw), z, y, truth)
    return None


def check_provider(provider: Provider, case: Case, kw, z, y, truth, base):
    """(status, loss function, the logits it runs on): 'ok' or 'FAILED (...)' from one
    checked forward + backward; a provider that raises is reported, not fatal."""
    zp = provider.logits_for(z)
    fn = None
    try:
        fn = provider.make(kw)
        errs = base if provider.name == "torch" and base is not None else errors(fn, zp, y, truth)
        status = check(errs, truth, case, base or (0.0, 0.0))
    except Exception as e:  # noqa: BLE001
        status = f"FAILED ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
    return status, fn, zp


def provider_stages(fn, zp, y, modes):
    """A provider's stages: its forward alone (no_grad), then, unless only fwd is reported,
    a training step's forward and its backward (on the forward's loss)."""
    own = [lambda _: _inference(fn, zp, y)]
    if any(m != "fwd" for m in modes):
        own += [lambda _: fn(zp, y), lambda loss: torch.autograd.grad(loss, zp)]
    return own


def check_cases(cases, providers, z, y, modes, dev, progress):
    """Entries (case, provider, status, its stages: none unless its check passed) of every
    provider that runs each case (the options group: lsce only)."""
    entries = []
    for case in cases:
        kw = case_kwargs(case, dev)
        t = case_target(case, z, y)
        truth = ground_truth(z, t, kw)
        base = torch_error(case, kw, z, t, truth)
        for provider in providers:
            if not runs(provider, case):
                continue
            progress.set_postfix_str(f"{case.shape} {case.dtype} {case.option or 'plain'} {provider.name}: check")
            status, fn, zp = check_provider(provider, case, kw, z, t, truth, base)
            entries.append((case, provider, status, provider_stages(fn, zp, t, modes) if status == "ok" else []))
            progress.update()
        del truth
    return entries


def schedule(entries, stages):
    """Appends the checked entries' stages to `stages`; returns {entry index: its first stage}.

    The stage right after one that freed several N×K tensors runs slower (measured: whichever
    lsce option came first after torch.compile took 1.2-1.6x longer, the same option 1.0-1.1x
    elsewhere in the run; with lsce first, plain lsce after the floors). So every provider's
    stages start after a settling stage (one more logits.sum(), not reported), and lsce's
    (plain ε and every option) run next to each other, first.
    """
    settle = stages[FLOOR_COLUMN["sum"]]
    firsts, previous = {}, None
    for i in sorted(range(len(entries)), key=lambda i: entries[i][1].name != "lsce"):
        provider, own = entries[i][1], entries[i][3]
        if own:
            if provider is not previous:
                stages.append(settle)
                previous = provider
            firsts[i] = len(stages)
            stages.extend(own)
    return firsts


def timing_fields(case: Case, mode: str, times, first: int) -> dict:
    """A row's time columns from the runs' stage times; `first` is the provider's first stage."""
    infer = times[:, first]
    t = infer if mode == "fwd" else times[:, first + 2] if mode == "bwd" else times[:, first + 1] + times[:, first + 2]
    floor = float(np.median(times[:, FLOOR_COLUMN[FLOOR[mode]]]))
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    gbps = (SOFT_PASSES if case.option == "soft" else PASSES)[mode] * case.logits_bytes / med / 1e9
    floor_gbps = FLOOR_PASSES[FLOOR[mode]] * case.logits_bytes / floor / 1e9
    fields = dict(repeats=len(t), median_ms=med * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, min_ms=t.min() * 1e3,
                  max_ms=t.max() * 1e3, gbps=gbps, floor_ms=floor * 1e3, pct_copy=100 * gbps / floor_gbps,
                  x_floor=med / floor)
    if mode != "fwd":
        copy = float(np.median(times[:, FLOOR_COLUMN["copy"]]))
        fields.update(copy_ms=copy * 1e3, x_copy=med / copy)
    return fields


def result_rows(entries, firsts, times, modes, dev):
    """One row (dict) per entry and mode; the time columns only where the entry was timed."""
    rows = []
    for i, (case, provider, status, _) in enumerate(entries):
        for mode in modes:
            row = dict(device=dev.type, case=case.shape, N=case.N, K=case.K, dtype=case.dtype,
                       option=case.option, provider=provider.name, mode=mode, status=status,
                       logits_mb=case.logits_bytes / MIB, floor=FLOOR[mode])
            if i in firsts:
                row.update(timing_fields(case, mode, times, firsts[i]))
            rows.append(row)
    return rows


def bench_shape(cases, providers, args, dev, progress):
    """Rows (dicts) of cases that share N, K and dtype (the plain case and its options).

    Each (provider, case) is checked first; those that pass are then timed together: one run
    is the floors, then every provider's stages in turn, so that all of them and the floors
    see the same (shared, noisy) machine.
    """
    z, y, _ = make_inputs(cases[0], dev)
    entries = check_cases(cases, providers, z, y, args.modes, dev, progress)
    stages = floor_stages(z)
    firsts = schedule(entries, stages)
    progress.set_postfix_str(f"{cases[0].shape} {cases[0].dtype}: timing {len(firsts)} together")
    times = time_stages(stages, dev, args.repeats, args.budget * len(firsts)) if firsts else None
    progress.update()
    return result_rows(entries, firsts, times, args.modes, dev)


def add_memory(rows, providers, dev, progress):
    """Peak memory of every (provider, case) that passed its check, into the rows."""
    for provider in providers:
        progress.set_postfix_str(f"memory {provider.name}")
        cases = list(dict.fromkeys(Case(r["N"], r["K"], r["dtype"], r["option"]) for r in rows
                                   if r["provider"] == provider.name and "median_ms" in r))
        peaks = dict(zip(cases, measure_memory(provider, cases, dev))) if cases else {}
        for r in rows:
            peak = peaks.get(Case(r["N"], r["K"], r["dtype"], r["option"])) if r["provider"] == provider.name else None
            if peak is not None:
                peak = peak[0] if r["mode"] == "fwd" else peak[1]
                r.update(peak_mb=peak / MIB, x_logits=peak / (r["logits_mb"] * MIB))
        progress.update()


def add_ratios(rows):
    """vs_torch / vs_compile (their median ÷ this one; plain and probability-target rows, each
    against the others on the same targets) and, for option rows, x_plain (this median ÷ lsce's
    with plain ε), same case, dtype and mode; all were timed in the same runs."""
    med = {(r["case"], r["dtype"], r["option"], r["mode"], r["provider"]): r["median_ms"] for r in rows
           if "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            continue
        key = (r["case"], r["dtype"], "", r["mode"])
        if r["option"]:
            r["x_plain"] = r["median_ms"] / med[key + (r["provider"],)] if key + (r["provider"],) in med else math.nan
        if not r["option"] or r["option"] in TARGET_OPTIONS:  # against the others on the same targets
            same = (r["case"], r["dtype"], r["option"], r["mode"])
            for other in ("torch", "compile"):
                r[f"vs_{other}"] = med[same + (other,)] / r["median_ms"] if same + (other,) in med else math.nan


# ----------------------------------------------------------------------------- output
COLUMNS = [  # (csv field, table heading, format)
    ("case", "case", "{}"), ("dtype", "dtype", "{}"), ("mode", "mode", "{}"), ("provider", "provider", "{}"),
    ("option", "option", "{}"), ("median_ms", "ms", "{:.2f}"), ("q1_ms", "q1", "{:.2f}"), ("q3_ms", "q3", "{:.2f}"),
    ("repeats", "n", "{}"), ("gbps", "GB/s", "{:.1f}"), ("floor_ms", "floor_ms", "{:.2f}"),
    ("pct_copy", "%copy", "{:.0f}%"),
    ("x_floor", "x_floor", "{:.2f}"), ("x_copy", "x_copy", "{:.2f}"), ("vs_torch", "vs_torch", "{:.2f}x"), ("vs_compile", "vs_compile", "{:.2f}x"),
    ("x_plain", "x_plain", "{:.2f}"), ("peak_mb", "peak_MB", "{:.0f}"), ("x_logits", "x_logits", "{:.2f}"),
    ("status", "status", "{}"),
]
CSV_FIELDS = [c[0] for c in COLUMNS] + ["min_ms", "max_ms", "copy_ms", "floor", "N", "K", "logits_mb", "device"]


# The floor each time panel draws: the one the tables' ratios read. fwd: logits.sum() (floor_ms);
# bwd and fwd+bwd: the copy_ into memory already mapped (copy_ms, x_copy), bandwidth alone.
# Not clone() (floor_ms there), which pays the page faults of new memory and so can sit above
# a provider whose gradient comes from mapped memory (lsce's cache on CPU).
PLOT_FLOOR = {"fwd": ("floor_ms", "logits.sum() (one read)"),
              "bwd": ("copy_ms", "copy_ into mapped memory (read + write)"),
              "fwd+bwd": ("copy_ms", "copy_ into mapped memory (read + write)")}
CPU_BWD_NOTE = ("on CPU lsce's fused step does the backward's work in the forward,\n"
                "so its backward only hands the gradient over: compare forward + backward")


def plot(rows, out: Path, dtypes, modes) -> list:
    """Per dtype: time_<device>_<dtype>.png (one panel per mode, log time, with the floor
    of PLOT_FLOOR) and memory_<...>.png (forward and training-step peak as a multiple of the
    logits), one line per provider. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if not r["option"]]
    device = rows[0]["device"]
    cases = list(dict.fromkeys(r["case"] for r in main))
    providers = list(dict.fromkeys(r["provider"] for r in main))
    x = np.arange(len(cases))
    style = dict(zip(providers, [dict(marker=m, markersize=s, fillstyle=f) for m, s, f in
                                 [("o", 10, "none"), ("s", 7, "full"), ("^", 6, "full"), ("D", 4, "full")]]))
    written = []

    def series(dtype, mode, field, provider=None):
        """field per case; without provider, the median over providers (the floors)."""
        values = {c: [r[field] for r in main if r["case"] == c and (r["dtype"], r["mode"]) == (dtype, mode)
                      and provider in (None, r["provider"]) and field in r] for c in cases}
        return np.array([np.median(values[c]) if values[c] else math.nan for c in cases], dtype=float)

    for dtype in dtypes:
        figs = [("time", modes, "median time per call, ms (log scale)"),
                ("memory", [m for m in ("fwd", "fwd+bwd") if m in modes], "peak memory beyond inputs, × logits")]
        for kind, panels, ylabel in figs:
            if not panels or (kind == "memory" and not any("x_logits" in r for r in main)):
                continue
            fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False,
                                     layout="constrained")
            for ax, mode in zip(axes[0], panels):
                field = "median_ms" if kind == "time" else "x_logits"
                for p in providers:
                    ax.plot(x, series(dtype, mode, field, p), label=p, **style[p])
                if kind == "time":
                    ax.plot(x, series(dtype, mode, PLOT_FLOOR[mode][0]), "k--", label=PLOT_FLOOR[mode][1])
                    ax.set_yscale("log")
                else:
                    ax.axhline(1.0, color="k", linestyle=":", label="1 × logits (the gradient)")
                    ax.set_ylim(bottom=0)
                name = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward + backward"}[mode]
                if (device, mode) == ("cpu", "bwd"):
                    ax.set_title(f"{name}, {dtype}\n{CPU_BWD_NOTE}", fontsize=9)
                else:
                    ax.set_title(f"{name}, {dtype}")
                ax.set_xticks(x, [c.replace("x", " × ") for c in cases], rotation=15)
                ax.set_xlabel("N × K (rows × classes)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f"lsce benchmark on {device}: {'time' if kind == 'time' else 'peak memory'} ({dtype})")
            path = out / f"{kind}_{device}_{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def environment(dev) -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("triton", "liger-kernel"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    try:
        from lsce import _C

        isa = f", C++ kernel ISA {_C.active_isa()}"
    except Exception:  # noqa: BLE001
        isa = ""
    versions.append(f"lsce {lsce.__version__}{isa}")
    command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    return "\n".join([
        f"date:     {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command:  {command}",
        f"machine:  {platform.node()}, {cpu}, {os.cpu_count()} cores ({usable} usable), "
        f"torch threads {torch.get_num_threads()}, GPU {gpu}; device {dev}",
        f"versions: {', '.join(versions)}",
    ])


METHOD = """\
timing:   median and quartiles (q1, q3) of n timed runs (at most --repeats; fewer once --budget s per
          provider have passed, never fewer than 3) after warm-up. One run = logits.sum(),
          logits.clone() and a copy_ of the logits into a buffer made before (the floors, same
          tensor), then each provider's forward alone (under
          torch.no_grad, as in evaluation: the fwd rows), a training step's forward and its backward
          (torch.autograd.grad) in turn, every stage timed alone with a {clock} on each side: all
          providers of a case and its floors are measured in the same runs. fwd+bwd = the training
          forward + bwd of the same run. lsce's CPU training forward also writes the gradient (one
          pass over the logits), so its bwd is nearly free: compare fwd+bwd. torch.compile time is
          excluded (it compiles in the correctness check).
floors:   fwd is compared with logits.sum() (reads N*K*b bytes), bwd and fwd+bwd with logits.clone()
          (reads and writes into new memory, so it pays the page faults a new gradient pays);
          x_copy compares bwd and fwd+bwd with the copy_ into mapped memory (bandwidth alone).
          GB/s counts N*K*b (fwd), 2*N*K*b (bwd), 3*N*K*b (fwd+bwd) bytes;
          %copy = GB/s / floor's GB/s; x_floor = time / floor's time; vs_X = X's time / this time;
          x_plain = time / lsce's time with plain label smoothing. Freeing a stage's result is
          not timed. lsce's CPU gradients come from its cache of freed gradients (lsce/cache.py)
          after the first step, so they pay no page faults.
memory:   {memory}
          x_logits = peak / size of the logits; the gradient alone is 1.00.
check:    loss and gradient against lsce.reference before timing (fp64 ground truth for bf16/fp16,
          within PyTorch's own error at that dtype plus a tolerance); a provider that fails is not timed."""
MEMORY = {
    "cpu": "peak resident memory above the inputs during one no_grad fwd (fwd row) or fwd+bwd step (other rows),\n"
           "          after one warm-up step, in a fresh process per provider (VmHWM reset through\n"
           "          /proc/self/clear_refs before each step; glibc's MALLOC_MMAP_THRESHOLD_=65536 so that\n"
           "          freed tensors leave the resident set).",
    "cuda": "torch.cuda.max_memory_allocated() during one no_grad fwd (fwd row) or fwd+bwd step (other rows),\n"
            "          after reset_peak_memory_stats(), minus what was allocated before the step.",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", help="comma-separated NxK, e.g. 4096x32000,8x256000 (default: per device)")
    p.add_argument("--dtypes", help=f"comma-separated, of {','.join(DTYPES)} (default: fp32,bf16)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of fwd,bwd,fwd+bwd")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, of " + ",".join(PROVIDERS))
    p.add_argument("--options", default=",".join(OPTIONS),
                   help="lsce extensions timed one at a time at the first case ('none' to skip)")
    p.add_argument("--repeats", type=int, default=20, help="at most this many timed runs per measurement")
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds after which a measurement stops repeating (once it has 3 runs)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the memory child process
    args = p.parse_args(argv)

    dev = args.device
    args.modes = args.modes.split(",")
    if args.quick:
        args.repeats, args.budget = min(args.repeats, 5), min(args.budget, 0.5)
    args.cases = ([tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",")] if args.cases
                  else QUICK_CASES if args.quick else DEFAULT_CASES[dev])
    args.dtypes = args.dtypes.split(",") if args.dtypes else DEFAULT_DTYPES[dev]
    args.providers = args.providers.split(",")
    args.options = [] if args.options == "none" else args.options.split(",")
    for name, values, allowed in (("mode", args.modes, MODES), ("dtype", args.dtypes, DTYPES),
                                  ("provider", args.providers, PROVIDERS), ("option", args.options, OPTIONS)):
        if bad := [v for v in values if v not in allowed]:
            p.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.probe:  # the memory child process of measure_memory
        spec = json.loads(args.probe)
        cases = [Case(**c) for c in spec["cases"]]
        return reply(probe(PROVIDERS[spec["provider"]], cases, torch.device("cpu")))
    from tqdm import tqdm

    dev = torch.device(args.device)
    clock = Clock()
    started = clock.now()
    header = environment(dev) + "\n" + METHOD.format(
        clock="CUDA event (read after torch.cuda.synchronize())" if dev.type == "cuda" else "clock read",
        memory=MEMORY[dev.type] if args.memory else "not measured (--no-memory)")
    print(header, flush=True)
    providers = available_providers(args.providers, dev)

    # Cases sharing N, K and dtype are timed together: the options group joins its plain case.
    groups = {(n, k, d): [Case(n, k, d)] for n, k in args.cases for d in args.dtypes}
    if any(p.extensions or p.soft for p in providers):
        opt_dtype = "fp32" if "fp32" in args.dtypes else args.dtypes[0]
        groups[(*args.cases[0], opt_dtype)] += [Case(*args.cases[0], opt_dtype, o) for o in args.options]
    checks = sum(len([p for p in providers if runs(p, c)]) for g in groups.values() for c in g)
    total = checks + len(groups) + (len(providers) if args.memory else 0)

    rows = []
    with tqdm(total=total, desc="bench", unit="step", dynamic_ncols=True) as progress:
        for cases in groups.values():
            new = bench_shape(cases, providers, args, dev, progress)
            for r in new:
                if r["status"] != "ok" and r["mode"] == args.modes[0]:
                    tqdm.write(f"{r['case']} {r['dtype']} {r['option']} {r['provider']}: {r['status']}")
            rows += new
            gc.collect()
        if args.memory:
            add_memory(rows, providers, dev, progress)
    add_ratios(rows)

    # The table and the CSV first: plotting needs matplotlib, which a run may lack.
    elapsed = clock.since(started)
    write_results(rows, header, args.out, elapsed)
    try:
        pngs = plot(rows, args.out, args.dtypes, args.modes)
        print("plots: " + ", ".join(str(p) for p in pngs))
    except ImportError as e:
        print(f"no plots: {e} (pip install matplotlib, then run again)")


def available_providers(names, dev):
    """The providers that can run here; the others are printed with the reason. One marked
    `required` (lsce) that cannot run ends the run: a sweep without it measures nothing."""
    providers, skipped = [], []
    for name in names:
        why = PROVIDERS[name].unavailable(dev)
        if why and PROVIDERS[name].required:
            sys.exit(f"{name} cannot run on {dev.type}: {why}. Install lsce into the environment that runs "
                     "this (bash run.sh bench does), rather than importing the source folder.")
        (skipped.append(f"{name} ({why})") if why else providers.append(PROVIDERS[name]))
    print(f"providers: {', '.join(p.name for p in providers)}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return providers


def write_results(rows, header, out: Path, elapsed):
    """Prints the table; writes it (with the header) to OUT/table.txt and the rows to OUT/results.csv."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows, CSV_FIELDS)
    table = format_table(rows, COLUMNS)
    (out / "table.txt").write_text(f"{header}\n\n{table}\n\ntotal time {elapsed:.0f} s\n")
    print("\n" + table)
    print(f"\nwrote {out / 'results.csv'}, {out / 'table.txt'}")
    print(f"total time {elapsed:.0f} s", flush=True)

if __name__ == "__main__":
    main()
