"""examples/label_smoothing_effects.py and examples/distillation_effects.py in
--fast mode: each runs, prints its tables (the expected rows and columns, finite
numbers in range) and writes its pictures."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lsce

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "label_smoothing_effects.py"
NEEDED = {"sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "matplotlib": "matplotlib"}
COLUMNS = ["ε=0", "ε=0 + TS", "ε=0.1"]
ROWS = ["test accuracy", "test NLL", "mean confidence, correct", "mean confidence, wrong",
        "ECE (15 bins, L1)", "penultimate within/between", "temperature T"]
IN_UNIT_INTERVAL = {"test accuracy", "mean confidence, correct", "mean confidence, wrong", "ECE (15 bins, L1)"}
FIGURES = ["reliability.png", "confidence.png", "penultimate_0-1-2.png", "penultimate_1-8-9.png", "sweep.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL = re.compile(r"^(-?\d+(?:\.\d+)?)(?: ± (\d+(?:\.\d+)?))?$")


def parse_tables(text: str):
    """Every markdown table in `text`, in order: [(header cells, {row label: cells})]."""
    tables, block = [], []
    for ln in [ln.strip() for ln in text.splitlines()] + [""]:
        if ln.startswith("|"):
            block.append([c.strip() for c in ln.strip("|").split("|")])
            continue
        if block:
            header, sep, body = block[0], block[1], block[2:]
            assert all(set(c) <= set("-:") for c in sep), f"not a markdown table separator: {sep}"
            tables.append((header, {row[0]: row[1:] for row in body}))
            block = []
    return tables


def parse_first_table(text: str):
    """The first markdown table in `text`: (header cells after the first, {row label: cells})."""
    header, rows = parse_tables(text)[0]
    return header[1:], rows


def run_fast(example: Path, out: Path):
    """Runs `example --fast --out out` in a fresh interpreter with this process's lsce;
    {"missing": [pip names]} when the examples' packages are not installed."""
    missing = [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return {"missing": missing}
    env = dict(os.environ)
    # The subprocess imports the same lsce as this process (installed or in-place build).
    lsce_root = str(Path(lsce.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([lsce_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, str(example), "--fast", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    return {"proc": proc, "out": out}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """Runs the example once for the module; the tests check (and fail on) what it gives."""
    return run_fast(EXAMPLE, tmp_path_factory.mktemp("label_smoothing_effects"))


def finished(run):
    """(stdout, out folder) of the fast run; a test failure (not a skip) when the
    example's packages are missing or the example failed."""
    if "missing" in run:
        pytest.fail(f"the example needs {', '.join(run['missing'])}: install lsce's 'examples' extra "
                    f"(pip install \".[examples]\")", pytrace=False)
    proc = run["proc"]
    if proc.returncode != 0:
        pytest.fail(f"example failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc.stdout, run["out"]


def test_table(fast_run):
    stdout, out = finished(fast_run)
    header, rows = parse_first_table(stdout)
    assert header == COLUMNS, header
    assert list(rows) == ROWS, list(rows)
    for label, cells in rows.items():
        assert len(cells) == len(COLUMNS), (label, cells)
        for col, cell in zip(COLUMNS, cells):
            if label == "temperature T" and col != "ε=0 + TS":
                assert cell == "—", (label, col, cell)
                continue
            m = CELL.match(cell)
            assert m, f"{label} / {col}: cannot parse {cell!r}"
            mean = float(m.group(1))
            assert math.isfinite(mean), (label, col, cell)
            assert m.group(2) is None, f"--fast runs one seed, so no spread: {cell!r}"
            if label in IN_UNIT_INTERVAL:
                assert 0.0 <= mean <= 1.0, (label, col, cell)
            if label in ("test NLL", "penultimate within/between", "temperature T"):
                assert mean > 0.0, (label, col, cell)
    # Temperature scaling does not change the predicted class, nor the features.
    assert rows["test accuracy"][0] == rows["test accuracy"][1]
    assert rows["penultimate within/between"][0] == rows["penultimate within/between"][1]
    # Better than chance (10 classes) even after a few epochs.
    assert all(float(c) > 0.5 for c in rows["test accuracy"])
    # The same table is saved next to the pictures.
    saved = (out / "results.md").read_text()
    assert parse_first_table(saved) == (header, rows)


@pytest.mark.parametrize("name", FIGURES)
def test_figures(fast_run, name):
    import matplotlib.image

    _, out = finished(fast_run)
    path = out / name
    assert path.is_file(), f"{name} not written"
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), f"{name} is not a PNG"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 200, img.shape


# ----------------------------------------------------------------------------- distillation_effects.py

KD_EXAMPLE = EXAMPLE.parent / "distillation_effects.py"
KD_REGIMES = ["clean", "noisy"]
KD_TEACHER_COLUMNS = ["ε=0", "ε=0 + TS", "ε=0.1", "ε=0.1 − ε=0, same seed", "TS − ε=0, same seed"]
KD_TEACHER_ROWS = ["accuracy on its training labels", "test accuracy", "test NLL", "mean confidence, wrong",
                   "ECE (15 bins, L1)", "temperature T", "MI Î (nats), mean of 45 pairs", "log N, mean of 45 pairs"]
KD_TEMPERATURES = ["1", "2", "4", "8"]  # the default --temperatures
KD_STUDENTS = ["hard labels only"] + [f"ε={e} teacher, T={t}" for e in ("0", "0.1") for t in KD_TEMPERATURES]
KD_METRICS = ["test accuracy", "test NLL", "ECE"]
KD_FIGURES = ["distillation_students.png", "distillation_information.png", "distillation_reliability.png"]
ROUNDING = 2.5e-4  # two numbers printed to 4 decimals, subtracted


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    return run_fast(KD_EXAMPLE, tmp_path_factory.mktemp("distillation_effects"))


def single(cell: str) -> float:
    """A --fast cell's number (one seed, so no ± spread); fails on anything else."""
    m = CELL.match(cell)
    assert m, f"cannot parse {cell!r}"
    assert m.group(2) is None, f"--fast runs one seed, so no spread: {cell!r}"
    value = float(m.group(1))
    assert math.isfinite(value), cell
    return value


def kd_tables(stdout: str):
    tables = parse_tables(stdout)
    assert len(tables) == 3 * len(KD_REGIMES), [t[0][0] for t in tables]
    return {name: tables[3 * i:3 * i + 3] for i, name in enumerate(KD_REGIMES)}


@pytest.mark.parametrize("regime", KD_REGIMES)
def test_distillation_teachers(kd_run, regime):
    stdout, _ = finished(kd_run)
    (header, rows), _, _ = kd_tables(stdout)[regime]
    assert header[0].startswith(f"{regime} teachers"), header
    assert header[1:] == KD_TEACHER_COLUMNS, header
    assert list(rows) == KD_TEACHER_ROWS, list(rows)
    v = {}
    for label, cells in rows.items():
        assert len(cells) == len(KD_TEACHER_COLUMNS), (label, cells)
        for col, cell in zip(KD_TEACHER_COLUMNS, cells):
            if (label == "temperature T" and col != "ε=0 + TS") or (label.startswith("log N") and "−" in col):
                assert cell == "—", (label, col, cell)
            else:
                v[label, col] = single(cell)
    for label in KD_TEACHER_ROWS:
        for col in KD_TEACHER_COLUMNS[:3]:
            x = v.get((label, col))
            if x is None:
                continue
            if label in ("accuracy on its training labels", "test accuracy", "mean confidence, wrong",
                         "ECE (15 bins, L1)"):
                assert 0.0 <= x <= 1.0, (label, col, x)
            if label in ("test NLL", "temperature T", "log N, mean of 45 pairs"):
                assert x > 0.0, (label, col, x)
            if label.startswith("MI"):
                # Müller et al.'s estimate lies in [0, log N].
                assert 0.0 <= x <= v["log N, mean of 45 pairs", col] + 1e-4, (col, x)
        if label not in ("temperature T", "log N, mean of 45 pairs"):
            # The paired columns are the differences of the columns they name (one seed).
            assert abs(v[label, KD_TEACHER_COLUMNS[3]] - (v[label, "ε=0.1"] - v[label, "ε=0"])) <= ROUNDING, label
            assert abs(v[label, KD_TEACHER_COLUMNS[4]] - (v[label, "ε=0 + TS"] - v[label, "ε=0"])) <= ROUNDING, label
    # Temperature scaling changes neither the predicted class nor the logits' information
    # (Î is unchanged when all logits are divided by one T).
    for label in ("accuracy on its training labels", "test accuracy", "MI Î (nats), mean of 45 pairs"):
        assert abs(v[label, "ε=0 + TS"] - v[label, "ε=0"]) <= 1e-4, label
    assert v["test accuracy", "ε=0"] > 0.5 and v["test accuracy", "ε=0.1"] > 0.5  # better than chance (10 classes)


@pytest.mark.parametrize("regime", KD_REGIMES)
def test_distillation_students(kd_run, regime):
    stdout, _ = finished(kd_run)
    _, (header, rows), (claim_header, claim) = kd_tables(stdout)[regime]
    assert header == [f"{regime} students"] + KD_METRICS + [f"Δ {m} to hard labels" for m in KD_METRICS], header
    assert list(rows) == KD_STUDENTS, list(rows)
    v = {}
    for student, cells in rows.items():
        assert len(cells) == 2 * len(KD_METRICS), (student, cells)
        for metric, cell in zip(KD_METRICS, cells):
            x = v[student, metric] = single(cell)
            assert (0.0 <= x <= 1.0) if metric != "test NLL" else x > 0.0, (student, metric, x)
        for metric, cell in zip(KD_METRICS, cells[len(KD_METRICS):]):
            if student == KD_STUDENTS[0]:
                assert cell == "—", (student, cell)
            else:
                d = v[student, metric] - v[KD_STUDENTS[0], metric]
                assert abs(single(cell) - d) <= ROUNDING, (student, metric, cell, d)
    assert claim_header[0].startswith(f"{regime}: ε=0.1 teacher's student − ε=0 teacher's"), claim_header
    assert claim_header[1:] == [f"Δ {m}" for m in KD_METRICS] + ["seeds where ε=0.1 is less accurate"]
    assert list(claim) == [f"T={t}" for t in KD_TEMPERATURES], list(claim)
    for t, cells in claim.items():
        for metric, cell in zip(KD_METRICS, cells):
            d = v[f"ε=0.1 teacher, {t}", metric] - v[f"ε=0 teacher, {t}", metric]
            assert abs(single(cell) - d) <= ROUNDING, (t, metric, cell, d)
        worse = single(cells[0]) < 0
        assert cells[-1] == f"{int(worse)}/1", (t, cells[-1])


def test_distillation_files(kd_run):
    import json

    stdout, out = finished(kd_run)
    saved = (out / "distillation_results.md").read_text()
    assert parse_tables(saved) == parse_tables(stdout)
    res = json.loads((out / "distillation_results.json").read_text())["results"]
    assert sorted(res) == sorted(KD_REGIMES)
    for regime in KD_REGIMES:
        curves = res[regime]["information_curves"]
        assert sorted(curves) == ["ε=0", "ε=0.1"], list(curves)
        for col, per_seed in curves.items():
            assert len(per_seed) == 1, (regime, col)
            epochs = [e for e, _ in per_seed[0]]
            assert epochs == sorted(set(epochs)) and len(epochs) >= 2, (regime, col, epochs)
            log_n = res[regime]["teachers"]["ε=0"][0]["log_n"]
            assert all(0.0 <= mi <= log_n + 1e-9 for _, mi in per_seed[0]), (regime, col, per_seed)


@pytest.mark.parametrize("name", KD_FIGURES)
def test_distillation_figures(kd_run, name):
    import matplotlib.image

    _, out = finished(kd_run)
    data = (out / name).read_bytes() if (out / name).is_file() else b""
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), f"{name} not written as a PNG"
    img = matplotlib.image.imread(out / name)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 200, img.shape


def test_mutual_information_estimate():
    """Müller et al.'s estimate on constructed logit differences: log N when the examples'
    values are far apart compared with their spread over copies, 0 when every example
    has the same values, unchanged by a common scale."""
    missing = [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.fail(f"the example needs {', '.join(missing)}", pytrace=False)
    import torch

    sys.path.insert(0, str(KD_EXAMPLE.parent))
    try:
        spec = importlib.util.spec_from_file_location("distillation_effects", KD_EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(KD_EXAMPLE.parent))
    g = torch.Generator().manual_seed(0)
    n, copies = 50, 9
    spread = torch.randn(n, copies, generator=g, dtype=torch.float64)
    apart = spread + 1000.0 * torch.arange(n, dtype=torch.float64)[:, None]
    assert abs(mod.mutual_information(apart) - math.log(n)) < 1e-6
    same = spread[:1].expand(n, copies)
    assert abs(mod.mutual_information(same)) < 1e-9
    middle = spread + 0.5 * torch.arange(n, dtype=torch.float64)[:, None]
    mi = mod.mutual_information(middle)
    assert 0.0 < mi < math.log(n) - 0.1, mi
    assert abs(mod.mutual_information(3.0 * middle) - mi) < 1e-9
