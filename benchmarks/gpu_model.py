#!/usr/bin/env python
"""A model of the GPU step: the bytes each provider must move for each GPU case
of the sweep, and the time that takes at the peak memory bandwidth of four GPUs.

    .venv/bin/python benchmarks/gpu_model.py              # plain-text table
    .venv/bin/python benchmarks/gpu_model.py --markdown   # the table in benchmarks/RESULTS.md

A cross-entropy step over N×K logits is bound by memory traffic: a few
arithmetic operations per element against 2-4 bytes loaded. So a provider's
time is modelled as its passes over the logits (reads plus writes of all N·K
elements, each b bytes) plus its per-row traffic, divided by the GPU's peak HBM
bandwidth. Nothing here runs on a GPU: a measured run (benchmarks/gpu_check.sh)
is compared with this. Real kernels reach about 85-92% of the peak, and the
smallest case (8×256000) is launch-bound rather than bandwidth-bound: a few µs
of bytes against several kernel launches of a few µs each.

The cases and dtypes are bench.py's GPU defaults; the pass counts come from the
table "Bytes of N×K-sized traffic per training step" in benchmarks/RESULTS.md
(one pass = N·K·b bytes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DEFAULT_CASES, DEFAULT_DTYPES, DTYPES  # noqa: E402

# Peak HBM bandwidth, TB/s (10^12 bytes/s): vendor datasheet figures.
GPUS = {
    "A100": 2.039,  # A100 SXM4 80GB (NVIDIA A100 datasheet: 2,039 GB/s)
    "H100": 3.35,  # H100 SXM5 80GB (NVIDIA H100 datasheet)
    "H200": 4.8,  # H200 SXM 141GB (NVIDIA H200 datasheet)
    "B200": 8.0,  # B200 (NVIDIA DGX B200 / HGX B200 datasheet, per GPU)
}

# Passes over the N×K logits (forward alone, training step = forward + backward)
# per provider, from the pass-count table in benchmarks/RESULTS.md. A pair is a
# range (an estimate that depends on fusion choices); the model prints both ends.
PASSES = {
    # forward: read 1; backward: read 1, write 1.
    "lsce": (1, 3),
    # the gradient is computed in the forward (read 2, write 1, into the logits); the
    # backward does nothing when the upstream gradient is 1 (bench.py: reduction "mean").
    "liger": (3, 3),
    # fused reductions: read ≈2 in the forward; ≈4-5 in a step (RESULTS.md).
    "compile": (2, (4, 5)),
    # log_softmax read 1 + write 1 and the smoothing sum read 1; a step ≈9 (RESULTS.md).
    "torch": (3, 9),
}

# Per-row traffic, bytes, for logits of b bytes: the forward reads the target
# (8), z_y (b) and w_y (4) and writes loss and lse (4 + 4); the backward reads
# the target, lse, the upstream gradient and w_y again (8 + 4 + 4 + 4) and the
# mean reads the losses (4). Every provider pays about this; it is under 0.01%
# of the logits at these sizes.
def per_row(mode: str, b: int) -> int:
    fwd = 8 + b + 4 + 4 + 4
    return fwd if mode == "fwd" else fwd + 8 + 4 + 4 + 4 + 4


def _us(nbytes: float, tbps: float) -> float:
    return nbytes / (tbps * 1e12) * 1e6


def _span(passes):
    return passes if isinstance(passes, tuple) else (passes, passes)


def rows(cases=None, dtypes=None):
    """One row per (case, dtype, provider): passes, GB moved and µs per GPU, each a
    (low, high) pair for the forward ("fwd") and the training step ("step")."""
    out = []
    for N, K in cases or DEFAULT_CASES["cuda"]:
        for dtype in dtypes or DEFAULT_DTYPES["cuda"]:
            b = DTYPES[dtype].itemsize
            one = N * K * b  # bytes of one pass
            for provider, (fwd, step) in PASSES.items():
                r = dict(case=f"{N}x{K}", dtype=dtype, provider=provider)
                for mode, passes in (("fwd", fwd), ("step", step)):
                    lo_hi = _span(passes)
                    nbytes = [p * one + N * per_row(mode, b) for p in lo_hi]
                    r[mode] = dict(passes=lo_hi, gb=[x / 1e9 for x in nbytes],
                                   us={g: [_us(x, bw) for x in nbytes] for g, bw in GPUS.items()})
                out.append(r)
    return out


def _fmt(pair, fmt="{:.1f}") -> str:
    lo, hi = pair
    return fmt.format(lo) if lo == hi else (fmt + "-" + fmt).format(lo, hi)


def table(rs, markdown: bool = False) -> str:
    """fwd / step per cell: passes over the logits, GB moved, µs at each GPU's peak bandwidth."""
    cols = ["case", "dtype", "provider", "passes fwd / step", "GB fwd / step"] + [f"{g} µs fwd / step" for g in GPUS]
    lines = []
    for r in rs:
        f, s = r["fwd"], r["step"]
        lines.append([r["case"], r["dtype"], r["provider"], f"{_fmt(f['passes'], '{}')} / {_fmt(s['passes'], '{}')}",
                      f"{_fmt(f['gb'], '{:.3f}')} / {_fmt(s['gb'], '{:.3f}')}"]
                     + [f"{_fmt(f['us'][g])} / {_fmt(s['us'][g])}" for g in GPUS])
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = "  ".join("{:<%d}" % w if i < 3 else "{:>%d}" % w for i, w in enumerate(widths))
    return "\n".join([fmt.format(*cols), "-" * (sum(widths) + 2 * len(widths) - 2)] + [fmt.format(*x) for x in lines])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="a Markdown table (for benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    print("Peak HBM bandwidth (vendor datasheets), TB/s: " + ", ".join(f"{g} {bw}" for g, bw in GPUS.items()))
    print(table(rows(), args.markdown))


if __name__ == "__main__":
    main()
