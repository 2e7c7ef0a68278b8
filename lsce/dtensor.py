"""DTensor inputs of ``lsce.cross_entropy``, ``lsce.linear_cross_entropy`` and ``lsce.CrossEntropyLoss``.

Those entry points hand a call here when one of its tensors is a
``torch.distributed.tensor.DTensor``, as tensor parallelism produces them
(torchtitan: a ``ColwiseParallel`` LM head with ``use_local_output=False``,
then ``loss_parallel()``). The layouts, and the placements of the result, are
those of PyTorch's ``loss_parallel``; with label smoothing, which
``loss_parallel`` does not compute, too.

Logits (class dimension 1, or 0 for a 1-D input), on each mesh dimension:

* ``Shard(class_dim)`` on at most one mesh dimension (the tensor-parallel
  one): the vocabulary-parallel algorithm of :mod:`lsce.distributed` over that
  dimension's process group; only per-row values cross ranks. Widths may
  differ (DTensor's uneven shards).
* ``Shard(d)`` on another tensor dimension (a batch or sequence dimension;
  data or context parallelism): each rank computes its rows; ``sum`` is
  ``Partial`` there (reduced when it is redistributed, as ``loss_parallel``
  returns it) and ``mean`` is the global mean, replicated: the sum of the
  rows' losses and the mean's denominators (Σ w[y], the row count) are summed
  over those ranks, 2 to 4 scalars.
* ``Replicate``: computed locally.

The target has the logits' placements with the class shard replaced by
``Replicate`` and any ``Shard(d)``, ``d > class_dim``, moved to ``d − 1``
(``loss_parallel``'s rule); a plain tensor is accepted where those are all
``Replicate`` (it is then the whole target). ``weight`` and
``smoothing_prior`` are full-vocabulary vectors, plain or replicated.
``reduction="none"`` and the returned lse have the target's placements.

The fused head: ``linear_weight`` (K, H) ``Shard(0)`` on at most one mesh
dimension (``ColwiseParallel``) runs
:func:`lsce.distributed.vocab_parallel_linear_cross_entropy` (no logits are
gathered, nor materialised); the input (…, H) is a DTensor replicated on that
mesh dimension and sharded on its row dimensions only, if at all (a plain
input is refused there: it could be each rank's own batch beside an FSDP2
parameter, which is a ``Shard(0)`` DTensor too); with a replicated head, a
plain input is the same on every rank. Where the input is
row-sharded and the head replicated, the head's gradient there is
``Partial`` (each rank's rows' share), as DTensor's own matmul gives it.

Why the tensors are unwrapped (``to_local()``) rather than the registered ops
given DTensor sharding rules: the class-sharded case needs collectives inside
the loss (a sharding rule can only ask DTensor to redistribute the inputs,
which would gather the N×K logits), and the reductions over rows need the
mean's denominators summed over ranks, which a per-op rule does not express.
The unwrapped results are wrapped again with ``DTensor.from_local``, so that
autograd and the placements stay DTensor's.

Before any collective, every rank checks its own arguments and the mesh
agrees (:func:`lsce.distributed.check_agreement`): a rank with a bad argument,
or ranks called with different options, raise on every rank.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import checks
from .distributed import check_agreement, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .functional import mean_denominators, reduce_rows
from .interface import acc_dtype


involved = checks.any_dtensor


def _dt():
    from torch.distributed import tensor

    return tensor


def _split_mesh_dim(placements, dim: int) -> Optional[int]:
    """The mesh dimension that shards tensor dimension ``dim`` (None: none does)."""
    found = [i for i, p in enumerate(placements) if p.is_shard(dim)]
    if len(found) > 1:
        raise ValueError(f"lsce: tensor dimension {dim} is sharded on {len(found)} mesh dimensions "
                         f"({tuple(placements)}); at most one may shard it")
    bad = [p for p in placements if not (p.is_shard() or p.is_replicate())]
    if bad:
        raise ValueError(f"lsce: DTensor placements must be Shard or Replicate, got {tuple(placements)}")
    return found[0] if found else None


def _row_placements(placements, class_dim: int):
    """The target's placements from the logits' (loss_parallel's rule)."""
    tensor = _dt()
    out = []
    for p in placements:
        if p.is_shard(class_dim) or p.is_replicate():
            out.append(tensor.Replicate())
        else:
            out.append(tensor.Shard(p.dim - 1) if p.dim > class_dim else p)
    return tuple(out)


def _as_local(t: Optional[Tensor], name: str, mesh, placements, whole_if_plain: bool = False) -> Optional[Tensor]:
    """This rank's part of ``t`` (placements as given); a plain tensor only where they are all Replicate
    (or ``whole_if_plain``: a full tensor every rank has)."""
    if t is None:
        return None
    if involved(t):
        if t.device_mesh != mesh:
            raise ValueError(f"lsce: {name} is a DTensor on another device mesh than the logits")
        if tuple(t.placements) != tuple(placements):
            raise ValueError(f"lsce: {name} has placements {tuple(t.placements)}; expected {tuple(placements)}")
        return t.to_local()
    if not whole_if_plain and any(p.is_shard() for p in placements):
        raise ValueError(
            f"lsce: {name} must be a DTensor with placements {tuple(placements)} (a plain tensor is ambiguous "
            "where the rows are sharded: wrap this rank's part with DTensor.from_local)")
    return t


def _whole(v: Optional[Tensor], name: str) -> Optional[Tensor]:
    """A class vector, replicated: its full value."""
    if v is None or not involved(v):
        return v
    if not all(p.is_replicate() for p in v.placements):
        raise ValueError(f"lsce: {name} must be replicated (the full vocabulary on every rank), "
                         f"got placements {tuple(v.placements)}")
    return v.to_local()


class _Layout:
    """A call's mesh: the tensor-parallel mesh dimension (or None), the mesh
    dimensions that split the rows, and the DTensor wrapping of results."""

    def __init__(self, mesh, placements, split_dim: Optional[int], row_placements):
        tensor = _dt()
        self.mesh, self.split_dim = mesh, split_dim
        self.rows = tuple(row_placements)
        self.row_split = any(p.is_shard() for p in self.rows)
        # A sum over this rank's rows: Partial where other ranks hold other rows.
        self.partial = tuple(tensor.Partial() if p.is_shard() else tensor.Replicate() for p in self.rows)
        self.replicated = tuple(tensor.Replicate() for _ in placements)

    def group(self):
        return None if self.split_dim is None else self.mesh.get_group(self.split_dim)

    def wrap(self, t: Tensor, placements, shape=None) -> Tensor:
        """``t``, this rank's part of a DTensor of the global ``shape`` (given
        where shards may be uneven, which from_local cannot infer)."""
        stride = None if shape is None else torch.empty(shape, device="meta").stride()
        return _dt().DTensor.from_local(t, self.mesh, placements, run_check=False, shape=shape, stride=stride)

    def total(self, mean: bool):
        """reduce_rows' ``total``: a local sum → the sum over every rank's rows
        (``Partial`` for ``sum``, as loss_parallel gives; summed at once for ``mean``)."""
        if not mean:
            return lambda t: self.wrap(t, self.partial)
        return lambda t: self.wrap(t, self.partial).redistribute(self.mesh, self.replicated)


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, smoothing_prior=None, return_lse=False, backend="auto",
                  out_dtype=None):
    """:func:`lsce.cross_entropy` of DTensor logits (see the module docstring)."""
    if not involved(input):
        raise TypeError("lsce: with a DTensor target, weight or smoothing_prior the logits must be a DTensor too")
    mesh, placements = input.device_mesh, tuple(input.placements)
    class_dim = 1 if input.dim() >= 2 else 0
    K = input.shape[class_dim]
    own_error, layout, local, y = None, None, None, None
    try:
        split = _split_mesh_dim(placements, class_dim)
        layout = _Layout(mesh, placements, split, _row_placements(placements, class_dim))
        weight, smoothing_prior = _whole(weight, "weight"), _whole(smoothing_prior, "smoothing_prior")
        checks.check_options(K, input.device, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
        checks.check_out_dtype(out_dtype)
        ignore_index = checks.as_ignore_index(ignore_index)
        y = _as_local(target, "target", mesh, layout.rows)
        local = input.to_local()
        checks.check_logits(local, y)
        prior = None if smoothing_prior is None else smoothing_prior.to(acc_dtype(input.dtype))
        checks.check_values(y.reshape(-1), prior, K, ignore_index)
    except (TypeError, ValueError, IndexError) as e:
        own_error = e
    options = ("cross_entropy", placements, ignore_index, reduction, float(label_smoothing), float(z_loss),
               float(softcap or 0.0), weight is None, smoothing_prior is None, bool(return_lse), out_dtype)
    check_agreement([mesh.get_group(d) for d in range(mesh.ndim)], own_error, options, input.device)

    acc = acc_dtype(input.dtype)
    rows_shape = input.shape[:class_dim] + input.shape[class_dim + 1:]
    kwargs = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                  softcap=softcap, smoothing_prior=smoothing_prior, backend=backend)
    if layout.split_dim is None and not layout.row_split:  # replicated: the single-process loss
        from .functional import cross_entropy as local_loss

        out = local_loss(local, y, reduction=reduction, return_lse=return_lse, out_dtype=out_dtype, **kwargs)
        out, lse = out if return_lse else (out, None)
        out = (layout.wrap(out, layout.rows, rows_shape) if reduction == "none"
               else layout.wrap(out, layout.replicated))
        return (out, layout.wrap(lse, layout.rows, rows_shape)) if return_lse else out
    if layout.split_dim is None:
        from .functional import cross_entropy as local_loss

        loss, lse = local_loss(local, y, reduction="none", return_lse=True, out_dtype=acc, **kwargs)
    else:
        z = local.movedim(1, -1) if local.dim() > 2 else local  # classes last, as lsce.distributed takes them
        loss, lse = vocab_parallel_cross_entropy(z, y, group=layout.group(), reduction="none", return_lse=True,
                                                 out_dtype=acc, **kwargs)
    w = None if weight is None else weight.to(acc)
    y_rows = y.reshape(-1).to(torch.int64)
    if reduction == "none":
        out = layout.wrap(loss.to(out_dtype or input.dtype), layout.rows, rows_shape)
    else:
        out = reduce_rows(loss.reshape(-1), lse.reshape(-1), y_rows, w, ignore_index, float(z_loss), reduction,
                          (), total=layout.total(reduction == "mean")).to(out_dtype or input.dtype)
    return (out, layout.wrap(lse, layout.rows, rows_shape)) if return_lse else out


def _linear_layout(input, linear_weight, linear_bias) -> Tuple[object, "_Layout"]:
    """(mesh, layout) of a fused head call; raises on placements it does not compute."""
    some = next(t for t in (linear_weight, input, linear_bias) if involved(t))
    mesh = some.device_mesh
    tensor = _dt()
    w_places = tuple(linear_weight.placements) if involved(linear_weight) else tuple(
        tensor.Replicate() for _ in range(mesh.ndim))
    split = _split_mesh_dim(w_places, 0)
    if any(p.is_shard() and not p.is_shard(0) for p in w_places):
        raise ValueError(f"lsce: linear_weight may be sharded on its output dimension (Shard(0), ColwiseParallel) "
                         f"only, got placements {w_places}")
    if involved(input):
        x_places = tuple(input.placements)
        _split_mesh_dim(x_places, input.dim() - 1)
        if any(p.is_shard(input.dim() - 1) for p in x_places) or (split is not None and not x_places[split].is_replicate()):
            raise ValueError(f"lsce: input (…, H) may be sharded on its row dimensions only, and must be replicated "
                             f"on the mesh dimension that shards the head; got {x_places}")
    elif split is not None:
        # A plain input cannot say that every rank holds the same rows, which the vocabulary-parallel head
        # needs; and FSDP2's own sharded weights are Shard(0) DTensors too, beside each rank's own batch.
        raise ValueError(
            "lsce: linear_weight is sharded on its output dimension, so the input must be a DTensor replicated "
            "on that mesh dimension (DTensor.from_local(input, mesh, [Replicate()])) for the tensor-parallel "
            "head; if the weight is an FSDP2-sharded parameter, gather it around the call with "
            "lsce.integrations.fsdp.unsharded(module)")
    else:
        x_places = tuple(tensor.Replicate() for _ in range(mesh.ndim))
    return mesh, _Layout(mesh, w_places, split, x_places)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, smoothing_prior=None,
                         chunk_size=None, out_dtype=None):
    """:func:`lsce.linear_cross_entropy` with DTensor arguments (see the module docstring)."""
    ignore_index = -100 if ignore_index is None else ignore_index
    mesh = next(t for t in (linear_weight, input, linear_bias, target) if involved(t)).device_mesh
    own_error, layout = None, None
    x = W = b = y = None
    try:
        mesh, layout = _linear_layout(input, linear_weight, linear_bias)
        weight, smoothing_prior = _whole(weight, "weight"), _whole(smoothing_prior, "smoothing_prior")
        ignore_index = checks.as_ignore_index(ignore_index)
        x = _as_local(input, "input", mesh, layout.rows, whole_if_plain=True)
        # The head's gradient from this rank's rows is a share (Partial) where other ranks hold other rows.
        grads = tuple(_dt().Partial() if r.is_shard() else p for r, p in
                      zip(layout.rows, linear_weight.placements)) if involved(linear_weight) else None
        W = linear_weight.to_local(grad_placements=grads) if involved(linear_weight) else linear_weight
        if linear_bias is not None and involved(linear_bias):
            if tuple(linear_bias.placements) != tuple(linear_weight.placements):
                raise ValueError("lsce: linear_bias must have the placements of linear_weight")
            b = linear_bias.to_local(grad_placements=grads)
        else:
            b = linear_bias
        y = _as_local(target, "target", mesh, layout.rows, whole_if_plain=not layout.row_split)
        K = linear_weight.shape[0]
        checks.check_options(K, x.device, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        checks.check_out_dtype(out_dtype)
        checks.check_chunk_size(chunk_size)
        if isinstance(y, Tensor) and isinstance(x, Tensor) and tuple(y.shape) == tuple(x.shape[:-1]):
            prior = None if smoothing_prior is None else smoothing_prior.to(acc_dtype(x.dtype))
            checks.check_values(y.reshape(-1), prior, K, ignore_index)
    except (TypeError, ValueError, IndexError) as e:
        own_error = e
    options = ("linear_cross_entropy", tuple(layout.rows) if layout else None, ignore_index, reduction,
               float(label_smoothing), float(z_loss), float(softcap or 0.0), weight is None,
               smoothing_prior is None, chunk_size, out_dtype, linear_bias is None)
    check_agreement([mesh.get_group(d) for d in range(mesh.ndim)], own_error, options,
                    getattr(x, "device", None))

    acc = acc_dtype(x.dtype)
    # Over row-sharded input, the mean with class weights and z_loss divides the
    # z-loss by the global row count and the rest by the global Σw: each rank's
    # two sums apart, which only its rows (loss and lse) give (reduce_rows).
    by_rows = layout.row_split and reduction == "mean" and weight is not None and bool(z_loss)
    local_reduction = "none" if reduction == "none" or by_rows else ("sum" if layout.row_split else reduction)
    kwargs = dict(weight=weight, reduction=local_reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap, smoothing_prior=smoothing_prior, chunk_size=chunk_size,
                  out_dtype=acc if layout.row_split else out_dtype, return_lse=by_rows)
    if layout.split_dim is None:
        from .linear import linear_cross_entropy as local_loss

        loss = local_loss(x, W, y, linear_bias=b, **kwargs)
    else:
        loss = vocab_parallel_linear_cross_entropy(x, W, y, local_linear_bias=b, group=layout.group(), **kwargs)
    if reduction == "none":
        return layout.wrap(loss.to(out_dtype or x.dtype), layout.rows, input.shape[:-1])
    if not layout.row_split:
        return layout.wrap(loss, layout.replicated)
    total = layout.total(reduction == "mean")
    if reduction == "sum":
        return total(loss).to(out_dtype or x.dtype)
    y_rows, w = y.reshape(-1).to(torch.int64), None if weight is None else weight.to(acc)
    if by_rows:
        loss, lse = loss
        return reduce_rows(loss.reshape(-1), lse.reshape(-1), y_rows, w, ignore_index, float(z_loss), "mean", (),
                           total=total).to(out_dtype or x.dtype)
    _, _, total_weight = mean_denominators(y_rows, w, ignore_index, acc)
    return (total(loss) / total(total_weight)).to(out_dtype or x.dtype)
