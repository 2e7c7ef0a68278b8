"""Every Triton kernel variant lsce launches, compiled ahead of time for real
NVIDIA GPUs on this CPU-only machine, and its machine code checked.

Triton's interpreter (the Triton tests) checks the arithmetic, not what a GPU
would run: it accepts programs the compiler rejects and says nothing about
registers or load widths. Here each kernel goes through Triton's compiler for
sm_80 (A100), sm_90 (H100, H200) and sm_100 (B200, when the installed Triton's
ptxas knows it), and the cubin is read with the ``cuobjdump`` that the Triton
wheel ships.

What is compiled is what a GPU run would compile. The launches are captured
by calling ``lsce.triton_kernels.cross_entropy``'s own ``forward`` and
``backward`` on meta tensors with the three kernels replaced by recorders
(and ``_target_programs`` answering for the GPU's SM count), so the block,
warp count and splits are those of ``_launch_config``. Each launch is then
specialised by Triton's own launcher code (``create_function_from_signature``
and ``JITFunction._pack_args``, as ``JITFunction.run`` does): an integer
divisible by 16 and a pointer 16-byte aligned get ``tt.divisibility = 16``, an
integer equal to 1 and a None pointer become constants. Meta tensors have
address 0, which stands for the CUDA caching allocator's 512-byte-aligned blocks.

Asserted for every compiled kernel, one test each:

- it compiles, without register spills: LOCAL 0 in ``cuobjdump -res-usage``
  and no STL in the SASS;
- where K is a multiple of 16 (so every row starts 16-byte aligned and the
  ``cols < K`` mask is constant over 16 columns), every global load and store
  inside the streaming loop is 128 bits wide (LDG.E.128 / STG.E.128: 4 fp32,
  8 bf16 or fp16, 2 fp64 values); with other K the widths are printed only;
- registers within ``REG_BUDGET``. The variants known to exceed it with
  Triton 3.9 are expected failures (``_known_over_budget``).

The default run compiles a representative set (bf16 and fp32, plain and all
options, many rows, split rows and an odd K, on sm_80 and sm_90); every
variant (dtypes × option sets × cases × architectures) is marked ``slow``.
Distinct compilations are shared between variants and run in a pool of
processes; Triton's on-disk cache and pytest's cache (the registers and
widths read from each cubin) make a second run quick. The table of the
kernels compiled is printed at the end; ``python tests/test_triton_aot.py
[--all]`` prints it alone.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import traceback
from typing import Dict, List, NamedTuple, Optional, Tuple
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from lsce.interface import DistillOptions, RowOptions, acc_dtype, coefficients  # noqa: E402
from lsce.triton_kernels import cross_entropy as _installed  # noqa: E402
from lsce.triton_kernels import distillation as _installed_kd  # noqa: E402


def _jit_kernels(installed, name, **modules):
    """A kernel module of lsce with its kernels as JITFunctions even where TRITON_INTERPRET=1
    (a Triton test file collected earlier sets it on machines without CUDA, and
    triton.jit reads it when it decorates): a private copy, loaded with the variable unset
    and with ``modules`` (the private copies of the lsce modules it imports jitted helpers from)
    standing in for those modules while it loads."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location(name, installed.__file__)
        module = importlib.util.module_from_spec(spec)
        with mock.patch.dict(sys.modules, modules):
            spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module


ce = _jit_kernels(_installed, "_lsce_aot_kernels")
kd = _jit_kernels(_installed_kd, "_lsce_aot_distillation", **{"lsce.triton_kernels.cross_entropy": ce})


def _kernel(name: str):
    """The private JITFunction called ``name`` (cross_entropy's or distillation's)."""
    return getattr(kd if name.startswith("_distill") else ce, name)

try:  # the launcher's specialisation code (Triton >= 3.3)
    from triton.runtime.jit import create_function_from_signature
except ImportError:  # pragma: no cover
    create_function_from_signature = None

# ≤ 128 registers per thread keeps two 8-warp programs (the launcher's widest)
# resident per SM (65536 registers / 512 threads); more halves the warps that
# keep loads in flight. Combine runs one warp per row on O(splits) values.
REG_BUDGET = {"_forward_kernel": 128, "_backward_kernel": 128, "_combine_kernel": 64,
              "_soft_forward_kernel": 128, "_soft_backward_kernel": 128,
              "_distill_forward_kernel": 128, "_distill_backward_kernel": 128}
# Bits of a full-width vector load or store (LDG.E.128 / STG.E.128).
WIDE = 128


class Arch(NamedTuple):
    cc: int
    gpu: str  # the GPU whose SM count the launch is configured for
    sms: int


ARCHES = [Arch(80, "A100", 108), Arch(90, "H100", 132)]
try:
    from triton.backends.nvidia.compiler import get_ptxas

    if tuple(map(int, get_ptxas(100).version.split("."))) >= (12, 8):
        ARCHES.append(Arch(100, "B200", 148))
except Exception:  # pragma: no cover - no sm_100 in this Triton
    pass


class Case(NamedTuple):
    name: str
    N: int
    K: int


CASES = [
    Case("rows", 8192, 128256),  # many rows: one program per row
    Case("split", 4, 128256),  # few rows: rows split, forward partials merged by _combine_kernel
    Case("oddK", 8192, 50257),  # K not a multiple of 16: rows not 16-byte aligned
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Every option set runs with label smoothing ε = 0.1 except "ce" (ε = 0).
OPTION_SETS = {
    "ce": (),
    "plain": (),
    "weight": ("weight",),
    "prior": ("prior",),
    "z_loss": ("z_loss",),
    "softcap": ("softcap",),
    "all": ("weight", "prior", "z_loss", "softcap"),
    # probability targets (the soft kernels; a target of the logits' dtype)
    "soft": ("soft",),
    "soft_all": ("soft", "weight", "z_loss", "softcap"),
    # distillation (the distill kernels; a teacher of the student's dtype, class targets
    # with weight and ε = 0.1): each branch of the divergence, β = 0, 1 and ½
    "kd_fkl": ("kd", "weight"),
    "kd_rkl": ("kd", "weight"),
    "kd_mix": ("kd", "weight"),
}
SOFT_KERNELS = ("_soft_forward_kernel", "_soft_backward_kernel")
KD_KERNELS = ("_distill_forward_kernel", "_distill_backward_kernel")
KD_BETA = {"kd_fkl": 0.0, "kd_rkl": 1.0, "kd_mix": 0.5}


class Variant(NamedTuple):
    cc: int
    dtype: str
    options: str
    case: str

    @property
    def id(self) -> str:
        return f"sm{self.cc}-{self.dtype}-{self.options}-{self.case}"


def _all_variants() -> List[Variant]:
    out = []
    for arch in ARCHES:
        for dtype in DTYPES:
            for options in OPTION_SETS:
                for case in CASES:
                    if options in KD_BETA:
                        # one program per row (no split); every dtype, and the odd K in bf16
                        if case.name == "split" or (case.name == "oddK" and dtype != "bf16"):
                            continue
                    # fp64 (rare on GPUs) and the odd K: the extremes of the options only.
                    elif (dtype == "fp64" or case.name == "oddK") and options not in ("plain", "all", "soft_all"):
                        continue
                    out.append(Variant(arch.cc, dtype, options, case.name))
    return out


DEFAULT = {
    Variant(cc, dtype, options, case)
    for cc in (80, 90)
    for dtype, options, case in [
        ("bf16", "plain", "rows"), ("bf16", "plain", "split"), ("bf16", "all", "rows"), ("bf16", "all", "split"),
        ("fp32", "plain", "rows"), ("bf16", "plain", "oddK"), ("bf16", "soft", "rows"), ("bf16", "soft_all", "rows"),
        ("bf16", "kd_fkl", "rows"), ("bf16", "kd_rkl", "rows"), ("bf16", "kd_mix", "rows"),
    ]
}


# ---------------------------------------------------------------------------
# The launches lsce makes, captured


class Launch(NamedTuple):
    kernel: str
    label: str  # which call of lsce made it
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel: str, out: List[Launch], label: List[str]):
        self.kernel, self.out, self.label = kernel, out, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.append(Launch(self.kernel, self.label[0], tuple(grid), args, kwargs))

        return launch


def launches(v: Variant) -> List[Launch]:
    """The kernel launches of lsce's Triton forward, backward, and backward with an
    lse gradient, for variant ``v``, as the launcher would make them on ``v``'s GPU."""
    arch = next(a for a in ARCHES if a.cc == v.cc)
    case = next(c for c in CASES if c.name == v.case)
    dtype, names, meta = DTYPES[v.dtype], OPTION_SETS[v.options], torch.device("meta")
    acc = acc_dtype(dtype)
    N, K = case.N, case.K
    logits = torch.empty(N, K, dtype=dtype, device=meta)
    target = torch.empty(N, dtype=torch.int64, device=meta)
    weight = torch.empty(K, dtype=acc, device=meta) if "weight" in names else None
    prior = torch.empty(K, dtype=acc, device=meta) if "prior" in names else None
    eps = 0.0 if v.options == "ce" else 0.1
    coef = coefficients(K, weight, prior, eps, acc, meta)
    opts = RowOptions(-100, eps, 1e-4 if "z_loss" in names else 0.0, 30.0 if "softcap" in names else 0.0)
    out: List[Launch] = []
    label = [""]
    patches = [mock.patch.object(ce, "_target_programs", lambda device: 4 * arch.sms)]
    patches += [mock.patch.object(ce, k, _Recorder(k, out, label))
                for k in ("_forward_kernel", "_combine_kernel", "_backward_kernel", *SOFT_KERNELS)]
    patches += [mock.patch.object(kd, k, _Recorder(k, out, label)) for k in KD_KERNELS]
    for p in patches:
        p.start()
    try:
        if "kd" in names:
            _kd_launches(logits, target, weight, KD_BETA[v.options], eps, label)
            return out
        if "soft" in names:
            _soft_launches(ce, logits, weight, opts, label)
            return out
        label[0] = "forward"
        _, m, log_s = ce.forward(logits, target, coef, opts)
        # The upstream of a mean or sum: one value expanded to every row (stride 0).
        grad_loss = torch.empty((), dtype=acc, device=meta).expand(N)
        label[0] = "backward"
        ce.backward(grad_loss, None, logits, target, coef, opts, m, log_s)
        label[0] = "backward+lse"
        ce.backward(grad_loss, torch.empty(N, dtype=acc, device=meta), logits, target, coef, opts, m, log_s)
    finally:
        for p in reversed(patches):
            p.stop()
    return out


def _soft_launches(ce, logits, weight, opts, label):
    """The probability-target launches: forward, backward of a mean or sum, and
    backward with an lse upstream and the target's gradient."""
    meta, (N, _), acc = logits.device, logits.shape, acc_dtype(logits.dtype)
    target = torch.empty_like(logits)
    label[0] = "soft forward"
    _, m, log_s, mass = ce.soft_forward(logits, target, weight, opts)
    grad_loss = torch.empty((), dtype=acc, device=meta).expand(N)
    label[0] = "soft backward"
    ce.soft_backward(grad_loss, None, logits, target, weight, opts, m, log_s, mass)
    label[0] = "soft backward+lse+target"
    ce.soft_backward(grad_loss, torch.empty(N, dtype=acc, device=meta), logits, target, weight, opts, m, log_s, mass,
                     target_grad=True)


def _kd_launches(student, target, weight, beta, eps, label):
    """The distillation launches: forward, and backward of a mean or sum (both upstreams expanded scalars)."""
    meta, (N, K), acc = student.device, student.shape, acc_dtype(student.dtype)
    teacher = torch.empty_like(student)
    opts = DistillOptions(2.0, beta, eps, -100, float(K))
    label[0] = "kd forward"
    _, _, stats = kd.distill_forward(student, teacher, target, weight, opts)
    upstream = torch.empty((), dtype=acc, device=meta).expand(N)
    label[0] = "kd backward"
    kd.distill_backward(upstream, upstream, student, teacher, target, weight, opts, stats)


class Spec(NamedTuple):
    """One compilation: what JITFunction.run would hand to triton.compile."""

    kernel: str
    cc: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def key(self) -> str:
        return repr((self.kernel, self.cc, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), self.options["num_warps"], self.options["num_stages"]))


def specialise(launch: Launch, cc: int) -> Spec:
    fn = _kernel(launch.kernel)
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Spec(launch.kernel, cc, signature, constexprs, attrs, dict(options.__dict__))


# ---------------------------------------------------------------------------
# Compiling and reading the cubin


class Result(NamedTuple):
    error: Optional[str] = None
    regs: int = -1
    local: int = -1  # bytes of local memory per thread
    stack: int = -1  # bytes of stack frame per thread (where ptxas puts spills)
    stl: int = 0  # local-memory stores in the SASS: spills
    loop_loads: Tuple[int, ...] = ()  # bit widths of the global loads inside loops
    loop_stores: Tuple[int, ...] = ()
    loads: Tuple[int, ...] = ()  # all global loads


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _width(op: str) -> int:
    for tok in op.split(".")[1:]:
        if tok.isdigit():
            return int(tok)
        if tok in ("U16", "S16"):
            return 16
        if tok in ("U8", "S8"):
            return 8
    return 32


def read_sass(sass: str) -> dict:
    """Global loads and stores of one kernel's SASS, and which lie inside a loop
    (between the target of a backward branch and the branch)."""
    instrs = []
    for m in _INSTR.finditer(sass):
        instrs.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))

    def in_loop(a):
        return any(lo <= a <= hi for lo, hi in loops)

    loads = [(a, _width(op)) for a, op, _ in instrs if op.startswith("LDG")]
    stores = [(a, _width(op)) for a, op, _ in instrs if op.startswith("STG")]
    return dict(
        stl=sum(op.startswith("STL") for _, op, _ in instrs),
        loop_loads=tuple(sorted({w for a, w in loads if in_loop(a)})),
        loop_stores=tuple(sorted({w for a, w in stores if in_loop(a)})),
        loads=tuple(sorted({w for _, w in loads})),
    )


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def build(spec: Spec) -> Result:
    """Compiles ``spec`` for its architecture and reads registers, spills and load widths.
    Runs in a worker process of build_all."""
    try:
        src = ASTSource(_kernel(spec.kernel), spec.signature, spec.constexprs, spec.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", spec.cc, 32), options=spec.options)
        cubin = kernel.asm["cubin"]
        usage = _cuobjdump("-res-usage", cubin)
        regs = re.search(r"REG:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        return Result(regs=int(regs.group(1)), local=int(local.group(1)), stack=int(stack.group(1)),
                      **read_sass(_cuobjdump("-sass", cubin)))
    except Exception:  # the innermost frames and the message: where in the kernel, and why
        return Result(error="".join(traceback.format_exc().splitlines(True)[-15:]))


def build_all(specs: Dict[str, Spec], workers: Optional[int] = None) -> Dict[str, Result]:
    """``build`` of each spec in a pool of fresh processes, one per CPU: in parallel, and
    in processes that import Triton without TRITON_INTERPRET. The Triton test files set
    it on machines without CUDA, and with it set when triton is imported, Triton's own
    jitted functions (tl.max, tl.sum, ...) are the interpreter's and its compiler fails
    ("'value' object has no attribute 'dtype'")."""
    if not specs:
        return {}
    workers = workers or max(1, min(os.cpu_count() or 1, len(specs)))
    saved = os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the environment when they start
    try:
        # spawn, not fork: fresh interpreters, whatever this process has imported or run.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {k: pool.submit(build, s) for k, s in specs.items()}
            return {k: f.result() for k, f in futures.items()}
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


class Row(NamedTuple):
    variant: Variant
    launch: Launch
    spec: Spec
    result: Result


def compile_variants(variants, cache=None) -> Dict[Variant, List[Row]]:
    """Every launch of every variant, compiled once per distinct specialisation.
    ``cache`` (pytest's ``config.cache``) keeps the results of earlier runs: reading
    the SASS costs more than a compilation that Triton's own cache answers."""
    planned = {v: [(launch, specialise(launch, v.cc)) for launch in launches(v)] for v in variants}
    specs = {s.key: s for pairs in planned.values() for _, s in pairs}

    def cache_key(s: Spec) -> str:
        text = f"{triton.__version__} {_kernel(s.kernel).cache_key} {s.key} {Result._fields}"
        return "lsce/triton_aot/" + hashlib.sha256(text.encode()).hexdigest()[:32]

    results = {}
    if cache is not None:
        for k, s in specs.items():
            hit = cache.get(cache_key(s), None)
            if hit is not None:
                results[k] = Result(**{f: tuple(x) if isinstance(x, list) else x for f, x in hit.items()})
    results.update(build_all({k: s for k, s in specs.items() if k not in results}))
    if cache is not None:
        for k, s in specs.items():
            if results[k].error is None:
                cache.set(cache_key(s), results[k]._asdict())
    return {v: [Row(v, launch, s, results[s.key]) for launch, s in pairs] for v, pairs in planned.items()}


def _fmt_widths(ws) -> str:
    return "/".join(map(str, ws)) if ws else "-"


def table(rows_by_variant: Dict[Variant, List[Row]]) -> str:
    """One line per distinct compilation (the first variant that uses it)."""
    head = (f"{'kernel':<16} {'arch':<6} {'dtype':<5} {'options':<8} {'case':<6} {'launch':<13} {'BLOCK':>6} "
            f"{'warps':>5} {'regs':>4} {'stack':>5} {'STL':>3} {'loop loads':>10} {'loop stores':>11} "
            f"{'all loads':>12}")
    lines, seen = [head, "-" * len(head)], set()
    for v in sorted(rows_by_variant):
        for r in rows_by_variant[v]:
            if r.spec.key in seen:
                continue
            seen.add(r.spec.key)
            c = r.spec.constexprs
            names = list(_kernel(r.spec.kernel).arg_names)
            block = c.get((names.index("BLOCK"),)) if "BLOCK" in names else c.get((names.index("SPLITS_BLOCK"),))
            res = r.result
            kind = r.spec.kernel.strip("_").replace("_kernel", "")
            if kind == "forward" and c.get((names.index("SPLIT"),)):
                kind = "forward split"
            if res.error:
                lines.append(f"{kind:<16} sm{v.cc:<4} {v.dtype:<5} {v.options:<8} {v.case:<6} {r.launch.label:<13} "
                             f"{block:>6} {r.spec.options['num_warps']:>5} FAILED TO COMPILE")
                continue
            lines.append(
                f"{kind:<16} sm{v.cc:<4} {v.dtype:<5} {v.options:<8} {v.case:<6} {r.launch.label:<13} {block:>6} "
                f"{r.spec.options['num_warps']:>5} {res.regs:>4} {res.stack:>5} {res.stl:>3} "
                f"{_fmt_widths(res.loop_loads):>10} {_fmt_widths(res.loop_stores):>11} {_fmt_widths(res.loads):>12}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The tests

_VARIANTS = _all_variants()
_COMPILED: Dict[Variant, List[Row]] = {}


@pytest.fixture(scope="module")
def compiled(request):
    """Compiles, on first use, the variants of every test of this module that the
    session runs (all at once, so that the pool is used), and prints the table at the end."""
    if create_function_from_signature is None or not hasattr(triton.JITFunction, "_pack_args"):
        pytest.skip(f"Triton {triton.__version__} lacks the launcher code this test reuses (Triton >= 3.3)")
    wanted = [item.callspec.params["variant"] for item in request.session.items
              if item.module is request.module and "variant" in getattr(getattr(item, "callspec", None), "params", {})]
    todo = [v for v in dict.fromkeys(wanted) if v not in _COMPILED]
    _COMPILED.update(compile_variants(todo, getattr(request.config, "cache", None)))  # no cache: -p no:cacheprovider
    yield _COMPILED
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(f"Triton {triton.__version__}, kernels compiled ahead of time for {len(wanted)} "
                                "variants (widths in bits; stack: bytes per thread; STL: spill stores)")
            for line in table({v: _COMPILED[v] for v in dict.fromkeys(wanted)}).splitlines():
                reporter.write_line(line)


def _known_over_budget(v: Variant) -> bool:
    """Variants whose forward or backward uses more than REG_BUDGET registers with
    Triton 3.9 (kernel problems, reported in benchmarks/RESULTS.md, not yet fixed):
    16-bit logits with K not a multiple of 16 (scalar loads and stores, 143-200
    registers) on sm_90 and sm_100, and with every option on sm_80; and the 16-bit
    forward with every option on sm_90 (141-143); and the fp64 soft-target backward
    with every option, the target's gradient and K not a multiple of 16 on sm_100 (132).
    (The distillation kernels are within budget everywhere.)"""
    if v.options in KD_BETA:
        return False
    if v.dtype == "fp64":
        return v.options == "soft_all" and v.case == "oddK" and v.cc >= 100
    if v.dtype not in ("bf16", "fp16"):
        return False
    if v.case == "oddK":
        return v.cc >= 90 or v.options == "all"
    return v.cc == 90 and v.options == "all"


def _known_spills(v: Variant) -> bool:
    """Forwards that spill 8-16 bytes of stack since the forward sums relative to
    the row max (a kernel problem, not yet fixed): fp32 with softcap on many rows
    on sm_80, fp32 with weight or prior on split rows on sm_100."""
    return v.dtype == "fp32" and (v.cc, v.options, v.case) in {(80, "softcap", "rows"), (100, "weight", "split"),
                                                                (100, "prior", "split")}


def _params(known=None):
    """Every variant; those ``known(v)`` says fail are non-strict expected failures."""
    out = []
    for v in _VARIANTS:
        marks = [] if v in DEFAULT else [pytest.mark.slow]
        if known is not None and known(v):
            marks.append(pytest.mark.xfail(reason=f"a known kernel problem (see {known.__name__})", strict=False))
        out.append(pytest.param(v, id=v.id, marks=marks))
    return out


def _rows(compiled, variant):
    rows = compiled[variant]
    if variant.options in KD_BETA:
        assert {r.launch.kernel for r in rows} == set(KD_KERNELS)
    elif "soft" in OPTION_SETS[variant.options]:
        assert {r.launch.kernel for r in rows} == set(SOFT_KERNELS)
    else:
        assert {r.launch.kernel for r in rows} >= {"_forward_kernel", "_backward_kernel"}
        if variant.case == "split":
            assert any(r.launch.kernel == "_combine_kernel" for r in rows), "4 rows should split"
    return [(f"{r.launch.kernel} ({r.launch.label}) for {variant.id}", r) for r in rows]


@pytest.mark.parametrize("variant", _params(_known_spills))
def test_compiles_without_spills(variant, compiled):
    for what, r in _rows(compiled, variant):
        res = r.result
        if res.error is not None:
            pytest.fail(f"{what} does not compile:\n{res.error}", pytrace=False)
        assert res.local == 0 and res.stl == 0, (
            f"{what} spills: {res.stl} STL instructions, {res.stack} bytes of stack, {res.local} of local memory")


@pytest.mark.parametrize("variant", _params())
def test_streaming_loops_move_128_bits_per_access(variant, compiled):
    aligned = next(c for c in CASES if c.name == variant.case).K % 16 == 0
    for what, r in _rows(compiled, variant):
        res = r.result
        assert res.error is None, f"{what} does not compile"
        if r.launch.kernel == "_combine_kernel":
            continue
        assert res.loop_loads, f"{what}: no global load inside a loop (the streaming loop not found)"
        if not aligned:
            continue  # the widths are in the table
        assert set(res.loop_loads) == {WIDE}, f"{what}: loop loads of {res.loop_loads} bits, not all {WIDE}"
        if r.launch.kernel in ("_backward_kernel", "_soft_backward_kernel", "_distill_backward_kernel"):
            assert set(res.loop_stores) == {WIDE}, f"{what}: loop stores of {res.loop_stores} bits, not all {WIDE}"


@pytest.mark.parametrize("variant", _params(_known_over_budget))
def test_registers_within_budget(variant, compiled):
    for what, r in _rows(compiled, variant):
        assert r.result.error is None, f"{what} does not compile"
        budget = REG_BUDGET[r.launch.kernel]
        assert r.result.regs <= budget, f"{what} uses {r.result.regs} registers (budget {budget})"


def test_read_sass_finds_the_loop():
    """read_sass on a hand-written excerpt: loads between a backward branch's target and the branch are in the loop."""
    sass = """
        /*0000*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0010*/              @!P0 LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0020*/              @!P1 LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*0030*/              @!P0 STG.E.128 desc[UR4][R6.64], R8 ;
        /*0040*/              @!P4 BRA 0x10 ;
        /*0050*/                   STG.E desc[UR4][R2.64], R5 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
    """
    got = read_sass(sass)
    assert got["loop_loads"] == (16, 128) and got["loop_stores"] == (128,) and got["loads"] == (16, 64, 128)


if __name__ == "__main__":  # python tests/test_triton_aot.py [--all]: the table alone
    chosen = _VARIANTS if "--all" in sys.argv else sorted(DEFAULT)
    print(table(compile_variants(chosen)))
