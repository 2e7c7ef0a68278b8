#!/usr/bin/env python
"""Communication volume and time of lsce.distributed.vocab_parallel_cross_entropy.

    .venv/bin/python benchmarks/bench_distributed.py                      # N=4096, K=128256 over 2 and 4 ranks
    .venv/bin/python benchmarks/bench_distributed.py --rows 512 --vocab 32000 --repeats 2   # a quick run

Compares, per training step (forward + backward), the bytes this design moves
between ranks (per-row scalars) with gathering the logits (N·K·b), both as
computed from the formula and as measured by wrapping the torch.distributed
collectives, on W CPU processes with the gloo backend. Times: the median step
on rank 0; "slice alone" is ``lsce.cross_entropy`` on the same slice with no
communication (the floor), run on every rank at once like the others; "in
collectives" includes waiting for the slowest rank. Each rank runs on
``cores // W`` threads (at least 1: 4 ranks on a 2-core machine are
oversubscribed, so times there show the contention, not the method).

The gather-the-logits baseline is run at ``--baseline-rows`` rows (its
gathered logits and their gradient are N·K each on every rank, 4·W GB at the
full size in fp32) and its bytes and time are scaled to N rows: both grow
linearly with the rows. Writes a table to the terminal and OUT/distributed.csv.

``--parallel`` adds the steps of PyTorch's own distributed stack, each
against PyTorch's equivalent in the same run (OUT/distributed_parallel.csv):

* DTensor tensor parallelism: logits ``Shard(1)`` over a 1-D mesh of W ranks
  (a ColwiseParallel head's output), ``lsce.cross_entropy`` on the DTensor;
  PyTorch: ``loss_parallel()`` at ``--eps 0`` (it does not compute ε > 0),
  else ``F.cross_entropy`` of the gathered logits (``full_tensor()``).
* The fused DTensor head: ``lsce.linear_cross_entropy`` with the head's weight
  ``Shard(0)`` (ColwiseParallel, ``--hidden`` features); PyTorch: the
  ColwiseParallel head's logits, then as above.
* FSDP2: the LM head an FSDP2 unit of its own inside a root module, each rank
  with N rows of its own; lsce: ``lsce.linear_cross_entropy`` on the gathered
  head (``lsce.integrations.fsdp.unsharded``); PyTorch: the head's forward and
  ``F.cross_entropy`` of the materialised logits.

Each of those runs in fresh processes: the peak is the resident-memory peak
of rank 0's first step above its level before it (what the step itself
touches), the time the median of ``--repeats`` later steps on rank 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import lsce
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import lsce
from lsce.distributed import vocab_parallel_cross_entropy
from measure import free_port, time_stages, write_csv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
EPS = 0.1
META_BYTES = 8 * 8  # the argument check: 8 int64 per rank
CSV_FIELDS = ["world", "N", "K", "dtype", "method", "collectives", "bytes_received_computed",
              "bytes_received_measured", "bytes_sent_measured", "measured_at_rows", "step_ms", "collective_ms",
              "threads_per_rank"]


class CollectiveCounter:
    """Wraps torch.distributed's collectives to record, per call, bytes sent and received and its time."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce")

    def __init__(self):
        self.calls = []
        self._originals = {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrapped(name, self._originals[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._originals.items():
            setattr(dist, name, fn)

    def _wrapped(self, name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds = time.perf_counter() - start
            first, second = args[0], args[1] if len(args) > 1 else None
            if name == "all_reduce":
                sent = received = first.nbytes
            elif name == "all_gather":
                sent, received = second.nbytes, sum(t.nbytes for t in first)
            else:
                sent, received = second.nbytes, first.nbytes
            self.calls.append((name, sent, received, seconds))
            return result

        return call

    def totals(self, first=0):
        """(count, bytes sent, bytes received, seconds) of the calls from index `first` on."""
        calls = self.calls[first:]
        return len(calls), sum(c[1] for c in calls), sum(c[2] for c in calls), sum(c[3] for c in calls)


def gather_logits_step(local_logits, target, rank, world):
    """The baseline: all_gather the slices into the full logits, then the
    single-process loss and gradient, of which this rank keeps its slice."""
    N, width = local_logits.shape
    gathered = local_logits.new_empty((world * N, width))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local_logits.detach().contiguous())
    full = gathered.view(world, N, width).permute(1, 0, 2).reshape(N, world * width).requires_grad_(True)
    lsce.cross_entropy(full, target, label_smoothing=EPS).backward()
    return full.grad[:, rank * width:(rank + 1) * width]


def _timed_steps(steps, repeats):
    """Per method, the median wall time (s) of a step and its collectives (count,
    bytes sent, bytes received, median seconds inside them). The methods take
    turns, each round starting one later, after a barrier each, so that the
    machine's slow spells fall on all of them; one untimed round first (first
    touch of the gradient's pages). Every rank runs the same rounds in the same
    order, as its collectives require."""
    counts = {name: [] for name in steps}

    def counted(name, step):
        def stage(_):
            first = len(counter.calls)
            step()
            counts[name].append(counter.totals(first))
        return stage

    with CollectiveCounter() as counter:
        times = time_stages([counted(name, step) for name, step in steps.items()], "cpu", repeats,
                            min_repeats=repeats, warmup_s=0, rotate=True, before=dist.barrier)
    return {
        name: (float(statistics.median(t)), *counts[name][-1][:3], statistics.median(c[3] for c in counts[name][1:]))
        for name, t in zip(steps, times.T)
    }


def _worker(rank, world, port, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = DTYPES[args.dtype]
    N, K = args.rows, args.vocab
    width = K // world + (rank < K % world)
    gen = torch.Generator().manual_seed(rank)
    target = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(1234))
    local = (torch.randn((N, width), generator=gen) * 2).to(dtype).requires_grad_(True)
    local_target = target % width

    def ours():
        vocab_parallel_cross_entropy(local, target, label_smoothing=EPS).backward()
        local.grad = None

    def slice_alone():  # the same kernels on the same slice, without the collectives: the floor
        lsce.cross_entropy(local, local_target, label_smoothing=EPS).backward()
        local.grad = None

    steps = {"vocab-parallel (lsce)": (N, ours), "slice alone, no comm.": (N, slice_alone)}
    if K % world == 0:  # the baseline's gather needs equal slices
        b_rows = min(args.baseline_rows, N)
        b_local = (torch.randn((b_rows, width), generator=gen) * 2).to(dtype)
        steps["gather logits"] = (b_rows, lambda: gather_logits_step(b_local, target[:b_rows], rank, world))
    timed = _timed_steps({name: step for name, (_, step) in steps.items()}, args.repeats)
    if rank == 0:
        rows = [(name, steps[name][0]) + timed[name] for name in steps]
        torch.save(dict(rows=rows, threads=threads), Path(out_dir) / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


PARALLEL_FIELDS = ["world", "N", "K", "H", "dtype", "eps", "step", "provider", "step_ms", "peak_MiB",
                   "threads_per_rank"]


def _parallel_keys(eps):
    """(step, provider) of each --parallel measurement, lsce's first."""
    theirs = "loss_parallel" if eps == 0 else "materialised logits"
    return [("DTensor logits Shard(1)", "lsce"), ("DTensor logits Shard(1)", theirs),
            ("DTensor head ColwiseParallel", "lsce fused"), ("DTensor head ColwiseParallel", theirs),
            ("FSDP2 head unit", "lsce fused"), ("FSDP2 head unit", "materialised logits")]


def _parallel_step(rank, world, args, key):
    """A callable running one training step of ``key`` (step, provider) on this rank; only its own tensors built."""
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    from lsce.integrations.fsdp import unsharded

    dtype, eps, N, K, H = DTYPES[args.dtype], args.eps, args.rows, args.vocab, args.hidden
    step, provider = key
    ours = provider.startswith("lsce")
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(1234)
    target = torch.randint(0, K, (N,), generator=gen)

    def torch_loss(z):
        if eps == 0:
            with loss_parallel():
                F.cross_entropy(z, target).backward()
        else:
            F.cross_entropy(z.full_tensor(), target, label_smoothing=eps).backward()

    if step.startswith("DTensor logits"):
        logits = distribute_tensor((torch.randn((N, K), generator=gen) * 2).to(dtype), mesh, [Shard(1)],
                                   src_data_rank=None).requires_grad_(True)
        if ours:
            return lambda: lsce.cross_entropy(logits, target, label_smoothing=eps).backward()
        return lambda: torch_loss(logits)
    if step.startswith("DTensor head"):
        hidden = (torch.randn((N, H), generator=gen) / H ** 0.5).to(dtype).requires_grad_(True)
        head = nn.Linear(H, K, bias=False, dtype=dtype)
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
        if ours:
            return lambda: lsce.linear_cross_entropy(hidden, head.weight, target, label_smoothing=eps).backward()
        return lambda: torch_loss(head(hidden))

    class Root(nn.Module):  # an FSDP2 root whose forward computes the loss; its head a unit of its own
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(H, K, bias=False, dtype=dtype)

        def forward(self, x, y):
            if ours:
                with unsharded(self.head):
                    return lsce.linear_cross_entropy(x, self.head.weight, y, label_smoothing=eps)
            return F.cross_entropy(self.head(x), y, label_smoothing=eps)

    root = Root()
    fully_shard(root.head, mesh=mesh)
    fully_shard(root, mesh=mesh)
    rows = (torch.randn((N, H), generator=torch.Generator().manual_seed(rank)) / H ** 0.5).to(dtype)
    rows.requires_grad_(True)  # each rank's rows of its own (data parallel)
    return lambda: root(rows, target).backward()


def _parallel_worker(rank, world, port, args, key, out_dir):
    """One step of --parallel in fresh processes: rank 0's peak of the first step, then the median time."""
    from measure import PeakMemory

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    step = _parallel_step(rank, world, args, key)
    meter = PeakMemory("cpu")
    dist.barrier()
    meter.start()
    step()
    peak = meter.peak()
    times = time_stages([lambda _: step()], "cpu", args.repeats, min_repeats=args.repeats, warmup_s=0,
                        before=dist.barrier)
    if rank == 0:
        torch.save(dict(peak=peak, seconds=float(statistics.median(times[:, 0])), threads=threads),
                   Path(out_dir) / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_parallel(world, args):
    rows = []
    keys = list(_parallel_keys(args.eps))
    for key in keys:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_parallel_worker, args=(world, free_port(), args, key, tmp), nprocs=world, join=True)
            r = torch.load(Path(tmp) / "result.pt")
        rows.append(dict(world=world, N=args.rows, K=args.vocab, H=args.hidden, dtype=args.dtype, eps=args.eps,
                         step=key[0], provider=key[1], step_ms=round(r["seconds"] * 1e3, 1),
                         peak_MiB=round(r["peak"] / 2**20, 1), threads_per_rank=r["threads"]))
    return rows


def print_parallel_table(rows):
    head = f"{'W':>2} {'step':<30} {'provider':<20} {'step ms':>9} {'peak MiB (rank 0)':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['world']:>2} {r['step']:<30} {r['provider']:<20} {r['step_ms']:>9} {r['peak_MiB']:>18}")


def computed_bytes(method, world, N, K, dtype):
    """Bytes each rank receives per step (gathers include its own part), from the formula."""
    acc = 8 if dtype == torch.float64 else 4
    if method.startswith("vocab-parallel"):
        return world * META_BYTES + world * 2 * N * acc  # checks + (N, 2) [lse_r, T_r]
    if method.startswith("slice alone"):
        return 0
    return N * K * dtype.itemsize  # the logits, N·K·b


def run_world(world, args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, free_port(), args, tmp), nprocs=world, join=True)
        result = torch.load(Path(tmp) / "result.pt")
    dtype = DTYPES[args.dtype]
    out = []
    for method, rows, seconds, n, sent, received, coll_seconds in result["rows"]:
        scale = args.rows / rows
        out.append(dict(
            world=world, N=args.rows, K=args.vocab, dtype=args.dtype, method=method, collectives=n,
            bytes_received_computed=computed_bytes(method, world, args.rows, args.vocab, dtype),
            bytes_received_measured=round(received * scale), bytes_sent_measured=round(sent * scale),
            measured_at_rows=rows, step_ms=round(seconds * scale * 1e3, 1),
            collective_ms=round(coll_seconds * scale * 1e3, 2), threads_per_rank=result["threads"],
        ))
    return out


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(rows):
    head = f"{'W':>2} {'method':<22} {'colls':>5} {'recv/rank (formula)':>20} {'recv/rank (measured)':>21} " \
           f"{'step ms':>9} {'in collectives ms':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        note = "" if r["measured_at_rows"] == r["N"] else f"  (run at {r['measured_at_rows']} rows, scaled)"
        print(f"{r['world']:>2} {r['method']:<22} {r['collectives']:>5} {_human(r['bytes_received_computed']):>20} "
              f"{_human(r['bytes_received_measured']):>21} {r['step_ms']:>9} {r['collective_ms']:>18}{note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="N")
    p.add_argument("--vocab", type=int, default=128256, help="K, split as evenly as possible over the ranks")
    p.add_argument("--worlds", default="2,4", help="world sizes, comma-separated")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method (median)")
    p.add_argument("--baseline-rows", type=int, default=512, help="rows the gather-the-logits baseline runs at")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--parallel", action="store_true", help="also the DTensor and FSDP2 steps (module docstring)")
    p.add_argument("--hidden", type=int, default=1024, help="H of the --parallel fused heads")
    p.add_argument("--eps", type=float, default=EPS, help="label smoothing of the --parallel steps "
                   "(0: PyTorch's side is loss_parallel)")
    args = p.parse_args(argv)

    worlds = [int(w) for w in args.worlds.split(",")]
    rows = [row for world in worlds for row in run_world(world, args)]
    print(f"\nN={args.rows}, K={args.vocab}, {args.dtype}, label_smoothing={EPS}, gloo on CPU "
          f"({os.cpu_count()} cores); per training step (forward + backward):\n")
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"\nwrote {write_csv(args.out / 'distributed.csv', rows, CSV_FIELDS)}")
    if args.parallel:
        rows = [row for world in worlds for row in run_parallel(world, args)]
        print(f"\nDTensor and FSDP2 steps: N={args.rows} rows (per rank for FSDP2), K={args.vocab}, "
              f"H={args.hidden}, {args.dtype}, label_smoothing={args.eps}; forward + backward:\n")
        print_parallel_table(rows)
        print(f"\nwrote {write_csv(args.out / 'distributed_parallel.csv', rows, PARALLEL_FIELDS)}")


if __name__ == "__main__":
    main()
