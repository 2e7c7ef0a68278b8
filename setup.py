"""Builds lsce._C (the C++/OpenMP kernels) with pybind11; torch is needed only at run time."""
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def openmp_flags():
    """-fopenmp where the compiler takes it; the kernels still build (single-threaded) without."""
    if os.environ.get("LSCE_NO_OPENMP"):
        return []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        cc = os.environ.get("CC", "cc")
        ok = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(d, "t")], capture_output=True).returncode == 0
    if not ok:
        print("lsce: compiler has no OpenMP; building single-threaded kernels", file=sys.stderr)
    return ["-fopenmp"] if ok else []


omp = openmp_flags()
ext = Pybind11Extension(
    "lsce._C",
    sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    include_dirs=["csrc"],
    depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")),
    cxx_std=17,
    # Portable baseline; wider instruction sets are compiled per file with
    # `#pragma GCC target` and chosen at run time (csrc/dispatch.cpp).
    # -fno-trapping-math: without it gcc will not turn the kernels' float
    # selects (clamps, NaN checks) into blends for SSE2/AVX2 and leaves those
    # loops scalar ("control flow in loop"); the kernels never read FP flags.
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", *omp],
    extra_link_args=omp,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    packages=["lsce", "lsce.integrations", "lsce.triton_kernels"],
    package_dir={"lsce.triton_kernels": "triton_kernels"},
)
