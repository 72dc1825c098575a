"""Quick checks that the package imports and the CLI answers."""

from __future__ import annotations

import subprocess
import sys


def test_cli_help_lists_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "demo-data" in result.stdout
