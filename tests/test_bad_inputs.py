"""Bad input gets one clear line and exit 2, and neither that line nor MLflow names a source path or a PatientID.

Source folders are often named after patients (``Surname_Given_MRN123/``): the folders here carry a
marker in their names, and every check scans the console and the MLflow store for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import scan_for_markers
from pipeline.cli import main
from pipeline.config import MedsynthConfig
from pipeline.core.errors import InputError

MARKERS = ["zorblax", "55501234"]
PATIENT_FOLDER = "Zorblax_Quentin_MRN55501234"


def _exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        main(args)
    captured = capsys.readouterr()
    return int(stopped.value.code), captured.out + captured.err


def test_run_logs_no_source_or_labels_path_to_mlflow(tmp_path: Path, mlflow_store: Path) -> None:
    from pipeline import tracking
    from pipeline.workflow import run_all

    source = tmp_path / "scans" / PATIENT_FOLDER  # an empty source: ingest stops with exit 2 after the run opened
    source.mkdir(parents=True)
    labels = tmp_path / "Zorblax_labels.csv"
    labels.write_text("key,label\nMRN55501234,normal\n", encoding="utf-8")
    config = MedsynthConfig(name="leak", run_root=tmp_path / "runs", sources=[source], labels=labels)
    with pytest.raises(InputError) as refused:
        run_all(config, where="leak.yaml", progress=False)
    assert not any(marker in str(refused.value).lower() for marker in MARKERS)
    assert scan_for_markers(mlflow_store, MARKERS) == []
    parent = next(run for run in tracking.list_runs("leak") if run.data.tags.get("medsynth.stage") == "run")
    assert parent.data.params["sources.count"] == "1" and parent.data.params["labels.given"] == "True"
    assert "sources" not in parent.data.params and "labels" not in parent.data.params


def test_missing_source_in_config_is_named_by_key_not_path(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\nrun_root: {tmp_path / 'runs'}\nsources: [{tmp_path / PATIENT_FOLDER}]\n")
    code, console = _exit(["run", "-c", str(config)], capsys)
    assert code == 2 and "key 'sources[0]': folder not found" in console
    assert not any(marker in console.lower() for marker in MARKERS)
    assert len(console.strip().splitlines()) == 1


def test_run_root_inside_a_source_is_refused_before_anything_is_written(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "scans"
    (source / "normal").mkdir(parents=True)
    (source / "normal" / "a.dcm").write_bytes(b"not really")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\nrun_root: {source / 'runs'}\nsources: [{source}]\n")
    code, console = _exit(["run", "-c", str(config)], capsys)
    assert code == 2 and "key 'run_root' lies inside key 'sources[0]'" in console
    assert sorted(path.name for path in source.rglob("*")) == ["a.dcm", "normal"]  # the source is untouched


def test_labels_csv_without_header_does_not_echo_its_first_row(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "scans" / "normal"
    source.mkdir(parents=True)
    (source / "a.dcm").write_bytes(b"x")
    labels = tmp_path / "labels.csv"
    labels.write_text("MRN55501234,normal\nZORBLAX01,lesion\n", encoding="utf-8")  # header row forgotten
    code, console = _exit(
        ["ingest", "--source", str(tmp_path / "scans"), "--labels", str(labels), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "the first row must be the header key,label" in console
    assert not any(marker in console.lower() for marker in MARKERS)


def test_audit_against_a_missing_source_is_named_by_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dataset").mkdir()
    code, console = _exit(["audit", str(tmp_path / "dataset"), "--against", str(tmp_path / PATIENT_FOLDER)], capsys)
    assert code == 2 and "--against #1: folder not found" in console
    assert not any(marker in console.lower() for marker in MARKERS)


def test_ingest_out_or_private_that_is_a_file_is_bad_input(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "scans" / "normal").mkdir(parents=True)
    (tmp_path / "scans" / "normal" / "a.dcm").write_bytes(b"x")
    occupied = tmp_path / "report.pdf"
    occupied.write_bytes(b"%PDF")
    for extra in (["--out", str(occupied)], ["--out", str(tmp_path / "out"), "--private", str(occupied)]):
        code, console = _exit(["ingest", "--source", str(tmp_path / "scans"), *extra], capsys)
        assert code == 2 and "exists and is not a folder" in console, console
    assert occupied.read_bytes() == b"%PDF"


def test_ingest_refuses_an_out_folder_holding_files_it_did_not_write(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A re-run deletes unowned files under images/ and dicom/: a folder of the user's own must be refused first."""
    (tmp_path / "scans" / "normal").mkdir(parents=True)
    (tmp_path / "scans" / "normal" / "a.dcm").write_bytes(b"x")
    mine = tmp_path / "project"
    (mine / "images" / "figures").mkdir(parents=True)
    (mine / "images" / "figures" / "fig1.png").write_bytes(b"\x89PNG")
    code, console = _exit(["ingest", "--source", str(tmp_path / "scans"), "--out", str(mine)], capsys)
    assert code == 2 and "1 file(s) under images/ or dicom/ were not written by medsynth ingest" in console
    assert (mine / "images" / "figures" / "fig1.png").read_bytes() == b"\x89PNG"
    assert sorted(path.name for path in mine.iterdir()) == ["images"]  # nothing written either


def test_audit_of_a_folder_with_an_unreadable_manifest_still_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "scans"
    source.mkdir()
    (source / "Zorblax_Quentin_MRN55501234.txt").write_text("scan notes")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "manifest.csv").write_bytes("sample_id,label\na,n\xe9rmal\n".encode("latin-1"))  # not UTF-8
    (folder / "notes.txt").write_text("patient MRN55501234\n")
    code, console = _exit(["audit", str(folder), "--against", str(source)], capsys)
    assert code == 1 and "notes.txt" in console  # the leak is found; no crash on the manifest
    assert "unexpected" not in console and "55501234" not in console


def test_output_under_a_file_is_bad_input_for_demo_data_and_ingest(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    (tmp_path / "scans" / "normal").mkdir(parents=True)
    (tmp_path / "scans" / "normal" / "a.dcm").write_bytes(b"x")
    for args in (
        ["demo-data", str(blocker)],
        ["demo-data", str(blocker / "cohort")],
        ["ingest", "--source", str(tmp_path / "scans"), "--out", str(blocker / "dataset")],
        ["ingest", "--source", str(tmp_path / "scans"), "--out", str(tmp_path / "d"), "--private", str(blocker / "p")],
    ):
        code, console = _exit(args, capsys)
        assert code == 2 and "unexpected" not in console and len(console.strip().splitlines()) == 1, (args, console)
    assert blocker.read_text() == "mine"


def test_unusable_tracking_store_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    (tmp_path / "scans" / "normal").mkdir(parents=True)
    (tmp_path / "scans" / "normal" / "a.dcm").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://user:secret@host/db")
    mlflow.set_tracking_uri(None)
    try:
        code, console = _exit(["ingest", "--source", str(tmp_path / "scans"), "--out", str(tmp_path / "out")], capsys)
    finally:
        mlflow.set_tracking_uri(None)
    assert code == 2 and "MLFLOW_TRACKING_URI (nosuchstore:...)" in console
    assert "secret" not in console and len(console.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before the stage ran
