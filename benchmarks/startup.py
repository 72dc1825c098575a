"""Benchmark: how long the CLI takes to answer before any stage runs.

Each command runs ``--repeats`` times in a fresh process; the median wall time is printed:

- ``medsynth --help``;
- ``medsynth train --data /nonexistent --out OUT``: an input error, answered before torch loads
  (goal: < 2 s);
- ``medsynth run -c bad.yaml`` where the config has an unknown key: the config error;
- ``python -X importtime -c "import pipeline.config"``: the wall time, and the import time of
  ``pipeline.config`` as Python measures it (the config is loaded by every command, so it must not
  pull in the stages' heavy libraries).

Usage::

    .venv/bin/python benchmarks/startup.py [--repeats 7]

The 2 cores are shared: the 1-minute load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MEDSYNTH = Path(sys.executable).parent / "medsynth"
INPUT_ERROR_GOAL_S = 2.0
# `-X importtime` prints "import time: self [us] | cumulative | name" per module; stderr.
_IMPORTTIME = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \|\s*pipeline\.config$", re.MULTILINE)


@dataclass(frozen=True)
class Timing:
    """Median wall time of a command, its exit status, and the last line it printed to stderr."""

    seconds: float
    returncode: int
    last_error_line: str


def _time(command: list[str], repeats: int, env: dict[str, str]) -> tuple[Timing, list[str]]:
    """Run ``command`` ``repeats`` times; the median timing and every run's stderr."""
    times: list[float] = []
    errors: list[str] = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        times.append(time.perf_counter() - started)
        errors.append(result.stderr)
    assert result is not None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return Timing(statistics.median(times), result.returncode, lines[-1] if lines else ""), errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (the median is printed)")
    args = parser.parse_args()
    if not MEDSYNTH.is_file():
        sys.exit(f"{MEDSYNTH} not found: install the project first (make install)")

    with tempfile.TemporaryDirectory(prefix="medsynth-startup-") as scratch:
        workdir = Path(scratch)
        # A typo'd section name: `modle:` for `model:`.
        bad_config = workdir / "bad.yaml"
        bad_config.write_text("name: startup\nmodle:\n  steps: 10\n", encoding="utf-8")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
        commands = {
            "medsynth --help": [str(MEDSYNTH), "--help"],
            "medsynth train (input error)": [str(MEDSYNTH), "train", "--data", "/nonexistent", "--out", str(workdir / "x")],
            "medsynth run (config typo)": [str(MEDSYNTH), "run", "-c", str(bad_config)],
            "import pipeline.config": [sys.executable, "-X", "importtime", "-c", "import pipeline.config"],
        }
        print(f"{args.repeats} runs each, median wall time; load average {os.getloadavg()[0]:.2f}")
        timings: dict[str, Timing] = {}
        for name, command in commands.items():
            timing, errors = _time(command, args.repeats, env)
            timings[name] = timing
            detail = f"exit {timing.returncode}"
            if name == "import pipeline.config":
                cumulative = [int(match) for text in errors for match in _IMPORTTIME.findall(text)]
                detail += f"; pipeline.config import time {statistics.median(cumulative) / 1000:.0f} ms (median)"
            elif timing.returncode != 0:
                detail += f": {timing.last_error_line[:100]}"
            print(f"{name:32s} {timing.seconds:6.2f} s   {detail}")

    answered = timings["medsynth train (input error)"]
    met = answered.seconds < INPUT_ERROR_GOAL_S and answered.returncode != 0
    print(f"input error answered in {answered.seconds:.2f} s: goal < {INPUT_ERROR_GOAL_S:.0f} s {'met' if met else 'MISSED'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
