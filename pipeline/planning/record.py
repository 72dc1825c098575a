"""``MODEL_DIR/plan.json`` as later readers see it: the train output, the report and the data card.

No tracking here: evaluate and export (compute layers) read the plan through this module.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError

__all__ = ["PLAN_JSON", "PREPROCESSED_PNG", "read_plan", "plan_record", "plan_lines"]

PLAN_JSON = "plan.json"
PREPROCESSED_PNG = "preprocessed.png"


def read_plan(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``MODEL_DIR/plan.json``, or None when the model has none (trained before planning existed)."""
    path = Path(model_dir) / PLAN_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({type(exc).__name__}). Fix: re-run `medsynth train`.") from exc


def plan_record(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The plan as the report and the data card show it: one row per key, the guards, the grid.

    Returns None when the model folder has no ``plan.json``.
    """
    document = read_plan(model_dir)
    if document is None:
        return None
    rows = [
        {"key": key, "value": json.dumps(item["value"]), "source": item["source"], "reason": item["reason"]}
        for key, item in document.get("plan", {}).items()
    ]
    grid_path = Path(model_dir) / PREPROCESSED_PNG
    grid = None
    if grid_path.is_file():
        grid = {
            "file": PREPROCESSED_PNG,
            "data_uri": "data:image/png;base64," + base64.b64encode(grid_path.read_bytes()).decode("ascii"),
        }
    guards = [
        {"name": g["name"], "status": g["status"], "message": g["message"]} for g in document.get("guards", [])
    ]
    fp = document.get("fingerprint", {})
    return {"rows": rows, "guards": guards, "grid": grid, "modality": fp.get("modality"), "n_images": fp.get("n_images")}


def plan_lines(model_dir: str | os.PathLike[str]) -> list[str]:
    """A short account of a trained model's plan for the train command's output (empty without plan.json)."""
    document = read_plan(model_dir)
    if document is None:
        return []
    planned = [
        f"{key} {json.dumps(item['value'])}"
        for key, item in document.get("plan", {}).items()
        if item["source"] == "plan" and not item["reason"].startswith("unused")
    ]
    lines = [f"Planned from the data: {', '.join(planned) if planned else 'nothing (every key set in the config)'}"]
    guards = document.get("guards", [])
    fired = [guard for guard in guards if guard["status"] == "fail"]
    if guards:
        lines.append(
            "  preprocessing guards: "
            + ("all passed" if not fired else "WARNING, fired (model.guards: warn): " + ", ".join(g["name"] for g in fired))
        )
    lines += [f"  warning: {guard['message']}" for guard in fired]
    model_dir = Path(model_dir)
    shown = f", preprocessed images: {model_dir / PREPROCESSED_PNG}" if (model_dir / PREPROCESSED_PNG).is_file() else ""
    lines.append(f"  plan and reasons: {model_dir / PLAN_JSON}{shown}")
    return lines
