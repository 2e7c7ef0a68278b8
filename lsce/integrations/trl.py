"""TRL: ``SFTTrainer``'s ``label_smoothing_factor`` computed by lsce's fused LM head.

    from lsce.integrations.trl import SFTTrainer
    trainer = SFTTrainer(model=model, args=SFTConfig(label_smoothing_factor=0.1), ...)

``trl.SFTTrainer`` smooths the labels from a forward that builds the full
N×V logits. This subclass gives the same loss from
:func:`lsce.integrations.transformers.apply_lsce`'s fused head, so the logits
of a training step never exist. Its entropy and token-accuracy metrics come,
as in TRL's own smoothing path, from TRL's fused head in a forward without
gradient. Everything else (no smoothing, evaluation, ``compute_loss_func``,
MoE auxiliary losses, ``return_outputs``) is ``trl.SFTTrainer``'s own code.
"""

from __future__ import annotations

import torch
import trl
from torch import nn

from .transformers import apply_lsce


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose ``label_smoothing_factor`` runs through lsce.

    The model must be passed as a module, not a name: lsce patches it before
    TRL adds its own fused head, whose forward then calls lsce's. Any other
    arguments are ``trl.SFTTrainer``'s.
    """

    def __init__(self, model, args=None, *rest, **kwargs):
        eps = getattr(args, "label_smoothing_factor", 0.0)
        self._lsce = bool(eps) and getattr(args, "loss_type", "nll") == "nll"
        if self._lsce:
            if not isinstance(model, nn.Module):
                raise TypeError("lsce.integrations.trl.SFTTrainer: with label_smoothing_factor > 0, pass the model "
                                f"as a module (got {type(model).__name__}); load it with from_pretrained first")
            apply_lsce(model, label_smoothing=eps)
        super().__init__(model, args, *rest, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        fused = (self._lsce and self.model.training and self.compute_loss_func is None and not return_outputs
                 and not self.aux_loss_enabled and "labels" in inputs)
        if not fused:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        # The same scaling as Trainer's: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # TRL's metrics, from its unsmoothed no-grad path (its loss is dropped).
        smoother, self.label_smoother = self.label_smoother, None
        try:
            with torch.no_grad():
                super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            self.label_smoother = smoother
        return loss
