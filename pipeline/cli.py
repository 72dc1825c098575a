"""The ``medsynth`` command line: parses flags, loads config, calls a stage, maps errors to exit codes.

Exit codes: 0 success; 1 a check failed (audit finding, failed gate); 2 bad input or usage, with
one message that says what, where and how to fix it, and no traceback unless ``--debug``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from pipeline.errors import CheckFailed, InputError, MedsynthError

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


config_option = click.option(
    "-c", "--config", "config_file", type=PathArg, default=None, help="YAML config (see configs/)."
)


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
def demo_data_command(out: Path, subjects: int, seed: int) -> None:
    """Write the phantom cohort (DICOM series, NIfTI volumes, labels.csv; fake PHI planted) to OUT."""
    from pipeline.demo import make_cohort

    summary = make_cohort(out, subjects=subjects, seed=seed)
    _echo_lines(summary.lines())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``medsynth`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command.
    debug = "--debug" in args or os.environ.get("MEDSYNTH_DEBUG") == "1"
    args = [arg for arg in args if arg != "--debug"]
    if debug:
        args = ["--debug", *args]
    try:
        cli.main(args=args, prog_name="medsynth", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
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
    except KeyboardInterrupt:
        click.echo("Interrupted; re-run the same command to resume.", err=True)
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            click.echo(
                f"error: unexpected {type(exc).__name__}. Re-run with --debug for the traceback and report it.",
                err=True,
            )
        sys.exit(3)
    sys.exit(0)


def _report(exc: MedsynthError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    prefix = "check failed" if isinstance(exc, CheckFailed) else "error"
    click.echo(f"{prefix}: {exc}", err=True)
