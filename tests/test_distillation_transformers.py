"""lsce.integrations.transformers.causal_lm_distillation_loss: a tiny Llama
student distilled from another (live, or its stored top-k), against
lsce.distillation_loss on the models' own materialised, shifted logits."""

from __future__ import annotations

import pytest
import torch
from test_transformers import EPS, V, batch, grads, tiny_model

import lsce
from lsce.integrations.transformers import causal_lm_distillation_loss

OPTIONS = dict(temperature=2.0, alpha=0.6, beta=0.3, label_smoothing=EPS)


def shifted_logits(model, ids):
    return model(ids).logits[:, :-1].reshape(-1, V)


@pytest.mark.parametrize("num_items", [None, 29])
@pytest.mark.parametrize("teacher_kind", ["live", "top-k"])
def test_equals_the_loss_of_the_materialised_shifted_logits(teacher_kind, num_items):
    student, teacher = tiny_model("llama", torch.float64), tiny_model("llama", torch.float64, seed=7)
    ids, labels = batch()
    target = labels[:, 1:].reshape(-1)
    reference = tiny_model("llama", torch.float64)
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
    if teacher_kind == "live":
        kw, ref_kw = dict(teacher=teacher), dict(teacher_logits=teacher_logits[:, :-1].reshape(-1, V))
    else:
        top = torch.log_softmax(teacher_logits, -1).topk(16, -1)
        kw = dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values, topk_mass="renormalize")
        ref_kw = dict(teacher_topk_ids=top.indices[:, :-1].reshape(-1, 16),
                      teacher_topk_logprobs=top.values[:, :-1].reshape(-1, 16), topk_mass="renormalize")
    loss = causal_lm_distillation_loss(student, ids, labels, num_items_in_batch=num_items, chunk_size=7, **kw,
                                       **OPTIONS)
    expected = lsce.distillation_loss(shifted_logits(reference, ids), target,
                                      reduction="mean" if num_items is None else "sum", **ref_kw, **OPTIONS)
    if num_items is not None:
        expected = expected / num_items
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    got, want = grads(student), grads(reference)
    assert got.keys() == want.keys() == {n for n, _ in student.named_parameters()}
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=lambda m: f"{n}: {m}")
    assert not grads(teacher)


def test_without_a_teacher_the_error_says_what_is_missing():
    ids, labels = batch()
    with pytest.raises(ValueError, match="give either a dense teacher"):
        causal_lm_distillation_loss(tiny_model("llama"), ids, labels)


def test_the_distillation_example_runs(capsys):
    """examples/distil_llama.py --fast: every teacher and student has a row of finite numbers."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "distil_llama.py"
    spec = importlib.util.spec_from_file_location("distil_llama", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--fast", "--temperatures", "2"])
    table = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [cells[0].strip() for cells in table[1:]]
    assert names == ["teacher, ε=0", "teacher, ε=0.1", "hard labels", "live, ε_t=0, T=2", "top-16, ε_t=0, T=1",
                     "live, ε_t=0.1, T=2", "top-16, ε_t=0.1, T=1"]
    for cells in table[1:]:
        nll, acc = (float(c.split("±")[0]) for c in cells[1:])
        assert 0 < nll < 20 and 0 <= acc <= 1
