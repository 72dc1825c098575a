"""The data card: facts gathered from the inputs, rendered through a Jinja2 template.

:func:`build_facts` collects every number the card shows from the datasets, the report, the model
and the environment (it is also written as ``export.json``); :func:`render_card` renders the
template with them. The template ships inside the package (``pipeline/export/templates/``;
``medsynth card-template`` prints it, ``export.card.template`` replaces it); ``data_cards/README.md``
explains every field.

The template is rendered with ``StrictUndefined``: a field it names that the facts lack is an
error, never an empty string, so the card cannot silently hold a placeholder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from pipeline.contracts.dataset import Dataset
from pipeline.core.errors import InputError
from pipeline.export.report import GATES, figure_rows
from pipeline.export.config import ExportConfig
from pipeline.export.facts import ModelFacts

__all__ = [
    "TEMPLATE_NAME",
    "HEADLINE_KEYS",
    "template_text",
    "packaged_template",
    "CardInputs",
    "CardGates",
    "CardExport",
    "CardProvenance",
    "build_facts",
    "card_environment",
    "render_card",
    "format_number",
    "size_category",
]

TEMPLATE_NAME = "data_card.md.j2"
# The figures the report contract names for each section, in the order the card lists them.
HEADLINE_KEYS: dict[str, tuple[str, ...]] = {
    "fidelity": ("fid", "kid", "precision", "recall", "density", "coverage"),
    "diversity": ("ms_ssim",),
    "privacy": ("memorization_rate", "dcr_synthetic_to_train", "dcr_holdout_to_train", "mia_auc", "epsilon", "delta"),
    "utility": ("synthetic_label_accuracy", "augmentation_gain"),
}
_SIZE_CATEGORIES: tuple[tuple[float, str], ...] = (
    (1e3, "n<1K"),
    (1e4, "1K<n<10K"),
    (1e5, "10K<n<100K"),
    (1e6, "100K<n<1M"),
    (1e7, "1M<n<10M"),
    (1e8, "10M<n<100M"),
    (1e9, "100M<n<1B"),
)


def packaged_template() -> Path:
    """Path of the template shipped in the package (works for installed packages too)."""
    return Path(str(resources.files("pipeline.export").joinpath("templates", TEMPLATE_NAME)))


def template_text(template: str | os.PathLike[str] | None = None) -> str:
    """The template's source: ``template`` if given, else the packaged one."""
    if template is None:
        return resources.files("pipeline.export").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")
    path = Path(template)
    if not path.is_file():
        raise InputError(f"{path}: data card template not found. Fix: correct export.card.template or remove it.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path}: data card template is not a readable UTF-8 text file ({type(exc).__name__}). Fix: save it as UTF-8."
        ) from None


def format_number(value: Any) -> str:
    """A figure as the card prints it: 4 decimals, or 3 significant digits for very small/large values."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or 1e-2 <= abs(value) < 1e6:
            return f"{value:.4f}"
        return f"{value:.3g}"
    return str(value)


def size_category(count: int) -> str:
    """Hugging Face ``size_categories`` value for ``count`` items."""
    for limit, name in _SIZE_CATEGORIES:
        if count < limit:
            return name
    return "n>1B"


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _yaml(value: Any) -> str:
    """A YAML scalar or flow sequence (JSON is valid YAML; quoting keeps odd label text intact)."""
    return json.dumps(value, ensure_ascii=False)


def _gate(status: str) -> str:
    return {"pass": "pass", "fail": "**FAIL**", "inconclusive": "**INCONCLUSIVE** (not a pass)", "not_run": "not run"}.get(
        status, status
    )


def _check_space(gate: str, name: str, report: Mapping[str, Any]) -> str:
    """The space a gated figure is measured in, for the card (pixel, feature or model space)."""
    if name.startswith("memorization"):
        return f"pixel ({(report.get('privacy') or {}).get('memorization_space', 'pixel')}: RMS distance of preprocessed images)"
    if name.startswith("mia_auc_whitebox"):
        return "the generator's discriminator output"
    if name.startswith("mia_auc"):
        return "pixel (distance to the nearest synthetic image)"
    if name == "epsilon":
        return "training (DP accountant)"
    if name == "ms_ssim_excess":
        return "pixel (MS-SSIM)"
    if gate in ("fidelity", "diversity"):
        return f"feature space {(report.get('fidelity') or {}).get('feature_space') or 'n/a'}"
    return "classifier trained on real pixels"


def _section_tables(section: Mapping[str, Any], headline: tuple[str, ...]) -> dict[str, Any]:
    """Headline figures (contract keys holding a number or null) and every other figure of a section."""
    keys = [key for key in headline if not isinstance(section.get(key), dict)]
    rows = figure_rows(section, keys)
    reference = section.get("reference") if isinstance(section.get("reference"), dict) else {}
    for row in rows:
        value = reference.get(row["name"])
        row["reference"] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    shown = {row["name"] for row in rows}
    more = [row for row in figure_rows(section) if row["name"] not in shown]
    return {"headline": rows, "more": more, "has_reference": any(row["reference"] is not None for row in rows)}


def _feature_space(section: Mapping[str, Any]) -> list[str]:
    space = section.get("feature_space")
    if space is None:
        return []
    if isinstance(space, dict):
        return [f"{key}: {value}" for key, value in space.items() if not isinstance(value, (dict, list))]
    if isinstance(space, list):
        return [str(item) for item in space]
    return [str(space)]


def _checks(checks: Any, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's gate checks (``gates.checks``) as table rows, each with the space it is measured in."""
    rows: list[dict[str, Any]] = []
    if not isinstance(checks, dict):
        return rows
    for gate in GATES:
        for check in checks.get(gate) or []:
            if not isinstance(check, dict):
                continue
            passed = check.get("passed")
            result = check.get("verdict") or ("pass" if passed is True else "fail" if passed is False else "not_run")
            rows.append({
                "space": _check_space(gate, str(check.get("name", "")), report),
                "power": str(check.get("power") or ""),
                "gate": gate,
                "name": str(check.get("name", "")),
                "value": check.get("value"),
                "comparison": str(check.get("comparison") or ""),
                "threshold": check.get("threshold"),
                "result": result,
                "reason": str(check.get("reason") or ""),
            })
    return rows


def _per_class(section: Mapping[str, Any]) -> dict[str, Any]:
    """``per_class`` as a table: columns (figure names) and rows ``{label, values}``."""
    per_class = section.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return {"columns": [], "rows": []}
    columns: list[str] = []
    rows = []
    for label, value in sorted(per_class.items()):
        figures = {row["name"]: row["value"] for row in figure_rows(value)} if isinstance(value, dict) else {"value": value}
        for name in figures:
            if name not in columns:
                columns.append(name)
        rows.append({"label": label, "figures": figures})
    return {"columns": columns, "rows": [{"label": row["label"], "figures": [row["figures"].get(c) for c in columns]} for row in rows]}


_PATH_WORDS = ("path", "dir", "folder", "root", "private", "key_file")


def _flat_rows(value: Any, prefix: str) -> list[dict[str, str]]:
    """Scalars of a nested record as ``{name, value}`` rows, leaving out anything path-like.

    Source paths can hold patient names, so keys naming paths or folders, and string values that
    look like paths, are dropped (the ingest record holds none; this keeps it that way on the card).
    """
    rows: list[dict[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if any(word in str(key).lower() for word in _PATH_WORDS):
                continue
            rows.extend(_flat_rows(item, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(value, list):
        if all(isinstance(item, (int, float, str, bool)) for item in value):
            text = ", ".join(format_number(item) for item in value) if value else "none"
            if "/" not in text and "\\" not in text:
                rows.append({"name": prefix, "value": text})
        else:
            rows.append({"name": prefix, "value": f"{len(value)} entries"})
        return rows
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return rows
    rows.append({"name": prefix, "value": format_number(value) if value is not None else "not set"})
    return rows


def _anonymization(record: Any) -> dict[str, Any] | None:
    """The ingest record (``ingest.json``) as the card shows it: profile, settings, counts."""
    if not isinstance(record, dict):
        return None
    profile = record.get("profile") if isinstance(record.get("profile"), dict) else {}
    settings = []
    for key in sorted(set(record) - {"profile", "counts", "quarantined"}):
        settings.extend(_flat_rows(record[key], key))
    return {
        "standard": str(profile.get("standard") or "not recorded"),
        "edition": str(profile.get("edition") or "not recorded"),
        "table_source": str(profile.get("table_source") or "not recorded"),
        "options": [str(option) for option in profile.get("options") or []],
        "settings": settings,
        "counts": _flat_rows(record.get("counts") or {}, ""),
    }


# Rows of the card's loss table: a handful of points along the run reads as a curve in text.
_LOSS_ROWS = 6


def _training(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report's ``training`` record (how the generator's training went) as the card shows it.

    None when the report has none (evaluated without ``--model``, or by an older medsynth). The
    sample grid is named by its file in the model folder (the card is text; export.json stays small).
    """
    record = report.get("training")
    if not isinstance(record, dict):
        return None
    curves = record.get("loss_curves") or {}
    steps = curves.get("step") or []
    picks = sorted({round(index * (len(steps) - 1) / (_LOSS_ROWS - 1)) for index in range(_LOSS_ROWS)}) if steps else []
    grid = record.get("sample_grid")
    return {
        "steps_done": record.get("steps_done"),
        "steps_planned": record.get("steps_planned"),
        "stopped_early": bool(record.get("stopped_early")),
        "stop_reason": record.get("stop_reason"),
        "train_seconds": float(record.get("train_seconds") or 0.0),
        "loss_curve": [
            {"step": steps[i], "loss_d": (curves.get("loss_d") or [None] * len(steps))[i],
             "loss_g": (curves.get("loss_g") or [None] * len(steps))[i]}
            for i in picks
        ],
        "sample_grid": grid.get("file") if isinstance(grid, dict) else None,
    }


def _distinct(series: pd.Series) -> list[str]:
    return sorted({str(value) for value in series if str(value).strip()})


def _descrip_example(augmented: Dataset) -> str:
    """The NIfTI ``descrip`` of the first exported synthetic image (how the files mark themselves)."""
    from pipeline.export.images import descrip_of

    rows = augmented.subset(origin="synthetic")
    if rows.empty:
        return "no synthetic image exported"
    return descrip_of(augmented.image_path(rows.iloc[0]))


@dataclass(frozen=True)
class CardInputs:
    """What the export read: the stages' outputs the card describes.

    Attributes:
        real: the real dataset (``medsynth ingest``).
        synthetic: the synthetic dataset (``medsynth generate``).
        report: the parsed ``report.json`` (``medsynth evaluate``).
        model: the generator's facts, None when no MODEL_DIR was given.
        ingest: what ingest did (:func:`pipeline.export.facts.ingest_facts`).
    """

    real: Dataset
    synthetic: Dataset
    report: Mapping[str, Any]
    model: ModelFacts | None
    ingest: Mapping[str, Any]


@dataclass(frozen=True)
class CardGates:
    """The report's gate verdicts as the export applied them.

    Attributes:
        gates: gate name -> ``pass``, ``fail``, ``inconclusive`` or ``not_run``.
        privacy_gate: the privacy gate's verdict (the one that blocks an export).
        overridden: the export went ahead although the privacy gate did not pass.
        accepted_by: what let an inconclusive privacy gate through (the flag or config key), for the card.
    """

    gates: Mapping[str, str]
    privacy_gate: str
    overridden: bool
    accepted_by: str = "--accept-inconclusive / export.accept_inconclusive"


@dataclass(frozen=True)
class CardExport:
    """What the export wrote and how.

    Attributes:
        augmented: the augmented dataset as written (real + kept synthetic images).
        excluded: the ``excluded.csv`` table (left-out synthetic and real images, with reasons).
        preprocessing: the ``preprocessing.json`` record (what was done to the real images).
        composition: counts per split x label x origin.
        modality: CT, MR or the manifests' modality.
        flagged: synthetic images the privacy audit flagged.
        filter_how: how the privacy filter decided (the report's flags or a distance threshold).
        warnings: notes for the reader of the card.
        out_name: the output folder's name (never its full path).
    """

    augmented: Dataset
    excluded: pd.DataFrame
    preprocessing: Mapping[str, Any]
    composition: list[dict[str, Any]]
    modality: str
    flagged: int
    filter_how: str
    warnings: list[str]
    out_name: str


@dataclass(frozen=True)
class CardProvenance:
    """Where the export came from: runs, software and code.

    Attributes:
        links: MLflow run ids of the stages behind the inputs, keyed by stage.
        export_run_id: this export's MLflow run id (None without tracking).
        versions: tool versions (:func:`pipeline.export.facts.tool_versions`).
        commit: the medsynth git commit (:func:`pipeline.export.facts.git_commit`).
    """

    links: Mapping[str, str]
    export_run_id: str | None
    versions: Mapping[str, str]
    commit: str


def build_facts(
    inputs: CardInputs,
    gate_outcome: CardGates,
    export: CardExport,
    provenance: CardProvenance,
    config: ExportConfig,
) -> dict[str, Any]:
    """Every fact the data card shows, as plain JSON-serialisable data (written as ``export.json``)."""
    real, synthetic, report, model = inputs.real, inputs.synthetic, inputs.report, inputs.model
    gates, privacy_gate, gates_overridden = gate_outcome.gates, gate_outcome.privacy_gate, gate_outcome.overridden
    augmented, excluded, preprocessing, modality = export.augmented, export.excluded, export.preprocessing, export.modality
    manifest = augmented.manifest
    labels = sorted(set(manifest["label"]))
    real_rows = manifest[manifest["origin"] == "real"]
    synthetic_rows = manifest[manifest["origin"] == "synthetic"]
    excluded_synthetic = excluded[excluded["origin"] == "synthetic"]
    excluded_real = excluded[excluded["origin"] == "real"]
    pretty_name = config.card.pretty_name or f"medsynth augmented {modality} dataset ({', '.join(labels)})"
    spec = preprocessing.get("spec") or {}
    spatial_dims = int(spec["spatial_dims"]) if spec else None
    thresholds = report["gates"].get("thresholds", {}) or {}
    privacy = report["privacy"]
    flagged_thresholds = sorted({float(v) for v in excluded_synthetic["threshold"] if str(v).strip()})

    tags = ["medical-imaging", modality.lower(), "synthetic", "gan", "medsynth"]
    if spatial_dims is not None:
        tags.append(f"{spatial_dims}d")
    tags.append(
        "privacy-gate-" + {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive", "not_run": "not-run"}[privacy_gate]
    )
    annotations = [config.card.real_annotations]
    if "machine-generated" not in annotations:
        annotations.append("machine-generated")
    front_matter = {
        "pretty_name": pretty_name,
        "license": config.card.license,
        "tags": tags,
        "task_categories": ["image-classification"],
        "size_categories": [size_category(len(manifest))],
        "source_datasets": [f"extended|{name}" for name in config.card.source_datasets] or ["original"],
        "annotations_creators": annotations,
    }
    banner: list[str] = []
    if gates_overridden and privacy_gate == "inconclusive":
        banner.append(
            "WARNING: the privacy gate was INCONCLUSIVE, which is not a pass: the evaluation had too few held-out "
            "subjects (or a privacy check did not run) to show that the synthetic images do not reproduce training "
            "patients. This dataset was exported only because an inconclusive verdict was accepted"
            f" ({gate_outcome.accepted_by}). Do not share it beyond the people allowed to see the real images."
        )
    elif gates_overridden:
        what = "FAILED" if privacy_gate == "fail" else "DID NOT RUN"
        banner.append(
            f"WARNING: the privacy gate {what}; this dataset was exported only because failed gates were allowed "
            "(--allow-failed-gates / export.allow_failed_gates). Its synthetic images may reproduce training "
            "patients: do not share it beyond the people allowed to see the real images."
        )
    training = _training(report)
    if training is not None and training["stopped_early"]:
        banner.append(
            f"WARNING: the generator stopped early ({training['stop_reason']}); its synthetic images are not "
            "those of the planned training run."
        )
    failed_other = [name for name in GATES if name != "privacy" and gates.get(name) == "fail"]
    if failed_other:
        banner.append(f"Note: the {', '.join(failed_other)} gate(s) failed; see the evaluation section before using the synthetic images.")
    open_other = [name for name in GATES if name != "privacy" and gates.get(name) in ("inconclusive", "not_run")]
    if open_other:
        banner.append(
            f"Note: the {', '.join(open_other)} gate(s) did not pass (inconclusive or not run); see the evaluation "
            "section before relying on those properties."
        )

    evaluation: dict[str, Any] = {
        "gates": [{"name": name, "status": gates[name]} for name in GATES],
        "thresholds": [{"name": key, "value": value} for key, value in thresholds.items() if not isinstance(value, dict)],
        "checks": _checks(report["gates"].get("checks"), report),
        "sentences": {name: str(text) for name, text in (report["gates"].get("sentences") or {}).items()},
        "feature_spaces": [
            {"name": str(name), "description": str(text)}
            for name, text in (report.get("feature_spaces") or {}).items()
            if not isinstance(text, (dict, list))
        ],
    }
    for name, headline in HEADLINE_KEYS.items():
        section = report[name]
        evaluation[name] = {
            **_section_tables(section, headline),
            "feature_space": _feature_space(section),
            "gate": gates[name],
        }
    evaluation["diversity"]["per_class"] = _per_class(report["diversity"])

    model_block: dict[str, Any] | None = None
    if model is not None:
        meta = model.meta
        model_block = {
            "spatial_dims": meta.spatial_dims,
            "image_size": meta.image_size,
            "spacing": meta.spacing,
            "labels": meta.labels,
            "latent_dim": meta.latent_dim,
            "seed": meta.seed,
            "steps": meta.steps,
            "dp": meta.dp,
            "config_hash": model.config_hash,
            "checkpoint_sha256": model.checkpoint_sha256,
            "train_dataset_digest": meta.train_dataset_digest,
            "initialized_from": meta.initialized_from,
            "loss": meta.config.get("loss"),
            "g_width": meta.config.get("g_width"),
            "d_width": meta.config.get("d_width"),
            "plan": model.plan,
        }
    grid = {
        "modality": modality,
        "spatial_dims": spatial_dims,
        "image_size": spec.get("image_size"),
        "spacing": spec.get("spacing"),
        "slice_spacing": spec.get("slice_spacing"),
        "orientation": spec.get("orientation"),
        "steps": list(preprocessing.get("steps", [])),
        "real": preprocessing.get("real"),
        "synthetic": preprocessing.get("synthetic"),
        "real_spacings": _distinct(real_rows["spacing"]) if "spacing" in real_rows else [],
        "real_shapes": _distinct(real_rows["shape"]) if "shape" in real_rows else [],
        "synthetic_spacings": _distinct(synthetic_rows["spacing"]) if "spacing" in synthetic_rows else [],
        "synthetic_shapes": _distinct(synthetic_rows["shape"]) if "shape" in synthetic_rows else [],
    }
    totals = {
        origin: int((manifest["origin"] == origin).sum()) for origin in ("real", "synthetic")
    }
    source_folders = {"real": real.root.name, "synthetic": synthetic.root.name, "out": export.out_name}
    return {
        "pretty_name": pretty_name,
        "front_matter": front_matter,
        "banner": banner,
        "privacy_gate": privacy_gate,
        "gates_overridden": gates_overridden,
        "counts": {
            "images": len(manifest),
            "real": totals["real"],
            "synthetic": totals["synthetic"],
            "real_sources": len(real.manifest) - len(excluded_real),
            "real_volumes_in": len(real.manifest),
            "synthetic_in": len(synthetic.manifest),
            "excluded_synthetic": len(excluded_synthetic),
            "excluded_real": len(excluded_real),
            "flagged": export.flagged,
            "subjects": int(real_rows["subject_id"].nunique()),
            "labels": labels,
            "splits": {split: int((manifest["split"] == split).sum()) for split in ("train", "val", "test")},
        },
        "composition": export.composition,
        "grid": grid,
        "provenance": {
            "ingest": {key: value for key, value in inputs.ingest.items() if key != "summary"},
            "anonymization": _anonymization(inputs.ingest.get("summary")),
            "versions": dict(provenance.versions),
            "git_commit": provenance.commit,
            "real_digest": real.digest,
            "synthetic_digest": synthetic.digest,
            "augmented_digest": augmented.digest,
        },
        "generation": {
            "model": model_block,
            "generator_runs": _distinct(synthetic.manifest["generator_run_id"]) or ["untracked (no MLflow run)"],
            "seeds": _distinct(synthetic.manifest["seed"]) if "seed" in synthetic.manifest else [],
            "model_digests": _distinct(synthetic.manifest["model_digest"]) if "model_digest" in synthetic.manifest else [],
            "per_class": {label: int((synthetic.manifest["label"] == label).sum()) for label in _distinct(synthetic.manifest["label"])},
            "descrip_example": _descrip_example(augmented),
        },
        "evaluation": evaluation,
        "training": training,
        "privacy_filter": {
            "flagged": export.flagged,
            "excluded": len(excluded_synthetic),
            "thresholds": flagged_thresholds,
            "min_distance": config.min_distance,
            "method": export.filter_how,
            "memorization_threshold": privacy.get("memorization_threshold"),
            "distance": privacy.get("distance") if isinstance(privacy.get("distance"), str) else None,
            "audited": privacy.get("n_synthetic"),
            "memorization_rate": privacy.get("memorization_rate"),
        },
        "links": dict(provenance.links),
        "export_run_id": provenance.export_run_id,
        "export_config": config.model_dump(mode="json"),
        "folders": source_folders,
        "dicom": {
            "enabled": config.dicom,
            "series": int((synthetic_rows["dicom_path"].str.len() > 0).sum()) if "dicom_path" in synthetic_rows else 0,
            "uid_root": config.uid_root,
        },
        "warnings": list(export.warnings),
        "contact": config.card.contact,
    }


def card_environment() -> jinja2.Environment:
    """The Jinja2 environment cards are rendered in: strict undefined fields and the card's filters."""
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; table cells are escaped with the `cell` filter
    )
    environment.filters.update(num=format_number, cell=_cell, yaml=_yaml, gate=_gate)
    return environment


def render_card(facts: Mapping[str, Any], template: str | os.PathLike[str] | None = None) -> str:
    """Render the data card from ``facts`` (see :func:`build_facts`).

    Raises:
        InputError: the template is missing, has a syntax error, or names a field the facts lack.
    """
    source = template_text(template)
    environment = card_environment()
    where = str(template) if template is not None else TEMPLATE_NAME
    try:
        compiled = environment.from_string(source)
        return compiled.render(**facts)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"{where} line {exc.lineno}: template syntax error ({exc.message}). Fix: correct the template.") from None
    except jinja2.UndefinedError as exc:
        raise InputError(
            f"{where}: the template uses a field the export does not provide ({exc.message}). "
            "Fix: use the fields listed in data_cards/README.md."
        ) from None
    except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        if template is None:
            raise  # the packaged template failing is a bug, not bad input
        # A custom template is user input: an expression that fails while rendering is bad input.
        raise InputError(
            f"{where}: the template failed while rendering ({type(exc).__name__}). Fix: correct the template "
            "expression (see data_cards/README.md for the fields and their types)."
        ) from None
