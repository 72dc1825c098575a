"""The CLI's tools for a newcomer: the MLflow UI, the card template, and input errors that leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _medsynth(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def test_input_errors_answer_with_one_line_and_create_no_mlflow_store(tmp_path: Path) -> None:
    config = tmp_path / "missing-source.yaml"
    config.write_text(yaml.safe_dump({"name": "typo", "sources": [str(tmp_path / "no-such-folder")]}))
    cases = [
        ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "model")],
        ["ingest", "--source", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "dataset")],
        ["generate", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "synthetic")],
        ["run", "-c", str(config)],
    ]
    for args in cases:
        result = _medsynth(args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Fix:" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    # Neither MLflow's default store nor a run was created for commands that never started.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "model").exists() and not (tmp_path / "dataset").exists()


def test_card_template_prints_the_packaged_template_byte_for_byte(tmp_path: Path) -> None:
    result = _medsynth(["card-template"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    packaged = (REPO / "pipeline" / "export" / "templates" / "data_card.md.j2").read_text(encoding="utf-8")
    assert result.stdout == packaged


def test_ui_serves_the_projects_store_on_loopback(tmp_path: Path) -> None:
    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _medsynth(["ui"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})  # no store yet: refused, exit 2
    assert not (tmp_path / "mlflow.db").exists()

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with tracking.stage_run("ingest", "ui-test"):
            pass
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # A shell's background job inherits SIGINT ignored, and Python then keeps ignoring it: give the UI a
    # default SIGINT, as a terminal's Ctrl-C would find it.
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ui"], cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = process.stdout.readline()
        assert first.startswith("MLflow UI: http://127.0.0.1:"), first + process.stderr.read()
        url = first.split()[2]
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-test", timeout=10) as answer:
            assert answer.status == 200 and b"ui-test" in answer.read()
    finally:
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
