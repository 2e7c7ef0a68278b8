"""Train a small Llama from scratch with Hugging Face's Trainer, label-smoothed,
three ways, then train a LoRA adapter on the same initial model with TRL's
SFTTrainer, two ways, and print loss, tokens/s and peak memory side by side:

* ``transformers``: ``TrainingArguments(label_smoothing_factor=ε)``, Trainer's
  own path (the model returns the logits, ``LabelSmoother`` smooths them);
* ``lsce fused``: ``apply_lsce(model, label_smoothing=ε)``, the LM head fused
  with the loss, so the logits never exist in a training step;
* ``lsce logits``: ``apply_lsce(..., fused_linear=False)``, the model's logits
  and lsce's loss on them;

and, with a LoRA adapter (rank 16 on the attention projections; the base
weights frozen) on the same model and text:

* ``trl``: ``SFTConfig(label_smoothing_factor=ε)``, SFTTrainer's own path
  (the logits and Transformers' ``LabelSmoother``);
* ``trl + lsce``: ``lsce.integrations.trl.SFTTrainer`` with the same
  ``label_smoothing_factor``: the loss from ``apply_lsce``'s fused head, so no
  training forward builds the logits.

Same initial weights, same batches, same optimizer; only the loss path
differs, so the loss columns of each table agree to rounding.

The text is generated here: a made-up language of ``--vocab`` words (syllable
strings) whose sentences follow a random Markov chain (each word has 8
likely successors; word frequencies are Zipfian), tokenised one id per word.

    python examples/train_llama_lsce.py                 # 32000 words, 30 steps
    python examples/train_llama_lsce.py --fast          # a smoke run

Each way runs in a fresh process, so that its peak memory is its own: on CPU
the peak resident set during ``trainer.train()`` above what the process held
when training started (the model, its data, the Python heap); on CUDA the
peak of ``torch.cuda.max_memory_allocated`` above the memory allocated then.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the shared benchmarks/measure.py
from measure import Clock, PeakMemory, WorkerError, reply, run_worker  # noqa: E402

VARIANTS = ("transformers", "lsce fused", "lsce logits")
SFT_VARIANTS = ("trl", "trl + lsce")
LORA_RANK = 16
SUCCESSORS = 8


# ----------------------------------------------------------------------------- the text
def words(vocab: int):
    """``vocab`` distinct pronounceable words: word i spells i in base 70 with syllables."""
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"][:70]
    out = []
    for i in range(vocab):
        digits = [i % 70, i // 70 % 70, i // 4900]
        out.append("".join(syllables[d] for d in reversed(digits) if d) or syllables[0])
    return out


def generate_text(vocab: int, sentences: int, length: int, seed: int = 0) -> str:
    """``sentences`` lines of ``length`` words from a random Markov chain: each
    word is followed by one of its 8 successors (probabilities ∝ 1, 1/2, ... 1/8),
    successors drawn from a Zipfian distribution over the vocabulary."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab + 1)
    successors = rng.choice(vocab, size=(vocab, SUCCESSORS), p=zipf / zipf.sum())
    step_p = 1.0 / np.arange(1, SUCCESSORS + 1)
    ids = np.empty((sentences, length), dtype=np.int64)
    ids[:, 0] = rng.choice(vocab, size=sentences, p=zipf / zipf.sum())
    for t in range(1, length):  # vectorised over the sentences
        pick = rng.choice(SUCCESSORS, size=sentences, p=step_p / step_p.sum())
        ids[:, t] = successors[ids[:, t - 1], pick]
    lexicon = words(vocab)
    return "\n".join(" ".join(lexicon[i] for i in row) for row in ids)


def tokenize(text: str, vocab: int) -> torch.Tensor:
    """One id per word, one row per line."""
    index = {w: i for i, w in enumerate(words(vocab))}
    return torch.tensor([[index[w] for w in line.split()] for line in text.splitlines()])


# ----------------------------------------------------------------------------- one training run
class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def sft_trainer(variant: str, model, ids: torch.Tensor, common: dict, args, callbacks):
    """SFTTrainer with a LoRA adapter on the token rows ``ids``; the tokenizer
    (one token per word, as :func:`tokenize`) is only read for its padding token."""
    import datasets
    import peft
    import transformers
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lsce.integrations import trl as lsce_trl

    lexicon = words(args.vocab)
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(lexicon)}, unk_token=lexicon[0]))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token=lexicon[0],
                                                     eos_token=lexicon[0])
    config = trl.SFTConfig(**common, label_smoothing_factor=args.eps, max_length=None)
    lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    trainer = lsce_trl.SFTTrainer if variant == "trl + lsce" else trl.SFTTrainer
    return trainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                   callbacks=callbacks)


def run_one(variant: str, args) -> dict:
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lsce.integrations.transformers import apply_lsce

    device = torch.device(args.device)
    ids = tokenize(generate_text(args.vocab, args.batch * args.steps, args.seq + 1), args.vocab)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64 or 1, max_position_embeddings=args.seq + 1,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if variant in ("lsce fused", "lsce logits"):
        apply_lsce(model, label_smoothing=args.eps, fused_linear=variant == "lsce fused")

    step_ends = []
    clock = Clock(device)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(clock.now())

    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=device.type == "cpu", bf16=args.bf16, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if variant in SFT_VARIANTS:
                trainer = sft_trainer(variant, model, ids, common, args, [StepClock()])
            else:
                training = TrainingArguments(**common, label_smoothing_factor=args.eps * (variant == "transformers"))
                trainer = Trainer(model=model, args=training, train_dataset=_Rows(ids), callbacks=[StepClock()])
            memory = PeakMemory(device)
            memory.start()
            trainer.train()
    peak = memory.peak()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    timed_steps = len(step_ends) - 1  # from the end of step 1: compilation and first-touch excluded
    tokens_per_s = timed_steps * args.batch * args.seq / (step_ends[-1] - step_ends[0])
    return {"variant": variant, "losses": losses, "tokens_per_s": tokens_per_s, "peak_bytes": peak}


# ----------------------------------------------------------------------------- the comparison
def report(results, args, title: str) -> str:
    logits_mb = args.batch * args.seq * args.vocab * (2 if args.bf16 else 4) / 2**20
    names = [r["variant"] for r in results]
    rows = [("", *names)]
    steps = len(results[0]["losses"])
    for s in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1}):
        rows.append((f"loss, step {s + 1}", *(f"{r['losses'][s]:.4f}" for r in results)))
    rows.append(("tokens/s", *(f"{r['tokens_per_s']:.0f}" for r in results)))
    rows.append(("peak MB above start", *(f"{r['peak_bytes'] / 2**20:.0f}" for r in results)))
    base = results[0]
    rows.append((f"speed vs {names[0]}", *(f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" for r in results)))
    rows.append((f"peak vs {names[0]}", *(f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" for r in results)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    worst = max(abs(a - b) / abs(b) for r in results[1:] for a, b in zip(r["losses"], base["losses"]))
    head = (f"{title}: Llama {args.layers} layers × {args.hidden}, vocabulary {args.vocab}, {args.batch}×{args.seq} "
            f"tokens per step, {args.steps} steps, ε={args.eps}, {'bf16' if args.bf16 else 'fp32'} on {args.device} "
            f"({torch.get_num_threads()} threads); logits of one step: {logits_mb:.0f} MB")
    return "\n".join([head, "", *lines, "", f"largest relative loss difference to {names[0]}: {worst:.2e}"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="Trainer's bf16 mixed precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fast", action="store_true", help="a smoke run: 4000 words, 64×4 tokens, 6 steps")
    p.add_argument("--tables", choices=("both", "trainer", "sft"), default="both", help="which tables to run")
    p.add_argument("--variant", choices=VARIANTS + SFT_VARIANTS, help=argparse.SUPPRESS)  # one run, in a child
    args = p.parse_args(argv)
    if args.fast:
        args.vocab, args.hidden, args.seq, args.batch, args.steps = 4000, 64, 64, 4, 6
    if args.variant:
        return reply(run_one(args.variant, args))
    settings = ("vocab", "hidden", "layers", "seq", "batch", "steps", "lr", "eps", "device")
    child = [a for name in settings for a in (f"--{name}", str(getattr(args, name)))] + ["--bf16"] * args.bf16
    tables = {"trainer": ("Trainer, from scratch", VARIANTS), "sft": (f"SFTTrainer, LoRA rank {LORA_RANK}", SFT_VARIANTS)}
    for title, variants in (tables.values() if args.tables == "both" else [tables[args.tables]]):
        results = []
        for variant in variants:
            print(f"training with {variant} ...", flush=True)
            try:
                results.append(run_worker(os.path.abspath(__file__), [*child, "--variant", variant]))
            except WorkerError as e:
                sys.exit(f"the {variant} run failed: {e}\n{e.stderr}")
        print(report(results, args, title) + "\n", flush=True)


if __name__ == "__main__":
    main()
