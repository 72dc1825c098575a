"""Faults of the machine, not of the input: a full disk (a real tmpfs), a killed worker.

Acceptance (issue #14): disk full in ingest, train and export exits non-zero with a plain "no
space left on device while writing ..." line, records nothing as quarantined, marks nothing
finished, and a re-run after freeing space gives the baseline result byte for byte.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _faults import full_disk_available, run_on_small_disk, tree_size
from _ingest_data import NAME_FAMILY, PATIENT_ID, tree_bytes, write_phi_nifti, write_series
from conftest import REPO
from test_models import make_phantom_dataset

PYTHON = sys.executable
pytestmark = pytest.mark.slow  # every test runs the CLI in subprocesses, some several times
needs_tmpfs = pytest.mark.skipif(bool(full_disk_available()), reason=full_disk_available() or "tmpfs available")


def _env(store: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "HOME": str(store),
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "OMP_NUM_THREADS": "1",
    }


def _one_plain_error(stderr: str, where: str) -> str:
    """The error line of a failed command: one line, the cause, the folder, the fix; no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert "no space left on device while writing" in line and where in line, line
    assert "free space and re-run" in line and "nothing was lost" in line, line
    return line


# ------------------------------------------------------------------------------------------------
# Ingest
# ------------------------------------------------------------------------------------------------


def _sources(root: Path) -> Path:
    """Four DICOM series and a NIfTI file under patient-named folders (the names are PHI)."""
    source = root / "source"
    for index in range(4):
        label = ("normal", "lesion")[index % 2]
        write_series(source / label / f"{NAME_FAMILY}{index}_{PATIENT_ID}{index}" / "CT", "CT_small.dcm", 3,
                     series=f"s{index}", who=str(index))
    write_phi_nifti(source / "lesion" / f"{NAME_FAMILY}_nifti.nii.gz")
    return source


def _ingest_argv(source: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "pipeline", "ingest", "--source", str(source), "--out", str(out), "--workers", "2"]


@needs_tmpfs
@pytest.mark.parametrize("free_share", [0.3, 0.9])
def test_ingest_on_a_full_disk_fails_remembers_nothing_and_resumes_to_the_baseline(
    tmp_path: Path, mlflow_store: Path, free_share: float
) -> None:
    source = _sources(tmp_path)
    env = _env(mlflow_store)
    base = tmp_path / "base"
    baseline = subprocess.run(_ingest_argv(source, base), capture_output=True, text=True, env=env, timeout=300)
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    private = tmp_path / "base.private"
    needed = tree_size(base) + tree_size(private)

    mount = tmp_path / "disk"
    out = mount / "dataset"
    runs = run_on_small_disk(
        tmp_path, mount, size=4 * needed + (1 << 20),
        steps=[
            ["put", str(private / "pseudonym.key"), str(mount / "dataset.private" / "pseudonym.key")],
            ["fill", int(needed * free_share)],
            ["run", "full", _ingest_argv(source, out)],
            ["copy", str(out), str(tmp_path / "failed")],
            ["copy", str(mount / "dataset.private"), str(tmp_path / "failed.private")],
            ["free"],
            ["run", "rerun", _ingest_argv(source, out)],
            ["copy", str(out), str(tmp_path / "rerun")],
        ],
        env=env,
    )
    full = runs["full"]
    assert full["rc"] == 1, full["stderr"][-3000:]
    line = _one_plain_error(full["stderr"], str(out))
    # Never a source path or header value: the patient-named folders stay out of the message.
    assert NAME_FAMILY not in line and PATIENT_ID not in line and str(source) not in line
    # Nothing remembered as quarantined, nothing that looks like a finished dataset.
    failed = tmp_path / "failed"
    assert not (failed / "manifest.csv").exists()
    for record in (tmp_path / "failed.private" / "state").glob("*.json"):
        assert json.loads(record.read_text())["quarantined"] == [], record.name
    if (failed / "quarantine.csv").exists():
        with open(failed / "quarantine.csv", newline="") as handle:
            assert not [row for row in csv.DictReader(handle) if "space" in row["reason"] or "error" in row["reason"]]
    assert not [path for path in failed.rglob("*.tmp*")]

    rerun = runs["rerun"]
    assert rerun["rc"] == 0, rerun["stderr"][-3000:]
    expected, got = tree_bytes(base), tree_bytes(tmp_path / "rerun")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if expected[name] != got[name]] == []


def test_a_killed_worker_fails_ingest_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    """A worker killed mid-series (out-of-memory killer) is a failure of the machine: exit 1, not a quarantine."""
    source = _sources(tmp_path)
    out = tmp_path / "dataset"
    # The first series task sends SIGKILL to its own worker: the process pool breaks as under the OOM killer.
    script = (
        "import os, signal, sys\n"
        "from pipeline.ingest import task\n"
        "original = task._run_task\n"
        "def dies(*args):\n"
        "    if os.getpid() != int(os.environ['PARENT']):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(*args)\n"
        "task._run_task = dies\n"
        "os.environ['PARENT'] = str(os.getpid())\n"
        "from pipeline.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    killed = subprocess.run(
        [PYTHON, "-c", script, *_ingest_argv(source, out)[3:]], capture_output=True, text=True, env=env, timeout=300,
    )
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "Traceback" not in killed.stderr
    assert "a worker process was killed" in killed.stderr and "nothing was lost" in killed.stderr
    assert not (out / "manifest.csv").exists()
    assert not list((tmp_path / "dataset.private" / "state").glob("*.json"))
    rerun = subprocess.run(_ingest_argv(source, out), capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Ingested 5 of 5 series" in rerun.stdout


# ------------------------------------------------------------------------------------------------
# Train
# ------------------------------------------------------------------------------------------------

_TRAIN_CONFIG = (
    "seed: 0\n"
    "model: {image_size: [32, 32], spacing: [10.0, 10.0], latent_dim: 16, embed_dim: 4, g_width: 8, d_width: 8,\n"
    "        batch_size: 8, max_steps: 4, checkpoint_every: 2, log_every: 1, sample_every: 0, sample_per_class: 2,\n"
    "        num_threads: 1, device: cpu}\n"
)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(model_dir / "checkpoint.pt", weights_only=True)
    return {f"{part}.{key}": value for part in ("generator", "discriminator", "ema") for key, value in state[part].items()}


@needs_tmpfs
def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes_to_the_baseline(
    tmp_path: Path, mlflow_store: Path
) -> None:
    data = make_phantom_dataset(tmp_path / "real")
    config = tmp_path / "config.yaml"
    config.write_text(_TRAIN_CONFIG, encoding="utf-8")
    env = _env(mlflow_store)

    def argv(out: Path, *extra: str) -> list[str]:
        return [PYTHON, "-m", "pipeline", "train", "--data", str(data), "--out", str(out), "-c", str(config),
                "--no-progress", *extra]

    base = tmp_path / "base"
    baseline = subprocess.run(argv(base), capture_output=True, text=True, env=env, timeout=300)
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    checkpoint = (base / "checkpoint.pt").stat().st_size
    needed = tree_size(base)

    mount = tmp_path / "disk"
    out = mount / "model"
    # Room for the first checkpoint and its files, not for the second one beside it.
    runs = run_on_small_disk(
        tmp_path, mount, size=4 * needed + (1 << 20),
        steps=[
            ["fill", needed + checkpoint // 2],
            ["run", "full", argv(out)],
            ["copy", str(out), str(tmp_path / "failed")],
            ["free"],
            ["run", "rerun", argv(out, "--resume")],
            ["copy", str(out), str(tmp_path / "rerun")],
        ],
        env=env,
    )
    full = runs["full"]
    assert full["rc"] == 1, full["stderr"][-3000:]
    line = _one_plain_error(full["stderr"], str(out))
    assert "--resume" in line
    failed = tmp_path / "failed"
    assert not [path for path in failed.rglob("*.tmp")]
    meta = json.loads((failed / "model.json").read_text())
    assert meta["steps"] == 2  # the first checkpoint, intact and described by model.json
    assert torch.load(failed / "checkpoint.pt", weights_only=True)["step"] == 2

    rerun = runs["rerun"]
    assert rerun["rc"] == 0, rerun["stderr"][-3000:]
    expected, got = _weights(base), _weights(tmp_path / "rerun")
    assert expected.keys() == got.keys()
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []
    assert json.loads((tmp_path / "rerun" / "model.json").read_text())["steps"] == 4
    assert (tmp_path / "rerun" / "losses.csv").read_text() == (base / "losses.csv").read_text()


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def _export_inputs(root: Path) -> dict[str, Path]:
    from test_export import _model_dir, _real_dataset, _report, _synthetic_dataset, _write_report

    _real_dataset(root / "real")
    info = _model_dir(root / "model-stand-in", root / "real")
    _synthetic_dataset(root / "synthetic", info["preprocess"])
    return {"real": root / "real", "synthetic": root / "synthetic", "report": _write_report(root / "report", _report())}


def _without_run_ids(tree: dict[str, bytes]) -> dict[str, bytes]:
    """The export's files with the export's own MLflow run id (card, facts) taken out: it differs per run."""
    return {name: data for name, data in tree.items() if name not in ("data_card.md", "export.json")}


@needs_tmpfs
def test_export_on_a_full_disk_leaves_no_partial_export_and_reruns_to_the_baseline(
    tmp_path: Path, mlflow_store: Path
) -> None:
    inputs = _export_inputs(tmp_path / "inputs")
    env = _env(mlflow_store)
    config = tmp_path / "config.yaml"
    config.write_text("export: {real_grid: native}\n", encoding="utf-8")  # real images copied as they are

    def argv(out: Path) -> list[str]:
        return [PYTHON, "-m", "pipeline", "export", "--real", str(inputs["real"]), "--synthetic",
                str(inputs["synthetic"]), "--report", str(inputs["report"]), "--out", str(out), "-c", str(config)]

    base = tmp_path / "base"
    baseline = subprocess.run(argv(base), capture_output=True, text=True, env=env, timeout=300)
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    needed = tree_size(base)

    mount = tmp_path / "disk"
    out = mount / "export"
    runs = run_on_small_disk(
        tmp_path, mount, size=4 * needed + (1 << 20),
        steps=[
            ["fill", needed // 2],
            ["run", "full", argv(out)],
            ["copy", str(mount), str(tmp_path / "failed")],
            ["free"],
            ["run", "rerun", argv(out)],
            ["copy", str(out), str(tmp_path / "rerun")],
        ],
        env=env,
    )
    full = runs["full"]
    assert full["rc"] == 1, full["stderr"][-3000:]
    _one_plain_error(full["stderr"], str(out))
    # Nothing half-written: no export folder, no staging folder, only the filler.
    assert sorted(path.name for path in (tmp_path / "failed").iterdir()) == [".filler"]

    rerun = runs["rerun"]
    assert rerun["rc"] == 0, rerun["stderr"][-3000:]
    expected, got = tree_bytes(base), tree_bytes(tmp_path / "rerun")
    assert sorted(got) == sorted(expected)
    assert _without_run_ids(got) == _without_run_ids(expected)

