"""The ``medsynth`` command line: parses flags, loads config, calls a stage, maps errors to exit codes.

Exit codes: 0 success; 1 a check failed (audit finding, failed gate); 2 bad input or usage, with
one message that says what, where and how to fix it, and no traceback unless ``--debug``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.core.errors import CheckFailed, InputError, MedsynthError

if TYPE_CHECKING:
    from pipeline.config import MedsynthConfig
    from pipeline.contracts.stages import RunPaths, StageResult

__all__ = ["main", "cli"]

PathArg = click.Path(path_type=Path)


class _State:
    """Per-invocation options shared by every command (no module-level state)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug


def _config(config_file: Path | None, overrides: dict[str, Any]):
    """Load ``-c FILE`` (or defaults) with explicit flags applied on top."""
    from pipeline.config import load_config

    return load_config(config_file, overrides)


def _echo_lines(lines: Sequence[str]) -> None:
    for line in lines:
        click.echo(line)


def _run_stage(
    name: str,
    config: MedsynthConfig,
    paths: dict[str, Path | None],
    *,
    progress: bool = False,
    resume: bool = False,
    tracked: bool = True,
) -> StageResult:
    """Run the registered stage ``name`` on explicit folders (roles given as None are left out).

    The same entry ``medsynth run`` executes, in its own MLflow run (``tracked``), so a single-stage
    command and the workflow produce the same outputs, params and lineage.
    """
    from pipeline import tracking
    from pipeline.core.section import flatten
    from pipeline.registry import StageContext, stage

    entry = stage(name)
    roles = {role: Path(path) for role, path in paths.items() if path is not None}
    entry.check_inputs(config, roles)
    notes: list[str] = []
    # torchrun: rank 0 writes and holds the lock; the other ranks write nothing.
    writing = entry.writing(roles, notes) if tracked else contextlib.nullcontext()
    with writing:
        _echo_lines(notes)
        if not tracked:
            return entry.run(StageContext(config=config, paths=roles, progress=progress, resume=resume))
        section = getattr(config, entry.section)
        with tracking.stage_run(
            name, config.experiment_name, params=flatten({entry.section: section.model_dump(mode="json")}),
            owner=entry.owner(roles),
        ) as tracker:
            result = entry.run(
                StageContext(config=config, paths=roles, tracker=tracker, progress=progress, resume=resume)
            )
    _echo_lines(result.lines)
    result.raise_if_incomplete()
    return result


config_option = click.option(
    "-c", "--config", "config_file", type=PathArg, default=None, help="YAML config (see configs/)."
)
accept_early_stop_option = click.option(
    "--accept-early-stop", is_flag=True, default=False,
    help="Go on with a model that stopped before its step budget (model.accept_early_stop); else exit 1.",
)
scheduler_option = click.option(
    "--scheduler", "scheduler", default=None, metavar="ADDRESS",
    help="Run ingest's per-series tasks on this Dask scheduler, e.g. tcp://host:8786 (ingest.executor; "
    "every worker must see the sources and output folders at the same paths).",
)
accept_inconclusive_option = click.option(
    "--accept-inconclusive", is_flag=True, default=False,
    help="Export even if the privacy gate is inconclusive (export.accept_inconclusive; the card says so first).",
)


def _scheduler(address: str | None) -> dict[str, Any]:
    """Config overrides for ``--scheduler ADDRESS`` (None: the config decides)."""
    if address is None:
        return {}
    return {"ingest.executor.kind": "dask", "ingest.executor.address": address}


def _acceptances(early_stop: bool, inconclusive: bool) -> dict[str, Any]:
    """Config overrides for the two results a user may accept knowingly (None: the config decides)."""
    return {
        "model.accept_early_stop": True if early_stop else None,
        "export.accept_inconclusive": True if inconclusive else None,
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="medsynth")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """medsynth: anonymize scans, train a conditional GAN, audit privacy, export an augmented dataset."""
    ctx.obj = _State(debug=debug)


@cli.command("demo-data")
@click.argument("out", type=PathArg)
@click.option("--subjects", type=click.IntRange(4, 10_000), default=40, show_default=True, help="Number of subjects.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed: same seed, same bytes.")
@click.option(
    "--family",
    type=click.Choice(["ct-abdomen", "mr-brain", "xray-chest"]),
    default="ct-abdomen",
    show_default=True,
    help="ct-abdomen: CT slabs in HU; mr-brain: MR head volumes in scanner units; xray-chest: single-frame 2D radiographs.",
)
def demo_data_command(out: Path, subjects: int, seed: int, family: str) -> None:
    """Write a phantom cohort (DICOM, NIfTI, labels.csv; fake PHI planted) to OUT."""
    from pipeline.demo import make_cohort

    summary = make_cohort(out, subjects=subjects, seed=seed, family=family)
    _echo_lines(summary.lines())


@cli.command("run")
@config_option
@click.option("--force", is_flag=True, help="Re-run every stage even when its inputs are unchanged.")
@click.option("--no-progress", is_flag=True, help="No progress (bars on a terminal, a line every 30 s in a log).")
@accept_early_stop_option
@accept_inconclusive_option
@scheduler_option
def run_command(
    config_file: Path | None, force: bool, no_progress: bool, accept_early_stop: bool, accept_inconclusive: bool,
    scheduler: str | None,
) -> None:
    """Run every stage (ingest, train, generate, evaluate, export) under one MLflow parent run."""
    from pipeline.workflow import run_all

    if config_file is None:
        raise InputError("medsynth run needs a config: pass -c FILE (e.g. -c configs/demo.yaml).")
    config = _config(config_file, {**_acceptances(accept_early_stop, accept_inconclusive), **_scheduler(scheduler)})
    summary = run_all(config, where=str(config_file), force=force, progress=not no_progress, echo=click.echo)
    _echo_lines(summary.lines())
    _exit_on_unaccepted_gates(summary, config)


@cli.command("demo")
@config_option
@click.option(
    "--subjects", type=click.IntRange(4, 10_000), default=None,
    help="Phantom subjects [default: the config's demo_subjects, 80 unless set].",
)
@click.option("--force", is_flag=True, help="Re-run every stage even when its inputs are unchanged.")
@click.option("--no-progress", is_flag=True, help="No progress (bars on a terminal, a line every 30 s in a log).")
@accept_early_stop_option
@accept_inconclusive_option
def demo_command(
    config_file: Path | None, subjects: int | None, force: bool, no_progress: bool, accept_early_stop: bool,
    accept_inconclusive: bool,
) -> None:
    """Write the phantom cohort into <run root>/raw, then run every stage with configs/demo.yaml."""
    from pipeline.contracts.stages import RunPaths
    from pipeline.demo import make_cohort
    from pipeline.workflow import default_demo_config, run_all

    from pipeline.core.locks import hold

    config_file = config_file or default_demo_config()
    config = _config(config_file, _acceptances(accept_early_stop, accept_inconclusive))
    paths = RunPaths(config.resolved_run_root)
    notes: list[str] = []
    with hold(paths.root, notes):  # the cohort is written into the run root: the same one writer as run_all
        _echo_lines(notes)
        cohort = make_cohort(paths.raw, subjects=subjects or config.demo_subjects, seed=config.seed)
        _use_demo_key(config, paths)
        _echo_lines(cohort.lines()[:3])
        summary = run_all(config, where=str(config_file), force=force, progress=not no_progress, echo=click.echo)
    _echo_lines(summary.lines())
    _exit_on_unaccepted_gates(summary, config)


def _exit_on_unaccepted_gates(summary: Any, config: MedsynthConfig) -> None:
    from pipeline.workflow import unaccepted_gates

    problem = unaccepted_gates(summary, config)
    if problem is not None:
        raise CheckFailed(problem)


def _use_demo_key(config: MedsynthConfig, paths: RunPaths) -> None:
    """Give the phantom cohort a key derived from the seed: every fresh demo splits (and scores) alike.

    Only when every source is the phantom cohort this command wrote: a derivable key must never
    pseudonymize real scans (a config pointing ``sources`` elsewhere gets ingest's random key).
    """
    from pipeline.ingest.keys import KEY_FILE, demo_key, load_or_create_key

    raw = paths.raw.resolve()
    if not config.sources or not all(Path(source).resolve().is_relative_to(raw) for source in config.sources):
        return
    if (paths.private / KEY_FILE).is_file() and load_or_create_key(paths.private) != demo_key(config.seed):
        click.echo(
            f"Note: {paths.private} holds the key of an earlier run, so pseudonyms, split and figures differ from "
            "the published demo. Fix (to reproduce it): delete the run root and run the demo again."
        )
        return
    load_or_create_key(paths.private, new_key=demo_key(config.seed))


@cli.command("export")
@click.option("--real", "real", type=PathArg, required=True, help="Real dataset (medsynth ingest).")
@click.option("--synthetic", "synthetic", type=PathArg, required=True, help="Synthetic dataset (medsynth generate).")
@click.option("--report", "report", type=PathArg, required=True, help="Report folder (medsynth evaluate).")
@click.option("--out", "out", type=PathArg, required=True, help="Augmented dataset folder to write.")
@click.option("--model", "model_dir", type=PathArg, default=None,
              help="Generator folder: real images get its preprocessing (model grid). Without it they are copied unchanged.")
@click.option("--allow-failed-gates", is_flag=True, default=False,
              help="Export even if the privacy gate failed or did not run (the data card says so at the top).")
@click.option("--accept-inconclusive", is_flag=True, default=False,
              help="Export even if the privacy gate is inconclusive (never a failed one; the card says so first).")
@config_option
def export_command(
    real: Path, synthetic: Path, report: Path, out: Path, model_dir: Path | None, allow_failed_gates: bool,
    accept_inconclusive: bool, config_file: Path | None,
) -> None:
    """Write the augmented dataset (real + synthetic in train only), excluded.csv and the data card to OUT."""
    config = _config(config_file, {
        "export.allow_failed_gates": True if allow_failed_gates else None,
        "export.accept_inconclusive": True if accept_inconclusive else None,
    })
    paths = {"ingested": real, "synthetic": synthetic, "report": report, "export": out, "model": model_dir}
    _run_stage("export", config, paths)


@cli.command("ui")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port; 0 picks a free one.")
def ui_command(port: int) -> None:
    """Open the MLflow UI on this folder's tracking store (MLFLOW_TRACKING_URI or ./mlflow.db), on 127.0.0.1."""
    from pipeline import tracking

    server = tracking.server_url()
    if server is not None:  # a team's tracking server serves its own UI
        click.echo(f"MLflow UI: {server}  (MLFLOW_TRACKING_URI is a tracking server: open its address)")
        return
    process, url = tracking.start_ui(port)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (a service manager, `timeout`) stops the server like Ctrl-C

    signal.signal(signal.SIGTERM, _stop)
    click.echo(f"MLflow UI: {url}  (store: {tracking.tracking_uri()})")
    click.echo("  each experiment's runs are under its 'Runs' tab; Ctrl-C stops the UI.")
    try:
        process.wait()
    except KeyboardInterrupt:
        tracking.stop_ui(process)
        click.echo("MLflow UI stopped.")


@cli.command("card-template")
def card_template_command() -> None:
    """Print the packaged data card template (Jinja2), e.g. to start your own: > my_card.md.j2.

    Export renders your copy instead when the config sets export.card.template (data_cards/README.md).
    """
    from pipeline.export.card import template_text

    click.echo(template_text(), nl=False)


# --- ingest + audit (pipeline/ingest) -------------------------------------------------------


@cli.command("ingest")
@click.option("--source", "sources", type=PathArg, multiple=True,
              help="Folder of DICOM/NIfTI files (repeatable). Default: 'sources' of the config.")
@click.option("--labels", type=PathArg, default=None,
              help="CSV key,label (key: PatientID, or NIfTI path relative to its source). Default: first folder level.")
@click.option("--out", "out", type=PathArg, required=True, help="Dataset folder to write (re-running resumes).")
@click.option("--private", "private", type=PathArg, default=None,
              help="Private folder (key, source map, quarantine originals). Default: <out>.private beside the dataset.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Worker processes. Default: all cores.")
@click.option("--no-progress", is_flag=True, help="No progress (bars on a terminal, a line every 30 s in a log).")
@scheduler_option
@config_option
def ingest_command(
    sources: tuple[Path, ...], labels: Path | None, out: Path, private: Path | None, workers: int | None,
    no_progress: bool, scheduler: str | None, config_file: Path | None,
) -> None:
    """Anonymize DICOM/NIfTI sources into a real dataset (manifest + one NIfTI per series), with a leak audit."""
    config = _config(config_file, {"ingest.workers": workers, **_scheduler(scheduler)})
    if sources:
        config.sources = list(sources)
    if labels is not None:
        config.labels = labels
    paths = {"ingested": out, "private": private}
    _run_stage("ingest", config, paths, progress=not no_progress)


@cli.command("labels-template")
@click.option("--source", "sources", type=PathArg, multiple=True, required=True,
              help="Folder ingest will read (repeatable).")
@click.option("--out", "out", type=PathArg, required=True,
              help="CSV to write (a new file, owner-only). It holds patient identifiers: keep it private.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Worker processes. Default: all cores.")
def labels_template_command(sources: tuple[Path, ...], out: Path, workers: int | None) -> None:
    """Write a key,label template (one row per DICOM PatientID / NIfTI path) to fill in and pass as --labels."""
    from pipeline.ingest import write_labels_template

    _echo_lines(write_labels_template(list(sources), out, workers=workers).lines())


@cli.command("audit")
@click.argument("directory", type=PathArg, required=False)
@click.option("--against", "against", type=PathArg, multiple=True,
              help="Source folder whose identifying values are searched for (repeatable).")
@click.option("--private", "private", type=PathArg, default=None,
              help="Private folder for the findings' matched values. Default: <DIRECTORY>.private beside it.")
@click.option("--explain", "explain_ref", default=None, metavar="REF",
              help="Show what finding REF matched (read from --private; for the folder's owner only).")
def audit_command(directory: Path | None, against: tuple[Path, ...], private: Path | None, explain_ref: str | None) -> None:
    """Scan DIRECTORY for PHI (source identifiers, DICOM/NIfTI structure); exit 1 on any finding."""
    from pipeline.ingest import audit
    from pipeline.ingest.audit import explain
    from pipeline.ingest.stage import default_private

    if explain_ref is not None:
        if private is None and directory is None:
            raise InputError("--explain needs the private folder. Fix: pass --private DIR (or the audited DIRECTORY).")
        _echo_lines(explain(explain_ref, private if private is not None else default_private(directory)))
        return
    if directory is None:
        raise InputError("no DIRECTORY given. Fix: medsynth audit DIRECTORY [--against SOURCE ...].")
    report = audit(directory, list(against) or None)
    if not report.ok:
        report.record(private if private is not None else default_private(directory))
    _echo_lines(report.lines())
    if not report.ok:
        raise CheckFailed(f"{len(report.findings)} finding(s) in {directory}. Do not share it until they are fixed.")


# --- train + generate (pipeline/models) ------------------------------------------------------


@cli.command("train")
@click.option("--data", "data", type=PathArg, required=True, help="Dataset folder (medsynth ingest); split 'train' is used.")
@click.option("--out", "out", type=PathArg, required=True, help="MODEL_DIR to write (checkpoint, model.json, samples).")
@click.option("--resume", is_flag=True, help="Continue from MODEL_DIR/checkpoint.pt (same seed: same result).")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed (default: the config's seed).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Step budget (default: model.max_steps).")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), default=None, help="Time budget in minutes.")
@click.option("--no-progress", is_flag=True, help="No progress (bars on a terminal, a line every 30 s in a log).")
@accept_early_stop_option
@config_option
def train_command(
    data: Path, out: Path, resume: bool, seed: int | None, max_steps: int | None, max_minutes: float | None,
    no_progress: bool, accept_early_stop: bool, config_file: Path | None,
) -> None:
    """Train the conditional GAN on DATASET's train split (also under `torchrun --nproc_per_node N -m pipeline train`)."""
    config = _config(config_file, {
        "seed": seed, "model.max_steps": max_steps, "model.max_minutes": max_minutes,
        "model.accept_early_stop": True if accept_early_stop else None,
    })
    paths = {"ingested": data, "model": out}
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: only rank 0 tracks, writes and prints
        _run_stage("train", config, paths, resume=resume, tracked=False)
        return
    _run_stage("train", config, paths, progress=not no_progress, resume=resume)


@cli.command("plan")
@click.option("--data", "data", type=PathArg, required=True, help="Dataset folder (medsynth ingest); split 'train' is planned.")
@click.option("--out", "out", type=PathArg, default=None, help="Write the plan (fingerprint, values, reasons, guards) as JSON.")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed of the sample and the probe (default: the config's seed).")
@config_option
def plan_command(data: Path, out: Path | None, seed: int | None, config_file: Path | None) -> None:
    """Fingerprint DATASET, plan every `auto` model key with its reason, and run the preprocessing guards.

    What `train` does before its first step, without training: exit 2 when a guard fires
    (unless model.guards is warn or off).
    """
    from pipeline.contracts.dataset import locate_manifest
    from pipeline.core.files import atomic_write_json
    from pipeline.planning.stage import plan_training

    config = _config(config_file, {"seed": seed})
    locate_manifest(data)
    result = plan_training(data, config.model, seed=config.seed)
    _echo_lines(result.lines())
    if out is not None:
        atomic_write_json(out, result.to_dict())
        click.echo(f"  plan: {out}")
    failure = result.failure()
    if failure is not None and result.mode == "error":
        raise InputError(f"{failure} To train anyway, set model.guards: warn.")


@cli.command("generate")
@click.option("--model", "model_dir", type=PathArg, required=True, help="MODEL_DIR written by medsynth train.")
@click.option("--out", "out", type=PathArg, required=True, help="Synthetic dataset folder to write.")
@click.option("--per-class", type=click.IntRange(1), default=None, help="Images per class (default: generate.per_class).")
@click.option("--seed", type=click.IntRange(0), default=None, help="Noise seed (default: generate.seed).")
@config_option
def generate_command(
    model_dir: Path, out: Path, per_class: int | None, seed: int | None, config_file: Path | None
) -> None:
    """Write N synthetic images per class from the model's EMA generator as a dataset (origin=synthetic)."""
    config = _config(config_file, {"generate.per_class": per_class, "generate.seed": seed})
    _run_stage("generate", config, {"model": model_dir, "synthetic": out})


# --- evaluate (pipeline/evaluate) -------------------------------------------------------------


@cli.command("evaluate")
@click.option("--real", "real", type=PathArg, required=True, help="Real dataset (medsynth ingest): train + held-out splits.")
@click.option("--synthetic", "synthetic", type=PathArg, required=True, help="Synthetic dataset (medsynth generate).")
@click.option("--out", "out", type=PathArg, required=True, help="Report folder: report.json + report.html.")
@click.option("--model", "model_dir", type=PathArg, default=None,
              help="Generator folder: its preprocessing, discriminator (white-box attack) and DP record. "
                   "Without it a default preprocessing is used.")
@click.option("--strict", is_flag=True, help="Also exit 1 when a gate is inconclusive or did not run.")
@click.option("--report-only", is_flag=True,
              help="Exit 0 whatever the gates say (the report is the product, e.g. for a sweep that reads report.json).")
@click.option("--no-progress", is_flag=True, help="No progress (bars on a terminal, a line every 30 s in a log).")
@config_option
def evaluate_command(
    real: Path, synthetic: Path, out: Path, model_dir: Path | None, strict: bool, report_only: bool, no_progress: bool,
    config_file: Path | None,
) -> None:
    """Measure fidelity, diversity, privacy and utility of SYNTHETIC against REAL; write the report.

    Exit 1 when a gate fails (after the report is written): a failed result never reads as success.
    """
    config = _config(config_file, {})
    paths = {"ingested": real, "synthetic": synthetic, "report": out, "model": model_dir}
    result = _run_stage("evaluate", config, paths, progress=not no_progress)
    if report_only:
        return
    failed = [gate for gate, verdict in result.gates.items() if verdict == "fail"]
    undecided = [gate for gate, verdict in result.gates.items() if verdict in ("inconclusive", "not_run")]
    if failed:
        raise CheckFailed(f"gate(s) failed: {', '.join(failed)}. See {out / 'report.html'} for the evidence.")
    if strict and undecided:
        raise CheckFailed(
            f"gate(s) inconclusive or not run: {', '.join(undecided)}. See {out / 'report.html'} for what would decide them."
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``timeout``, ``kill``): unwinds like Ctrl-C, so MLflow runs end KILLED."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


class _QuietFileHandler(logging.FileHandler):
    """A log file that never prints logging's own error report: an unwritable log must not break the console."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def _capture_warnings(debug: bool) -> Path:
    """Send Python warnings (torch, numpy, MONAI, ...) to the log file instead of the console.

    A ``RuntimeWarning`` printed before ``error: ...`` breaks the promise of one line per error.
    The log is ``MEDSYNTH_LOG`` or ``medsynth.log`` in the working directory (beside MLflow's
    default ``mlflow.db``), created on the first warning; ``--debug`` also shows them on stderr.

    Returns:
        The log file's path.
    """
    path = Path(os.environ.get("MEDSYNTH_LOG") or "medsynth.log")
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, "_medsynth", False):
            logger.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [_QuietFileHandler(path, encoding="utf-8", delay=True)]
    if debug:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler._medsynth = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return path


def _no_space(exc: OSError) -> str:
    # The file name is not quoted: an OSError's filename can be a source path, which may name a patient.
    return (
        "error: no space left on device. Fix: free space and re-run; what was finished is kept "
        "(every file is written whole or not at all) and the re-run continues from there."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``medsynth`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command.
    debug = "--debug" in args or os.environ.get("MEDSYNTH_DEBUG") == "1"
    args = [arg for arg in args if arg != "--debug"]
    if debug:
        args = ["--debug", *args]
    _capture_warnings(debug)
    previous_term = None
    if _main_thread():
        previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=args, prog_name="medsynth", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns an interrupt inside a command into Abort, keeping the interrupt as its cause.
        if isinstance(exc, Terminated) or isinstance(exc.__cause__ or exc.__context__, Terminated):
            click.echo("Terminated (SIGTERM). What was written is kept; re-run the command to continue.", err=True)
            sys.exit(128 + signal.SIGTERM)
        click.echo(
            "Interrupted. What was written is kept: train saved a checkpoint (add --resume to continue), "
            "`medsynth run` resumes where it stopped, ingest skips the series it finished.",
            err=True,
        )
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CheckFailed as exc:
        _report(exc, debug)
        sys.exit(exc.exit_code)
    except MedsynthError as exc:
        _report(exc, debug)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            _unexpected(exc, debug)
        if debug:
            traceback.print_exc()
        click.echo(_no_space(exc), err=True)
        sys.exit(1)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        _unexpected(exc, debug)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # A torchrun rank whose work is done and written: leave without interpreter teardown. With
        # torch 2.13 + gloo a rank aborts now and then at exit, after training finished ("terminate
        # called without an active exception", 2 in 45 runs here; 0 in 60 with this exit), and
        # torchrun would then report the whole run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(0)


def _main_thread() -> bool:
    """Whether this is the main thread (the only one that may set signal handlers)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _unexpected(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    else:
        click.echo(
            f"error: unexpected {type(exc).__name__}. Re-run with --debug for the traceback and report it.",
            err=True,
        )
    sys.exit(3)


def _report(exc: MedsynthError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    prefix = "check failed" if isinstance(exc, CheckFailed) else "error"
    click.echo(f"{prefix}: {exc}", err=True)
