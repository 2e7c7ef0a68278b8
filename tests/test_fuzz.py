"""The C++ core fuzzed under AddressSanitizer and UndefinedBehaviorSanitizer.

Builds csrc/fuzz/fuzz_kernels.cpp with the core sources (csrc/kernels_*.cpp,
csrc/dispatch.cpp; not the pybind11 binding) into a temporary directory and
runs its seeded random driver for a bounded time: every dtype, every
instruction set this CPU has, thread counts 1..4, N 0..64, K 1..70000 (edge
sizes favoured), padded rows with NaN canaries, exactly sized buffers. The
driver checks values against fp64 and exits non-zero at the first problem;
a sanitizer report aborts it. See the harness's header for what it checks.

A machine whose compiler cannot link the sanitizer runtimes fails this test
with a message saying so: the check is part of the suite, not optional.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HARNESS = CSRC / "fuzz" / "fuzz_kernels.cpp"
SOFT_HARNESS = CSRC / "fuzz" / "fuzz_soft.cpp"  # the probability-target kernels
DISTILL_HARNESS = CSRC / "fuzz" / "fuzz_distill.cpp"  # the distillation kernels
SEED = 20240611
SECONDS = float(os.environ.get("LSCE_FUZZ_SECONDS", "40"))

FLAGS = [
    "-std=c++17", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fopenmp",
    "-O1", "-g", "-fno-omit-frame-pointer", "-fno-trapping-math",
]
SANITIZER_ENV = {
    # Stop at the first report, with a stack; leaks are reported too.
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:detect_leaks=1:strict_string_checks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
REPORT_MARKERS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer", "runtime error:")


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.fail(f"test_fuzz needs a C++ compiler: {cxx!r} is not on PATH (set CXX)")
    return cxx


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


CORE_SOURCES = [*sorted(CSRC.glob("kernels_*.cpp")), CSRC / "dispatch.cpp"]
assert not any(s.name == "binding.cpp" for s in CORE_SOURCES)


def _start_core_compiles() -> list:
    """The core's sanitizer builds, started when this module is collected, niced, so
    that their minutes of compiling run beside the rest of the suite (which leaves a
    core idle much of the time) rather than before these tests. (src, obj, process)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return []  # core_objects fails with _compiler()'s message
    out = Path(tempfile.mkdtemp(prefix="lsce_fuzz_core_"))
    jobs = []

    def clean_up():  # a run that deselected these tests leaves no compiler behind
        for _, _, process in jobs:
            process.kill()
            process.wait()
        shutil.rmtree(out, ignore_errors=True)

    atexit.register(clean_up)
    for src in CORE_SOURCES:
        obj = out / (src.stem + ".o")
        cmd = [cxx, *FLAGS, f"-I{CSRC}", "-c", str(src), "-o", str(obj)]
        jobs.append((src, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                preexec_fn=lambda: os.nice(10))))
    return jobs


CORE_JOBS = _start_core_compiles()


def _compile(cxx: str, tmp: Path, src: Path) -> Path:
    """The object file of ``src`` in ``tmp``; fails the test with the compiler's message."""
    obj = tmp / (src.stem + ".o")
    r = _run([cxx, *FLAGS, f"-I{CSRC}", "-c", str(src), "-o", str(obj)])
    if r.returncode != 0:
        pytest.fail(f"compiling {src.relative_to(ROOT)} failed:\n{r.stderr[-5000:]}")
    return obj


@pytest.fixture(scope="module")
def core_objects(tmp_path_factory) -> list:
    """The core sources (csrc/kernels_*.cpp, csrc/dispatch.cpp) compiled once with the
    sanitizers (CORE_JOBS, started at collection), for every driver to link."""
    tmp = tmp_path_factory.mktemp("fuzz_core")
    cxx = _compiler()
    # The sanitizer runtimes first, on a trivial program, for a clear message.
    probe = tmp / "probe.cpp"
    probe.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n")
    r = _run([cxx, *FLAGS, str(probe), "-o", str(tmp / "probe")])
    if r.returncode != 0:
        pytest.fail(
            f"{cxx} cannot build with -fsanitize=address,undefined -fopenmp: the AddressSanitizer / "
            f"UndefinedBehaviorSanitizer runtimes (libasan, libubsan) or OpenMP (libgomp) are missing "
            f"(Debian/Ubuntu: apt-get install g++ libasan8 libubsan1 libgomp1).\n{r.stderr[-3000:]}"
        )
    r = _run([str(tmp / "probe")], env={**os.environ, **SANITIZER_ENV})
    if r.returncode != 0:
        pytest.fail(f"a sanitized program does not run on this machine (rc {r.returncode}):\n{r.stderr[-3000:]}")

    objects = []
    for src, obj, process in CORE_JOBS:
        _, err = process.communicate()
        if process.returncode != 0:
            pytest.fail(f"compiling {src.relative_to(ROOT)} failed:\n{err[-5000:]}")
        objects.append(obj)
    return objects


def _build(tmp: Path, core_objects: list, harness: Path = HARNESS) -> Path:
    """One driver, compiled and linked with the core's objects."""
    cxx = _compiler()
    exe = tmp / harness.stem
    objects = [_compile(cxx, tmp, harness), *core_objects]
    r = _run([cxx, *FLAGS, *(str(o) for o in objects), "-o", str(exe)])
    if r.returncode != 0:
        pytest.fail(f"linking the fuzz harness failed:\n{r.stderr[-5000:]}")
    return exe


@pytest.mark.slow
def test_kernels_under_asan_and_ubsan(tmp_path, core_objects):
    exe = _build(tmp_path, core_objects)
    env = {**os.environ, **SANITIZER_ENV}
    r = _run([str(exe), "--seed", str(SEED), "--seconds", str(SECONDS)], env=env, timeout=SECONDS + 300)
    out = r.stdout + r.stderr
    sys.stdout.write(r.stdout)  # the case count, shown with pytest -s
    report = [m for m in REPORT_MARKERS if m in out]
    assert r.returncode == 0 and not report, (
        f"fuzz_kernels failed (rc {r.returncode}{', sanitizer report' if report else ''}); "
        f"replay with: {exe.name} --seed {SEED} --case I (I from the 'case:' line)\n{out[-8000:]}"
    )
    assert "no failure" in r.stdout, out[-3000:]


def _run_driver(tmp_path, core_objects, harness: Path, seconds: float):
    """Builds one driver and runs it for ``seconds``; asserts a clean, non-empty run."""
    exe = _build(tmp_path, core_objects, harness)
    env = {**os.environ, **SANITIZER_ENV}
    r = _run([str(exe), "--seed", str(SEED), "--seconds", str(seconds)], env=env, timeout=SECONDS + 300)
    out = r.stdout + r.stderr
    sys.stdout.write(r.stdout)
    report = [m for m in REPORT_MARKERS if m in out]
    assert r.returncode == 0 and not report, (
        f"{harness.stem} failed (rc {r.returncode}{', sanitizer report' if report else ''}); "
        f"replay with: {exe.name} --seed {SEED} --case I\n{out[-8000:]}"
    )
    assert "no failure" in r.stdout and " 0 cases" not in r.stdout, out[-3000:]


@pytest.mark.slow
def test_soft_kernels_under_asan_and_ubsan(tmp_path, core_objects):
    """The probability-target kernels (lsce::soft_forward / soft_backward) under the
    same sanitizers, with their own driver (see csrc/fuzz/fuzz_soft.cpp's header)."""
    _run_driver(tmp_path, core_objects, SOFT_HARNESS, SECONDS / 2)


@pytest.mark.slow
def test_distill_kernels_under_asan_and_ubsan(tmp_path, core_objects):
    """The distillation kernels (lsce::distill_forward / distill_backward: every β
    form, T, ε, weight, ignored rows, no target, strides, mixed dtypes, the fused
    step, special values) under the same sanitizers (csrc/fuzz/fuzz_distill.cpp's header)."""
    _run_driver(tmp_path, core_objects, DISTILL_HARNESS, SECONDS / 2)
