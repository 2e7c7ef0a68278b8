"""lsce.integrations.transformers against Transformers' own paths: the model's
loss (ForCausalLMLoss), Trainer's label smoothing (LabelSmoother) and Trainer
with gradient accumulation. Small models built from configs: offline."""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import subprocess
import sys
import types
import warnings

import pytest
import torch
import transformers
from transformers.trainer_pt_utils import LabelSmoother

import lsce
from lsce.integrations import transformers as integration
from lsce.integrations.transformers import SUPPORTED_MODEL_TYPES, CausalLMLoss, apply_lsce
from _util import LargestTensor

V = 384
EPS = 0.1


def tiny_model(model_type: str, dtype=torch.float32, seed: int = 0):
    extra = {"head_dim": 8} if model_type.startswith("gemma") else {}
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def batch(B=3, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[1, -3:] = -100  # padding
    return ids, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_step(model, ids, labels, num_items_in_batch=None):
    """Trainer's label_smoothing_factor path: logits, then LabelSmoother."""
    out = model(ids)
    loss = LabelSmoother(epsilon=EPS)(out, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), grads(model)


def assert_same_step(actual, expected, rtol=1e-5, atol=1e-6):
    (loss, g), (ref_loss, ref_g) = actual, expected
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert g.keys() == ref_g.keys()
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("num_items", [None, 29], ids=["mean", "num_items"])
def test_loss_and_gradients_equal_label_smoother(model_type, fused, num_items):
    ref = tiny_model(model_type)
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS, fused_linear=fused)
    ids, labels = batch()
    n = None if num_items is None else torch.tensor(num_items)
    expected = reference_step(ref, ids, labels, n)
    out = model(ids, labels=labels, num_items_in_batch=n)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert (out.logits is None) == fused
    assert_same_step((out.loss.detach(), grads(model)), expected)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_without_smoothing_equals_the_models_own_loss(model_type):
    """ε = 0: the model's own ForCausalLMLoss (shift, mean or sum / num_items)."""
    ref = tiny_model(model_type)
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=0.0)
    ids, labels = batch()
    for n in (None, torch.tensor(17)):
        ref.zero_grad(), model.zero_grad()
        expected = ref(ids, labels=labels, num_items_in_batch=n).loss
        expected.backward()
        actual = model(ids, labels=labels, num_items_in_batch=n).loss
        actual.backward()
        assert_same_step((actual.detach(), grads(model)), (expected.detach(), grads(ref)))


def shifted(labels):
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


def test_loss_options_reach_lsce():
    """weight, z_loss, smoothing_prior and a chunk that does not divide the
    rows: the fused model equals lsce.cross_entropy's sum on the model's
    logits over the token count (with class weights, see below)."""
    ref = tiny_model("qwen2")
    g = torch.Generator().manual_seed(3)
    prior = torch.rand(V, generator=g) + 0.1
    options = dict(weight=torch.rand(V, generator=g) + 0.5, z_loss=1e-3, smoothing_prior=prior / prior.sum())
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS, chunk_size=7, **options)
    ids, labels = batch()
    logits = ref(ids).logits
    target = shifted(labels).reshape(-1)
    expected = lsce.cross_entropy(logits.reshape(-1, V), target, label_smoothing=EPS, reduction="sum", **options)
    expected = expected / (target != -100).sum()
    expected.backward()
    actual = model(ids, labels=labels).loss
    actual.backward()
    assert_same_step((actual.detach(), grads(model)), (expected.detach(), grads(ref)))


@pytest.mark.parametrize("fused", [True, False])
def test_fused_training_step_never_materialises_the_logits(fused):
    model = apply_lsce(tiny_model("llama"), label_smoothing=EPS, fused_linear=fused)
    ids, labels = batch(B=4, T=24)
    logits_numel = ids.numel() * V
    assert logits_numel > V * model.config.hidden_size  # larger than any weight
    # The largest memory behind any op's output: lsce's ops are one op each, their
    # chunk buffers internal (bounded by tests/test_linear.py).
    with LargestTensor(storage=True) as seen:
        model(ids, labels=labels).loss.backward()
    assert (seen.largest < logits_numel) == fused


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_without_labels_the_model_is_untouched(model_type):
    ref = tiny_model(model_type)
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS)
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids, labels = batch()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    model.eval(), ref.eval()
    prompt = ids[:1, :6]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt.shape[1]
    assert torch.equal(generated, ref.generate(prompt, max_new_tokens=6, do_sample=False))
    # Eval mode with labels: logits returned too, loss still lsce's.
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.logits, ref(ids).logits, rtol=0, atol=0)
    expected = LabelSmoother(epsilon=EPS)(ref(ids), labels, shift_labels=True)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("num_items", [None, 23])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_smoother_drop_in(shift, num_items, dtype):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, V, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, V, (3, 10), generator=g)
    labels[0, :4] = -100
    outputs = {"logits": logits.requires_grad_()}
    n = None if num_items is None else torch.tensor(num_items)
    expected = LabelSmoother(epsilon=EPS)(outputs, labels, shift_labels=shift, num_items_in_batch=n)
    actual = integration.LabelSmoother(epsilon=EPS)(outputs, labels, shift_labels=shift, num_items_in_batch=n)
    (g_expected,) = torch.autograd.grad(expected, logits)
    (g_actual,) = torch.autograd.grad(actual, logits)
    torch.testing.assert_close(actual, expected.to(actual.dtype))
    torch.testing.assert_close(g_actual, g_expected)


def test_bf16_loss_no_worse_than_label_smoother():
    """bf16 model: lsce's loss at least as close to the fp64 loss of the same
    bf16 logits as LabelSmoother's (which smooths a bf16 log-softmax)."""
    ref = tiny_model("llama", torch.bfloat16)
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS, fused_linear=False)
    ids, labels = batch()
    logits = ref(ids).logits
    truth = LabelSmoother(epsilon=EPS)({"logits": logits.double()}, labels, shift_labels=True)
    theirs = LabelSmoother(epsilon=EPS)({"logits": logits}, labels, shift_labels=True).double()
    ours = model(ids, labels=labels).loss
    assert ours.dtype == torch.float32
    assert abs(ours.double() - truth) <= abs(theirs - truth) + 1e-6 * truth


def test_applying_twice_replaces_the_options():
    ref = tiny_model("mistral")
    model = apply_lsce(apply_lsce(copy.deepcopy(ref), label_smoothing=0.3), label_smoothing=EPS)
    ids, labels = batch()
    expected, _ = reference_step(ref, ids, labels)
    torch.testing.assert_close(model(ids, labels=labels).loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_a_deep_copy_is_independent():
    model = apply_lsce(tiny_model("llama"), label_smoothing=EPS)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    ids, labels = batch()
    assert not torch.equal(clone(ids, labels=labels).loss, model(ids, labels=labels).loss)
    assert clone._lsce is not model._lsce


@pytest.mark.parametrize("make, match", [
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2)),
     "model types llama, mistral"),
    (lambda: transformers.AutoModelForSequenceClassification.from_config(tiny_model("llama").config),
     "ForCausalLM"),
])
def test_unsupported_models_are_named(make, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        apply_lsce(model)
    assert "forward" not in vars(model) and not hasattr(model, "_lsce")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(weight=torch.ones(V + 1)), ValueError, "weight"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(reduction="sum"), TypeError, "unknown loss option"),
])
def test_bad_options_raise_before_the_model_is_changed(kwargs, error, match):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        apply_lsce(model, **kwargs)
    assert "forward" not in vars(model) and not hasattr(model, "_lsce")


def test_softcap_twice_is_refused():
    with pytest.raises(ValueError, match="already softcaps"):
        apply_lsce(tiny_model("gemma2"), softcap=20.0)


# ---- the patched model as training scripts handle it ---------------------------


def test_the_forward_keeps_the_models_signature_and_class_name():
    """Trainer's column filtering, generation, torch.compile and TRL read it."""
    ref = tiny_model("llama")
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS)
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model, type(ref))


def test_trainer_with_default_training_arguments(tmp_path):
    """Trainer's defaults, remove_unused_columns=True among them (the columns
    the forward does not take are dropped: "note" here): the patched model
    trains, with the loss of label_smoothing_factor=ε."""
    g = torch.Generator().manual_seed(5)
    dataset = [{"input_ids": ids, "labels": ids, "note": "x"} for ids in torch.randint(0, V, (16, 12), generator=g)]

    def train_loss(model, **kwargs):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
            trainer.train()
        return trainer.state.log_history[-1]["train_loss"]

    base = tiny_model("llama")
    expected = train_loss(copy.deepcopy(base), label_smoothing_factor=EPS)
    assert train_loss(apply_lsce(copy.deepcopy(base), label_smoothing=EPS)) == pytest.approx(expected, rel=1e-5)


def _copies(how, model, tmp_path):
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    if how == "deepcopy":
        return copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_a_patched_model_survives_pickle_torch_save_and_deepcopy(how, tmp_path):
    model = apply_lsce(tiny_model("llama"), label_smoothing=EPS, z_loss=1e-3)
    ids, labels = batch()
    clone = _copies(how, model, tmp_path)
    assert type(clone) is type(model) and inspect.signature(clone.forward) == inspect.signature(model.forward)
    out = clone(ids, labels=labels)
    assert out.logits is None  # still fused, with the same options
    torch.testing.assert_close(out.loss, model(ids, labels=labels).loss, rtol=0, atol=0)


def test_a_patched_model_loads_in_a_fresh_process_and_its_state_dict_in_another_model(tmp_path):
    model = apply_lsce(tiny_model("llama"), label_smoothing=EPS)
    ids, labels = batch()
    expected = model(ids, labels=labels).loss
    torch.save(model, tmp_path / "model.pt")
    torch.save((ids, labels), tmp_path / "batch.pt")
    child = ("import sys, torch; model = torch.load(sys.argv[1], weights_only=False); "
             "ids, labels = torch.load(sys.argv[2]); out = model(ids, labels=labels); "
             "print(out.logits is None, repr(out.loss.item()))")
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "model.pt"), str(tmp_path / "batch.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # the installed lsce
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", repr(expected.item())]
    torch.save(model.state_dict(), tmp_path / "state.pt")
    other = apply_lsce(tiny_model("llama", seed=7), label_smoothing=EPS)
    other.load_state_dict(torch.load(tmp_path / "state.pt"))
    torch.testing.assert_close(other(ids, labels=labels).loss, expected, rtol=0, atol=0)


def test_save_pretrained_saves_no_lsce_settings_and_reapplying_is_one_line(tmp_path):
    ref = tiny_model("gemma2")
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS)
    ref.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "lsce")
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "lsce")]
    assert config[0] == config[1]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lsce").train()
    assert type(loaded) is type(ref)  # the checkpoint is the model's own
    assert loaded.state_dict().keys() == ref.state_dict().keys()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids, labels = batch()
    torch.testing.assert_close(loaded(ids, labels=labels).loss, ref(ids, labels=labels).loss, rtol=0, atol=0)
    apply_lsce(loaded, label_smoothing=EPS)
    torch.testing.assert_close(loaded(ids, labels=labels).loss, model(ids, labels=labels).loss, rtol=0, atol=0)


@pytest.mark.parametrize("to", [torch.float64, "cuda"])
def test_model_to_takes_the_loss_options_along(to):
    if to == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ref = tiny_model("llama")
    weight = torch.rand(V, generator=torch.Generator().manual_seed(6)) + 0.5
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS, weight=weight).to(to)
    ref.to(to)
    ids, labels = (t.to(ref.lm_head.weight.device) for t in batch())
    target = shifted(labels).reshape(-1)
    expected = lsce.cross_entropy(ref(ids).logits.reshape(-1, V), target, weight=weight.to(ids.device),
                                  label_smoothing=EPS, reduction="sum") / (target != -100).sum()
    actual = model(ids, labels=labels).loss
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected)


def test_applying_after_the_forward_was_replaced_is_refused():
    model = tiny_model("llama")
    model.forward = types.MethodType(type(model).forward, model)  # as accelerate's and TRL's wrappers do
    with pytest.raises(ValueError, match="before handing it to them"):
        apply_lsce(model)


def test_import_lsce_reaches_the_integration_without_importing_transformers(tmp_path):
    code = ("import sys, lsce; assert callable(lsce.integrations.transformers.apply_lsce); "
            "assert 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# ---- the LM head module --------------------------------------------------------


class _HalvedLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) * 0.5


HEAD_CHANGES = {
    "forward hook": lambda head: head.register_forward_hook(lambda m, args, out: out * 0.5),
    "forward pre-hook": lambda head: head.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,)),
    "backward hook": lambda head: head.register_full_backward_hook(lambda m, gi, go: (gi[0] * 0.5,)),
    "subclass": lambda head: setattr(head, "__class__", _HalvedLinear),
    "forward on the module": lambda head: setattr(head, "forward", types.MethodType(_HalvedLinear.forward, head)),
}


@pytest.mark.parametrize("change", HEAD_CHANGES)
def test_a_head_that_is_not_a_plain_linear_runs_its_own_forward(change):
    """Fusing would skip what the head adds: training falls back to the head's
    own forward with a one-time warning, and equals the unpatched model (and
    the patched one in eval mode)."""
    ref = tiny_model("llama")
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS)
    for m in (ref, model):
        HEAD_CHANGES[change](m.lm_head)
    ids, labels = batch()
    expected = reference_step(ref, ids, labels)
    with pytest.warns(UserWarning, match="LM head is not fused with the loss because"):
        out = model(ids, labels=labels)
    out.loss.backward()
    assert out.logits is not None
    assert_same_step((out.loss.detach(), grads(model)), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        model(ids, labels=labels)
    torch.testing.assert_close(model.eval()(ids, labels=labels).loss, expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp2_heads_fuse_own_unit_or_in_the_root():
    """FSDP2 on one process: a head wrapped by fully_shard (its weight sharded
    until gathered) fuses with its weight gathered around the call; a head
    inside the root's group is a plain nn.Linear during the root's forward and
    fuses. (Several ranks and every wrapping: tests/test_fsdp.py.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ref = tiny_model("llama")
    ids, labels = batch()
    expected = reference_step(ref, ids, labels)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for wrap_head in (True, False):
            model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS)
            model.zero_grad()
            if wrap_head:
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model(ids, labels=labels)
            out.loss.backward()
            assert out.logits is None
            assert not any("not fused" in str(w.message) for w in caught)
            full = {n: g.full_tensor() for n, g in grads(model).items()}
            assert_same_step((out.loss.detach(), full), expected)
    finally:
        torch.distributed.destroy_process_group()


# ---- class weights -------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_class_weights_give_the_same_loss_for_the_same_tokens(fused):
    """With class weights, apply_lsce and CausalLMLoss divide the weighted sum
    by the token count, as Trainer's num_items_in_batch does: a call on the
    whole batch equals the sum of its micro-batches under Trainer's gradient
    accumulation (each divided by the whole batch's count)."""
    ref = tiny_model("llama")
    weight = torch.rand(V, generator=torch.Generator().manual_seed(6)) + 0.5
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS, fused_linear=fused, weight=weight)
    ids, labels = batch(B=4)
    target = shifted(labels).reshape(-1)
    n = (target != -100).sum()
    logits = ref(ids).logits
    expected = lsce.cross_entropy(logits.reshape(-1, V), target, weight=weight, label_smoothing=EPS,
                                  reduction="sum") / n
    loss = CausalLMLoss(label_smoothing=EPS, weight=weight)
    whole = [model(ids, labels=labels).loss, loss({"logits": logits}, labels)]
    parts = [sum(model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=n).loss for i in (0, 2)),
             sum(loss({"logits": logits[i:i + 2]}, labels[i:i + 2], num_items_in_batch=n) for i in (0, 2))]
    for actual in whole + parts:
        torch.testing.assert_close(actual, expected)


# ---- Trainer -----------------------------------------------------------------


class _Examples(torch.utils.data.Dataset):
    """Sequences of unequal lengths, so micro-batches hold unequal token counts
    and the gradient-accumulation normalisation matters."""

    def __init__(self, n=16, seed=2):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randint(0, V, (int(torch.randint(6, 20, (), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def _collate(examples):
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.int64)
    labels = torch.full((len(examples), T), -100)
    mask = torch.zeros(len(examples), T, dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = labels[row, :n] = e["input_ids"]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, tmp_path, label_smoothing_factor=0.0, lsce_label_smoother=False, keep_warnings=False,
           **trainer_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=3,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False,
        label_smoothing_factor=label_smoothing_factor, dataloader_num_workers=0)
    with warnings.catch_warnings():
        if not keep_warnings:
            warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Examples(), data_collator=_collate,
                                       **trainer_kwargs)
        if lsce_label_smoother:
            trainer.label_smoother = integration.LabelSmoother(epsilon=label_smoothing_factor)
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_with_gradient_accumulation_matches_label_smoothing_factor(tmp_path):
    """Three optimizer steps of 3 micro-batches each: the loss of every step
    and the final weights equal Trainer(label_smoothing_factor=ε)'s, with
    apply_lsce (fused and not), CausalLMLoss and lsce's LabelSmoother."""
    base = tiny_model("llama")
    expected_losses, expected_weights = _train(copy.deepcopy(base), tmp_path, label_smoothing_factor=EPS)
    runs = {
        "apply_lsce fused": _train(apply_lsce(copy.deepcopy(base), label_smoothing=EPS), tmp_path),
        "apply_lsce logits": _train(apply_lsce(copy.deepcopy(base), label_smoothing=EPS, fused_linear=False),
                                    tmp_path),
        "CausalLMLoss": _train(copy.deepcopy(base), tmp_path, compute_loss_func=CausalLMLoss(label_smoothing=EPS)),
        "LabelSmoother": _train(copy.deepcopy(base), tmp_path, label_smoothing_factor=EPS, lsce_label_smoother=True),
    }
    assert expected_weights.keys() == {n for n, _ in base.named_parameters()}
    moved = max((expected_weights[n] - p).abs().max().item() for n, p in base.named_parameters())
    assert moved > 1e-3  # the steps did train
    for name, (losses, weights) in runs.items():
        assert losses == pytest.approx(expected_losses, rel=1e-5), name
        for n, w in expected_weights.items():
            torch.testing.assert_close(weights[n], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {n}: {m}")


def test_trainer_smoothing_its_own_logits_says_apply_lsce_is_unused(tmp_path):
    """Trainer(label_smoothing_factor=ε) takes the labels away from the model
    and smooths the logits itself: the loss is Trainer's, and a patched model
    says once that apply_lsce's loss is not used."""
    base = tiny_model("llama")
    expected, _ = _train(copy.deepcopy(base), tmp_path, label_smoothing_factor=EPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, _ = _train(apply_lsce(copy.deepcopy(base), label_smoothing=EPS), tmp_path,
                           label_smoothing_factor=EPS, keep_warnings=True)
    assert losses == pytest.approx(expected, rel=1e-5)
    unlabelled = [w for w in caught if "training step without labels" in str(w.message)]
    assert len(unlabelled) == 1 and "label_smoothing_factor" in str(unlabelled[0].message)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_autocast_bf16_no_worse_than_label_smoother(fused):
    """Under autocast (Trainer's bf16=True) the fused head runs in bf16 as
    nn.Linear would: lsce's loss is at least as close as LabelSmoother's to the
    fp64 loss of the model's own bf16 logits, and its gradients are close."""
    ref = tiny_model("llama")
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS, fused_linear=fused)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ref(ids)
        assert out.logits.dtype == torch.bfloat16
        theirs = LabelSmoother(epsilon=EPS)(out, labels, shift_labels=True)
        ours = model(ids, labels=labels).loss
    truth = LabelSmoother(epsilon=EPS)({"logits": out.logits.double()}, labels, shift_labels=True)
    assert abs(ours.double() - truth) <= abs(theirs.double() - truth) + 1e-6 * truth
    theirs.backward(), ours.backward()
    expected, actual = grads(ref), grads(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0.05, atol=5e-3, msg=lambda m: f"{name}: {m}")


def test_torch_compile_of_the_patched_model():
    ref = tiny_model("llama")
    model = apply_lsce(copy.deepcopy(ref), label_smoothing=EPS)
    ids, labels = batch()
    expected = reference_step(ref, ids, labels)
    out = torch.compile(model)(ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert_same_step((out.loss.detach(), grads(model)), expected)
