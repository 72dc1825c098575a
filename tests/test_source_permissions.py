"""A source the machine cannot read is the machine's failure, not the file's: exit 1, nothing quarantined.

The tests run as root, for whom permissions do not bite, so ingest runs as the unprivileged user
``nobody`` (``setpriv``) over a folder it may write, with one source file and one source folder
that only root can read. Fixing the permissions and re-running must ingest every series.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run ingest as another user"
)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder ``nobody`` can enter and write (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="medsynth-perm-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ingest_as_nobody(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": str(folder),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "MEDSYNTH_LOG": str(folder / "medsynth.log"),
    }
    command = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        sys.executable, "-m", "pipeline", "ingest", "--source", "source", "--out", "dataset", "--workers", "1",
        "--no-progress",
    ]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_an_unreadable_source_file_or_folder_stops_ingest_and_a_rerun_after_the_fix_ingests_it(shared_folder: Path) -> None:
    source = shared_folder / "source"
    for name in ("ct", "mr", "locked"):
        (source / name).mkdir(parents=True)
    (source / "ct" / "image.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (source / "mr" / "image.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    (source / "locked" / "image.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    for folder in (source, source / "ct", source / "mr"):
        folder.chmod(0o755)
    (source / "ct" / "image.dcm").chmod(0o600)  # root's file: nobody cannot open it
    (source / "mr" / "image.dcm").chmod(0o644)
    (source / "locked").chmod(0o700)  # root's folder: nobody cannot list it

    refused = _ingest_as_nobody(shared_folder)
    assert refused.returncode == 1, refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert "permission denied while reading 2 source file(s) or folder(s)" in message
    assert "nothing was written" in message and "Traceback" not in refused.stderr
    assert str(source) not in refused.stderr + refused.stdout  # a source path can name a patient
    assert not (shared_folder / "dataset").exists() and not (shared_folder / "dataset.private").exists()

    (source / "ct" / "image.dcm").chmod(0o644)
    (source / "locked").chmod(0o755)
    (source / "locked" / "image.dcm").chmod(0o644)
    fixed = _ingest_as_nobody(shared_folder)
    assert fixed.returncode == 0, fixed.stderr
    with open(shared_folder / "dataset" / "manifest.csv") as manifest:
        assert sum(1 for _ in manifest) - 1 == 2  # CT and MR; the RT plan has no pixels
    with open(shared_folder / "dataset" / "quarantine.csv") as quarantine:
        reasons = quarantine.read()
    assert "permission" not in reasons and "unreadable" not in reasons
