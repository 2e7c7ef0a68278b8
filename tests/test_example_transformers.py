"""examples/train_llama_lsce.py --fast: the three ways of training with
Trainer, and the two of training a LoRA adapter with TRL's SFTTrainer, print
the same losses step by step within each table, and finite speed and memory
figures."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from test_examples import parse_first_table

import lsce

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_llama_lsce.py"
VARIANTS = ["transformers", "lsce fused", "lsce logits"]
SFT_VARIANTS = ["trl", "trl + lsce"]


def test_fast_run_prints_matching_losses():
    env = dict(os.environ)
    lsce_root = str(Path(lsce.__file__).resolve().parents[1])  # the children import this lsce
    env["PYTHONPATH"] = os.pathsep.join([lsce_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--fast"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    sft = proc.stdout.index("\nSFTTrainer")
    for text, variants in ((proc.stdout[:sft], VARIANTS), (proc.stdout[sft:], SFT_VARIANTS)):
        check_table(text, variants)


def check_table(text, variants):
    header, rows = parse_first_table(text)
    assert header == variants, header
    loss_rows = [label for label in rows if label.startswith("loss, step")]
    assert len(loss_rows) >= 3 and "loss, step 6" in loss_rows, list(rows)
    first, last = (float(c) for c in (rows[loss_rows[0]][0], rows[loss_rows[-1]][0]))
    assert last < first, "six steps of training lowered the loss"
    for label in loss_rows:
        reference, *ours = (float(c) for c in rows[label])
        for value in ours:
            assert math.isclose(value, reference, rel_tol=1e-4), (label, rows[label])
    for label in ("tokens/s", "peak MB above start"):
        assert all(math.isfinite(float(c)) and float(c) >= 0 for c in rows[label]), (label, rows[label])
    assert float(rows["tokens/s"][0]) > 0
