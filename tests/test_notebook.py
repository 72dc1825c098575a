"""The walkthrough notebook executes top to bottom on the smoke config, and shows no PHI."""

from __future__ import annotations

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


def _output_text(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(str(output.get("text", "")))
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/"):
                    texts.append(str(value))
    return "\n".join(texts)


def test_committed_walkthrough_ships_executed_without_errors_machine_paths_or_phi(tmp_path: Path) -> None:
    """The notebook in the repository shows its results to a reader who cannot run it (`make notebook`)."""
    import yaml

    from pipeline.demo import make_cohort

    notebook = nbformat.read(REPO / "notebooks" / "walkthrough.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "run `make notebook` before committing it"
    assert sum(bool(cell.get("outputs")) for cell in code) >= len(code) - 2
    assert not [o for cell in code for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    text = _output_text(notebook)
    assert "anonymized" in text and "gate" in text
    for machine_path in ("/tmp/", "/root/", "/home/", "/work/"):
        assert machine_path not in text, machine_path
    seed = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text()).get("seed", 0)
    planted = make_cohort(tmp_path / "cohort", subjects=12, seed=seed).planted_phi
    assert [marker for marker in planted if marker.lower() in text.lower()] == []
