"""Shared fixtures: a real MLflow sqlite store (migrated once per session, copied per test)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests must never train on more threads than CI's 2 cores, nor pick up a user's store.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Create and migrate one sqlite tracking database for the whole session (~7 s once)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    previous = mlflow.get_tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    MlflowClient().search_experiments()  # forces creation + migration
    mlflow.set_tracking_uri(previous)
    return db


@pytest.fixture()
def mlflow_store(_migrated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, real MLflow store for one test.

    The working directory becomes a fresh folder holding ``mlflow.db`` (a copy of the migrated
    template), so artifacts land in ``./mlruns`` inside it. Returns that folder: scan it to
    check what a run wrote to MLflow.
    """
    import mlflow

    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(_migrated_store, store / "mlflow.db")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.chdir(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield store
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def scan_for_markers(root: Path, markers: list[str]) -> list[tuple[str, str]]:
    """Every (file, marker) where a marker occurs in a file's name, bytes, or gunzipped bytes.

    Case-insensitive; also checks DICOM-style uppercase and '^'-joined variants are the caller's
    job (pass them as markers).
    """
    import gzip

    found: list[tuple[str, str]] = []
    lowered = [marker.lower().encode() for marker in markers]
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root)).lower().encode()
        for marker, needle in zip(markers, lowered):
            if needle in name:
                found.append((str(path), marker))
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            try:
                data = data + gzip.decompress(data)
            except (OSError, EOFError):
                pass
        data = data.lower()
        for marker, needle in zip(markers, lowered):
            if needle in data:
                found.append((str(path), marker))
    return found
