"""lsce.integrations.transformers under PEFT adapters and TRL's trainers, as
fine-tuning scripts use them. Tiny Llamas built from configs, a word-level
tokenizer built here, data sets in memory: offline."""

from __future__ import annotations

import warnings

import datasets
import peft
import pytest
import torch
import transformers
import trl
from test_transformers import EPS, V, assert_same_step, batch, grads, reference_step, tiny_model

import lsce.integrations.transformers as integration
from lsce.integrations import trl as lsce_trl
from lsce.integrations.transformers import CausalLMLoss, apply_lsce

BYPASSED = "decoder ran outside the model's forward"
UNLABELLED = "training step without labels"


def lsce_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("lsce:")]


# ---- PEFT --------------------------------------------------------------------


def lora(model, targets):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(3)  # the adapters' initial weights (nonzero B: the adapters change the loss)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["lsce, then PEFT", "PEFT, then lsce"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["q_proj", "lm_head"]],
                         ids=["attention+mlp", "lm_head"])
def test_lora_gives_the_loss_and_adapter_gradients_of_the_model_without_lsce(targets, order):
    """LoRA on the attention and MLP: the head stays fused. LoRA on lm_head:
    the head's own forward (the adapter's low-rank term included), with a
    warning. Either way the loss and every trainable gradient are those of
    the same PEFT model with Transformers' label smoothing."""
    ref = lora(tiny_model("llama"), targets)
    if order == "lsce, then PEFT":
        model = lora(apply_lsce(tiny_model("llama"), label_smoothing=EPS), targets)
    else:
        model = apply_lsce(lora(tiny_model("llama"), targets), label_smoothing=EPS)
    assert isinstance(model, peft.PeftModel)
    ids, labels = batch()
    expected = reference_step(ref, ids, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, labels=labels)
    out.loss.backward()
    head_has_lora = "lm_head" in targets
    assert (out.logits is None) != head_has_lora
    assert any("LM head is not fused" in m for m in lsce_warnings(caught)) == head_has_lora
    trained = grads(model)
    assert trained.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora" in n for n in trained) == head_has_lora
    assert_same_step((out.loss.detach(), trained), expected)


# ---- TRL ---------------------------------------------------------------------


def tokenizer():
    """Word-level: "w17" is token 17; the last two ids are padding and end of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(V - 2)}
    vocab.update({"<pad>": V - 2, "<eos>": V - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def token_rows(n=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 2, (int(torch.randint(6, 20, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def common_args(tmp_path):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, seed=0, disable_tqdm=True)


def losses_of(trainer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2
    return losses, lsce_warnings(caught)


def sft(model, tmp_path, label_smoothing_factor=0.0, packing=False, lora_targets=None, trainer=trl.SFTTrainer,
        bf16=None, **kwargs):
    """Two optimizer steps; bf16=None is SFTConfig's default (bf16 autocast where the CPU has it)."""
    config = {} if bf16 is None else dict(bf16=bf16)
    args = trl.SFTConfig(**common_args(tmp_path), label_smoothing_factor=label_smoothing_factor, packing=packing,
                         max_length=64, **config)
    peft_config = None if lora_targets is None else peft.LoraConfig(r=4, target_modules=lora_targets)
    data = datasets.Dataset.from_dict({"input_ids": token_rows()})
    torch.manual_seed(3)
    return losses_of(trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                             peft_config=peft_config, **kwargs))


SFT_SETUPS = dict(argvalues=[dict(), dict(packing=True), dict(lora_targets=["q_proj", "v_proj"])],
                  ids=["padded", "packed", "LoRA"])


@pytest.mark.parametrize("setup", **SFT_SETUPS)
def test_lsce_sft_trainer_gives_trls_label_smoothing_factor_loss_without_logits(setup, tmp_path, monkeypatch):
    """lsce.integrations.trl.SFTTrainer: the losses of trl.SFTTrainer's own
    label_smoothing_factor (padded batches, packed sequences, a LoRA adapter),
    from apply_lsce's fused head: every training forward runs it (no logits),
    and TRL's metrics are still logged. fp32 here: equal to rounding."""
    expected, _ = sft(tiny_model("llama"), tmp_path, label_smoothing_factor=EPS, bf16=False, **setup)
    fused_calls, fused_forward = [], integration._fused_forward

    def counted(*args):
        fused_calls.append(torch.is_grad_enabled())
        return fused_forward(*args)

    monkeypatch.setattr(integration, "_fused_forward", counted)
    losses, caught = sft(tiny_model("llama"), tmp_path, label_smoothing_factor=EPS, bf16=False,
                         trainer=lsce_trl.SFTTrainer, **setup)
    assert losses == pytest.approx(expected, rel=1e-5)
    assert caught == []
    assert fused_calls == [True] * 4  # 2 steps × 2 accumulated micro-batches, each through lsce's fused head


def test_lsce_sft_trainer_under_bf16_autocast_is_no_further_from_fp32_than_trl(tmp_path):
    """SFTConfig's default on a CPU with bf16: autocast. Both round the
    head's matmul to bf16 (in other blocks), so the losses are compared with
    the fp32 run: lsce no further from it than TRL's own bf16 run."""
    truth, _ = sft(tiny_model("llama"), tmp_path, label_smoothing_factor=EPS, bf16=False)
    trl_bf16, _ = sft(tiny_model("llama"), tmp_path, label_smoothing_factor=EPS, bf16=True)
    lsce_bf16, _ = sft(tiny_model("llama"), tmp_path, label_smoothing_factor=EPS, bf16=True,
                       trainer=lsce_trl.SFTTrainer)
    assert trl_bf16 != truth  # autocast did round
    worst_trl = max(abs(a - t) for a, t in zip(trl_bf16, truth))
    worst_lsce = max(abs(a - t) for a, t in zip(lsce_bf16, truth))
    assert worst_lsce <= worst_trl + 1e-6 * max(truth)


def test_lsce_sft_trainer_needs_a_model_object_to_smooth(tmp_path):
    with pytest.raises(TypeError, match="pass the model as a module"):
        sft("some/model-name", tmp_path, label_smoothing_factor=EPS, trainer=lsce_trl.SFTTrainer)


@pytest.mark.parametrize("setup", **SFT_SETUPS)
def test_sft_trainer_with_causal_lm_loss_gives_its_label_smoothing_factor_loss(setup, tmp_path):
    """SFTTrainer's compute_loss_func: lsce's loss on the logits it builds
    gives the losses of its own label_smoothing_factor. On a model patched by
    apply_lsce (the LoRA case), apply_lsce says once that its loss is unused."""
    expected, _ = sft(tiny_model("llama"), tmp_path, label_smoothing_factor=EPS, **setup)
    model = apply_lsce(tiny_model("llama"), label_smoothing=EPS) if "lora_targets" in setup else tiny_model("llama")
    losses, caught = sft(model, tmp_path, compute_loss_func=CausalLMLoss(label_smoothing=EPS), **setup)
    assert losses == pytest.approx(expected, rel=1e-5)
    assert len(caught) == ("lora_targets" in setup) and all(UNLABELLED in m for m in caught)


def test_sft_trainer_with_apply_lsce_alone_warns_that_the_smoothing_is_not_used(tmp_path):
    """SFTTrainer's default loss runs TRL's own fused LM head on the decoder:
    the losses are those without smoothing, and apply_lsce says so once."""
    expected, _ = sft(tiny_model("llama"), tmp_path)
    losses, caught = sft(apply_lsce(tiny_model("llama"), label_smoothing=EPS), tmp_path)
    assert losses == pytest.approx(expected, rel=1e-5)
    assert len(caught) == 1 and BYPASSED in caught[0] and "lsce.integrations.trl.SFTTrainer" in caught[0]


def test_dpo_trainer_with_apply_lsce_warns_that_the_loss_is_trls(tmp_path):
    """DPO's loss (and its SFT-style terms) are computed by TRL from its own
    fused head: unchanged by apply_lsce, which warns once."""
    words = [" ".join(f"w{i}" for i in row) for row in token_rows(n=8, seed=4)]
    data = datasets.Dataset.from_dict({"prompt": words[:4], "chosen": [" " + w for w in words[4:]],
                                       "rejected": [" " + w for w in reversed(words[4:])]})

    def dpo(model):
        args = trl.DPOConfig(**common_args(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
        return losses_of(trl.DPOTrainer(model=model, ref_model=tiny_model("llama"), args=args, train_dataset=data,
                                        processing_class=tokenizer()))

    expected, _ = dpo(tiny_model("llama"))
    losses, caught = dpo(apply_lsce(tiny_model("llama"), label_smoothing=EPS))
    assert losses == pytest.approx(expected, rel=1e-5)
    assert len(caught) == 1 and BYPASSED in caught[0]
