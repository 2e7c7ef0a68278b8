"""Distil a small Llama from a larger one with lsce, on CPU, and compare the
students with one trained on hard labels alone.

Teachers (2 layers × 128) are trained with label smoothing ε ∈ {0, 0.1};
students (1 layer × 64) are trained on the same text for the same steps:

* ``hard labels``: the label-smoothing-free cross-entropy only;
* ``live, ε_t, T``: ``causal_lm_distillation_loss(student, ..., teacher=teacher)``,
  alpha = 0.5, forward KL at temperature T (heads fused with the loss, no
  logits of either model kept);
* ``top-k, ε_t``: the same from the teacher's top-16 log-probabilities,
  computed once before training as an offline teacher would store them
  (renormalised over the 16).

The text is the made-up Markov language of ``train_llama_lsce.py`` (each
word has 8 likely successors), tokenised one id per word; the held-out
sentences come from the same chain. Reported: held-out next-token NLL and
accuracy, mean ± std over ``--seeds`` student seeds (one teacher per ε).

    python examples/distil_llama.py            # vocabulary 2000, 3 seeds
    python examples/distil_llama.py --fast     # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_llama_lsce import generate_text, tokenize  # noqa: E402  (the same made-up language)

TOPK = 16


def llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config)


def train(model, ids: torch.Tensor, steps: int, batch: int, lr: float, loss_of, seed: int):
    """Adam on random batches of rows of ``ids``; ``loss_of(model, rows, step)`` gives the loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, ids.shape[0], (batch,), generator=g)
        loss = loss_of(model, rows, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model, ids: torch.Tensor):
    """Held-out next-token NLL and accuracy."""
    model.eval()
    logits = model(ids).logits[:, :-1].float()
    target = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    acc = (logits.argmax(-1) == target).float().mean()
    return nll.item(), acc.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--fast", action="store_true", help="a smoke run: vocabulary 300, 20/10 steps, 1 seed")
    args = p.parse_args(argv)
    if args.fast:
        args.vocab, args.seq, args.batch, args.teacher_steps, args.student_steps, args.seeds = 300, 32, 8, 20, 10, 1

    from lsce.integrations.transformers import apply_lsce, causal_lm_distillation_loss

    ids = tokenize(generate_text(args.vocab, 1200, args.seq, seed=0), args.vocab)
    train_ids, test_ids = ids[:1000], ids[1000:]
    start = time.perf_counter()

    teachers, rows = {}, {}
    for eps in (0.0, 0.1):
        teacher = apply_lsce(llama(args.vocab, 128, 2, seed=100), label_smoothing=eps)
        train(teacher, train_ids, args.teacher_steps, args.batch, 3e-3,
              lambda m, r, _: m(train_ids[r], labels=train_ids[r]).loss, seed=100)
        teacher.eval()
        teachers[eps] = teacher
        rows[f"teacher, ε={eps:g}"] = [evaluate(teacher, test_ids)]
    with torch.no_grad():  # an offline teacher's stored top-k, once
        stored = {eps: torch.log_softmax(t(train_ids).logits.float(), -1).topk(TOPK, -1) for eps, t in teachers.items()}

    runs = {"hard labels": lambda m, r, _: m(train_ids[r], labels=train_ids[r]).loss}
    for eps, teacher in teachers.items():
        for T in args.temperatures:
            runs[f"live, ε_t={eps:g}, T={T:g}"] = (
                lambda m, r, _, t=teacher, T=T: causal_lm_distillation_loss(
                    m, train_ids[r], train_ids[r], teacher=t, temperature=T, alpha=0.5))
        runs[f"top-{TOPK}, ε_t={eps:g}, T=1"] = (
            lambda m, r, _, s=stored[eps]: causal_lm_distillation_loss(
                m, train_ids[r], train_ids[r], teacher_topk_ids=s.indices[r], teacher_topk_logprobs=s.values[r],
                alpha=0.5))
    for name, loss_of in runs.items():
        rows[name] = [evaluate(train(llama(args.vocab, 64, 1, seed=s), train_ids, args.student_steps, args.batch,
                                     3e-3, loss_of, seed=s), test_ids) for s in range(args.seeds)]

    print(f"Teachers 2 layers × 128 ({args.teacher_steps} steps), students 1 layer × 64 ({args.student_steps} "
          f"steps, {args.seeds} seeds); vocabulary {args.vocab}, {args.batch}×{args.seq} tokens per step; "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| model | held-out NLL | held-out accuracy |")
    print("|---|---|---|")
    for name, results in rows.items():
        nll, acc = np.array(results).T
        spread = (lambda a: f" ± {a.std(ddof=1):.4f}") if len(results) > 1 else (lambda a: "")
        print(f"| {name} | {nll.mean():.4f}{spread(nll)} | {acc.mean():.4f}{spread(acc)} |")


if __name__ == "__main__":
    main()
