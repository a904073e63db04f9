"""examples/quickstart.ipynb runs top to bottom in a real kernel, on a budget of a few seconds."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
TEMPERATURES = ("0.2", "0.5", "1.0", "1.2")
# The notebook's first cell reads these: 30 steps, validated every 10, at most 30 s of training.
BUDGET = {"CHARLOOM_NOTEBOOK_MAX_STEPS": "30", "CHARLOOM_NOTEBOOK_EVAL_EVERY": "10",
          "CHARLOOM_NOTEBOOK_MAX_TIME": "30"}


def _text(cell: dict) -> str:
    """Everything a code cell printed (stdout and stderr streams and plain-text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs_and_learns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BUDGET.items():
        monkeypatch.setenv(name, value)
    # The kernel inherits this environment: CHARLOOM_DATA and CHARLOOM_CACHE as conftest set them.
    assert os.environ.get("CHARLOOM_CACHE")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"

    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    printed = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    for t in TEMPERATURES:
        assert f"--- temperature {t}" in printed, f"no sample at temperature {t}"
    assert "stopped: reached max steps" in printed

    # charloom.train in a notebook shows tqdm's widget bar and, when it ends, the loss curve (a PNG).
    train_cell = next(c for c in nb.cells if c.cell_type == "code" and "charloom.train(" in c.source)
    kinds = {k for out in train_cell.get("outputs", []) for k in out.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in kinds, kinds
    assert "image/png" in kinds, kinds

    # The run directory the notebook wrote, read independently of the notebook's own printing.
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    with open(runs[0] / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    val = [float(r["val_loss"]) for r in rows]
    assert val[-1] < val[0], f"validation loss did not fall: {val}"
    # Lowercased Nietzsche has 57 distinct characters: a uniform guess scores ln(57) = 4.04 nats.
    assert val[-1] < math.log(57), f"no better than guessing: {val}"

    # The loss table the notebook printed has the same rows as metrics.csv.
    table = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", printed, re.M)
    assert [int(step) for step, *_ in table] == [10, 20, 30]
    assert [round(float(v), 3) for _, _, v, _ in table] == [round(v, 3) for v in val]

    # Loading the run back and evaluating it gives a finite score, and the same seed the same text.
    match = re.search(r"validation: ([\d.]+) nats per character, ([\d.]+) bits per character", printed)
    assert match and math.isfinite(float(match.group(2)))
    assert re.search(r"^True$", printed, re.M), "the same seed did not give the same text"
