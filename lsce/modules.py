"""``lsce.CrossEntropyLoss``: holds the settings of :func:`lsce.cross_entropy`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import checks
from .functional import cross_entropy


# The constructor mirrors torch.nn.CrossEntropyLoss on purpose (a drop-in).
class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same positional arguments), plus
    lsce's keyword-only extensions. ``weight`` and ``smoothing_prior`` are
    buffers, so they follow ``.to(device)`` and the state dict."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        smoothing_prior: Optional[Tensor] = None,
        return_lse: bool = False,
        backend: str = "auto",
        out_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        # The checks of a call that need no input, so a bad setting fails here
        # with the message it would give at the first call.
        reduction = checks.legacy_reduction(size_average, reduce, reduction)
        checks.check_options(None, None, weight=weight, smoothing_prior=smoothing_prior, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=backend)
        checks.check_out_dtype(out_dtype)
        checks.as_ignore_index(ignore_index)
        self.register_buffer("weight", weight)
        self.register_buffer("smoothing_prior", smoothing_prior)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.backend = backend
        self.out_dtype = out_dtype

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            smoothing_prior=self.smoothing_prior, return_lse=self.return_lse, backend=self.backend,
            out_dtype=self.out_dtype,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"backend={self.backend!r}")
