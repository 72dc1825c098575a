"""Integrity under concurrency and hostile input: one writer per output, paths that stay home, tampering detected.

Everything is real: a tiny trained model, its generated images, real second processes holding (or
having died holding) a lock, a real MLflow sqlite store, real symbolic links.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.core.files import sha256_file, write_nifti
from pipeline.core.locks import lock_id, lock_path
from test_export import _report, _write_report
from test_models import make_phantom_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real dataset, a model trained on it for 4 steps, 3 generated images per class, a passing report."""
    from pipeline.models import generate, train
    from pipeline.models.config import GenerateConfig

    root = tmp_path_factory.mktemp("integrity")
    make_phantom_dataset(root / "real")
    train.run(root / "real", root / "model", tiny_config(log_model=False), seed=0)
    generate.run(root / "model", root / "synthetic", GenerateConfig(per_class=3, seed=1, device="cpu"))
    _write_report(root / "report", _report(flagged=()))
    return {"root": root, "real": root / "real", "model": root / "model", "synthetic": root / "synthetic",
            "report": root / "report"}


def _exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        main(args)
    captured = capsys.readouterr()
    return int(stopped.value.code), captured.out + captured.err


def _one_error_line(console: str) -> str:
    lines = [line for line in console.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0], console
    return lines[0]


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _holder(folder: Path, then: str = "time.sleep(60)") -> subprocess.Popen[str]:
    """A second real process that takes the lock of ``folder``, says so, then runs ``then``."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from pipeline.core.locks import hold
        with hold({str(folder)!r}):
            print("held", flush=True)
            {then}
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _generate(model: Path, out: Path) -> list[str]:
    return ["generate", "--model", str(model), "--out", str(out), "--per-class", "2"]


# ------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_naming_the_holder(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    holder = _holder(out)
    try:
        code, console = _exit(_generate(chain["model"], out), capsys)
    finally:
        _stop(holder)
    line = _one_error_line(console)
    assert code == 2 and f"pid {holder.pid} on host " in line and " since " in line and "being written by" in line
    assert not out.exists()  # the refused writer wrote nothing
    from pipeline import tracking

    assert tracking.list_runs("medsynth") == []  # refused before an MLflow run was opened


def test_a_folder_below_a_locked_run_root_is_refused(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs" / "demo"
    holder = _holder(root)
    try:
        code, console = _exit(_generate(chain["model"], root / "synthetic"), capsys)
        source = tmp_path / "scans"
        (source / "normal").mkdir(parents=True)
        config = tmp_path / "c.yaml"
        config.write_text(f"name: demo\nrun_root: {root}\nsources: [{source}]\n")
        code_run, console_run = _exit(["run", "-c", str(config)], capsys)
    finally:
        _stop(holder)
    assert code == 2 and f"the folder above it, {root}," in _one_error_line(console)
    assert code_run == 2 and f"pid {holder.pid}" in _one_error_line(console_run)


def test_a_stale_lock_of_a_killed_writer_is_taken_over_and_its_mlflow_run_closed(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline import tracking

    out = tmp_path / "syn"
    # A writer killed with SIGKILL inside its MLflow run: its lock file and its RUNNING run stay behind.
    victim = _holder(out, then=textwrap.dedent(f"""
            from pipeline import tracking
            with tracking.stage_run("generate", "medsynth", owner={lock_id(out)!r}):
                print("running", flush=True)
                os.kill(os.getpid(), 9)
    """).strip().replace("\n", "\n            "))
    assert victim.stdout is not None and victim.stdout.readline().strip() == "running"
    victim.wait()
    assert victim.returncode == -signal.SIGKILL and lock_path(out).is_file()
    stale = tracking.list_runs("medsynth")
    assert [run.info.status for run in stale] == ["RUNNING"]

    code, console = _exit(_generate(chain["model"], out), capsys)
    assert code == 0, console
    assert f"took over the lock of {out} left by pid {victim.pid}" in console
    assert "which is no longer running" in console
    assert tracking.get_run(stale[0].info.run_id).info.status == "KILLED"
    assert not lock_path(out).exists()  # released at the end
    assert len(read_dataset(out).manifest) == 4


def test_sigterm_ends_the_mlflow_run_killed(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path
) -> None:
    from pipeline import tracking

    config = tmp_path / "c.yaml"
    model = tiny_config(max_steps=100000, checkpoint_every=100000, sample_every=0, log_model=False)
    config.write_text(json.dumps({"model": model.model_dump(mode="json")}))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--data", str(chain["real"]), "--out", str(tmp_path / "m"),
         "-c", str(config), "--no-progress"],
        env=_env(), cwd=mlflow_store, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "m").is_dir():  # train creates it once it trains
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Terminated (SIGTERM)" in err and "Traceback" not in err
    runs = tracking.list_runs("medsynth")
    assert [run.info.status for run in runs] == ["KILLED"]
    assert not lock_path(tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------ paths


def test_an_image_linked_outside_its_dataset_is_refused_by_train(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _copy(chain["real"], tmp_path / "real")
    outside = tmp_path / "elsewhere.nii.gz"
    first = real / "images" / "sub-000.nii.gz"
    shutil.move(first, outside)
    first.symlink_to(outside)  # same bytes, same checksum: only the link gives it away
    code, console = _exit(["train", "--data", str(real), "--out", str(tmp_path / "m")], capsys)
    line = _one_error_line(console)
    assert code == 2 and "row 2, column 'path'" in line and "resolves outside the dataset folder" in line


def test_export_without_a_model_never_copies_a_link_to_a_system_file(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _copy(chain["real"], tmp_path / "real")
    manifest = read_dataset(real).manifest
    target = real / manifest.loc[0, "path"]
    target.unlink()
    target.symlink_to("/etc/passwd")
    manifest.loc[0, "sha256"] = sha256_file("/etc/passwd")
    write_manifest(real, manifest)
    out = tmp_path / "export"
    code, console = _exit(["export", "--real", str(real), "--synthetic", str(chain["synthetic"]), "--report",
                           str(chain["report"]), "--out", str(out)], capsys)
    assert code == 2 and "resolves outside the dataset folder" in _one_error_line(console)
    assert not out.exists()


def test_generate_never_writes_through_a_linked_images_folder(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "syn"
    out.mkdir()
    (out / "images").symlink_to(outside)
    code, console = _exit(_generate(chain["model"], out), capsys)
    assert code == 2 and "links to a folder outside" in _one_error_line(console)
    assert list(outside.iterdir()) == []
    (out / "images").unlink()
    (out / "samples").mkdir()
    model_out = tmp_path / "m"
    model_out.mkdir()
    (model_out / "samples").symlink_to(outside)
    code, console = _exit(["train", "--data", str(chain["real"]), "--out", str(model_out)], capsys)
    assert code == 2 and "links to a folder outside" in _one_error_line(console)
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------------------------------ tampering


def _tamper(dataset: Path, row: int = 0) -> str:
    """Flip one byte of the image of manifest row ``row`` (spreadsheet row ``row + 2``); return its path."""
    rel = read_dataset(dataset).manifest.loc[row, "path"]
    data = bytearray((dataset / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dataset / rel).write_bytes(bytes(data))
    return rel


def test_a_tampered_image_stops_every_stage_naming_the_row(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline import tracking

    real = _copy(chain["real"], tmp_path / "real")
    synthetic = _copy(chain["synthetic"], tmp_path / "synthetic")
    rel = _tamper(real)
    checks = {
        "train": ["train", "--data", str(real), "--out", str(tmp_path / "m")],
        "evaluate": ["evaluate", "--real", str(real), "--synthetic", str(chain["synthetic"]), "--out", str(tmp_path / "r")],
        "export": ["export", "--real", str(real), "--synthetic", str(chain["synthetic"]), "--report",
                   str(chain["report"]), "--out", str(tmp_path / "e"), "--model", str(chain["model"])],
    }
    for stage, args in checks.items():
        code, console = _exit(args, capsys)
        line = _one_error_line(console)
        assert code == 2 and f"{real / 'manifest.csv'} row 2, column 'sha256': file {rel}" in line, (stage, line)
    syn_rel = _tamper(synthetic, row=2)
    for args in (
        ["evaluate", "--real", str(chain["real"]), "--synthetic", str(synthetic), "--out", str(tmp_path / "r")],
        ["export", "--real", str(chain["real"]), "--synthetic", str(synthetic), "--report", str(chain["report"]),
         "--out", str(tmp_path / "e")],
    ):
        code, console = _exit(args, capsys)
        assert code == 2 and f"row 4, column 'sha256': file {syn_rel}" in _one_error_line(console)
    failed = {run.info.status for run in tracking.list_runs("medsynth")}
    assert failed == {"FAILED"}  # a stage stopped by bad input ends its MLflow run FAILED
    assert not (tmp_path / "e").exists() and not (tmp_path / "r" / "report.json").exists()


def test_a_tampered_or_foreign_checkpoint_is_refused(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy(chain["model"], tmp_path / "model")
    meta = json.loads((model / "model.json").read_text())
    assert meta["checkpoint_sha256"] == sha256_file(model / "checkpoint.pt")
    data = bytearray((model / "checkpoint.pt").read_bytes())
    data[-100] ^= 0xFF
    (model / "checkpoint.pt").write_bytes(bytes(data))
    for args in (
        _generate(model, tmp_path / "syn"),
        ["evaluate", "--real", str(chain["real"]), "--synthetic", str(chain["synthetic"]), "--out", str(tmp_path / "r"),
         "--model", str(model)],
        ["export", "--real", str(chain["real"]), "--synthetic", str(chain["synthetic"]), "--report",
         str(chain["report"]), "--out", str(tmp_path / "e"), "--model", str(model)],
    ):
        code, console = _exit(args, capsys)
        assert code == 2 and "does not match the checksum recorded in model.json" in _one_error_line(console), args
    # Another (untampered) model than the one that generated the images: export refuses to mix them.
    from pipeline.models import train

    other = tmp_path / "other"
    train.run(chain["real"], other, tiny_config(max_steps=2, log_model=False), seed=9)
    code, console = _exit(["export", "--real", str(chain["real"]), "--synthetic", str(chain["synthetic"]), "--report",
                           str(chain["report"]), "--out", str(tmp_path / "e"), "--model", str(other)], capsys)
    assert code == 2 and "row 2, column 'model_digest'" in _one_error_line(console)


# ------------------------------------------------------------------------------------------ exit 2, not 3


def _edited_model(chain: dict[str, Path], folder: Path, edit) -> Path:
    model = _copy(chain["model"], folder)
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps(edit(meta)))
    return model


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("empty", lambda meta: {}, "key 'medsynth_version' is missing"),
        ("no-preprocess", lambda meta: {k: v for k, v in meta.items() if k != "preprocess"}, "key 'preprocess' is missing"),
        ("empty-preprocess", lambda meta: {**meta, "preprocess": {}}, "key 'preprocess' is not valid (missing key"),
        ("huge", lambda meta: {**meta, "image_size": [65536, 65536]}, "above the limit of 67108864"),
        ("extra-label", lambda meta: {**meta, "labels": [*meta["labels"], "third"]}, "weights do not fit the network"),
    ],
)
def test_a_damaged_model_json_is_bad_input(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str], name, edit, message
) -> None:
    model = _edited_model(chain, tmp_path / name, edit)
    started = time.perf_counter()
    code, console = _exit(_generate(model, tmp_path / "syn"), capsys)
    assert code == 2 and message in _one_error_line(console), console
    assert time.perf_counter() - started < 30  # refused before allocating anything large


def test_non_utf8_model_json_and_a_checkpoint_without_its_keys_are_bad_input(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    model = _copy(chain["model"], tmp_path / "latin1")
    (model / "model.json").write_bytes('{"labels": ["l\xe9sion"]}'.encode("latin-1"))
    code, console = _exit(_generate(model, tmp_path / "syn"), capsys)
    assert code == 2 and "not readable JSON (UnicodeDecodeError)" in _one_error_line(console)

    model = _copy(chain["model"], tmp_path / "keys")
    config = tmp_path / "tiny.yaml"  # the config the model was trained with: only the checkpoint is wrong
    config.write_text(json.dumps({"model": tiny_config(log_model=False).model_dump(mode="json")}))
    torch.save({"step": 4}, model / "checkpoint.pt")
    meta = json.loads((model / "model.json").read_text())
    meta["checkpoint_sha256"] = sha256_file(model / "checkpoint.pt")
    (model / "model.json").write_text(json.dumps(meta))
    code, console = _exit(_generate(model, tmp_path / "syn"), capsys)
    assert code == 2 and "key 'ema' is missing" in _one_error_line(console)
    code, console = _exit(["train", "--data", str(chain["real"]), "--out", str(model), "--resume", "-c", str(config)],
                          capsys)
    assert code == 2 and "not a medsynth checkpoint: key 'generator' is missing" in _one_error_line(console)


def test_config_that_is_not_utf8_or_builds_python_objects_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text('name: x\nseed: !!python/object/apply:os.system ["touch pwned"]\n')
    for config, message in ((latin, "not UTF-8 text"), (tagged, "line 2: unsupported YAML tag '!!python/object/apply:os.system'")):
        code, console = _exit(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "-c", str(config)], capsys)
        assert code == 2 and message in _one_error_line(console)
    assert not (tmp_path / "pwned").exists()


def test_an_oversized_image_size_in_the_config_is_refused_before_training(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  image_size: [65536, 65536]\n  spacing: [1.0, 1.0]\n")
    started = time.perf_counter()
    code, console = _exit(["train", "--data", str(chain["real"]), "--out", str(tmp_path / "m"), "-c", str(config)], capsys)
    assert code == 2 and "model.image_size [65536, 65536] is 4294967296 voxels" in _one_error_line(console)
    assert time.perf_counter() - started < 30


def test_evaluate_refuses_non_finite_images_and_a_file_as_out_before_the_work(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nibabel as nib

    synthetic = _copy(chain["synthetic"], tmp_path / "synthetic")
    manifest = read_dataset(synthetic).manifest
    for index, row in manifest.iterrows():
        path = synthetic / row["path"]
        image = nib.load(path)
        write_nifti(path, np.full(image.shape, np.nan, dtype=np.float32), image.affine, descrip="synthetic (medsynth x)")
        manifest.loc[index, "sha256"] = sha256_file(path)
    write_manifest(synthetic, manifest)
    monkeypatch.setenv("MEDSYNTH_LOG", str(tmp_path / "medsynth.log"))
    code, console = _exit(["evaluate", "--real", str(chain["real"]), "--synthetic", str(synthetic),
                           "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "holds NaN or infinite values" in _one_error_line(console)
    assert "Warning" not in console  # library warnings went to the log, not the console

    occupied = tmp_path / "report.pdf"
    occupied.write_bytes(b"%PDF")
    started = time.perf_counter()
    code, console = _exit(["evaluate", "--real", str(chain["real"]), "--synthetic", str(chain["synthetic"]),
                           "--out", str(occupied)], capsys)
    assert code == 2 and "exists and is not a folder" in _one_error_line(console)
    assert time.perf_counter() - started < 5 and occupied.read_bytes() == b"%PDF"


def test_library_warnings_go_to_the_log_not_the_error_line(
    tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning raised on the way to an error (here numpy's, from a real computation) lands in medsynth.log."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from pipeline import cli
        from pipeline.core.errors import InputError

        @cli.cli.command("warn-then-fail")
        def warn_then_fail():
            np.mean(np.array([]))  # RuntimeWarning: Mean of empty slice
            raise InputError("x: bad. Fix: y.")

        cli.main(sys.argv[1:])
    """)
    result = subprocess.run([sys.executable, "-c", code, "warn-then-fail"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "error: x: bad. Fix: y.", result.stderr
    assert "Mean of empty slice" in (tmp_path / "medsynth.log").read_text()


def test_export_is_shareable_like_every_dataset(
    chain: dict[str, Path], tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    code, console = _exit(["export", "--real", str(chain["real"]), "--synthetic", str(chain["synthetic"]), "--report",
                           str(chain["report"]), "--out", str(out), "--model", str(chain["model"])], capsys)
    assert code == 0, console
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask == chain["synthetic"].stat().st_mode & 0o777
