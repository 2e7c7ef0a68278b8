"""examples/label_smoothing_effects.py in --fast mode: it runs, prints its table
(the expected rows and columns, finite numbers in range) and writes its pictures."""

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


def parse_first_table(text: str):
    """The first markdown table in `text`: (header cells, {row label: cells})."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split("|")])
    header, sep, body = block[0], block[1], block[2:]
    assert all(set(c) <= set("-:") for c in sep), f"not a markdown table separator: {sep}"
    return header[1:], {row[0]: row[1:] for row in body}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """Runs the example once for the module; the tests check (and fail on) what it gives."""
    missing = [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return {"missing": missing}
    out = tmp_path_factory.mktemp("label_smoothing_effects")
    env = dict(os.environ)
    # The subprocess imports the same lsce as this process (installed or in-place build).
    lsce_root = str(Path(lsce.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([lsce_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--fast", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    return {"proc": proc, "out": out}


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
