"""How benchmarks/ and examples/ measure: one clock, one stage timer, one
peak-memory meter, one way to run a worker in a fresh interpreter, and a free
TCP port for process groups.

    Clock(device)         .now(): seconds (CUDA: after the queued kernels finish); .since(t)
    time_stages(...)      seconds of each stage per timed run, an array (runs, stages)
    floor_stages(t)       stages that only move t's bytes (sum, clone, copy_): the bandwidth floors
    PeakMemory(device)    .start(), then .peak(): peak bytes above the level at start();
                          .during(action), .calibrate(nbytes)
    run_worker(...)       a script in a fresh interpreter, the same lsce; returns its reply()
    worker_result(...)    run_worker's reply, or {"error": why} when the worker failed
    CPU_MEMORY_ENV        the environment of a worker that measures CPU peak memory
    format_table(...)     result rows as an aligned text table; write_csv(...) as a CSV file
    reply(value)          a worker's answer: one line of JSON on stdout
    free_port()           a TCP port on 127.0.0.1 that was free a moment ago

Scripts in benchmarks/ import it directly (their folder is on sys.path); the
examples and tests add benchmarks/ to sys.path in one line first.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch


# ----------------------------------------------------------------------------- time
def synchronize(device) -> None:
    """Waits for the kernels queued on a CUDA device; nothing on CPU, whose ops are synchronous."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """The host's monotonic clock in seconds; on CUDA each reading first waits for
    the queued kernels, so that the work launched before it is counted."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def since(self, start: float) -> float:
        return self.now() - start


def time_stages(stages: Sequence[Callable], device, repeats: int, budget_s: float = float("inf"),
                min_repeats: int = 3, warmup_s: float = 0.25, rotate: bool = False,
                before: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Seconds of each stage per timed run: an array of shape (runs, stages), columns in
    the order of `stages`.

    One run calls the stages in turn, each on the previous call's result (the first on
    None), and times each alone; the result a stage no longer needs is freed between two
    timings, not inside one. With `rotate`, run r starts at stage r mod len(stages) (for
    independent stages: a change in the machine's load then falls on each alike).
    `before`, if given, is called untimed before every stage (e.g. a barrier).
    Warm-up: untimed runs, at least one and, until `warmup_s` has passed, at most 10.
    Then up to `repeats` timed runs, stopping early once `min_repeats` are done and
    `budget_s` has passed (min_repeats = repeats: exactly `repeats` runs). On CUDA the
    clock is a pair of CUDA events per stage, read after a synchronize at the end of the
    run; CPU ops are synchronous and read perf_counter.
    """
    cuda = torch.device(device).type == "cuda"

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def run(r):
        k = r % len(stages) if rotate else 0
        marks, out = {}, None
        for i in list(range(k, len(stages))) + list(range(k)):
            if before is not None:
                before()
            start = mark()
            result = stages[i](out)
            marks[i] = (start, mark())
            out = result  # frees the previous result here, between two timings: freeing a large
            del result  # tensor (munmap) costs tens of ms, which belong to no stage
        del out
        if cuda:
            torch.cuda.synchronize()
        pairs = [marks[i] for i in range(len(stages))]
        return [a.elapsed_time(b) / 1e3 for a, b in pairs] if cuda else [b - a for a, b in pairs]

    start, n = time.perf_counter(), 0
    while n < 1 or (n < 10 and time.perf_counter() - start < warmup_s):
        run(n)
        n += 1
    samples, start = [], time.perf_counter()
    while len(samples) < repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        samples.append(run(len(samples)))
    return np.array(samples)


def floor_stages(t):
    """Stages for time_stages that only move the bytes of tensor t, the floors a step on it is
    compared with (FLOOR_COLUMN names their columns): one read (t.sum()); a read and a write
    into new memory (clone, whose page faults a fresh gradient pays too); a read and a write
    into memory already mapped (copy_: bandwidth alone)."""
    flat = t.detach()
    warm = flat.clone()
    return [lambda _: flat.sum(), lambda _: flat.clone(), lambda _: warm.copy_(flat)]


FLOOR_COLUMN = {"sum": 0, "clone": 1, "copy": 2}


# ----------------------------------------------------------------------------- memory
# A worker that measures CPU peak memory runs with this: glibc then gives every allocation of
# 64 KiB or more its own mapping, returned to the OS when freed, so that the resident set
# follows the live tensors instead of keeping freed heap (which would hide a step's peak).
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class PeakMemory:
    """Peak bytes above the level at start(). CUDA: the caching allocator's counters
    (max_memory_allocated after reset_peak_memory_stats). CPU: PyTorch keeps no peak
    for CPU tensors, so the process's resident set from /proc/self/status: writing "5"
    to /proc/self/clear_refs resets its high-water mark VmHWM to the current VmRSS
    (Linux >= 4.0); it counts pages actually touched, by anything in the process."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.base = 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        """Bytes; on CPU it can be a few pages below 0 (RSS read just after the reset)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base

    def during(self, action) -> int:
        """Peak bytes above what was held before, while `action()` runs (never below 0: on
        CPU the RSS read just after the reset can exceed the later high-water mark by a few pages)."""
        gc.collect()
        self.start()
        action()
        return max(self.peak(), 0)

    def calibrate(self, nbytes: int) -> int:
        """The peak this meter sees for a buffer of `nbytes` made and freed: a worker reports it
        next to its measurements, to show whether the method sees the bytes it should."""
        self.start()
        buffer = torch.ones(nbytes // 4, device=self.device)
        seen = self.peak()
        del buffer
        return seen


# ----------------------------------------------------------------------------- processes
class WorkerError(RuntimeError):
    """A worker that exited with an error, ran out of time or replied nothing; the
    message is the last line of its stderr, .stderr all of it."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


def reply(value) -> None:
    """The worker's side of run_worker: its answer, one line of JSON on stdout."""
    print(json.dumps(value), flush=True)


def run_worker(script, args: Sequence[str], env: Optional[dict] = None, timeout: Optional[float] = None):
    """Runs `python script *args` in a fresh interpreter and returns the JSON value on
    the last line of its stdout (see reply()). The child imports the lsce this process
    imported (an installed one, with its compiled _C, ahead of a checkout's source):
    its folder goes first on PYTHONPATH. `env`: variables to set on top of this
    process's. Raises WorkerError if it fails, times out or replies nothing."""
    env = dict(os.environ, **(env or {}))
    lsce = sys.modules.get("lsce")
    if lsce is not None and getattr(lsce, "__file__", None):
        root = str(Path(lsce.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise WorkerError(f"timed out after {timeout} s", stderr) from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no reply"])[-1]
    raise WorkerError(why, proc.stderr)


def worker_result(script, args: Sequence[str], env: Optional[dict] = None, timeout: Optional[float] = None):
    """run_worker's reply, or {"error": the reason} if the worker failed: a sweep reports a
    failed measurement and goes on."""
    try:
        return run_worker(script, args, env=env, timeout=timeout)
    except WorkerError as e:
        return dict(error=str(e))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS had free just now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- output
def _cell(value, fmt: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows, columns) -> str:
    """Rows (dicts) as a text table, a heading line, a rule, then one line per row. `columns`:
    (field, heading, format) each; a value that is missing, empty or NaN shows as "-"."""
    cells = [[h for _, h, _ in columns]] + [[_cell(r.get(k), f) for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def write_csv(path, rows, fields: Sequence[str]) -> Path:
    """Rows (dicts) as a CSV file with the columns `fields` (other keys are left out); makes its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
