"""A real full disk for fault-injection tests: a small tmpfs in a private mount namespace.

``python tests/_faults.py SPEC.json`` runs inside ``unshare --mount --map-root-user`` (so no real
root is needed and the mount is gone when it ends): it mounts a tmpfs of ``size`` bytes at
``mount`` and runs ``steps`` in order, writing what happened to ``results``:

- ``["put", src, dst]``: copy a file in (e.g. a pseudonym key);
- ``["fill", free]``: a filler file leaves ``free`` bytes free;
- ``["free"]``: remove the filler (the user frees space);
- ``["run", name, argv]``: run a command, record its exit code and output under ``name``;
- ``["copy", src, dst]``: copy a folder out (the tmpfs vanishes with the namespace).

The product code has no test hook: the kernel itself answers ENOSPC.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["NAMESPACE", "full_disk_available", "run_on_small_disk", "tree_size"]

NAMESPACE = ["unshare", "--mount", "--map-root-user", "--"]
_FILLER = ".filler"


@functools.cache
def full_disk_available() -> str:
    """Empty when this machine can mount a tmpfs in a private namespace; else why not (the skip reason)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not installed"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(
            [*NAMESPACE, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder],
            capture_output=True, text=True, timeout=30,
        )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here ({probe.stderr.strip()[:200]})"
    return ""


def tree_size(root: Path) -> int:
    """Bytes of every file under ``root``, each rounded up to a 4 KiB page (as tmpfs charges them)."""
    return sum(-(-path.stat().st_size // 4096) * 4096 for path in root.rglob("*") if path.is_file())


def run_on_small_disk(
    work: Path, mount: Path, size: int, steps: list[list[Any]], env: dict[str, str], timeout: float = 600
) -> dict[str, dict[str, Any]]:
    """Run ``steps`` (see the module docstring) with a ``size``-byte tmpfs at ``mount``; return the runs."""
    mount.mkdir(parents=True, exist_ok=True)
    spec = {"mount": str(mount), "size": size, "steps": steps, "env": env, "results": str(work / "fault-results.json")}
    (work / "fault-spec.json").write_text(json.dumps(spec), encoding="utf-8")
    completed = subprocess.run(
        [*NAMESPACE, sys.executable, __file__, str(work / "fault-spec.json")],
        capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((work / "fault-results.json").read_text(encoding="utf-8"))


def _free_bytes(mount: str) -> int:
    stat = os.statvfs(mount)
    return stat.f_bavail * stat.f_frsize


def _main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    mount = spec["mount"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(spec['size'])}", "tmpfs", mount], check=True)
    results: dict[str, dict[str, Any]] = {}
    for step in spec["steps"]:
        kind = step[0]
        if kind == "put":
            Path(step[2]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(step[1], step[2])
        elif kind == "fill":
            with open(Path(mount) / _FILLER, "wb") as handle:
                left = max(0, _free_bytes(mount) - int(step[1]))
                while left > 0:
                    chunk = min(left, 1 << 20)
                    handle.write(b"\1" * chunk)
                    left -= chunk
            results.setdefault("_fill", {})["free"] = _free_bytes(mount)
        elif kind == "free":
            (Path(mount) / _FILLER).unlink()
        elif kind == "run":
            completed = subprocess.run(step[2], capture_output=True, text=True, env=spec["env"], timeout=540)
            results[step[1]] = {"rc": completed.returncode, "stdout": completed.stdout, "stderr": completed.stderr}
        elif kind == "copy":
            if Path(step[1]).exists():
                shutil.copytree(step[1], step[2], symlinks=True)
        else:
            raise ValueError(f"unknown step {kind!r}")
    Path(spec["results"]).write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    _main(sys.argv[1])
