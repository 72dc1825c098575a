"""The team setup of docs/team.md, for real: PostgreSQL (the ``pgserver`` wheel's server) as MLflow's
backend store, ``mlflow server`` serving the artifacts, and two ``medsynth run -c smoke`` processes
started at once against it, as two members of a team would.

Checked: both parent runs are on the server with their five nested stage runs, dataset inputs and
artifacts (stored under the server's artifacts destination); each run prints the server's UI address;
and no planted identifier reaches the server: every PostgreSQL table, the artifact folder, the server's
log and the consoles are searched for each planted PHI value.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import REPO, scan_for_markers
from pipeline.demo import make_cohort

pgserver = pytest.importorskip("pgserver")
pytest.importorskip("psycopg2")

pytestmark = pytest.mark.slow
STAGES = {"ingest", "train", "generate", "evaluate", "export"}
MEMBERS = ("alice", "bob")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """PostgreSQL + `mlflow server --serve-artifacts`, then two smoke runs started at once."""
    work = tmp_path_factory.mktemp("team")
    # Not under pytest's folder: pgserver runs pg_ctl as its own user, which must reach the data folder.
    pg_root = Path(tempfile.mkdtemp(prefix="medsynth-pg-"))
    database = pgserver.get_server(pg_root / "pg", cleanup_mode="stop")
    try:
        database.psql("CREATE DATABASE mlflow;")
        store = f"postgresql+psycopg2://postgres:@/mlflow?host={pg_root / 'pg'}"
        artifacts = work / "artifacts"
        port = _free_port()
        server_log = work / "server.log"
        with open(server_log, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--serve-artifacts",
                 "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(f"{url}/health", server, server_log)
            cohort = make_cohort(work / "raw", subjects=12, seed=5)
            base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
            env = dict(os.environ, MLFLOW_TRACKING_URI=url, PYTHONUNBUFFERED="1")
            runs = {}
            for member in MEMBERS:
                config = dict(base, run_root=str(work / "runs" / member),
                              sources=[str(work / "raw" / "dicom"), str(work / "raw" / "nifti")],
                              labels=str(work / "raw" / "labels.csv"))
                path = work / f"{member}.yaml"
                path.write_text(yaml.safe_dump(config))
                runs[member] = subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "run", "-c", str(path), "--no-progress"],
                    cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
            outputs = {member: process.communicate(timeout=900) for member, process in runs.items()}
            codes = {member: process.returncode for member, process in runs.items()}
            yield dict(url=url, work=work, cohort=cohort, outputs=outputs, codes=codes, socket=pg_root / "pg",
                       artifacts=artifacts, server_log=server_log)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:  # its job workers may linger: the test's data is already read
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
    finally:
        database.cleanup()
        shutil.rmtree(pg_root, ignore_errors=True)


def test_both_runs_succeed_and_print_the_servers_ui_address(team: dict) -> None:
    for member in MEMBERS:
        out, err = team["outputs"][member]
        assert team["codes"][member] == 0, err[-3000:]
        assert f"on the tracking server; open {team['url']}/#/experiments/" in out
        assert "medsynth ui" not in out  # the sqlite hint is for a local store only


def test_server_holds_both_parent_runs_with_stages_datasets_and_artifacts(team: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team["url"])
    experiment = client.get_experiment_by_name("smoke")  # created by whichever run came first, found by the other
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [run for run in runs if run.data.tags.get("medsynth.stage") == "run"]
    assert len(parents) == 2
    assert {run.data.tags["medsynth.run_root"] for run in parents} == {str(team["work"] / "runs" / m) for m in MEMBERS}
    for parent in parents:
        assert f"/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}" in "".join(
            out for out, _ in team["outputs"].values()
        )
        children = {run.data.tags["medsynth.stage"]: run for run in runs
                    if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == STAGES
        assert all(child.info.status == "FINISHED" for child in children.values())
        contexts = {stage: {tag.value for item in run.inputs.dataset_inputs for tag in item.tags
                            if tag.key == "mlflow.data.context"} for stage, run in children.items()}
        assert "output" in contexts["ingest"] and "output" in contexts["export"]
        assert len(children["export"].inputs.dataset_inputs) >= 3
        assert children["train"].data.params and "mia_auc" in parent.data.metrics
        # Artifacts go through the server (proxied) into its artifacts destination.
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
        logged = {item.path for folder in ("report", "export") for item in client.list_artifacts(parent.info.run_id, folder)}
        assert {"report/report.json", "report/report.html", "export/data_card.md"} <= logged
        assert [item.path for item in client.list_artifacts(children["ingest"].info.run_id, "ingest")] == ["ingest/ingest.json"]
        stored = team["artifacts"] / experiment.experiment_id / parent.info.run_id / "artifacts"
        assert (stored / "report" / "report.json").is_file() and (stored / "export" / "data_card.md").is_file()


def _database_text(team: dict) -> tuple[str, dict[str, int]]:
    """Every row of every table of the MLflow database as text, and the row count of each table."""
    import psycopg2

    connection = psycopg2.connect(dbname="mlflow", user="postgres", host=str(team["socket"]))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            tables = [name for (name,) in cursor.fetchall()]
            texts, counts = [], {}
            for table in tables:
                cursor.execute(f'SELECT row_to_json(t)::text FROM "{table}" t')
                rows = [row for (row,) in cursor.fetchall()]
                counts[table] = len(rows)
                texts.extend(rows)
    finally:
        connection.close()
    return "\n".join(texts).lower(), counts


def test_no_planted_phi_reaches_the_server(team: dict) -> None:
    markers = team["cohort"].planted_phi
    assert markers
    text, counts = _database_text(team)
    # The scan reads the real store: both runs' rows are there.
    assert counts["runs"] == 12 and counts["params"] > 100 and counts["metrics"] > 0 and counts["inputs"] > 0
    assert [marker for marker in markers if marker.lower() in text] == []
    assert scan_for_markers(team["artifacts"], markers) == []
    server_log = team["server_log"].read_text(errors="replace").lower()
    assert [marker for marker in markers if marker.lower() in server_log] == []
    for out, err in team["outputs"].values():
        console = (out + err).lower()
        assert [marker for marker in markers if marker.lower() in console] == []
    # The source paths are not sent either (their folder names could name patients).
    assert str(team["work"] / "raw").lower() not in text


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://alice:s3cret@mlflow.internal:5000/", "http://mlflow.internal:5000"),
        ("https://mlflow.example.org/tracking", "https://mlflow.example.org/tracking"),
        ("sqlite:///mlflow.db", None),
    ],
)
def test_server_address_is_printed_without_credentials(
    uri: str, expected: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    from pipeline import tracking
    from pipeline.cli import main

    mlflow.set_tracking_uri(uri)
    try:
        assert tracking.server_url() == expected
        if expected is None:
            assert tracking.server_run_url("1", "abc") is None
            return
        assert tracking.server_run_url("1", "abc") == f"{expected}/#/experiments/1/runs/abc"
        with pytest.raises(SystemExit) as exit_info:
            main(["ui"])  # the server serves its own UI: medsynth ui says where, and starts nothing
        console = capsys.readouterr().out
        assert exit_info.value.code == 0 and expected in console and "s3cret" not in console
    finally:
        mlflow.set_tracking_uri(None)
