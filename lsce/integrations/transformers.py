"""Hugging Face Transformers: train a causal LM with lsce in one line.

    from lsce.integrations.transformers import apply_lsce
    apply_lsce(model, label_smoothing=0.1)   # model(..., labels=...) now uses lsce

Two ways in:

* :func:`apply_lsce` replaces the model's loss. ``model(input_ids, labels=labels)``
  returns the shifted, label-smoothed loss normalised like the model's own:
  the mean over predicted tokens, or the sum divided by the
  ``num_items_in_batch`` that ``Trainer`` passes under gradient accumulation.
  With ``fused_linear=True`` a training-mode call with labels runs a plain
  ``nn.Linear`` LM head inside :func:`lsce.linear_cross_entropy`, so the N×V
  logits never exist (the output's ``logits`` is then None); any other head
  runs its own forward (:func:`unfused_reason`). Without labels, or in eval
  mode, the model computes and returns its logits as before, so generation is
  untouched. The model's class becomes a subclass of its own with lsce's
  forward: same name and signature, picklable.
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

import copyreg
import functools
import inspect
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .. import checks
from ..functional import cross_entropy
from ..linear import linear_cross_entropy
from .fsdp import is_fsdp_module, unsharded

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
    ``num_items_in_batch`` is given, the sum divided by it. With class weights
    too: their weighted sum divided by the token count, not by Σ w_y as
    ``F.cross_entropy``'s mean, since Trainer's ``num_items_in_batch`` counts
    tokens; so the same tokens give the same loss however they are split into
    micro-batches. With ``lm_head``, ``logits`` holds the hidden states and the
    head runs fused with the loss. The loss is fp32 (fp64 for fp64), as the
    model's own loss is.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None and options.get("weight") is not None:
        num_items_in_batch = (target != ignore_index).sum()
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


def causal_lm_distillation_loss(
    student: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    teacher: Optional[nn.Module] = None,
    teacher_topk_ids: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    **options,
) -> Tensor:
    """Distil a causal LM: :func:`lsce.linear_distillation_loss` of the
    student's next-token distributions against a live ``teacher`` model's (same
    vocabulary) or an offline teacher's top-k, mixed with the label-smoothed
    cross-entropy of ``labels``.

    Position t predicts label t+1, as the models' own loss; positions whose
    next label is ``ignore_index`` count in neither term. Both models run
    their decoders (the teacher without gradient) and the heads run fused
    with the loss in row chunks: neither model's logits exist whole. A head
    that is not a plain ``nn.Linear`` (:func:`unfused_reason`) runs its own
    forward, with that model's logits materialised. The top-k tensors are
    (B, T, k), at the positions that predict (position t: the teacher's top-k
    for token t+1). The mean over predicted tokens, or the sum divided by
    ``num_items_in_batch``. ``options``: ``temperature``, ``alpha``,
    ``beta``, ``label_smoothing``, ``weight``, ``topk_mass`` of
    :func:`lsce.distillation_loss`.
    """
    from ..distillation import distillation_loss, linear_distillation_loss

    target = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    hidden = student.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])
    kw = dict(ignore_index=ignore_index, reduction="mean" if num_items_in_batch is None else "sum", **options)
    if teacher is None:  # the top-k, or nothing (then lsce.distillation_loss says what is missing)
        kw.update({name: None if t is None else t.reshape(target.shape[0], -1) for name, t in
                   (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs))})
    else:
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
            teacher_hidden = teacher_hidden.last_hidden_state.reshape(target.shape[0], -1)
    heads = [student.get_output_embeddings()] + ([] if teacher is None else [teacher.get_output_embeddings()])
    if all(unfused_reason(h) is None for h in heads):
        if teacher is not None:
            kw.update(teacher_hidden=teacher_hidden, teacher_weight=heads[1].weight, teacher_bias=heads[1].bias)
        loss = linear_distillation_loss(rows, heads[0].weight, target, student_bias=heads[0].bias,
                                        chunk_size=chunk_size, **kw)
    else:
        if teacher is not None:
            with torch.no_grad():
                kw["teacher_logits"] = heads[1](teacher_hidden)
        loss = distillation_loss(heads[0](rows), target, **kw)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


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


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _foreign_hooks(head: nn.Module, fsdp_unit: bool) -> bool:
    """Whether ``head`` has hooks a fused head would skip: any but FSDP2's own
    (whose gather and reduce-scatter lsce.integrations.fsdp.unsharded does)."""
    global_hooks = (getattr(nn.modules.module, f"_global{name}", None) for name in _HOOKS)
    if any(global_hooks):
        return True
    for name in _HOOKS:
        hooks = getattr(head, name)
        for key in hooks:  # (not .values(): torch.compile cannot guard on an index into it)
            if not (fsdp_unit and type(getattr(hooks[key], "__self__", None)).__name__ == "FSDPState"):
                return True
    return False


def unfused_reason(head: nn.Module) -> Optional[str]:
    """Why running ``head`` fused with the loss (reading its ``weight`` and
    ``bias``) could differ from calling it; None for a plain ``nn.Linear``,
    an FSDP2 unit of its own included (its weight is gathered around the
    fused call: lsce.integrations.fsdp.unsharded)."""
    fsdp_unit = is_fsdp_module(head)
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"it is a {type(head).__module__}.{type(head).__qualname__} with a forward of its own, not an nn.Linear"
    if "forward" in vars(head):
        return "its forward is replaced on the module (as accelerate's device_map hooks do)"
    if _foreign_hooks(head, fsdp_unit):
        return "it has forward or backward hooks, which a fused head would skip"
    if not fsdp_unit and any(p is not None and type(p) not in (nn.Parameter, Tensor) for p in (head.weight, head.bias)):
        return f"its weight is a {type(head.weight).__name__}, not a plain tensor"
    return None


class _LsceState:
    """What apply_lsce attaches to a model (``model._lsce``): the loss options,
    plain data, so that the model pickles and copies with them."""

    def __init__(self, label_smoothing: float, fused_linear: bool, options: dict) -> None:
        self.label_smoothing, self.fused_linear, self.options = label_smoothing, fused_linear, options
        self.warned: set = set()
        self.running = 0  # calls of the model's forward in progress: a decoder call outside them bypasses lsce

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)

    def loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, *, lm_head=None, softcap=None, **_model_kwargs):
        """``model.loss_function``, called as the model's own ForCausalLMLoss is;
        with ``lm_head`` (the fused forward), ``logits`` are the hidden states."""
        options = {k: v.to(logits.device) if isinstance(v, Tensor) else v for k, v in self.options.items()}
        chunk_size = options.pop("chunk_size", None)
        if lm_head is not None:
            options.update(lm_head=lm_head, chunk_size=chunk_size)
            if softcap is not None:
                options["softcap"] = softcap
        return causal_lm_loss(logits, labels, label_smoothing=self.label_smoothing,
                              num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                              shift_labels=shift_labels, **options)

    def decoder_pre_hook(self, decoder: nn.Module, args, kwargs) -> None:
        """The decoder's forward pre-hook: a training step that runs the decoder
        outside the model's forward computes its loss from the hidden states
        itself, as TRL's trainers do through their own fused LM head."""
        if self.running == 0 and decoder.training and torch.is_grad_enabled():
            self.warn_once("bypassed", (
                "lsce: the model's decoder ran outside the model's forward in a training step, as TRL's trainers "
                "(SFTTrainer, DPOTrainer, ...) do through their own fused LM head: that loss is computed by its "
                "caller, not by apply_lsce, so lsce's label smoothing does not reach it. With SFTTrainer, use "
                "lsce.integrations.trl.SFTTrainer with label_smoothing_factor instead."))


def _lsce_forward(model: nn.Module, base: type, signature: inspect.Signature, var_keyword: Optional[str],
                  args, kwargs):
    """``model.forward`` after apply_lsce: the model's own forward (its loss
    lsce's), or, in a training-mode call with labels, the fused head."""
    state = model._lsce
    state.running += 1
    try:
        if model.training and torch.is_grad_enabled():
            arguments = signature.bind(model, *args, **kwargs).arguments
            if arguments.get("labels") is None:
                state.warn_once("unlabelled", (
                    "lsce: the model ran a training step without labels, so its caller computes the loss from the "
                    "logits (as Trainer does with label_smoothing_factor > 0 or compute_loss_func): apply_lsce's loss "
                    "and fused head are not used there. With TRL, use lsce.integrations.trl.SFTTrainer."))
            elif state.fused_linear:
                reason = unfused_reason(model.get_output_embeddings())
                if reason is None:
                    return _fused_forward(model, var_keyword, dict(arguments))
                state.warn_once(reason, f"lsce: the LM head is not fused with the loss because {reason}; the loss is "
                                        "lsce's on the logits the head's own forward returns (materialised, as with "
                                        "fused_linear=False)")
        return base.forward(model, *args, **kwargs)
    finally:
        state.running -= 1


def _fused_forward(model: nn.Module, var_keyword: Optional[str], arguments: dict):
    """The supported families' ``…ForCausalLM.forward`` with the LM head (and
    Gemma 2/3's final-logit softcap) moved into the loss: the decoder, its last
    hidden states (sliced by ``logits_to_keep``), the fused loss; ``logits`` None.
    Nothing of the model is changed during the call, so it traces under torch.compile."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    del arguments["self"]
    kwargs = arguments.pop(var_keyword, {}) if var_keyword else {}
    labels, keep = arguments.pop("labels"), arguments.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    outputs = model.get_decoder()(**arguments, **kwargs)
    hidden = outputs.last_hidden_state
    if isinstance(keep, int):
        hidden = hidden[:, -keep:] if keep else hidden
    else:
        hidden = hidden[:, keep]
    head = model.get_output_embeddings()
    with unsharded(head):  # an FSDP2 unit of its own: its weight gathered for the fused call
        loss = model._lsce.loss_function(hidden, labels, lm_head=head,
                                         softcap=getattr(model.config, "final_logit_softcapping", None), **kwargs)
    output = CausalLMOutputWithPast(loss=loss, **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
    return output.to_tuple() if return_dict is False else output


_PATCHED: dict = {}  # a model class -> its subclass whose forward is lsce's


def _new_patched(base: type):
    """Unpickling and deep copies: a patched model is rebuilt from its model class."""
    cls = _patched_class(base)
    return cls.__new__(cls)


def _patched_class(base: type) -> type:
    """``base`` with lsce's forward: same name, signature (``functools.wraps``)
    and everything else, so that Trainer, generation, PEFT, TRL and
    ``save_pretrained`` see the model's own class."""
    cls = _PATCHED.get(base)
    if cls is None:
        signature = inspect.signature(base.forward)
        # The name of forward's **kwargs, found once: torch.compile cannot guard
        # on the signature's parameters (an odict_values) when a graph breaks in forward.
        var_keyword = next((p.name for p in signature.parameters.values()
                            if p.kind is inspect.Parameter.VAR_KEYWORD), None)

        @functools.wraps(base.forward)
        def forward(self, *args, **kwargs):
            return _lsce_forward(self, base, signature, var_keyword, args, kwargs)

        def __reduce_ex__(self, protocol):
            rv = base.__reduce_ex__(self, protocol)
            if type(self) is cls and rv[0] is copyreg.__newobj__:  # not a subclass made later (FSDP2's)
                rv = (_new_patched, (base,), *rv[2:])
            return rv

        cls = type(base.__name__, (base,), {"forward": forward, "__reduce_ex__": __reduce_ex__,
                                             "__module__": base.__module__, "__qualname__": base.__qualname__})
        _PATCHED[base] = cls
    return cls


def _base_model(model: nn.Module) -> nn.Module:
    """A PEFT model's transformers model (the one its adapters were injected into)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and type(model).__module__.startswith("peft.") else model


def _check_model(model) -> nn.Module:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (model_type not in SUPPORTED_MODEL_TYPES or not type(model).__name__.endswith("ForCausalLM")
            or not isinstance(getattr(head, "weight", None), Tensor) or not hasattr(model, "loss_function")):
        raise ValueError(
            f"lsce: apply_lsce supports the causal-LM models (…ForCausalLM) of the model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {type(model).__name__} (model_type={model_type!r}). "
            "For another model, pass lsce.integrations.transformers.CausalLMLoss as Trainer's compute_loss_func.")
    if "forward" in vars(model) and not hasattr(model, "_lsce"):
        wrapper = getattr(model.forward, "__qualname__", type(model.forward).__name__)
        raise ValueError(
            f"lsce: this model's forward was already replaced on the model ({wrapper}), as Trainer's accelerate, "
            "TRL's trainers and other wrappers do, and that forward would keep calling the model's own: call "
            "apply_lsce on the model before handing it to them")
    return head


def apply_lsce(model: nn.Module, label_smoothing: float = 0.1, fused_linear: bool = True, **loss_options):
    """Make ``model(..., labels=labels)`` compute its loss with lsce; returns ``model``.

    Args:
        model: a Transformers ``…ForCausalLM`` of a type in ``SUPPORTED_MODEL_TYPES``
            (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text), or a
            PEFT model around one.
        label_smoothing: ε of the smoothed target ``(1 − ε)·onehot + ε/V``.
        fused_linear: in training mode, with labels, compute the LM head and
            the loss together (:func:`lsce.linear_cross_entropy`): the logits
            are never materialised and the output's ``logits`` is None. Gemma
            2/3's final-logit softcap is applied inside the fused loss. Only a
            plain ``nn.Linear`` head without hooks is fused (an FSDP2 unit of
            its own too: its weight is gathered around the fused call); any
            other head (LoRA on ``lm_head``, a quantised head, hooks)
            runs its own forward, with a one-time warning that says why.
            The model's own forward still runs in every other call.
        **loss_options: lsce's ``weight``, ``z_loss``, ``softcap``,
            ``smoothing_prior`` and (fused) ``chunk_size``.

    The loss is normalised like the model's own: the mean over the tokens that
    have a next-token label, or the sum divided by ``num_items_in_batch``
    (what ``Trainer`` passes under gradient accumulation); with class weights
    too, so that the same tokens give the same loss either way.

    The model keeps its class name, forward signature, parameters, state dict
    and config: its class becomes a subclass of its own whose forward is
    lsce's. It pickles, deep-copies and ``torch.save``-s with lsce's settings;
    ``save_pretrained`` saves none of them (call apply_lsce again after
    ``from_pretrained``). Calling apply_lsce again replaces the options.
    """
    target = _base_model(model)
    head = _check_model(target)
    if loss_options.get("softcap") is not None and getattr(target.config, "final_logit_softcapping", None):
        raise ValueError("lsce: this model already softcaps its logits (config.final_logit_softcapping); "
                         "do not pass softcap")
    weight = head.weight
    _check_options(label_smoothing, loss_options, weight.shape[0], weight.device)
    state = getattr(target, "_lsce", None)
    if state is None:
        state = _LsceState(label_smoothing, fused_linear, dict(loss_options))
        target._lsce = state
        target.loss_function = state.loss_function
        target.get_decoder().register_forward_pre_hook(state.decoder_pre_hook, with_kwargs=True)
        target.__class__ = _patched_class(type(target))
    else:
        state.label_smoothing, state.fused_linear, state.options = label_smoothing, fused_linear, dict(loss_options)
    return model
