"""Generalization: the same `auto` recipe on every demo family, through the CLI a new user would type.

For each family: a fresh cohort (``medsynth demo-data --family F``) -> ``ingest`` -> ``plan`` ->
``train`` -> ``generate`` -> ``evaluate``, with **no config file** (every planned model key reads
``auto``, the evaluate section its defaults) and no per-family setting. Training is capped at
``--max-minutes`` (5) for every family alike; a model the cap stopped early is evaluated anyway and
the table says so. Prints one row per family: the plan (2D/3D, size, spacing, intensity mapping),
training time and steps, GAN-test balanced accuracy relative to real held-out images
(``utility.synthetic_label_accuracy_ratio``), FID against the size-matched real reference
(``fidelity.ratios.fid``), precision and coverage ratios, the privacy verdict, and the machine load.

Acceptance (issue #12): label accuracy ratio >= 0.95 on every family and no privacy ``fail``.

    nice -n 10 .venv/bin/python benchmarks/generalization.py [--out /tmp/gen] [--subjects 120]

Writes ``OUT/generalization.json``. Exit status 0 when every family meets the acceptance, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("ct-abdomen", "mr-brain", "xray-chest")
GOAL_RATIO = 0.95


def _medsynth(args: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run one CLI command (same interpreter, this repository's code), its output appended to ``log``."""
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"$ medsynth {' '.join(args)}\n")
        handle.flush()
        code = subprocess.call(
            [sys.executable, "-m", "pipeline", *args], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    return code, time.perf_counter() - start


def _load() -> float:
    return os.getloadavg()[0]


def run_family(
    family: str, root: Path, subjects: int, seed: int, max_minutes: float, env: dict[str, str], resume: bool = False
) -> dict[str, Any]:
    """One family through every stage; returns the row of the table (with the raw figures).

    ``resume``: keep the stages whose output is already complete (after an interrupted run).
    """
    if root.exists() and not resume:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.log"
    raw, data, model, synthetic, report = (root / name for name in ("raw", "data", "model", "synthetic", "report"))
    row: dict[str, Any] = {"family": family, "subjects": subjects, "seed": seed, "load_start": _load()}
    done = {
        "demo-data": raw / "labels.csv",
        "ingest": data / "manifest.csv",
        "plan": root / "plan.json",
        "train": model / "model.json",
        "generate": synthetic / "manifest.csv",
        "evaluate": report / "report.json",
    }
    steps = [
        ("demo-data", ["demo-data", str(raw), "--family", family, "--subjects", str(subjects), "--seed", str(seed)]),
        (
            "ingest",
            ["ingest", "--source", str(raw / "dicom"), "--source", str(raw / "nifti"), "--labels",
             str(raw / "labels.csv"), "--out", str(data), "--workers", "2", "--no-progress"],
        ),
        ("plan", ["plan", "--data", str(data), "--out", str(root / "plan.json")]),
        (
            "train",
            ["train", "--data", str(data), "--out", str(model), "--max-minutes", str(max_minutes),
             "--accept-early-stop", "--no-progress"],
        ),
        ("generate", ["generate", "--model", str(model), "--out", str(synthetic)]),
        (
            "evaluate",
            ["evaluate", "--real", str(data), "--synthetic", str(synthetic), "--out", str(report), "--model",
             str(model), "--report-only", "--no-progress"],
        ),
    ]
    row["seconds"] = {}
    for name, args in steps:
        if resume and done[name].is_file() and not (name == "train" and _stopped_mid_run(model)):
            print(f"[{family}] {name}: kept from the earlier run", flush=True)
            continue
        print(f"[{family}] {name} (load {_load():.1f}) ...", flush=True)
        code, seconds = _medsynth(args, log, env)
        row["seconds"][name] = round(seconds, 1)
        if code != 0:
            row["failed"] = f"{name} exited {code} (see {log})"
            print(f"[{family}] {row['failed']}", flush=True)
            return row
    row["load_end"] = _load()
    row.update(_figures(root, model, report))
    return row


def _stopped_mid_run(model: Path) -> bool:
    """Whether model.json is a checkpoint written while training still ran (not a finished model)."""
    meta = json.loads((model / "model.json").read_text())
    return "while it ran" in str(meta.get("stop_reason") or "")


def _figures(root: Path, model: Path, report: Path) -> dict[str, Any]:
    """The table's figures from plan.json, model.json and report.json."""
    plan = json.loads((root / "plan.json").read_text())
    meta = json.loads((model / "model.json").read_text())
    document = json.loads((report / "report.json").read_text())
    values = {key: entry.get("value") if isinstance(entry, dict) else entry for key, entry in plan["plan"].items()}
    utility, fidelity = document["utility"], document["fidelity"]
    ratios = fidelity.get("ratios") or {}
    return {
        "plan": {key: values.get(key) for key in ("spatial_dims", "image_size", "spacing", "intensity", "window",
                                                   "percentiles", "batch_size", "max_steps", "max_minutes")},
        "train_steps": meta.get("steps"),
        "train_steps_planned": values.get("max_steps"),
        "selected_step": meta.get("selected_step"),
        "converged": meta.get("converged"),
        "stopped_early": meta.get("stopped_early"),
        "train_seconds": meta.get("train_seconds"),
        "label_accuracy_synthetic": utility.get("synthetic_label_accuracy"),
        "label_accuracy_real_holdout": utility.get("real_holdout_accuracy"),
        "label_accuracy_ratio": utility.get("synthetic_label_accuracy_ratio"),
        "label_accuracy_ratio_reason": utility.get("synthetic_label_accuracy_ratio_reason"),
        "fid_ratio_matched": ratios.get("fid"),
        "precision_ratio": ratios.get("precision"),
        "coverage_ratio": ratios.get("coverage"),
        "privacy": document["gates"]["privacy"],
        "gates": {gate: document["gates"][gate] for gate in ("fidelity", "diversity", "privacy", "utility")},
        "augmentation_gain": utility.get("augmentation_gain"),
        "augmentation_gain_ci": [utility.get("augmentation_gain_ci_low"), utility.get("augmentation_gain_ci_high")],
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return "x".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
    return str(value)


def meets(row: dict[str, Any]) -> bool:
    """The acceptance: GAN-test ratio >= 0.95 and a privacy verdict other than fail."""
    ratio = row.get("label_accuracy_ratio")
    return "failed" not in row and ratio is not None and ratio >= GOAL_RATIO and row.get("privacy") != "fail"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table docs/models.md ("Generalization") shows."""
    lines = [
        "| family | plan: dims, size, spacing (mm), intensity | train s (steps) | GAN-test / real held-out "
        "(synthetic, real) | FID ratio (matched) | precision ratio | coverage ratio | privacy | load | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['family']} | {row['failed']} | | | | | | | | no |")
            continue
        plan = row["plan"]
        mapping = (
            f"CT window {plan['window'][0]:g}..{plan['window'][1]:g} HU" if plan["intensity"] == "ct"
            else f"percentiles {plan['percentiles'][0]:g}..{plan['percentiles'][1]:g}"
        )
        steps = f"{row['train_steps']}/{row['train_steps_planned']}" + (" early" if row["stopped_early"] else "")
        lines.append(
            f"| {row['family']} | {plan['spatial_dims']}D, {_fmt(plan['image_size'])}, {_fmt(plan['spacing'])}, "
            f"{mapping} | {row['train_seconds']:.0f} ({steps}) | **{_fmt(row['label_accuracy_ratio'])}** "
            f"({_fmt(row['label_accuracy_synthetic'])}, {_fmt(row['label_accuracy_real_holdout'])}) | "
            f"{_fmt(row['fid_ratio_matched'])} | {_fmt(row['precision_ratio'])} | {_fmt(row['coverage_ratio'])} | "
            f"{row['privacy']} | {row['load_start']:.1f}-{row['load_end']:.1f} | {'yes' if meets(row) else 'no'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/medsynth-generalization"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--subjects", type=int, default=120, help="Subjects per cohort (0.6/0.2/0.2 split).")
    parser.add_argument("--seed", type=int, default=11, help="Cohort seed (fresh: not the demo's).")
    parser.add_argument("--max-minutes", type=float, default=5.0, help="Training cap, the same for every family.")
    parser.add_argument("--resume", action="store_true", help="Keep every stage whose output is complete.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{args.out.resolve()}/mlflow.db"),
        # The machine's 2 cores: torch and BLAS may not start more threads than that.
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }
    print(f"generalization benchmark: {', '.join(args.families)}; {os.cpu_count()} CPUs, load {_load():.1f}", flush=True)
    rows = []
    for family in args.families:
        rows.append(run_family(family, args.out / family, args.subjects, args.seed, args.max_minutes, env, args.resume))
        (args.out / "generalization.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    print(f"written: {args.out / 'generalization.json'}")
    return 0 if all(meets(row) for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
