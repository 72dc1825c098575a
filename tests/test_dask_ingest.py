"""Ingest on a real Dask cluster: a LocalCluster of worker processes, and a scheduler plus two workers
started as separate processes (the `dask scheduler` / `dask worker` CLIs) on 127.0.0.1.

Checked: the dataset is byte-identical to the local process pool's for the same key; a worker killed
while it runs a task loses nothing (the scheduler runs the task again on the other worker); a re-run
resumes; the pseudonymization key appears in no task name or task specification on the scheduler and
in no log (scheduler, workers, console); and no planted identifier reaches the console.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _ingest_data import NAME_FAMILY, PATIENT_ID, all_markers, tree_bytes, write_phi_nifti, write_series
from pipeline.cli import main
from pipeline.core.errors import InputError
from pipeline.ingest import IngestConfig, run
from pipeline.ingest.keys import load_or_create_key
from pipeline.ingest.task import STATE_DIR

pytest.importorskip("distributed")  # the `cluster` extra (in the dev extra: `make test` installs it)

pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).with_name("dask"))
# A fixed, recognisable key: every test looks for these bytes where they must never be.
KEY = bytes.fromhex("5ec7e7ab1e0f1ce5a1d2c3b4a5968778695a4b3c2d1e0f00112233445566d00d")


def _cohort(root: Path, series: int, slices: int) -> Path:
    """SOURCE/<label>/<patient folder>/...: ``series`` DICOM series with planted PHI, and one NIfTI."""
    source = root / "source"
    for index in range(series):
        label = ("normal", "lesion")[index % 2]
        base = ("CT_small.dcm", "MR_small.dcm")[index % 2]
        write_series(source / label / f"{NAME_FAMILY}{index}_{PATIENT_ID}{index}", base, slices, series=f"d{index}", who=str(index))
    write_phi_nifti(source / "lesion" / "Quenivere_MKNIFTI77.nii.gz")
    return source


def _ingest(source: Path, out: Path, executor: dict, workers: int = 2) -> object:
    """Ingest with the fixed key (written into the private folder first, as a demo or a second site would)."""
    private = out.with_name(out.name + ".private")
    load_or_create_key(private, new_key=KEY)
    return run([source], out, IngestConfig(workers=workers, executor=executor), private=private)


def _secret_forms() -> list[bytes]:
    """The key as it could appear in a log or a task description: raw, hex, and Python's repr."""
    return [KEY, KEY.hex().encode(), KEY.hex().upper().encode(), repr(KEY).encode()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A scheduler and two workers, each a separate `dask` CLI process on 127.0.0.1, logging at debug level."""
    folder = tmp_path_factory.mktemp("dask")
    # tests/ on the path: the inspection function below runs on the scheduler, pickled by reference.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    env = dict(os.environ, DASK_LOGGING__DISTRIBUTED="debug", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    scheduler_file = folder / "scheduler.json"
    logs: dict[str, Path] = {}
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, args: list[str]) -> None:
        logs[name] = folder / f"{name}.log"
        with open(logs[name], "wb") as log:
            processes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)

    start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", str(scheduler_file)])
    deadline = time.monotonic() + 120
    while not scheduler_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scheduler_file.is_file(), logs["scheduler"].read_text()[-2000:]
    address = json.loads(scheduler_file.read_text())["address"]
    for name in ("w1", "w2"):
        # No nanny: the worker is this very process, so killing it kills the worker (a nanny would restart it).
        start(name, [DASK, "worker", address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                     "--host", "127.0.0.1", "--memory-limit", "0"])
    from distributed import Client

    client = Client(address, set_as_default=False, timeout="60s")
    client.wait_for_workers(2, timeout=120)
    try:
        yield dict(address=address, client=client, processes=processes, logs=logs)
    finally:
        client.close()
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _scheduler_tasks(dask_scheduler) -> list[str]:  # runs on the scheduler
    """Each task the scheduler knows: its key, its prefix and group, and its pickled specification."""
    return [
        f"{key}|{state.prefix.name}|{state.group.name}|{pickle.dumps(state.run_spec)!r}"
        for key, state in dask_scheduler.tasks.items()
    ]


def _worker_of(client, name: str) -> str | None:
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        if info.get("name") == name:
            return address
    return None


def test_local_cluster_writes_the_local_pools_bytes_and_resumes(tmp_path: Path) -> None:
    source = _cohort(tmp_path, series=4, slices=3)
    _ingest(source, tmp_path / "pool", {"kind": "local"})
    first = _ingest(source, tmp_path / "cluster", {"kind": "dask"})  # no address: a LocalCluster of 2 processes
    assert first.series_written == 5 and first.quarantined_files == 0
    assert tree_bytes(tmp_path / "cluster") == tree_bytes(tmp_path / "pool")
    before = tree_bytes(tmp_path / "cluster")
    second = _ingest(source, tmp_path / "cluster", {"kind": "dask"})
    assert second.series_resumed == 5  # finished series are skipped, as with the local pool
    assert tree_bytes(tmp_path / "cluster") == before


def test_killed_worker_loses_nothing_and_the_key_stays_off_the_scheduler(cluster: dict, tmp_path: Path) -> None:
    source = _cohort(tmp_path, series=24, slices=8)
    reference = tmp_path / "pool"
    _ingest(source, reference, {"kind": "local"})
    out = tmp_path / "cluster"
    private = out.with_name(out.name + ".private")
    client, processes = cluster["client"], cluster["processes"]
    outcome: dict[str, object] = {}

    def ingest() -> None:
        try:
            outcome["summary"] = _ingest(source, out, {"kind": "dask", "address": cluster["address"]})
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=ingest)
    thread.start()
    victim = _worker_of(client, "w1")
    seen: list[str] = []
    killed_while_running: list[str] = []
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        seen += client.run_on_scheduler(_scheduler_tasks)
        if killed_while_running or victim is None:
            time.sleep(0.02)
            continue
        running = client.processing(workers=[victim]).get(victim, [])
        finished = len(list((private / STATE_DIR).glob("*.json"))) if (private / STATE_DIR).is_dir() else 0
        if running and finished >= 2:
            killed_while_running = [str(key) for key in running]
            processes["w1"].send_signal(signal.SIGKILL)  # mid-task: no goodbye to the scheduler
            processes["w1"].wait(timeout=30)
        time.sleep(0.02)
    thread.join(timeout=60)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    summary = outcome["summary"]

    assert killed_while_running, "the run finished before a worker could be killed mid-task: make the cohort larger"
    assert _worker_of(client, "w1") is None and _worker_of(client, "w2") is not None
    # Nothing lost: every series written, nothing quarantined for a failed worker, the same bytes as the pool's.
    assert summary.series_written == 25 and summary.quarantined_files == 0
    assert tree_bytes(out) == tree_bytes(reference)
    assert not list(out.rglob("*.tmp"))
    # The key never names a task, nor sits in a task's specification on the scheduler.
    assert any("medsynth-ingest-" in entry for entry in seen)
    blob = "\n".join(seen).encode()
    assert [form for form in _secret_forms() if form in blob] == []
    # Task names carry no path, label or identifier either.
    keys = " ".join(entry.split("|", 1)[0] for entry in seen).lower()
    assert [marker for marker in all_markers() if marker.lower() in keys] == []
    assert "normal" not in keys and "lesion" not in keys
    # Nor is the key in any log: the processes' own (debug level) and the in-memory ones the dashboard shows.
    texts = [path.read_bytes() for path in cluster["logs"].values()]
    texts.append(repr(client.get_scheduler_logs(n=10_000)).encode())
    texts.append(repr(client.get_worker_logs(n=10_000)).encode())
    assert [form for form in _secret_forms() for text in texts if form in text] == []
    lowered = [text.lower() for text in texts]
    assert [marker for marker in all_markers() for text in lowered if marker.lower().encode() in text] == []


def test_cli_scheduler_flag_runs_on_the_cluster_and_prints_no_identifier(
    cluster: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = _cohort(tmp_path, series=2, slices=3)
    out = tmp_path / "dataset"
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--source", str(source), "--out", str(out), "--scheduler", cluster["address"], "--no-progress"])
    captured = capfd.readouterr()
    console = captured.out + captured.err
    assert exit_info.value.code == 0, console
    assert "Ingested 3 of 3 series" in console
    assert [marker for marker in all_markers() if marker.lower() in console.lower()] == []
    key = load_or_create_key(out.with_name("dataset.private"))
    assert key not in console.encode() and key.hex() not in console.lower()


def test_unreachable_scheduler_is_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    source = _cohort(tmp_path, series=1, slices=2)
    out = tmp_path / "dataset"
    with pytest.raises(InputError, match=r"ingest\.executor\.address tcp://127\.0\.0\.1:9: no Dask scheduler answered"):
        run([source], out, IngestConfig(executor={"kind": "dask", "address": "tcp://127.0.0.1:9", "timeout_s": 2}))
    assert not out.exists() and not out.with_name("dataset.private").exists()


@pytest.mark.parametrize(
    ("executor", "message"),
    [
        ({"kind": "local", "address": "tcp://h:8786"}, "set kind: dask"),
        ({"kind": "dask", "address": "h:8786"}, "tcp://host:8786"),
        ({"kind": "spark"}, "'local' or 'dask'"),
    ],
)
def test_executor_keys_are_checked_at_load(tmp_path: Path, executor: dict, message: str) -> None:
    from pipeline.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"ingest": {"executor": executor}}))
    with pytest.raises(InputError, match="ingest.executor") as caught:
        load_config(path)
    assert message in str(caught.value)


def test_remote_task_failure_comes_back_as_a_value_not_a_worker_log(tmp_path: Path) -> None:
    """A task that raises on a worker is reported on the client by type only (Dask would log its arguments)."""
    from pipeline.ingest.config import ExecutorConfig
    from pipeline.ingest.executors import RemoteTaskError, map_tasks

    results = dict(map_tasks(_fails_on_two, [(1,), (2,), (3,)], (10,), ExecutorConfig(kind="dask"), 2, lambda _: None))
    assert results[0] == 11 and results[2] == 13
    assert isinstance(results[1], RemoteTaskError) and str(results[1]) == "ValueError"


def _fails_on_two(value: int, offset: int) -> int:
    if value == 2:
        raise ValueError(f"secret detail {value}")
    return value + offset


def test_run_passes_scheduler_to_ingest(tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`medsynth run --scheduler ADDRESS` runs ingest's tasks there (here: no scheduler answers, so exit 2)."""
    import yaml

    source = _cohort(tmp_path, series=1, slices=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "dask-run", "run_root": str(tmp_path / "root"), "sources": [str(source)],
        "ingest": {"executor": {"timeout_s": 2}},
    }))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-c", str(config), "--no-progress", "--scheduler", "tcp://127.0.0.1:9"])
    console = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "ingest.executor.address tcp://127.0.0.1:9: no Dask scheduler answered" in console.err
    assert not (tmp_path / "root" / "ingested" / "manifest.csv").exists()
