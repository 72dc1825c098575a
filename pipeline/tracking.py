"""MLflow tracking: the only module that imports mlflow.

Stages receive a :class:`Tracker` and call its methods; they never import mlflow. The CLI and
the ``run`` orchestrator open runs with :func:`stage_run` (a nested run when a parent is open).
Without tracking (library use, notebooks) stages get a :class:`NullTracker`.

The tracking store is MLflow's own convention: ``MLFLOW_TRACKING_URI`` when set, else MLflow's
default (``sqlite:///mlflow.db`` in the working directory with MLflow 3.x).

Never pass PHI here: params come from the resolved config, datasets are logged by their
(pseudonymous) folder and content digest, artifacts are files the stages wrote after anonymization.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import InputError

if TYPE_CHECKING:  # the dataset contract loads pandas; a tracker is made long before any dataset is read
    from pipeline.contracts.dataset import Dataset

__all__ = [
    "Tracker",
    "NullTracker",
    "MlflowTracker",
    "stage_run",
    "close_stale_runs",
    "OWNER_TAG",
    "tracking_uri",
    "STAGE_TAG",
    "get_run",
    "list_runs",
    "logging_quiet",
    "start_ui",
    "stop_ui",
    "ui_url",
    "server_url",
    "server_run_url",
]

STAGE_TAG = "medsynth.stage"
_PARAM_VALUE_LIMIT = 6000  # MLflow refuses longer param values


class Tracker:
    """What a stage may record. The base class records nothing (see :class:`NullTracker`)."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params (dotted keys)."""

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None) -> None:
        """Log numeric metrics; None values are skipped."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file (or folder) into the run's artifacts."""

    def log_dataset(self, dataset: Dataset, context: str, name: str | None = None) -> None:
        """Record a dataset the stage read (context: training/evaluation/...) or wrote (context: output)."""

    def log_torch_model(
        self,
        model: Any,
        name: str,
        example_inputs: Mapping[str, Any],
        output_example: Any | None = None,
        pip_requirements: list[str] | None = None,
    ) -> str | None:
        """Log a torch module with ``mlflow.pytorch.log_model``; returns the model URI (or None).

        ``example_inputs`` maps forward()'s argument names to example arrays, in argument order.
        ``pip_requirements`` skips MLflow's requirement inference (~12 s) when given.
        """
        return None


class NullTracker(Tracker):
    """Tracking switched off: every call is a no-op."""


class MlflowTracker(Tracker):
    """Records into the active MLflow run ``run_id``."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        clean = {key: _param_value(value) for key, value in params.items()}
        items = list(clean.items())
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None) -> None:
        import mlflow

        numeric = {key: float(value) for key, value in metrics.items() if _is_number(value)}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({key: str(value) for key, value in tags.items()})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dataset(self, dataset: Dataset, context: str, name: str | None = None) -> None:
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways"
            source = resolve_dataset_source(str(Path(dataset.root).resolve()))
        meta = MetaDataset(source=source, name=name or Path(dataset.root).name, digest=dataset.digest[:32])
        counts = dataset.manifest.groupby(["origin", "split"]).size()
        tags = {f"n_{origin}_{split}": str(count) for (origin, split), count in counts.items()}
        tags["n_images"] = str(len(dataset.manifest))
        tags["sha256"] = dataset.digest
        mlflow.log_input(meta, context=context, tags=tags)

    def log_torch_model(
        self,
        model: Any,
        name: str,
        example_inputs: Mapping[str, Any],
        output_example: Any | None = None,
        pip_requirements: list[str] | None = None,
    ) -> str | None:
        import mlflow
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        def spec(array_name: str | None, array: Any) -> TensorSpec:
            array = np.asarray(array)
            return TensorSpec(array.dtype, (-1, *array.shape[1:]), array_name)

        inputs = Schema([spec(key, value) for key, value in example_inputs.items()])
        outputs = Schema([spec(None, output_example)]) if output_example is not None else None
        signature = ModelSignature(inputs=inputs, outputs=outputs)
        # torch.export ("pt2", MLflow's default) takes the example as a tuple of arrays in the order of
        # forward()'s arguments; a dict is refused. The signature keeps the input names.
        example = tuple(np.asarray(value) for value in example_inputs.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pytorch.log_model(
                model, name=name, signature=signature, input_example=example, pip_requirements=pip_requirements
            )
        return info.model_uri


def _is_number(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return value is not None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number and abs(number) != float("inf")


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


def tracking_uri() -> str:
    """The tracking URI in force (``MLFLOW_TRACKING_URI`` or MLflow's default)."""
    import mlflow

    return mlflow.get_tracking_uri()


def server_url() -> str | None:
    """The tracking server's address when ``MLFLOW_TRACKING_URI`` is an http(s) server, else None.

    Any user name and password in the URI are left out: the address is printed.
    """
    from urllib.parse import urlsplit, urlunsplit

    uri = tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def server_run_url(experiment_id: str | None, run_id: str | None) -> str | None:
    """The address of a run in the tracking server's UI (None without a server)."""
    base = server_url()
    if base is None:
        return None
    if experiment_id is not None and run_id is not None:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return base


def _experiment_id(name: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        # On a shared server two runs may create the experiment at once: the loser finds the winner's.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _reach_store(experiment: str) -> str:
    """The experiment's id; an unreachable or unsupported tracking store is bad input (exit 2), not a crash."""
    from mlflow.exceptions import MlflowException

    try:
        return _experiment_id(experiment)
    except MlflowException as exc:
        # Only the scheme is named: a server URI can carry credentials.
        scheme = tracking_uri().split(":", 1)[0] if ":" in tracking_uri() else "file"
        raise InputError(
            f"MLFLOW_TRACKING_URI ({scheme}:...): the MLflow tracking store cannot be used ({type(exc).__name__}). "
            "Fix: set MLFLOW_TRACKING_URI to a reachable server or a sqlite:///PATH/mlflow.db file, or unset it."
        ) from None


OWNER_TAG = "medsynth.owner"


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    owner: str | None = None,
) -> Iterator[MlflowTracker]:
    """Open an MLflow run for ``stage`` (nested under the active run, if any) and yield its tracker.

    The run ends FINISHED when the block returns, KILLED when it is interrupted (Ctrl-C, SIGTERM:
    ``KeyboardInterrupt``) and FAILED when it raises anything else.

    Args:
        stage: the stage's name (the run's name unless ``run_name`` is given).
        experiment: the MLflow experiment (used when no run is active).
        params: flat params to log.
        tags: extra tags.
        run_name: the run's name.
        owner: the id of the output this run writes (:func:`pipeline.core.locks.lock_id`), set as a tag.
            The caller holds that output's lock, so a run of the same owner still RUNNING was left by
            a process that died (``kill -9``, a power cut): it and its nested runs are ended KILLED first.
    """
    import mlflow

    logging_quiet()
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id if parent is not None else _reach_store(experiment)
    all_tags = {STAGE_TAG: stage, **{key: str(value) for key, value in (tags or {}).items()}}
    if owner is not None:
        all_tags[OWNER_TAG] = owner
        if parent is None:
            closed = close_stale_runs(experiment_id, owner)
            if closed:
                all_tags["medsynth.closed_stale_runs"] = str(closed)
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name or stage, nested=parent is not None, tags=all_tags
    )
    run_id = run.info.run_id
    try:
        tracker = MlflowTracker(run_id, experiment_id)
        if params:
            tracker.log_params(params)
        yield tracker
    except KeyboardInterrupt:
        _end_if_active(run_id, "KILLED")
        raise
    except BaseException:
        _end_if_active(run_id, "FAILED")
        raise
    else:
        _end_if_active(run_id, "FINISHED")


def _end_if_active(run_id: str, status: str) -> None:
    """End run ``run_id`` with ``status`` if it is the active run (a stage may have ended it already)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)


def close_stale_runs(experiment_id: str, owner: str) -> int:
    """End KILLED every RUNNING run tagged with ``owner``, and their RUNNING nested runs; return how many.

    Only the holder of the owner's lock calls this, so no live process can still be writing them.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    stale = client.search_runs(
        [experiment_id], f"tags.`{OWNER_TAG}` = '{owner}' and attributes.status = 'RUNNING'", max_results=1000
    )
    closed = 0
    for run in stale:
        children = client.search_runs(
            [experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        for child in children:
            client.set_terminated(child.info.run_id, "KILLED")
            closed += 1
        client.set_terminated(run.info.run_id, "KILLED")
        closed += 1
    return closed


def logging_quiet() -> None:
    """Keep MLflow's own INFO chatter (migrations, 'View run at ...') off the user's console."""
    import logging

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get_run(run_id: str) -> Any:
    """The MLflow run entity (for tests and the report: params, metrics, tags, inputs)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id)


def list_runs(experiment: str) -> list[Any]:
    """All runs of an experiment, newest first (empty when the experiment does not exist)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)


def ui_url(host: str, port: int, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI's address, optionally of one experiment or one run."""
    url = f"http://{host}:{port}"
    if experiment_id is not None and run_id is not None:
        return f"{url}/#/experiments/{experiment_id}/runs/{run_id}"
    if experiment_id is not None:
        return f"{url}/#/experiments/{experiment_id}"
    return url


def start_ui(port: int = 0, host: str = "127.0.0.1", timeout: float = 120.0) -> tuple[Any, str]:
    """Start ``mlflow ui`` on this project's tracking store; return the process and its address once it answers.

    Listens on ``host`` only (loopback by default: the store may hold a study's figures). Port 0
    picks a free port. The caller stops the process.

    Raises:
        InputError: there is no local store yet, or the UI did not answer within ``timeout`` seconds.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(
            f"no MLflow store at {uri} yet. Fix: run a stage (e.g. `medsynth demo`) in this folder first, "
            "or set MLFLOW_TRACKING_URI to the store to browse."
        )
    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: stop_ui ends the server and every worker it forked
    )
    url = ui_url(host, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (process.stderr.read() if process.stderr else "").strip().splitlines()[-1:]
            raise InputError(f"the MLflow UI stopped at start ({' '.join(tail) or 'no message'}). Fix: re-run with --port.")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    stop_ui(process)
    raise InputError(f"the MLflow UI did not answer at {url} within {timeout:.0f} s. Fix: re-run; check the port.")


def stop_ui(process: Any, grace: float = 10.0) -> None:
    """Stop a UI started by :func:`start_ui`: SIGTERM to its process group, SIGKILL after ``grace`` seconds."""
    import signal
    import subprocess

    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()
