"""The phantom cohort ingests cleanly, audits clean, and a SIGKILLed run resumes to the same dataset."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _ingest_data import tree_bytes
from conftest import REPO, scan_for_markers
from pipeline.cli import main
from pipeline.contracts.dataset import read_dataset
from pipeline.demo import make_cohort


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out + captured.err


def _ingest_args(raw: Path, out: Path, *extra: str) -> list[str]:
    return [
        "ingest", "--source", str(raw / "dicom"), "--source", str(raw / "nifti"), "--labels", str(raw / "labels.csv"),
        "--out", str(out), *extra,
    ]


def test_demo_cohort_ingests_and_audits_clean(tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    cohort = make_cohort(raw, subjects=6, seed=0)
    out = tmp_path / "ingested"
    code, console = _cli(_ingest_args(raw, out, "--private", str(tmp_path / "private")), capsys)
    assert code == 0, console

    markers = sorted({item for marker in cohort.planted_phi for item in (marker, marker.upper())})
    assert scan_for_markers(out, markers) == []
    assert scan_for_markers(mlflow_store, markers) == []
    assert not [marker for marker in markers if marker.lower() in console.lower()]

    dataset = read_dataset(out)
    assert len(dataset.manifest) == cohort.subjects  # the burned-in subject is kept, its text blanked
    with open(out / "quarantine.csv", newline="") as handle:
        reasons = Counter(row["reason"] for row in csv.DictReader(handle))
    assert reasons["no pixel data: non-image object or stripped image (Basic Text SR Storage)"] == 1
    assert sum(count for reason, count in reasons.items() if reason.startswith("undecodable pixel data")) == 1
    assert sum(reasons.values()) == 2

    # Shared outputs are readable as a plain open() would make them; what links pseudonyms to
    # patients (source map, quarantine originals, per-series state) is owner-only.
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((out / "manifest.csv").stat().st_mode) == 0o666 & ~mask
    private = [path for path in (tmp_path / "private").rglob("*") if path.is_file()]
    assert {"source_map.csv", "quarantine.csv", "pseudonym.key"} <= {path.name for path in private}
    assert all(stat.S_IMODE(path.stat().st_mode) & 0o077 == 0 for path in private)

    code, console = _cli(["audit", str(out), "--against", str(raw / "dicom"), "--against", str(raw / "nifti")], capsys)
    assert code == 0, console
    assert "no finding" in console


_LIBRARY_RUN = """
import sys
from pathlib import Path
from pipeline.ingest import IngestConfig, run
raw, out, private = (Path(arg) for arg in sys.argv[1:4])
summary = run([raw / "dicom", raw / "nifti"], out, IngestConfig(workers=2), labels=raw / "labels.csv", private=private)
print("\\n".join(summary.lines()))
"""


def _run_ingest(raw: Path, out: Path, private: Path) -> subprocess.Popen:
    """The library call in its own process group (no MLflow import: the test is about the data)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _LIBRARY_RUN, str(raw), str(out), str(private)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )


def test_sigkill_then_rerun_gives_the_uninterrupted_dataset(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_cohort(raw, subjects=8, seed=1)
    killed_private = tmp_path / "private-a"
    killed = _run_ingest(raw, tmp_path / "a", killed_private)
    state = killed_private / "state"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        if state.is_dir() and len(list(state.glob("*.json"))) >= 2:
            break
        time.sleep(0.005)
    assert killed.poll() is None, "the run ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)  # the whole process group: the pool workers die too
    killed.wait(timeout=30)
    assert not (tmp_path / "a" / "manifest.csv").exists()

    resumed = _run_ingest(raw, tmp_path / "a", killed_private)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr.decode()[-2000:]
    assert " unchanged since the last run" in stdout.decode() and "(0 unchanged" not in stdout.decode()

    fresh_private = tmp_path / "private-b"
    fresh_private.mkdir()
    shutil.copy(killed_private / "pseudonym.key", fresh_private / "pseudonym.key")  # same key, same pseudonyms
    fresh = _run_ingest(raw, tmp_path / "b", fresh_private)
    _, stderr = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, stderr.decode()[-2000:]

    resumed_tree, fresh_tree = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert sorted(resumed_tree) == sorted(fresh_tree)
    assert [name for name in resumed_tree if resumed_tree[name] != fresh_tree[name]] == []
