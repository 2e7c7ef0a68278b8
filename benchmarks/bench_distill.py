#!/usr/bin/env python
"""Distillation, forward+backward: lsce.distillation_loss and lsce.linear_distillation_loss
against the PyTorch composition (log_softmax + F.kl_div + F.cross_entropy), eager and compiled.

    .venv/bin/python benchmarks/bench_distill.py            # materialised 4096×32000, fused 2048×1024×32000; fp32
    .venv/bin/python benchmarks/bench_distill.py --quick    # small sizes: a smoke test
    .venv/bin/python benchmarks/bench_distill.py --forms materialised --teachers topk --k 128 --temperature 4

Every provider computes the same loss (issue 16; lsce/distillation.py's docstring),

    alpha · T² · D_β(teacher^T, student^T) + (1 − alpha) · CE_ε(student, target),   reduction="mean",

with --alpha, --temperature (T), --beta (β) and --eps (ε) (defaults 0.5, 2, 0, 0.1):

    lsce           lsce.distillation_loss (materialised) or lsce.linear_distillation_loss (fused)
    torch          the eager composition: F.log_softmax of both, F.kl_div(log_target=True,
                   reduction="batchmean") for each KL of D_β, F.cross_entropy(label_smoothing=ε);
                   fused: F.linear of the hidden states first
    torch_compile  torch.compile(dynamic=False) of that same function

Teachers: ``dense``, the teacher's logits over the whole vocabulary (materialised) or its
hidden states and LM head (fused); ``topk``, an offline teacher's --k ids and log-probabilities
at T = 1 (lsce's topk_mass="renormalize": both distributions restricted to the k ids and
renormalised there; the composition gathers the student's k logits).

Forms: ``materialised`` (N×K logits given, --case NxK) and ``fused`` (hidden states (N, H) and
LM heads (K, H), --fused-case NxHxK; a live teacher has the student's H).

Each case runs in fresh processes: one checks every provider's loss and gradients against the
composition in fp64 and then times them, interleaved round by round with the bandwidth floor;
one more per provider measures the peak memory of one step. benchmarks/README.md explains the
columns. Writes a table to the terminal and one CSV row per (case, provider) to
benchmarks/out/distill.csv (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
try:
    import lsce
except ImportError:  # a checkout without PYTHONPATH: use the repository's package
    sys.path.insert(0, str(ROOT))
    import lsce
from measure import (CPU_MEMORY_ENV, FLOOR_COLUMN, PeakMemory, floor_stages, format_table, reply, time_stages,
                     worker_result, write_csv)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("lsce", "torch", "torch_compile")
FORMS = ("materialised", "fused")
TEACHERS = ("dense", "topk")
CASE = {False: (4096, 32000), True: (256, 4000)}  # materialised N×K; by --quick
FUSED_CASE = {False: (2048, 1024, 32000), True: (128, 64, 4000)}  # fused N×H×K; by --quick
SETTINGS = dict(alpha=0.5, temperature=2.0, beta=0.0, label_smoothing=0.1)  # the flags' defaults
TOP_K = 64
CALIBRATION_BYTES = 256 << 20
# The check: relative to |loss| and to max |gradient| of the fp64 composition; below fp32 on top
# of the eager composition's own error at that dtype ("no further from the truth than PyTorch").
TOL = {"fp32": 1e-4, "bf16": 2.0**-7, "fp16": 2.0**-10}
# The done-when: the materialised dense step at least 5× faster than eager PyTorch;
# the fused step's transient memory (peak without the gradients returned) at most 15% of PyTorch's.
SPEEDUP_TARGET, TRANSIENT_TARGET = 5.0, 0.15


# ---------------------------------------------------------------- the loss, three ways


def divergence(log_t, log_s, beta: float):
    """D_β(t, s) averaged over rows, from log-probabilities (lsce/distillation.py's convention).
    F.kl_div(a, b, log_target=True) is KL(exp b ‖ exp a)."""
    def kl(log_p, log_q):
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

    if beta == 0:
        return kl(log_t, log_s)
    if beta == 1:
        return kl(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return (1 - beta) * kl(log_t, log_m) + beta * kl(log_s, log_m)


def composition(s: dict, teacher: str):
    """PyTorch's statement of the loss, a function of the case's inputs (make_inputs' dict)."""
    T = s["temperature"]

    def fn(b):
        if "x" in b:  # fused: the LM heads' logits first
            z = F.linear(b["x"], b["W"])
            t = F.linear(b["xt"], b["Wt"]) if teacher == "dense" else None
        else:
            z, t = b["z"], b.get("t")
        if teacher == "dense":
            z_kd, log_t = z, F.log_softmax(t / T, -1)
        else:  # the student's logits at the teacher's k ids; both renormalised over them
            z_kd, log_t = z.gather(1, b["ids"]), F.log_softmax(b["lp"] / T, -1)
        kd = divergence(log_t, F.log_softmax(z_kd / T, -1), s["beta"])
        ce = F.cross_entropy(z, b["y"], label_smoothing=s["label_smoothing"])
        return s["alpha"] * T * T * kd + (1 - s["alpha"]) * ce

    return fn


def lsce_loss(s: dict, teacher: str):
    def fn(b):
        if teacher == "dense":
            tk = (dict(teacher_hidden=b["xt"], teacher_weight=b["Wt"]) if "x" in b
                  else dict(teacher_logits=b["t"]))
        else:
            tk = dict(teacher_topk_ids=b["ids"], teacher_topk_logprobs=b["lp"])
        if "x" in b:
            return lsce.linear_distillation_loss(b["x"], b["W"], b["y"], **tk, **s)
        return lsce.distillation_loss(b["z"], b["y"], **tk, **s)

    return fn


def loss_fn(provider: str, s: dict, teacher: str):
    if provider == "lsce":
        return lsce_loss(s, teacher)
    if provider == "torch":
        return composition(s, teacher)
    if provider == "torch_compile":
        torch._dynamo.reset()  # one compilation per case and process, from scratch
        return torch.compile(composition(s, teacher), dynamic=False)
    raise ValueError(provider)


# ---------------------------------------------------------------- cases and inputs


def case_spec(form: str, teacher: str, dtype: str = "fp32", shape=None, k: int = TOP_K, settings=None,
              reps: int = 2, device: str = "cpu") -> dict:
    """What a worker needs to know of a case; shape (N, K) or (N, H, K) defaults to --quick's."""
    shape = shape or (FUSED_CASE if form == "fused" else CASE)[True]
    N, H, K = shape if len(shape) == 3 else (shape[0], 0, shape[1])
    return dict(device=device, form=form, teacher=teacher, dtype=dtype, N=N, H=H, K=K, k=min(k, K),
                settings=dict(settings or SETTINGS), reps=reps)


def make_inputs(spec: dict, device) -> dict:
    """The case's tensors (the same for the same spec); those that take a gradient (the
    student's logits, or its hidden states and weight) require it."""
    dtype = DTYPES[spec["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)
    N, H, K = spec["N"], spec["H"], spec["K"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    if spec["form"] == "fused":
        b = dict(x=randn(N, H), W=randn(K, H, scale=H**-0.5), xt=randn(N, H), Wt=randn(K, H, scale=H**-0.5))
        teacher_logits = F.linear(b["xt"].float(), b["Wt"].float()) if spec["teacher"] == "topk" else None
    else:
        b = dict(z=randn(N, K, scale=2.0), t=randn(N, K, scale=2.0))
        teacher_logits = b["t"].float()
    b["y"] = torch.randint(0, K, (N,), generator=g, device=device)
    if spec["teacher"] == "topk":  # an offline teacher's top-k at T = 1; its dense form is not an input
        lp, ids = torch.log_softmax(teacher_logits, -1).topk(spec["k"], -1)
        b.update(ids=ids, lp=lp.to(dtype))
        for name in ("t", "xt", "Wt"):
            b.pop(name, None)
    return with_grad(b)


def with_grad(b: dict) -> dict:
    for name in trainable(b):
        b[name].requires_grad_(True)
    return b


def ground_truth(spec: dict, b: dict):
    """(loss, gradients) of the composition in fp64 on the same inputs, in row chunks (the fp64
    temporaries of N×K at once would take several GB at the default size). Each term of the
    loss is a mean over rows, so the loss is Σ_c (n_c / N)·loss_c, and so are the gradients."""
    fn, N = composition(spec["settings"], spec["teacher"]), spec["N"]
    rows = max(1, (1 << 22) // spec["K"])
    b64 = {n: t.detach().double() if t.is_floating_point() else t for n, t in b.items()}
    loss, row_grads, weight_grad = 0.0, [], 0
    for i in range(0, N, rows):
        chunk = with_grad({n: t if n in ("W", "Wt") else t[i:i + rows] for n, t in b64.items()})
        out = step(fn, chunk)
        scale = out[1].shape[0] / N
        loss += float(out[0].detach()) * scale
        row_grads.append(out[1] * scale)
        if len(out) > 2:
            weight_grad = weight_grad + out[2] * scale
    return (loss, torch.cat(row_grads)) + ((weight_grad,) if "W" in b else ())


def trainable(b: dict):
    return ("x", "W") if "x" in b else ("z",)


def step(fn, b: dict):
    """The measured unit: the loss and its gradients with respect to the student's inputs."""
    loss = fn(b)
    return (loss,) + torch.autograd.grad(loss, [b[n] for n in trainable(b)])


def must_move(spec: dict) -> int:
    """Bytes a forward+backward step must move at the least: reading every input once
    (the target, and the teacher's ids, as int64) and writing every gradient once."""
    N, H, K, k, e = spec["N"], spec["H"], spec["K"], spec["k"], DTYPES[spec["dtype"]].itemsize
    topk = spec["teacher"] == "topk"
    if spec["form"] == "fused":  # read x, W; write dx, dW; read the live teacher's xt, Wt
        student, teacher = 2 * (N * H + K * H) * e, (N * k * (8 + e) if topk else (N * H + K * H) * e)
    else:  # read z, write dz; read the teacher's logits, or its ids and log-probabilities
        student, teacher = 2 * N * K * e, (N * k * (8 + e) if topk else N * K * e)
    return student + teacher + 8 * N


def must_compute(spec: dict) -> int:
    """Fused: the matmuls' flops a step must do: the student's logits and both gradients
    (3 × 2NHK) and a live teacher's logits (2NHK); 0 for materialised logits."""
    if spec["form"] != "fused":
        return 0
    N, H, K = spec["N"], spec["H"], spec["K"]
    return (6 + (2 if spec["teacher"] == "dense" else 0)) * N * H * K


def grad_bytes(spec: dict) -> int:
    """The gradients every provider returns (the student's logits, or hidden states and weight)."""
    e = DTYPES[spec["dtype"]].itemsize
    return (spec["N"] * spec["H"] + spec["K"] * spec["H"] if spec["form"] == "fused" else spec["N"] * spec["K"]) * e


# ---------------------------------------------------------------- worker side


def errors(out, truth):
    """(|loss − truth| / max(1, |truth|), max over the gradients of max |g − truth| / max |truth|)."""
    loss = abs(float(out[0].detach()) - float(truth[0])) / max(1.0, abs(float(truth[0])))
    grad = max(float((g.double() - t).abs().max() / t.abs().max().clamp(min=1e-30)) for g, t in zip(out[1:], truth[1:]))
    return loss, grad


def time_worker(spec: dict) -> dict:
    """Checks every provider against the composition in fp64, then times the ones that pass:
    the copy_ floor and their steps in the same rounds, interleaved, each round starting one
    stage later, so that a change in the machine's load falls on each alike."""
    device = torch.device(spec["device"])
    b = make_inputs(spec, device)
    truth = ground_truth(spec, b)
    fns, results = {}, {}
    for name in spec["providers"]:
        try:
            fn = loss_fn(name, spec["settings"], spec["teacher"])
            out = step(fn, b)  # also compiles torch_compile, before any timing
            loss_err, grad_err = errors(out, truth)
            results[name] = dict(loss=float(out[0].detach()), loss_err=loss_err, grad_err=grad_err)
            fns[name] = fn
        except Exception as e:  # noqa: BLE001 (reported in its row, the others go on)
            results[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    del truth
    base = results.get("torch", {}) if spec["dtype"] != "fp32" else {}
    for name, r in results.items():
        if "error" not in r:
            tol = TOL[spec["dtype"]]
            ok = (r["loss_err"] <= tol + base.get("loss_err", 0) and r["grad_err"] <= tol + base.get("grad_err", 0))
            r["status"] = "ok" if ok else f"FAILED (loss err {r['loss_err']:.1e}, grad err {r['grad_err']:.1e})"
    timed = [n for n in fns if results[n]["status"] == "ok"]
    # The floor: a copy_ into memory already mapped of a buffer half the step's bytes, so the
    # copy's read + write move exactly the bytes the step must move.
    floor = floor_stages(torch.ones(must_move(spec) // 8, dtype=torch.float32, device=device))[FLOOR_COLUMN["copy"]]
    stages = [floor] + [lambda _, fn=fns[n]: step(fn, b) for n in timed]
    times = time_stages(stages, device, spec["reps"], min_repeats=spec["reps"], warmup_s=0, rotate=True)
    floor_ms = 1e3 * float(np.median(times[:, 0]))
    for name, t in zip(timed, times[:, 1:].T):
        q1, med, q3 = np.percentile(1e3 * t, [25, 50, 75])
        results[name].update(time_ms=float(med), q1_ms=float(q1), q3_ms=float(q3), time_min_ms=1e3 * float(t.min()),
                             floor_ms=floor_ms)
    return results


def memory_worker(spec: dict) -> dict:
    """Peak memory of one provider's step in this fresh process, after one untimed step on the
    same inputs (compilation, thread pools, lazy initialisation; lsce's gradient cache emptied
    after it, so that the measured step allocates its gradients as a first step does)."""
    device = torch.device(spec["device"])
    meter = PeakMemory(device)
    seen = meter.calibrate(CALIBRATION_BYTES)
    b = make_inputs(spec, device)
    fn = loss_fn(spec["provider"], spec["settings"], spec["teacher"])
    step(fn, b)
    lsce.empty_cache()
    peak = meter.during(lambda: step(fn, b))
    return dict(peak_mb=peak / 2**20, calibration_seen_mb=seen / 2**20)


# ---------------------------------------------------------------- driver side


def in_subprocess(kind: str, spec: dict) -> dict:
    """A worker in a fresh interpreter; {"error": ...} if it fails. CPU memory workers run with
    CPU_MEMORY_ENV, so that freed tensors leave the resident set."""
    env = CPU_MEMORY_ENV if kind == "memory" and spec["device"] == "cpu" else None
    return worker_result(__file__, [f"--{kind}-worker", json.dumps(spec)], env=env)


def derived(r: dict, torch_row) -> None:
    """The ratios of a timed and measured row: bandwidth, floor, PyTorch eager, memory."""
    t = r.get("time_ms")
    if t:
        r["gbps"] = r["bytes_mb"] * 2**20 / (t / 1e3) / 1e9
        r["pct_floor"] = 100 * r["floor_ms"] / t
        r["tflops"] = r["flop"] / (t / 1e3) / 1e12 if r["flop"] else math.nan
        r["vs_torch"] = torch_row["time_ms"] / t if torch_row and torch_row.get("time_ms") else math.nan
    if "peak_mb" in r:
        r["x_logits"] = r["peak_mb"] / r["logits_mb"]
        if torch_row and "peak_mb" in torch_row:
            r["transient_vs_torch"] = (r["peak_mb"] - r["grads_mb"]) / (torch_row["peak_mb"] - torch_row["grads_mb"])


COLUMNS = [  # (field, heading, format)
    ("form", "form", "{}"), ("teacher", "teacher", "{}"), ("shape", "case", "{}"), ("dtype", "dtype", "{}"),
    ("provider", "provider", "{}"), ("time_ms", "ms", "{:.1f}"), ("q1_ms", "q1", "{:.1f}"), ("q3_ms", "q3", "{:.1f}"),
    ("gbps", "GB/s", "{:.2f}"), ("pct_floor", "%floor", "{:.0f}%"), ("tflops", "TFLOP/s", "{:.3f}"),
    ("vs_torch", "vs_torch", "{:.2f}x"), ("peak_mb", "peak_MB", "{:.0f}"), ("x_logits", "x_logits", "{:.2f}"),
    ("transient_vs_torch", "T/torch", "{:.3f}"), ("loss", "loss", "{:.6f}"), ("loss_err", "loss_err", "{:.1e}"),
    ("grad_err", "grad_err", "{:.1e}"), ("status", "status", "{}"),
]
CSV_FIELDS = [c[0] for c in COLUMNS] + [
    "N", "H", "K", "k", "alpha", "temperature", "beta", "label_smoothing", "reps", "threads", "device",
    "time_min_ms", "floor_ms", "bytes_mb", "flop", "logits_mb", "grads_mb", "calibration_seen_mb", "error"]


def targets(rows) -> list:
    """The issue's done-when, per case, for lsce's row."""
    notes = []
    for r in rows:
        if r["provider"] != "lsce":
            continue
        where = f"{r['form']} {r['teacher']} {r['shape']} {r['dtype']}"
        if r["form"] == "materialised" and r["teacher"] == "dense" and "vs_torch" in r:
            notes.append(f"target ({where}): {r['vs_torch']:.2f}× eager PyTorch (≥ {SPEEDUP_TARGET})")
        if r["form"] == "fused" and "transient_vs_torch" in r:
            notes.append(f"target ({where}): transient memory {r['transient_vs_torch']:.3f} of eager PyTorch's "
                         f"(≤ {TRANSIENT_TARGET})")
    return notes


def parse_shape(text: str, parts: int):
    """"4096x32000" → (4096, 32000); argparse reports a wrong count of sizes or a non-number."""
    values = tuple(int(v) for v in text.lower().split("x"))
    if len(values) != parts:
        raise argparse.ArgumentTypeError(f"expected {parts} sizes joined by x, got {text!r}")
    return values


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a smoke test")
    ap.add_argument("--case", type=lambda text: parse_shape(text, 2),
                    help="materialised N×K (default 4096x32000; --quick 256x4000)")
    ap.add_argument("--fused-case", type=lambda text: parse_shape(text, 3),
                    help="fused N×H×K (default 2048x1024x32000; --quick 128x64x4000)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--teachers", default=",".join(TEACHERS))
    ap.add_argument("--dtypes", default="fp32", help=f"comma-separated, of {','.join(DTYPES)}")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--k", type=int, default=TOP_K, help="the top-k teacher's k")
    ap.add_argument("--alpha", type=float, default=SETTINGS["alpha"])
    ap.add_argument("--temperature", type=float, default=SETTINGS["temperature"])
    ap.add_argument("--beta", type=float, default=SETTINGS["beta"])
    ap.add_argument("--eps", type=float, default=SETTINGS["label_smoothing"],
                    help="label smoothing of the cross-entropy term")
    ap.add_argument("--reps", type=int, help="timed rounds (after one untimed round; default 5, --quick 2)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "distill.csv"))
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--time-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        return reply(memory_worker(json.loads(args.memory_worker)))
    if args.time_worker:
        return reply(time_worker(json.loads(args.time_worker)))

    for name, values, allowed in (("form", args.forms, FORMS), ("teacher", args.teachers, TEACHERS),
                                  ("dtype", args.dtypes, DTYPES), ("provider", args.providers, PROVIDERS)):
        if bad := [v for v in values.split(",") if v not in allowed]:
            ap.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    shapes = {"materialised": args.case or CASE[args.quick], "fused": args.fused_case or FUSED_CASE[args.quick]}
    settings = dict(alpha=args.alpha, temperature=args.temperature, beta=args.beta, label_smoothing=args.eps)
    reps = args.reps or (2 if args.quick else 5)
    names = args.providers.split(",")
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} reps={reps} "
          f"alpha={args.alpha} T={args.temperature} beta={args.beta} eps={args.eps} k={args.k}", flush=True)

    rows = []
    for form in args.forms.split(","):
        for teacher in args.teachers.split(","):
            for dtype in args.dtypes.split(","):
                spec = case_spec(form, teacher, dtype, shapes[form], args.k, settings, reps, args.device)
                N, H, K = spec["N"], spec["H"], spec["K"]
                timed = in_subprocess("time", dict(spec, providers=names))
                e = DTYPES[dtype].itemsize
                group = []
                for name in names:
                    r = dict(spec, provider=name, shape="x".join(str(v) for v in (N, H, K) if v), **settings,
                             threads=torch.get_num_threads(), bytes_mb=must_move(spec) / 2**20,
                             flop=must_compute(spec), logits_mb=N * K * e / 2**20, grads_mb=grad_bytes(spec) / 2**20)
                    r.pop("settings")
                    r.update(timed.get(name, {}) if "error" not in timed else {"error": timed["error"]})
                    if args.memory and r.get("status") == "ok":  # measure only what computes the loss
                        memory = in_subprocess("memory", dict(spec, provider=name))
                        r.update({"error": f"memory: {memory['error']}"} if "error" in memory else memory)
                    r.setdefault("status", f"FAILED ({r['error']})" if "error" in r else "")
                    group.append(r)
                eager = next((r for r in group if r["provider"] == "torch"), None)
                for r in group:
                    derived(r, eager)
                rows += group
                print(f"{form} {teacher} {dtype}: " + ", ".join(
                    f"{r['provider']} {r['time_ms']:.1f} ms" if "time_ms" in r else f"{r['provider']} -" for r in group), flush=True)
    print("\n" + format_table(rows, COLUMNS))
    seen = [r["calibration_seen_mb"] for r in rows if "calibration_seen_mb" in r]
    if seen:
        print(f"calibration: a {CALIBRATION_BYTES >> 20} MB buffer measured as {min(seen):.1f}-{max(seen):.1f} MB")
    for note in targets(rows):
        print(note)
    out = write_csv(args.out, rows, CSV_FIELDS)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
