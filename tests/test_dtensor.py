"""DTensor inputs (tensor parallelism, lsce/dtensor.py) on real gloo groups of 2 and 4 ranks.

The workers build DTensors of one full problem (``distribute_tensor``) on a
1-D mesh (every rank) and, on 4 ranks, a 2-D ``data × tensor`` mesh; logits
sharded on the class dimension (uneven shards: K = 37), on the rows, on both,
or replicated; every option; ``reduction`` none, mean and sum, with the lse
returned; the fused head with a ``ColwiseParallel``-sharded weight; the
module. The parent compares each rank's full loss and full gradient with the
single-process ``F.cross_entropy`` (fp64; lsce.reference where PyTorch has no
such option) and the output placements with ``loss_parallel``'s. Ranks that
disagree raise on every rank; the group is still usable afterwards.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import lsce
from lsce import reference

from _util import fp64, make_options, make_problem
from test_distributed import GLOO_TIMEOUT_S, _spawn

K = 37
ROWS = 12
HIDDEN = 8
OPTIONS = {"plain": (), "weight": ("weight",), "all": ("weight", "prior", "z_loss", "softcap")}


def _placements(spec):
    from torch.distributed.tensor import Replicate, Shard

    names = {"S0": Shard(0), "S1": Shard(1), "S2": Shard(2), "R": Replicate()}
    return [names[p] for p in spec.split(",")]


def _cases(world):
    """(name, spec): mesh ("1d" or "2d"), logits placements, 3-D or not, options, ε, reduction."""
    layouts = [("1d", "S1", False), ("1d", "S0", False), ("1d", "R", False), ("1d", "S1", True)]
    if world == 4:
        layouts += [("2d", "S0,S1", False), ("2d", "R,S1", False), ("2d", "S1,S0", False), ("2d", "S2,S1", True),
                    ("2d", "S0,R", False)]
    cases = []
    for mesh, places, three_d in layouts:
        for opts in OPTIONS:
            for eps in (0.0, 0.1, 1.0):
                for reduction in ("mean", "sum", "none"):
                    if opts != "plain" and (mesh, places, three_d) not in (("1d", "S1", False), ("2d", "S0,S1", False)):
                        if eps == 1.0 or reduction == "sum":
                            continue  # every option on the two main layouts; a sample elsewhere
                    spec = dict(mesh=mesh, places=places, three_d=three_d, opts=opts, eps=eps, reduction=reduction)
                    cases.append((f"{mesh} {places}{' 3d' if three_d else ''} {opts} eps={eps} {reduction}", spec))
    return cases


def _problem(spec):
    """Full logits ((N, K) or (B, K, T)), target, options, upstream (fp64)."""
    seed = zlib.crc32(repr(sorted(spec.items())).encode())
    logits, target = make_problem((ROWS, K), torch.float64, ignore_frac=0.2, seed=seed)
    target[0], target[1] = 0, K - 1
    if spec["three_d"]:
        logits, target = logits.reshape(4, 3, K).permute(0, 2, 1).contiguous(), target.reshape(4, 3)
    kwargs = make_options(K, OPTIONS[spec["opts"]])
    kwargs.update(label_smoothing=spec["eps"], reduction=spec["reduction"])
    g = torch.Generator().manual_seed(seed + 1)
    upstream = torch.rand(target.shape if spec["reduction"] == "none" else (), generator=g, dtype=torch.float64) + .5
    return logits, target, kwargs, upstream


def _target_placements(places, class_dim=1):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if p.is_shard(class_dim) or p.is_replicate() else (Shard(p.dim - 1) if p.dim > class_dim else p)
            for p in places]


def _run_case(mesh, spec, fn=None):
    """(full loss, full lse, full logits gradient, output placements) of one case on this rank."""
    from torch.distributed.tensor import distribute_tensor

    logits, target, kwargs, upstream = _problem(spec)
    places = _placements(spec["places"])
    z = distribute_tensor(logits, mesh, places).requires_grad_(True)
    y = distribute_tensor(target, mesh, _target_placements(places))
    loss, lse = (fn or lsce.cross_entropy)(z, y, return_lse=True, **kwargs)
    if spec["reduction"] == "none":
        up = distribute_tensor(upstream, mesh, loss.placements)
        objective = (loss * up).sum().full_tensor()
    else:
        objective = loss.full_tensor() * upstream
    objective = objective + 1e-3 * lse.sum().full_tensor()  # the lse's gradient path too
    objective.backward()
    return dict(loss=loss.full_tensor().detach(), lse=lse.full_tensor().detach(), grad=z.grad.full_tensor(),
                placements=repr(tuple(loss.placements)), lse_placements=repr(tuple(lse.placements)))


def _linear_cases(world):
    cases = [("1d colwise", dict(mesh="1d", w="S0", x="R")), ("1d replicated head", dict(mesh="1d", w="R", x="plain")),
             ("1d rows, replicated head", dict(mesh="1d", w="R", x="S0"))]
    if world == 4:
        cases += [("2d rows x colwise", dict(mesh="2d", w="R,S0", x="S0,R")),
                  ("2d rows, replicated head", dict(mesh="2d", w="R,R", x="S0,R"))]
    out = []
    for name, spec in cases:
        # Every option where the rows are sharded (the mean with weight and z_loss sums two terms over ranks).
        for opts in ("plain", "weight") + (("all",) if "S0" in spec["x"] else ()):
            for eps in (0.0, 0.1) if opts != "all" else (0.1,):
                for reduction in ("mean", "sum", "none"):
                    out.append((f"linear {name} {opts} eps={eps} {reduction}",
                                dict(spec, eps=eps, reduction=reduction, opts=opts)))
    return out


def _linear_problem(spec):
    seed = zlib.crc32(repr(sorted(spec.items())).encode())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
    W = torch.randn(K, HIDDEN, generator=g, dtype=torch.float64) / 2
    b = torch.randn(K, generator=g, dtype=torch.float64)
    _, target = make_problem((ROWS, K), torch.float64, ignore_frac=0.2, seed=seed)
    kwargs = make_options(K, OPTIONS[spec["opts"]])
    kwargs.update(label_smoothing=spec["eps"], reduction=spec["reduction"], chunk_size=5)
    upstream = torch.rand(() if spec["reduction"] != "none" else (ROWS,), generator=g, dtype=torch.float64) + .5
    return x, W, b, target, kwargs, upstream


def _run_linear(meshes, spec):
    from torch.distributed.tensor import distribute_tensor

    mesh = meshes[spec["mesh"]]
    x, W, b, target, kwargs, upstream = _linear_problem(spec)
    w_places = _placements(spec["w"])
    Wd = distribute_tensor(W, mesh, w_places).requires_grad_(True)
    bd = distribute_tensor(b, mesh, w_places).requires_grad_(True)
    if spec["x"] == "plain":
        xd, yd = x.clone().requires_grad_(True), target
    elif spec["x"] == "R":
        xd, yd = distribute_tensor(x, mesh, _placements("R")).requires_grad_(True), target
    else:
        xd = distribute_tensor(x, mesh, _placements(spec["x"])).requires_grad_(True)
        yd = distribute_tensor(target, mesh, _placements(spec["x"]))
    loss = lsce.linear_cross_entropy(xd, Wd, yd, linear_bias=bd, **kwargs)
    if spec["reduction"] == "none":
        objective = (loss * distribute_tensor(upstream, mesh, loss.placements)).sum().full_tensor()
    else:
        objective = loss.full_tensor() * upstream
    objective.backward()
    gx = xd.grad if spec["x"] == "plain" else xd.grad.full_tensor()
    return dict(loss=loss.full_tensor().detach(), grad_input=gx, grad_weight=Wd.grad.full_tensor(),
                grad_bias=bd.grad.full_tensor(), placements=repr(tuple(loss.placements)))


ERRORS = {
    "label_smoothing differs on the last rank": ValueError,
    "reduction differs on the last rank": ValueError,
    "target out of range on the last rank, rows sharded": IndexError,
    "bad reduction on rank 0": ValueError,
    "plain target for row-sharded logits": ValueError,
    "plain input with a vocabulary-sharded head": ValueError,
    "2d: z_loss differs on rank 3": ValueError,
}


def _error_calls(world, rank, meshes):
    """(name, call) of calls in which one rank differs (ERRORS: what each raises)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    logits, target = make_problem((ROWS, K), torch.float32, seed=3)
    z = distribute_tensor(logits, meshes["1d"], _placements("S1"))
    z0 = distribute_tensor(logits, meshes["1d"], _placements("S0"))
    y0 = distribute_tensor(target, meshes["1d"], _placements("S0"))
    last = rank == world - 1
    bad_local = torch.where(y0.to_local() == y0.to_local()[0], K, y0.to_local()) if last else y0.to_local()
    bad = DTensor.from_local(bad_local, meshes["1d"], _placements("S0"))
    calls = [
        ("label_smoothing differs on the last rank", lambda: lsce.cross_entropy(z, target, label_smoothing=0.2 if last else 0.1)),
        ("reduction differs on the last rank", lambda: lsce.cross_entropy(z0, y0, reduction="sum" if last else "mean")),
        ("target out of range on the last rank, rows sharded", lambda: lsce.cross_entropy(z0, bad)),
        ("bad reduction on rank 0", lambda: lsce.cross_entropy(z, target, reduction="avg" if rank == 0 else "mean")),
        ("plain target for row-sharded logits", lambda: lsce.cross_entropy(z0, target)),
        ("plain input with a vocabulary-sharded head", lambda: lsce.linear_cross_entropy(
            torch.randn(ROWS, HIDDEN), distribute_tensor(torch.randn(K, HIDDEN), meshes["1d"], _placements("S0")),
            target)),
    ]
    if world == 4:
        z2 = distribute_tensor(logits, meshes["2d"], _placements("S0,S1"))
        y2 = distribute_tensor(target, meshes["2d"], _placements("S0,R"))
        calls.append(("2d: z_loss differs on rank 3",
                      lambda: lsce.cross_entropy(z2, y2, z_loss=1e-3 if rank == 3 else 0.0)))
    return calls


def _worker(rank, world, port, out_dir):
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    meshes = {"1d": init_device_mesh("cpu", (world,))}
    if world == 4:
        meshes["2d"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "tensor"))
    results = {"cases": {}, "linear": {}, "errors": {}, "loss_parallel": {}}
    for name, spec in _cases(world):
        try:
            results["cases"][name] = _run_case(meshes[spec["mesh"]], spec)
        except Exception as e:
            results["cases"][name] = dict(error=f"{type(e).__name__}: {e}")
    # The module, and loss_parallel's placements (where PyTorch computes the case: ε = 0, 1-D mesh for mean).
    for name, spec in _cases(world):
        if spec["opts"] == "plain" and spec["eps"] == 0.0 and "S1" in spec["places"]:
            if spec["mesh"] == "2d" and spec["reduction"] == "mean":
                continue
            logits, target, kwargs, _ = _problem(spec)
            places = _placements(spec["places"])
            z = distribute_tensor(logits, meshes[spec["mesh"]], places)
            y = distribute_tensor(target, meshes[spec["mesh"]], _target_placements(places))
            with loss_parallel():
                theirs = F.cross_entropy(z, y, reduction=spec["reduction"])
            ours = lsce.CrossEntropyLoss(reduction=spec["reduction"])(z, y)
            results["loss_parallel"][name] = dict(theirs=repr(tuple(theirs.placements)),
                                                  ours=repr(tuple(ours.placements)),
                                                  theirs_value=theirs.full_tensor(), ours_value=ours.full_tensor())
    for name, spec in _linear_cases(world):
        try:
            results["linear"][name] = _run_linear(meshes, spec)
        except Exception as e:
            import traceback

            results["linear"][name] = dict(error=f"{type(e).__name__}: {e} {traceback.format_exc()[-1500:]}")
    for name, call in _error_calls(world, rank, meshes):
        try:
            call()
            results["errors"][name] = None
        except Exception as e:
            results["errors"][name] = ([c.__name__ for c in type(e).__mro__], str(e))
    spec = _cases(world)[0][1]
    results["after errors"] = _run_case(meshes["1d"], spec)["loss"]
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"dtensor{world}"), module="test_dtensor", deadline_s=240)


def _expected(spec):
    """Single-process loss and logits gradient: F.cross_entropy in fp64 where it has the options, else lsce.reference."""
    logits, target, kwargs, upstream = _problem(spec)
    x = logits.clone().requires_grad_(True)
    torch_ok = spec["opts"] != "all"
    if torch_ok:
        loss = F.cross_entropy(x, target, **kwargs)
        lse = torch.logsumexp(x, dim=1)
    else:
        loss, lse = reference.cross_entropy(x, target, return_lse=True, **fp64(kwargs))
    ((loss * upstream).sum() + 1e-3 * lse.sum()).backward()
    return loss.detach(), lse.detach(), x.grad


def test_every_layout_and_option_matches_single_process(run):
    world, results = run
    failures = []
    for name, spec in _cases(world):
        loss, lse, grad = _expected(spec)
        for r, res in enumerate(results):
            got = res["cases"][name]
            try:
                assert "error" not in got, got.get("error")
                torch.testing.assert_close(got["loss"], loss, rtol=1e-10, atol=1e-12, equal_nan=True)
                torch.testing.assert_close(got["lse"], lse, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(got["grad"], grad, rtol=1e-10, atol=1e-12)
            except AssertionError as e:
                failures.append(f"{name}, rank {r}: {e}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:8])


def test_placements_are_those_of_loss_parallel(run):
    world, results = run
    assert results[0]["loss_parallel"], "no case compared"
    for name, got in results[0]["loss_parallel"].items():
        assert got["ours"] == got["theirs"], f"{name}: {got['ours']} vs loss_parallel's {got['theirs']}"
        torch.testing.assert_close(got["ours_value"], got["theirs_value"], rtol=1e-10, atol=1e-12)
    # The global mean (loss_parallel computes it on 1-D meshes only) is replicated; 'none' follows the rows.
    for name, spec in _cases(world):
        got = results[0]["cases"][name]
        if spec["reduction"] == "mean":
            assert "Shard" not in got["placements"] and "Partial" not in got["placements"], (name, got["placements"])
        if spec["reduction"] == "none" and spec["places"] in ("S0", "S0,S1"):
            assert "Shard(dim=0)" in got["placements"], (name, got["placements"])


def test_fused_head_matches_single_process(run):
    world, results = run
    failures = []
    for name, spec in _linear_cases(world):
        x, W, b, target, kwargs, upstream = _linear_problem(spec)
        leaves = [t.clone().requires_grad_(True) for t in (x, W, b)]
        kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
        if spec["opts"] == "all":  # z_loss, softcap, smoothing_prior: options F.cross_entropy lacks
            loss = reference.cross_entropy(F.linear(*leaves), target, **fp64(kwargs))
        else:
            loss = F.cross_entropy(F.linear(*leaves), target, **kwargs)
        (loss * upstream).sum().backward()
        for r, res in enumerate(results):
            got = res["linear"][name]
            try:
                assert "error" not in got, got.get("error")
                torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
                for key, leaf in zip(("grad_input", "grad_weight", "grad_bias"), leaves):
                    torch.testing.assert_close(got[key], leaf.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{key}: {m}")
            except AssertionError as e:
                failures.append(f"{name}, rank {r}: {e}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:8])


def test_disagreeing_ranks_raise_on_every_rank(run):
    world, results = run
    expected = {name: exc for name, exc in ERRORS.items() if world == 4 or not name.startswith("2d")}
    assert set(results[0]["errors"]) == set(expected)
    for name, exc in expected.items():
        for r, res in enumerate(results):
            got = res["errors"][name]
            assert got is not None, f"{name}: rank {r} raised nothing"
            assert exc.__name__ in got[0], f"{name}: rank {r}: {got}"  # that type or a subclass
    # The rank with the bad argument says what it is; the others name it.
    last = world - 1
    assert "out of bounds" in results[last]["errors"]["target out of range on the last rank, rows sharded"][1]
    assert f"rank {last}" in results[0]["errors"]["target out of range on the last rank, rows sharded"][1]
    for res in results:  # the group is still in step
        torch.testing.assert_close(res["after errors"], results[0]["after errors"])
