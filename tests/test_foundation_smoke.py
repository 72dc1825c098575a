"""Quick checks that the package imports and the CLI answers."""

from __future__ import annotations

import subprocess
import sys


def test_cli_help_lists_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "demo-data" in result.stdout


def test_log_progress_prints_a_line_per_interval_and_stays_silent_when_short() -> None:
    """In a log, progress is one plain line every interval (and a last one), never a redrawn bar."""
    import io

    from pipeline.core.progress import LogProgress, progress

    now = [0.0]
    stream = io.StringIO()
    with LogProgress(100, "train", "step", interval=30.0, stream=stream, clock=lambda: now[0]) as bar:
        for _ in range(100):
            now[0] += 1.0
            bar.update(1)
            bar.set_postfix(d="1.500", g="0.700")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train: 30/100 steps (30%), 1.0 steps/s, d=1.500, g=0.700"
    assert len(lines) == 4 and lines[-1].startswith("train: 100/100 steps (100%)")
    assert "\r" not in stream.getvalue()

    quiet = io.StringIO()
    with LogProgress(10, "ingest", "file", stream=quiet, clock=lambda: 0.0) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""  # a task shorter than the interval says nothing
    assert not isinstance(progress(10, "x", "step", enabled=False), LogProgress)
