"""FSDP2 (``torch.distributed.fsdp.fully_shard``): a fused loss that reads a sharded module's weight.

FSDP2 gathers a module's parameters in its forward pre-hook and hands the
gradients to the reduce-scatter after its backward. A fused LM head
(:func:`lsce.linear_cross_entropy`) reads ``lm_head.weight`` without calling
``lm_head``, so when the head is an FSDP2 unit of its own (``fully_shard(model.lm_head)``,
as torchtitan shards its output layer) the weight it would read is this rank's
shard. :func:`unsharded` gathers it around the fused call with FSDP2's public
API (``FSDPModule.unshard`` / ``reshard``)::

    with unsharded(model.lm_head):
        loss = lsce.linear_cross_entropy(hidden, model.lm_head.weight, labels, label_smoothing=0.1)
    loss.backward()

The gradient reaches the gathered parameter; FSDP2's end-of-backward callback
(queued by the root module's forward) runs the head's post-backward, which
reduce-scatters it into the sharded parameter's ``.grad`` as for a module that
ran its own forward (reduce_dtype, gradient division and all). The weight is
resharded on leaving the block: with ``reduction`` mean or sum the fused op
computes the gradients in its forward (row chunks, never vocabulary blocks,
in the block: lsce.linear.weight_released_after_forward) and keeps no reference to the weight
(``none`` recomputes the logits in backward and needs it there: keep the
backward inside the block then).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

__all__ = ["is_fsdp_module", "unsharded"]


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit (``fully_shard`` was applied to it);
    never imports FSDP (nothing is one before it is imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and isinstance(module, cls)


@contextlib.contextmanager
def unsharded(module: nn.Module):
    """``module``'s own parameters gathered (FSDP2's ``unshard()``) in the block, resharded after it.
    A module that is not an FSDP2 unit (its parameters are gathered by an enclosing unit, or not
    sharded at all) is left as it is."""
    if not is_fsdp_module(module):
        yield module
        return
    from ..linear import weight_released_after_forward

    _unshard(module)
    try:
        with weight_released_after_forward():  # reshard() frees the gathered weight: nothing may read it in backward
            yield module
    finally:
        _reshard(module)


# FSDP2's own hooks run outside torch.compile's graphs too (its state
# machine is Python, not tensor code): a compiled model breaks its graph here.
# Disabled at the call, not with a decorator: torch.compiler.disable imports
# torch._dynamo, which imports triton, and `import lsce` must not (a later
# TRITON_INTERPRET=1 would then be ignored).
def _unshard(module: nn.Module) -> None:
    torch.compiler.disable(module.unshard)()


def _reshard(module: nn.Module) -> None:
    torch.compiler.disable(module.reshard)()
