"""Hugging Face Transformers: train a causal LM with lsce in one line.

    from lsce.integrations.transformers import apply_lsce
    apply_lsce(model, label_smoothing=0.1)   # model(..., labels=...) now uses lsce

Two ways in:

* :func:`apply_lsce` replaces the model's loss. ``model(input_ids, labels=labels)``
  returns the shifted, label-smoothed loss normalised like the model's own:
  the mean over predicted tokens, or the sum divided by the
  ``num_items_in_batch`` that ``Trainer`` passes under gradient accumulation.
  With ``fused_linear=True`` a training-mode call with labels runs the LM head
  inside :func:`lsce.linear_cross_entropy`, so the N×V logits never exist (the
  output's ``logits`` is then None). Without labels, or in eval mode, the model
  computes and returns its logits as before, so generation is untouched.
* :class:`CausalLMLoss` is a ``Trainer(compute_loss_func=...)``: the loss of
  the logits the model returned, equal to what ``label_smoothing_factor``
  (``LabelSmoother``) gives, without its log-softmax and fp32 copies.
* :class:`LabelSmoother` replaces Transformers' own, for scripts that keep
  ``label_smoothing_factor``: ``trainer.label_smoother = LabelSmoother(ε)``.

With the first two, leave ``TrainingArguments.label_smoothing_factor`` at 0:
when it is set, ``Trainer`` takes the labels away from the model and calls its
label smoother on the logits.
"""

from __future__ import annotations

import inspect
import types
from typing import Optional

import torch
from torch import Tensor, nn

from .. import checks
from ..functional import cross_entropy
from ..linear import linear_cross_entropy

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
LOSS_OPTIONS = ("weight", "z_loss", "softcap", "smoothing_prior", "chunk_size")


def causal_lm_loss(
    logits: Tensor,
    labels: Optional[Tensor],
    *,
    label_smoothing: float = 0.0,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    lm_head: Optional[nn.Linear] = None,
    chunk_size: Optional[int] = None,
    **options,
) -> Tensor:
    """The causal-LM loss of Transformers' ``ForCausalLMLoss``, label-smoothed by lsce.

    Position t predicts label t+1 (``labels`` padded with ``ignore_index`` and
    shifted left, so the logits are never sliced or copied) unless
    ``shift_labels`` is given. The mean over non-ignored tokens, or, when
    ``num_items_in_batch`` is given, the sum divided by it. With ``lm_head``,
    ``logits`` holds the hidden states and the head runs fused with the loss.
    The loss is fp32 (fp64 for fp64), as the model's own loss is.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    rows = logits.reshape(-1, logits.shape[-1])
    kwargs = dict(reduction="mean" if num_items_in_batch is None else "sum", ignore_index=ignore_index,
                  label_smoothing=label_smoothing, out_dtype=torch.promote_types(logits.dtype, torch.float32),
                  **options)
    if lm_head is None:
        loss = cross_entropy(rows, target, **kwargs)
    else:
        weight, bias = lm_head.weight, lm_head.bias
        device = rows.device.type
        if torch.is_autocast_enabled(device):  # the head's matmul in autocast's dtype, as nn.Linear's would be
            dtype = torch.get_autocast_dtype(device)
            rows, weight, bias = rows.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        loss = linear_cross_entropy(rows, weight, target, linear_bias=bias, chunk_size=chunk_size, **kwargs)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _check_options(label_smoothing, options, K: int = 1, device=None) -> None:
    """lsce's own argument checks, run once when the loss is set up rather
    than in the middle of a training step."""
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"lsce: unknown loss option(s) {unknown}; accepted: {LOSS_OPTIONS}")
    checks.check_options(K, torch.device(device or "cpu"), weight=options.get("weight"),
                         smoothing_prior=options.get("smoothing_prior"), label_smoothing=label_smoothing,
                         z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"))
    checks.check_chunk_size(options.get("chunk_size"))


def _logits(outputs) -> Tensor:
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


class CausalLMLoss:
    """A ``Trainer(compute_loss_func=...)`` computing the shifted, label-smoothed
    loss with lsce from the logits the model returned; the same loss as
    ``TrainingArguments(label_smoothing_factor=ε)``, normalised by
    ``num_items_in_batch`` under gradient accumulation as Trainer asks.

        trainer = Trainer(model, args, train_dataset=...,
                          compute_loss_func=CausalLMLoss(label_smoothing=0.1))

    Options: ``ignore_index`` and lsce's ``weight``, ``z_loss``, ``softcap``,
    ``smoothing_prior``.
    """

    def __init__(self, label_smoothing: float = 0.1, ignore_index: int = -100, **options) -> None:
        vectors = [v for v in (options.get("weight"), options.get("smoothing_prior")) if isinstance(v, Tensor)]
        # Without a model the vocabulary size is whatever the class vectors say.
        K, device = (vectors[0].shape[0], vectors[0].device) if vectors and vectors[0].dim() == 1 else (1, None)
        _check_options(label_smoothing, options, K, device)
        options.pop("chunk_size", None)  # only the fused head has chunks
        self.label_smoothing, self.ignore_index, self.options = label_smoothing, ignore_index, options

    def __call__(self, outputs, labels: Tensor, num_items_in_batch=None) -> Tensor:
        return causal_lm_loss(_logits(outputs), labels, label_smoothing=self.label_smoothing,
                              num_items_in_batch=num_items_in_batch, ignore_index=self.ignore_index, **self.options)


class LabelSmoother(CausalLMLoss):
    """Drop-in for ``transformers.trainer_pt_utils.LabelSmoother``, the object
    behind ``label_smoothing_factor``, for scripts that keep that setting:

        trainer.label_smoother = LabelSmoother(epsilon=trainer.args.label_smoothing_factor)

    Same call (``shift_labels=True`` for causal LMs, False when logits and
    labels are aligned, as for seq2seq models), same loss, computed by lsce.
    """

    def __init__(self, epsilon: float = 0.1, ignore_index: int = -100) -> None:
        super().__init__(label_smoothing=epsilon, ignore_index=ignore_index)
        self.epsilon = epsilon

    def __call__(self, model_output, labels: Tensor, shift_labels: bool = False, num_items_in_batch=None) -> Tensor:
        return causal_lm_loss(_logits(model_output), labels, label_smoothing=self.epsilon,
                              num_items_in_batch=num_items_in_batch, ignore_index=self.ignore_index,
                              shift_labels=None if shift_labels else labels)


class _LsceState:
    """What apply_lsce attaches to a model (``model._lsce``): the loss options
    and the forward it wraps."""

    def __init__(self, model: nn.Module, label_smoothing: float, fused_linear: bool, options: dict) -> None:
        self.label_smoothing, self.fused_linear, self.options = label_smoothing, fused_linear, options
        self.inner_forward = model.forward
        self.signature = inspect.signature(type(model).forward)
        self.var_keyword = next((p.name for p in self.signature.parameters.values()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, *, lm_head=None, softcap=None, **_model_kwargs):
        """``model.loss_function``, called as the model's own ForCausalLMLoss is;
        with ``lm_head`` (the fused forward), ``logits`` are the hidden states."""
        options = dict(self.options)
        chunk_size = options.pop("chunk_size", None)
        if lm_head is not None:
            options.update(lm_head=lm_head, chunk_size=chunk_size)
            if softcap is not None:
                options["softcap"] = softcap
        return causal_lm_loss(logits, labels, label_smoothing=self.label_smoothing,
                              num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                              shift_labels=shift_labels, **options)


def _lsce_forward(model: nn.Module, *args, **kwargs):
    """``model.forward`` after apply_lsce: the model's own forward, unless this
    is a training-mode call with labels and the head is fused."""
    state = model._lsce
    arguments = state.signature.bind(model, *args, **kwargs).arguments
    if not (state.fused_linear and model.training and arguments.get("labels") is not None):
        return state.inner_forward(*args, **kwargs)
    return _fused_forward(model, state, dict(arguments))


def _fused_forward(model: nn.Module, state: _LsceState, arguments: dict):
    """The supported families' ``…ForCausalLM.forward`` with the LM head (and
    Gemma 2/3's final-logit softcap) moved into the loss: the decoder, its last
    hidden states (sliced by ``logits_to_keep``), the fused loss; ``logits`` None.
    Nothing of the model is changed during the call, so it traces under torch.compile."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    del arguments["self"]
    kwargs = arguments.pop(state.var_keyword, {}) if state.var_keyword else {}
    labels, keep = arguments.pop("labels"), arguments.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    outputs = model.get_decoder()(**arguments, **kwargs)
    hidden = outputs.last_hidden_state
    if isinstance(keep, int):
        hidden = hidden[:, -keep:] if keep else hidden
    else:
        hidden = hidden[:, keep]
    loss = state.loss_function(hidden, labels, lm_head=model.get_output_embeddings(),
                               softcap=getattr(model.config, "final_logit_softcapping", None), **kwargs)
    output = CausalLMOutputWithPast(loss=loss, **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
    return output.to_tuple() if return_dict is False else output


def _check_model(model) -> nn.Linear:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (model_type not in SUPPORTED_MODEL_TYPES or not type(model).__name__.endswith("ForCausalLM")
            or not isinstance(head, nn.Linear) or not hasattr(model, "loss_function")):
        raise ValueError(
            f"lsce: apply_lsce supports the causal-LM models (…ForCausalLM) of the model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {type(model).__name__} (model_type={model_type!r}). "
            "For another model, pass lsce.integrations.transformers.CausalLMLoss as Trainer's compute_loss_func.")
    return head


def apply_lsce(model: nn.Module, label_smoothing: float = 0.1, fused_linear: bool = True, **loss_options):
    """Make ``model(..., labels=labels)`` compute its loss with lsce; returns ``model``.

    Args:
        model: a Transformers ``…ForCausalLM`` of a type in ``SUPPORTED_MODEL_TYPES``
            (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text).
        label_smoothing: ε of the smoothed target ``(1 − ε)·onehot + ε/V``.
        fused_linear: in training mode, with labels, compute the LM head and
            the loss together (:func:`lsce.linear_cross_entropy`): the logits
            are never materialised and the output's ``logits`` is None. Gemma
            2/3's final-logit softcap is applied inside the fused loss.
            The model's own forward still runs in every other call.
        **loss_options: lsce's ``weight``, ``z_loss``, ``softcap``,
            ``smoothing_prior`` and (fused) ``chunk_size``.

    The loss is normalised like the model's own: the mean over the tokens that
    have a next-token label, or the sum divided by ``num_items_in_batch``
    (what ``Trainer`` passes under gradient accumulation). Calling apply_lsce
    again replaces the options. Parameters, state dict and config are untouched.
    """
    head = _check_model(model)
    if loss_options.get("softcap") is not None and getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("lsce: this model already softcaps its logits (config.final_logit_softcapping); "
                         "do not pass softcap")
    _check_options(label_smoothing, loss_options, head.out_features, head.weight.device)
    state = getattr(model, "_lsce", None)
    if state is None:
        state = _LsceState(model, label_smoothing, fused_linear, dict(loss_options))
        model._lsce = state
        model.forward = types.MethodType(_lsce_forward, model)
        model.loss_function = state.loss_function
    else:
        state.label_smoothing, state.fused_linear, state.options = label_smoothing, fused_linear, dict(loss_options)
    return model
