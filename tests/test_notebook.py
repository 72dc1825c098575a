"""The walkthrough notebook executes top to bottom on the smoke config, and shows no PHI."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_walkthrough_executes_and_its_outputs_carry_no_phi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.demo import make_cohort

    root = tmp_path / "walk"
    monkeypatch.setenv("MEDSYNTH_NOTEBOOK_ROOT", str(root))
    monkeypatch.setenv("MEDSYNTH_NOTEBOOK_CONFIG", str(REPO / "configs" / "smoke.yaml"))
    monkeypatch.setenv("MEDSYNTH_NOTEBOOK_SUBJECTS", "12")
    notebook = nbformat.read(REPO / "notebooks" / "walkthrough.ipynb", as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()

    outputs = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
            outputs.append(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                           + str(output.get("data", {}).get("text/markdown", "")))
    text = "\n".join(outputs)
    assert "anonymized" in text and "gate" in text
    assert (root / "report" / "report.html").is_file()
    # The same seed and subject count regenerate the same cohort: its planted PHI must not show.
    planted = make_cohort(tmp_path / "again", subjects=12, seed=0).planted_phi
    leaked = [marker for marker in planted if marker.lower() in text.lower()]
    assert leaked == []
