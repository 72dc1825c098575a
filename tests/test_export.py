"""Export: augmented dataset, per-sample privacy filter, synthetic marking, data card, MLflow lineage.

The inputs are real files built to the stage contracts: a real dataset of CT-like phantom volumes
(as ingest writes it: native grid, HU, split by subject, quarantine.csv and audit.jsonl), a model
folder whose preprocessing spec comes from ``pipeline.imaging.preprocess.build_spec``, a synthetic
dataset on the model grid (as generate writes it) and a report.json with known figures and flags.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from pipeline import tracking
from pipeline.contracts.dataset import read_dataset, verify_checksums, write_manifest
from pipeline.core.errors import CheckFailed, InputError
from pipeline.export import EXCLUDED_COLUMNS, ExportConfig, run
from pipeline.export.card import card_environment, format_number, packaged_template
from pipeline.core.files import read_nifti, sha256_file, write_nifti
from pipeline.models.config import ModelConfig
from pipeline.imaging.preprocess import Preprocessor, build_spec

REPO = Path(__file__).resolve().parents[1]
LABELS = ("lesion", "normal")
GENERATOR_RUN = "0f3c9a1b2d4e4f6a8b0c1d2e3f405162"
SPLIT_OF = {0: "train", 1: "train", 2: "val", 3: "test"}


def _phantom(rng: np.random.Generator, label: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Air (-1000 HU), an elliptical body (~40 HU) and, for 'lesion', a bright disc, on every slice."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
    body = ((x - cx) / (shape[0] * 0.35)) ** 2 + ((y - cy) / (shape[1] * 0.3)) ** 2 <= 1.0
    image = np.where(body, 40.0, -1000.0)
    if label == "lesion":
        image[(x - cx - 3) ** 2 + (y - cy) ** 2 <= 9] = 160.0
    volume = (image[:, :, None] + rng.normal(0, 10, size=(*body.shape, shape[2]))).astype(np.float32)
    volume[:, :, 0] = -1000.0  # an air-only slice: the model preprocessing drops it
    return volume


def _real_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    spacing = (0.8, 0.8, 2.5)
    affine = np.diag([*spacing, 1.0])
    for label in LABELS:
        for index in range(4):
            sample_id = f"r{label[0]}{index}"
            volume = _phantom(rng, label, (40, 36, 4))
            rel = f"images/{sample_id}.nii.gz"
            write_nifti(root / rel, volume, affine)
            rows.append(dict(
                sample_id=sample_id, subject_id=f"sub-{label[0]}{index}", label=label, split=SPLIT_OF[index], path=rel,
                origin="real", sha256=sha256_file(root / rel), modality="CT", source_format="dicom",
                spacing="0.8x0.8x2.5", shape="40x36x4",
            ))
    write_manifest(root, pd.DataFrame(rows))
    # quarantine.csv, audit.jsonl and ingest.json in the formats pipeline/ingest/stage.py writes.
    reasons = ["burned-in annotation (BurnedInAnnotation=YES)", "not a DICOM or NIfTI file", "not a DICOM or NIfTI file"]
    pd.DataFrame([{"ref": f"q{k:04d}", "reason": reason, "sample_id": "", "format": "other"} for k, reason in enumerate(reasons)]
                 ).to_csv(root / "quarantine.csv", index=False)
    with open(root / "audit.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            rules = [{"tag": "(0010,0010)", "keyword": "PatientName", "action": "D", "rule": "pseudonym", "count": 1},
                     {"tag": "(0008,0020)", "keyword": "StudyDate", "action": "C", "rule": "modified_dates", "count": 4},
                     {"tag": "(0008,0080)", "keyword": "InstitutionName", "action": "X", "rule": "basic", "count": 4}]
            handle.write(json.dumps({"sample_id": row["sample_id"], "format": "dicom", "status": "written", "files": 4,
                                     "rules": rules}, sort_keys=True) + "\n")
    record = {
        "profile": {"standard": "DICOM PS3.15 Annex E, Table E.1-1", "edition": "2026c",
                    "table_source": "dicom-anonymizer==2.1.0 (dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c)",
                    "options": ["Retain Longitudinal Temporal Information with Modified Dates"]},
        "deid": {"modified_dates": True, "patient_characteristics": False, "device_identity": False,
                 "clean_descriptors": False, "safe_private": []},
        "burned_in": {"modalities": ["US", "OT"], "blank": []},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 0},
        "counts": {"files_seen": 35, "series_found": 8, "series_written": 8, "quarantined_files": 3, "subjects.train": 4},
        "quarantined": {"not a DICOM or NIfTI file": 2, "burned-in annotation (BurnedInAnnotation=YES)": 1},
    }
    (root / "ingest.json").write_text(json.dumps(record), encoding="utf-8")


# export checks that the synthetic rows' model_digest is the --model checkpoint's SHA-256.
CHECKPOINT_BYTES = b"stand-in checkpoint bytes"
MODEL_DIGEST = hashlib.sha256(CHECKPOINT_BYTES).hexdigest()


def _model_dir(root: Path, real: Path) -> dict:
    dataset = read_dataset(real)
    config = ModelConfig(image_size=[32, 32], spacing=[1.0, 1.0], max_steps=10)
    train_rows = dataset.subset(split="train")
    spec = build_spec(config, dataset, train_rows)
    train_images, _, _ = Preprocessor(spec).dataset_images(dataset, train_rows)
    info = {
        "format_version": 1, "medsynth_version": "0.1.0",
        "spatial_dims": 2, "image_size": [32, 32], "spacing": spec["spacing"], "labels": list(LABELS),
        "latent_dim": config.latent_dim, "mlflow_run_id": "train-run-1", "seed": 7, "steps": 10,
        "n_train_volumes": len(train_rows), "n_train_images": len(train_images),
        "config": config.model_dump(mode="json"), "preprocess": spec, "dp": None, "train_dataset_digest": dataset.digest,
    }
    root.mkdir(parents=True)
    (root / "model.json").write_text(json.dumps(info), encoding="utf-8")
    (root / "checkpoint.pt").write_bytes(CHECKPOINT_BYTES)
    return info


def _synthetic_dataset(root: Path, spec: dict, per_class: int = 5) -> None:
    """Single-slice (H, W, 1) NIfTI files in HU on the model grid, as generate writes them."""
    pre = Preprocessor(spec)
    rng = np.random.default_rng(1)
    rows = []
    for label in LABELS:
        for index in range(per_class):
            sample_id = f"syn-{label}-{index:03d}"
            hu = _phantom(rng, label, (32, 32, 2))[:, :, 1]
            image = np.asarray(pre.to_intensity(pre.from_intensity(hu)), dtype=np.float32)[:, :, None]
            rel = f"images/{sample_id}.nii.gz"
            write_nifti(root / rel, image, pre.grid_affine(), descrip=f"synthetic (medsynth {GENERATOR_RUN})")
            rows.append(dict(
                sample_id=sample_id, subject_id=sample_id, label=label, split="train", path=rel, origin="synthetic",
                sha256=sha256_file(root / rel), generator_run_id=GENERATOR_RUN, seed="3", model_digest=MODEL_DIGEST,
            ))
    write_manifest(root, pd.DataFrame(rows))


def _report(privacy_gate: str = "pass", flagged: tuple[str, ...] = ("syn-lesion-001", "syn-normal-004")) -> dict:
    return {
        "fidelity": {"fid": 23.456789, "kid": 0.00123, "precision": 0.6812, "recall": 0.5534, "density": 0.9132,
                     "coverage": 0.8411, "feature_space": "random-init ResNet-style CNN, 128-d"},
        "diversity": {"ms_ssim": 0.2871, "per_class": {"lesion": {"ms_ssim": 0.2911}, "normal": {"ms_ssim": 0.2803}}},
        "privacy": {
            "memorization_rate": 0.2 if privacy_gate == "fail" else 0.04, "dcr_synthetic_to_train": 1.734,
            "dcr_holdout_to_train": 1.512, "mia_auc": 0.5372, "epsilon": None, "epsilon_reason": "not trained with DP",
            "delta": None, "delta_reason": "not trained with DP", "gate": privacy_gate,
            "flagged": [
                {"sample_id": sample_id, "distance": 0.25 + 0.01 * k, "nearest_train_sample_id": f"rl0#z{k}", "threshold": 0.61}
                for k, sample_id in enumerate(flagged)
            ],
        },
        "utility": {"synthetic_label_accuracy": 0.925, "real_only": {"accuracy": 0.812},
                    "real_plus_synthetic": {"accuracy": 0.844}, "augmentation_gain": 0.032},
        "gates": {"fidelity": "pass", "diversity": "pass", "privacy": privacy_gate, "utility": "pass",
                  "thresholds": {"max_memorization_rate": 0.1, "max_mia_auc": 0.6}},
    }


def _write_report(folder: Path, report: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("export-inputs")
    _real_dataset(root / "real")
    info = _model_dir(root / "model", root / "real")
    _synthetic_dataset(root / "synthetic", info["preprocess"])
    return {
        "root": root, "real": root / "real", "synthetic": root / "synthetic", "model": root / "model", "info": info,
        "report": _write_report(root / "report", _report()),
        "failed": _write_report(root / "report-failed", _report("fail")),
        "not_run": _write_report(root / "report-not-run", _report("not_run", flagged=())),
        "inconclusive": _write_report(root / "report-inconclusive", _inconclusive_report()),
    }


def _inconclusive_report() -> dict:
    """A report whose privacy gate could not tell: its memorization test had too few held-out subjects."""
    report = _report("inconclusive", flagged=())
    power = ("with 12 held-out subjects, an excess above 0.18 would be detected with 80% power; "
             "about 40 held-out subjects would be needed for a pass")
    report["gates"]["checks"] = {
        "privacy": [
            {"name": "memorization_excess", "value": 0.01, "comparison": "<=", "threshold": 0.07, "verdict": "inconclusive",
             "meaning": "memorization beyond the held-out null", "reason": "too few held-out subjects", "power": power},
            {"name": "mia_auc_blackbox_pixel", "value": 0.52, "comparison": "<=", "threshold": 0.65, "passed": True,
             "verdict": "pass", "meaning": "distance attack", "power": "with 12 held-out subjects, ..."},
        ]
    }
    return report


@pytest.fixture(scope="module")
def exported(inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("export-out") / "export"
    summary = run(inputs["real"], inputs["synthetic"], inputs["report"], out, ExportConfig(dicom=True),
                  model_dir=inputs["model"], links={"ingest": "ingest-run-1", "evaluate": "eval-run-1"})
    return {"out": out, "summary": summary}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


# ------------------------------------------------------------------------------------------
# The augmented dataset
# ------------------------------------------------------------------------------------------


def test_synthetic_only_in_train_and_real_on_the_model_grid(inputs: dict, exported: dict) -> None:
    out = exported["out"]
    dataset = read_dataset(out)
    manifest = dataset.manifest
    assert verify_checksums(dataset) == []
    synthetic = manifest[manifest["origin"] == "synthetic"]
    real = manifest[manifest["origin"] == "real"]
    assert set(synthetic["split"]) == {"train"}
    assert set(manifest.loc[manifest["split"].isin(["val", "test"]), "origin"]) == {"real"}
    # Every real volume became its non-empty preprocessed slices, on the model grid, in HU.
    source = read_dataset(inputs["real"])
    pre = Preprocessor(inputs["info"]["preprocess"])
    for _, row in source.manifest.iterrows():
        data, affine = read_nifti(source.image_path(row))
        expected = pre.to_intensity(pre.volume_to_images(data, affine))
        slices = real[real["source_sample_id"] == row["sample_id"]].sort_values("slice_index", key=lambda s: s.astype(int))
        assert len(slices) == len(expected) == 3  # the air-only slice is dropped
        assert set(slices["split"]) == {row["split"]} and set(slices["subject_id"]) == {row["subject_id"]}
        for k, (_, exported_row) in enumerate(slices.iterrows()):
            assert exported_row["sample_id"] == f"{row['sample_id']}#z{k}"
            image, image_affine = read_nifti(out / exported_row["path"])
            assert image.shape == (32, 32, 1)
            np.testing.assert_allclose(image[:, :, 0], expected[k], atol=1e-3)
            np.testing.assert_allclose(image_affine, pre.grid_affine())
    assert set(real["preprocessing"]) == {"model-grid"}
    assert real["modality"].eq("CT").all()  # the real dataset's extra columns are carried over
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["spec"] == inputs["info"]["preprocess"]
    assert record["steps"] == list(pre.describe())


def test_synthetic_files_are_marked_and_traceable(inputs: dict, exported: dict) -> None:
    out = exported["out"]
    manifest = read_dataset(out).manifest
    synthetic = manifest[manifest["origin"] == "synthetic"]
    assert len(synthetic) == 8  # 10 generated, 2 flagged
    assert set(synthetic["generator_run_id"]) == {GENERATOR_RUN}
    assert set(synthetic["seed"]) == {"3"} and set(synthetic["model_digest"]) == {MODEL_DIGEST}
    source = read_dataset(inputs["synthetic"]).manifest.set_index("sample_id")
    for _, row in synthetic.iterrows():
        header = nib.load(out / row["path"]).header
        descrip = header["descrip"].item().decode()
        assert descrip.startswith("synthetic") and GENERATOR_RUN in descrip
        assert row["sha256"] == source.loc[row["sample_id"], "sha256"]  # copied byte for byte


def test_unmarked_files_are_re_marked_and_stray_splits_moved_to_train(inputs: dict, tmp_path: Path) -> None:
    import shutil

    synthetic = tmp_path / "synthetic"
    shutil.copytree(inputs["synthetic"], synthetic)
    manifest = read_dataset(synthetic).manifest
    data, affine = read_nifti(synthetic / manifest.loc[0, "path"])
    write_nifti(synthetic / manifest.loc[0, "path"], data, affine, descrip="GAN sample")  # no marker
    manifest.loc[0, "sha256"] = sha256_file(synthetic / manifest.loc[0, "path"])
    manifest.loc[1, "split"] = "test"
    write_manifest(synthetic, manifest)
    summary = run(inputs["real"], synthetic, _write_report(tmp_path / "r", _report(flagged=())), tmp_path / "out",
                  ExportConfig(), model_dir=inputs["model"])
    exported = read_dataset(tmp_path / "out").manifest.set_index("sample_id")
    row = exported.loc[manifest.loc[0, "sample_id"]]
    assert nib.load(tmp_path / "out" / row["path"]).header["descrip"].item().decode() == f"synthetic (medsynth {GENERATOR_RUN})"
    assert exported.loc[manifest.loc[1, "sample_id"], "split"] == "train"
    assert any("re-marked" in note for note in summary.warnings)
    assert any("moved to the train split" in note for note in summary.warnings)


def test_flagged_samples_are_excluded_and_listed_with_distance_and_reason(inputs: dict, exported: dict) -> None:
    out = exported["out"]
    manifest = read_dataset(out).manifest
    excluded = pd.read_csv(out / "excluded.csv", dtype=str, keep_default_na=False)
    assert list(excluded.columns) == list(EXCLUDED_COLUMNS)
    assert set(excluded["sample_id"]) == {"syn-lesion-001", "syn-normal-004"}
    assert not set(excluded["sample_id"]) & set(manifest["sample_id"])
    for path in (out / "train").rglob("*"):
        assert "syn-lesion-001" not in path.name and "syn-normal-004" not in path.name
    assert not (out / "dicom" / "syn-lesion-001").exists()
    row = excluded.set_index("sample_id").loc["syn-normal-004"]
    assert float(row["distance"]) == pytest.approx(0.26)
    assert float(row["threshold"]) == pytest.approx(0.61)
    assert row["nearest_train_sample_id"] == "rl0#z1"
    assert row["reason"].startswith("memorized") and row["generator_run_id"] == GENERATOR_RUN
    assert exported["summary"].excluded_synthetic == 2


def _nearest_train_distances(inputs: dict) -> dict[str, float]:
    """RMS distance of every preprocessed synthetic image to its closest preprocessed real train slice."""
    pre = Preprocessor(inputs["info"]["preprocess"])
    real, synthetic = read_dataset(inputs["real"]), read_dataset(inputs["synthetic"])
    train, _, _ = pre.dataset_images(real, real.subset(split="train"))
    images, _, ids = pre.dataset_images(synthetic)
    train = train.reshape(len(train), -1).astype(np.float64)
    out = {}
    for sample_id, image in zip(ids, images.reshape(len(images), -1).astype(np.float64)):
        out[sample_id] = float(np.sqrt(((train - image) ** 2).mean(axis=1)).min())
    return out


def test_min_distance_excludes_synthetic_images_closer_than_it(inputs: dict, tmp_path: Path) -> None:
    distances = _nearest_train_distances(inputs)
    limit = float(np.median(list(distances.values())))
    flagged = {"syn-lesion-001", "syn-normal-004"}
    summary = run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out", ExportConfig(min_distance=limit),
                  model_dir=inputs["model"])
    excluded = pd.read_csv(tmp_path / "out" / "excluded.csv", dtype=str, keep_default_na=False).set_index("sample_id")
    below = {sample_id for sample_id, distance in distances.items() if distance < limit}
    assert below and set(excluded.index) == below | flagged
    for sample_id in below - flagged:
        assert float(excluded.loc[sample_id, "distance"]) == pytest.approx(distances[sample_id], rel=1e-4)
        assert "export.min_distance" in excluded.loc[sample_id, "reason"]
        assert excluded.loc[sample_id, "nearest_train_sample_id"].split("#z")[0] in {"rl0", "rl1", "rn0", "rn1"}
    assert summary.synthetic_images == len(distances) - len(below | flagged)
    assert "measured by export" in (tmp_path / "out" / "data_card.md").read_text()


def test_per_sample_distances_in_the_report_are_used_as_given(inputs: dict, tmp_path: Path) -> None:
    report = _report(flagged=())
    ids = read_dataset(inputs["synthetic"]).manifest["sample_id"].tolist()
    report["privacy"]["per_sample"] = [
        {"sample_id": sample_id, "distance": 0.5 + 0.1 * k, "nearest_train_sample_id": "rn0#z0"} for k, sample_id in enumerate(ids)
    ]
    run(inputs["real"], inputs["synthetic"], _write_report(tmp_path / "r", report), tmp_path / "out",
        ExportConfig(min_distance=0.85), model_dir=inputs["model"])
    excluded = pd.read_csv(tmp_path / "out" / "excluded.csv", dtype=str, keep_default_na=False)
    assert set(excluded["sample_id"]) == {sample_id for k, sample_id in enumerate(ids) if 0.5 + 0.1 * k < 0.85}


def test_images_the_report_did_not_audit_are_held_to_its_threshold(inputs: dict, tmp_path: Path) -> None:
    distances = _nearest_train_distances(inputs)
    threshold = float(np.percentile(list(distances.values()), 30))
    report = _report(flagged=())
    report["privacy"].update(n_synthetic=4, memorization_threshold=threshold, memorization_space="pixel")
    run(inputs["real"], inputs["synthetic"], _write_report(tmp_path / "r", report), tmp_path / "out", ExportConfig(),
        model_dir=inputs["model"])
    excluded = pd.read_csv(tmp_path / "out" / "excluded.csv", dtype=str, keep_default_na=False)
    assert set(excluded["sample_id"]) == {sample_id for sample_id, d in distances.items() if d < threshold}
    assert all("memorization threshold" in reason for reason in excluded["reason"])


def test_3d_model_exports_one_volume_per_real_image_on_the_model_grid(inputs: dict, tmp_path: Path) -> None:
    real = read_dataset(inputs["real"])
    config = ModelConfig(spatial_dims=3, image_size=[16, 16, 8], spacing=[2.0, 2.0, 1.0], max_steps=10)
    spec = build_spec(config, real, real.subset(split="train"))
    model = tmp_path / "model3d"
    model.mkdir()
    (model / "checkpoint.pt").write_bytes(CHECKPOINT_BYTES)
    (model / "model.json").write_text(json.dumps({**inputs["info"], "spatial_dims": 3, "image_size": [16, 16, 8],
                                                  "spacing": spec["spacing"], "preprocess": spec}))
    pre = Preprocessor(spec)
    rows = []
    synthetic = tmp_path / "synthetic3d"
    for k, label in enumerate(LABELS):
        rel = f"images/syn3d-{k}.nii.gz"
        volume = np.asarray(pre.to_intensity(np.zeros((16, 16, 8), np.float32)), dtype=np.float32)
        write_nifti(synthetic / rel, volume, pre.grid_affine(), descrip=f"synthetic (medsynth {GENERATOR_RUN})")
        rows.append(dict(sample_id=f"syn3d-{k}", subject_id=f"syn3d-{k}", label=label, split="train", path=rel,
                         origin="synthetic", sha256=sha256_file(synthetic / rel), generator_run_id=GENERATOR_RUN,
                         seed="1", model_digest=MODEL_DIGEST))
    write_manifest(synthetic, pd.DataFrame(rows))
    run(inputs["real"], synthetic, _write_report(tmp_path / "r", _report(flagged=())), tmp_path / "out",
        ExportConfig(dicom=True), model_dir=model)
    manifest = read_dataset(tmp_path / "out").manifest
    exported_real = manifest[manifest["origin"] == "real"]
    assert sorted(exported_real["sample_id"]) == sorted(real.manifest["sample_id"])  # no per-slice ids in 3D
    for _, row in exported_real.iterrows():
        image, affine = read_nifti(tmp_path / "out" / row["path"])
        assert image.shape == (16, 16, 8)
        np.testing.assert_allclose(affine, pre.grid_affine())
    series = sorted((tmp_path / "out" / "dicom" / "syn3d-0").glob("*.dcm"))
    assert len(series) == 8  # one file per axial slice of the synthetic volume
    positions = [float(pydicom.dcmread(path).ImagePositionPatient[2]) for path in series]
    assert np.allclose(np.diff(positions), 1.0)


def test_without_model_real_images_are_copied_unchanged(inputs: dict, tmp_path: Path) -> None:
    summary = run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out", ExportConfig(real_grid="native"))
    manifest = read_dataset(tmp_path / "out").manifest
    real = manifest[manifest["origin"] == "real"]
    source = read_dataset(inputs["real"]).manifest
    assert sorted(real["sha256"]) == sorted(source["sha256"])
    assert set(real["preprocessing"]) == {"none"}
    assert not (tmp_path / "out" / "dicom").exists()  # export.dicom is off by default
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "copied unchanged" in card
    assert any("no model folder" in warning for warning in summary.warnings)


# ------------------------------------------------------------------------------------------
# The privacy gate
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("report_key", ["failed", "not_run"])
def test_failed_or_missing_privacy_gate_refuses_export(inputs: dict, tmp_path: Path, report_key: str) -> None:
    with pytest.raises(CheckFailed) as caught:
        run(inputs["real"], inputs["synthetic"], inputs[report_key], tmp_path / "out", ExportConfig(), model_dir=inputs["model"])
    message = str(caught.value)
    assert message.startswith("export refused") and "--allow-failed-gates" in message
    if report_key == "failed":
        assert "memorization rate 0.2 (max 0.1)" in message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_allow_failed_gates_exports_and_the_card_says_so_first(inputs: dict, tmp_path: Path) -> None:
    summary = run(inputs["real"], inputs["synthetic"], inputs["failed"], tmp_path / "out", ExportConfig(),
                  model_dir=inputs["model"], allow_failed_gates=True)
    assert summary.gates_overridden and summary.privacy_gate == "fail"
    assert any("WARNING" in line for line in summary.lines())
    card = (tmp_path / "out" / "data_card.md").read_text()
    lines = card.splitlines()
    assert lines[0] == "---" and lines[1].startswith("# WARNING: the privacy gate FAILED")
    body = card.split("---\n", 2)[2].lstrip().splitlines()
    assert body[0].startswith("> **WARNING: the privacy gate FAILED")
    front = _front_matter(card)
    assert front["medsynth"]["privacy_gate"] == "fail" and front["medsynth"]["gates_overridden"] is True
    assert "privacy-gate-failed" in front["tags"]
    # The config key does the same as the flag.
    run(inputs["real"], inputs["synthetic"], inputs["failed"], tmp_path / "out2", ExportConfig(allow_failed_gates=True),
        model_dir=inputs["model"])
    assert "WARNING: the privacy gate FAILED" in (tmp_path / "out2" / "data_card.md").read_text().splitlines()[1]


def test_inconclusive_privacy_gate_is_refused_like_a_failure(inputs: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckFailed) as caught:
        run(inputs["real"], inputs["synthetic"], inputs["inconclusive"], tmp_path / "out", ExportConfig(),
            model_dir=inputs["model"])
    message = str(caught.value)
    assert message.startswith("export refused: the privacy gate of") and "is inconclusive, which is not a pass" in message
    assert "about 40 held-out subjects would be needed" in message and "--accept-inconclusive" in message
    assert not (tmp_path / "out").exists()


def test_accept_inconclusive_exports_and_the_card_says_so_first(inputs: dict, tmp_path: Path) -> None:
    summary = run(inputs["real"], inputs["synthetic"], inputs["inconclusive"], tmp_path / "out",
                  ExportConfig(accept_inconclusive=True), model_dir=inputs["model"])
    assert summary.gates_overridden and summary.privacy_gate == "inconclusive"
    assert any("INCONCLUSIVE" in line and "WARNING" in line for line in summary.lines())
    assert "privacy INCONCLUSIVE" in "\n".join(summary.lines())
    card = (tmp_path / "out" / "data_card.md").read_text()
    lines = card.splitlines()
    assert lines[0] == "---" and lines[1].startswith("# WARNING: the privacy gate was INCONCLUSIVE, which is not a pass")
    assert "--accept-inconclusive / export.accept_inconclusive" in lines[1]
    body = card.split("---\n", 2)[2].lstrip().splitlines()
    assert body[0].startswith("> **WARNING: the privacy gate was INCONCLUSIVE")
    front = _front_matter(card)
    assert front["medsynth"]["privacy_gate"] == "inconclusive" and "privacy-gate-inconclusive" in front["tags"]
    # The gate table shows the three states distinctly, and each gated figure's space.
    assert "| privacy | **INCONCLUSIVE** (not a pass) |" in card
    assert "| privacy | memorization_excess | pixel (pixel: RMS distance of preprocessed images) |" in card
    assert "| privacy | mia_auc_blackbox_pixel | pixel (distance to the nearest synthetic image) |" in card
    # Accepting inconclusive does not accept a failure.
    with pytest.raises(CheckFailed, match="--allow-failed-gates"):
        run(inputs["real"], inputs["synthetic"], inputs["failed"], tmp_path / "out2",
            ExportConfig(accept_inconclusive=True), model_dir=inputs["model"])


# ------------------------------------------------------------------------------------------
# DICOM marking
# ------------------------------------------------------------------------------------------


def test_synthetic_dicom_rereads_with_the_required_tags_and_no_patient_data(inputs: dict, exported: dict) -> None:
    from pydicom import config as dicom_config
    from pydicom.pixels import apply_rescale

    out = exported["out"]
    manifest = read_dataset(out).manifest
    synthetic = manifest[manifest["origin"] == "synthetic"]
    assert synthetic["dicom_path"].str.len().gt(0).all()
    previous = dicom_config.settings.reading_validation_mode
    dicom_config.settings.reading_validation_mode = dicom_config.RAISE
    uids: set[str] = set()
    try:
        for _, row in synthetic.iterrows():
            files = sorted((out / row["dicom_path"]).glob("*.dcm"))
            assert len(files) == 1  # a 2D image is one single-slice series
            ds = pydicom.dcmread(files[0])
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert ds.SeriesDescription.startswith("SYNTHETIC")
            assert GENERATOR_RUN in ds.DerivationDescription
            assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
                assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
            uids.update((ds.SeriesInstanceUID, ds.SOPInstanceUID))
            patient = {element.keyword: element.value for element in ds if element.tag.group == 0x0010 and element.value not in ("", None)}
            assert patient == {"PatientName": "SYNTHETIC", "PatientID": "SYNTHETIC"}
            assert ds.PatientIdentityRemoved == "YES"
            image, affine = read_nifti(out / row["path"])
            hu = apply_rescale(ds.pixel_array, ds)
            np.testing.assert_allclose(hu.T, np.rint(image[:, :, 0]), atol=0.5)
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx([abs(affine[1, 1]), abs(affine[0, 0])])
    finally:
        dicom_config.settings.reading_validation_mode = previous
    assert len(uids) == 2 * len(synthetic)  # every series and instance UID is new and distinct
    studies = {pydicom.dcmread(path).StudyInstanceUID for path in (out / "dicom").rglob("*.dcm")}
    assert len(studies) == 1


def test_dicom_uids_use_the_configured_root(inputs: dict, tmp_path: Path) -> None:
    root = "1.2.826.0.1.3680043.10.999"
    run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out", ExportConfig(dicom=True, uid_root=root),
        model_dir=inputs["model"])
    files = sorted((tmp_path / "out" / "dicom").rglob("*.dcm"))
    assert len(files) == 8
    for path in files:
        ds = pydicom.dcmread(path)
        assert all(str(uid).startswith(root + ".") for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    with pytest.raises(ValueError, match="dotted digits"):
        ExportConfig(uid_root="1.2.03")


# ------------------------------------------------------------------------------------------
# The data card
# ------------------------------------------------------------------------------------------


def test_card_has_every_section_and_the_reports_numbers(inputs: dict, exported: dict) -> None:
    out = exported["out"]
    card = (out / "data_card.md").read_text()
    report = json.loads((inputs["report"] / "report.json").read_text())
    front = _front_matter(card)
    assert front["annotations_creators"] == ["found", "machine-generated"]
    assert front["size_categories"] == ["n<1K"] and front["license"] == "other"
    assert front["task_categories"] == ["image-classification"]
    assert {"synthetic", "ct", "medical-imaging", "privacy-gate-passed"} <= set(front["tags"])
    for heading in ("## Summary", "## Provenance", "## Composition", "### Image grid and spacing", "## Generation",
                    "### Fidelity", "### Diversity", "### Privacy", "### Utility", "## Intended use",
                    "### Out-of-scope uses", "## Limitations and ethical considerations", "## How to reproduce"):
        assert f"\n{heading}\n" in card, heading
    for section, keys in (("fidelity", ("fid", "kid", "precision", "recall", "density", "coverage")),
                          ("privacy", ("memorization_rate", "dcr_synthetic_to_train", "dcr_holdout_to_train", "mia_auc")),
                          ("utility", ("synthetic_label_accuracy", "augmentation_gain")), ("diversity", ("ms_ssim",))):
        for key in keys:
            assert f"| {key} | {format_number(report[section][key])} |" in card, (section, key)
    assert f"| real_only.accuracy | {format_number(0.812)} |" in card
    assert "| epsilon | not measured: not trained with DP |" in card
    assert "random-init ResNet-style CNN, 128-d" in card
    for gate in ("fidelity", "diversity", "privacy", "utility"):
        assert f"| {gate} | pass |" in card
    # Composition: counts per split x label x origin, straight from the manifest.
    manifest = read_dataset(out).manifest
    for (split, label), rows in manifest.groupby(["split", "label"]):
        real = int((rows["origin"] == "real").sum())
        synthetic = int((rows["origin"] == "synthetic").sum())
        assert f"| {split} | {label} | {real} | {synthetic} | {real + synthetic} |" in card
    assert f"**{len(manifest)}**" in card
    # Provenance: quarantine by reason, audit actions, tools and the commit.
    assert "| not a DICOM or NIfTI file | 2 |" in card and "| burned-in annotation (BurnedInAnnotation=YES) | 1 |" in card
    assert "| inputs quarantined by ingest | 3 |" in card
    assert "| X: removed | 32 |" in card and "| C: cleaned (dates shifted / descriptors cleaned) | 32 |" in card
    assert "8 series records: 8 written" in card
    assert "edition 2026c" in card and "Retain Longitudinal Temporal Information with Modified Dates" in card
    assert "| deid.modified_dates | yes |" in card and "| files_seen | 35 |" in card and "| split.seed | 0 |" in card
    for tool in ("medsynth", "torch", "monai", "pydicom", "nibabel", "mlflow"):
        assert f"\n| {tool} | " in card, tool
    assert "medsynth git commit" in card
    # Generation: model facts, run ids, config hash, seeds.
    facts = json.loads((out / "export.json").read_text())
    assert facts["generation"]["model"]["config_hash"] in card
    assert "`train-run-1`" in card and "`ingest-run-1`" in card and "`eval-run-1`" in card and GENERATOR_RUN in card
    assert "| generation seed(s) | 3 |" in card and "| training seed | 7 |" in card
    assert "Not for diagnosis" in card and "Never as a test or validation set" in card and "deepfake" in card
    # Never a placeholder, an unrendered field or a Python None.
    for bad in ("{{", "{%", "TODO"):
        assert bad not in card, bad
    for word in ("None", "nan", "null", "undefined"):
        assert not re.search(rf"\b{word}\b", card.split("---\n", 2)[2]), word


def test_card_template_is_shipped_once_and_every_field_is_documented() -> None:
    from jinja2 import meta, nodes

    from pipeline.export.card import template_text

    packaged = packaged_template()
    assert packaged.is_file()
    assert template_text() == packaged.read_text(encoding="utf-8")
    # The package's template is the only one: a copy beside the README would drift from it.
    assert not list((REPO / "data_cards").glob("*.j2"))
    readme = (REPO / "data_cards" / "README.md").read_text()
    tree = card_environment().parse(packaged.read_text())
    # The README names every variable the template reads from the export's facts ...
    variables = meta.find_undeclared_variables(tree)
    assert {"counts", "composition", "evaluation", "provenance", "generation"} <= variables
    for variable in variables:
        assert f"`{variable}`" in readme, variable
    # ... and every field it reads from them (Jinja's own `loop.*` and dict methods aside).
    methods = {id(call.node) for call in tree.find_all(nodes.Call)}
    fields = {
        node.attr
        for node in tree.find_all(nodes.Getattr)
        if id(node) not in methods and not (isinstance(node.node, nodes.Name) and node.node.name == "loop")
    }
    fields |= {
        node.arg.value
        for node in tree.find_all(nodes.Getitem)
        if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str)
    }
    assert {"audit_status", "descrip_example", "has_reference", "memorization_threshold"} <= fields
    undocumented = sorted(field for field in fields if not re.search(rf"`[^`\n]*\b{re.escape(field)}\b[^`\n]*`", readme))
    assert not undocumented, undocumented


def test_custom_template_and_undefined_fields(inputs: dict, tmp_path: Path) -> None:
    template = tmp_path / "card.md.j2"
    template.write_text("---\nlicense: {{ front_matter.license }}\n---\n# {{ pretty_name }}: {{ counts.synthetic }} synthetic\n")
    config = ExportConfig.model_validate({"card": {"template": str(template), "license": "cc-by-nc-4.0",
                                                   "pretty_name": "Phantom CT"}})
    run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out", config, model_dir=inputs["model"])
    assert (tmp_path / "out" / "data_card.md").read_text() == "---\nlicense: cc-by-nc-4.0\n---\n# Phantom CT: 8 synthetic\n"
    template.write_text("{{ no_such_field }}\n")
    with pytest.raises(InputError, match="no_such_field"):
        run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out2", config, model_dir=inputs["model"])
    assert not (tmp_path / "out2").exists()
    for broken, message in ((b"# Fran\xe7ais {{ pretty_name }}\n", "not a readable UTF-8"),  # Latin-1, not UTF-8
                            (b"{{ counts.synthetic / 0 }}\n", "failed while rendering"),
                            (b"{{ pretty_name(1) }}\n", "failed while rendering")):
        template.write_bytes(broken)
        with pytest.raises(InputError, match=message):
            run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out3", config, model_dir=inputs["model"])
        assert not (tmp_path / "out3").exists()


# ------------------------------------------------------------------------------------------
# Inputs and re-runs
# ------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_a_clear_message(inputs: dict, tmp_path: Path) -> None:
    model = inputs["model"]
    with pytest.raises(InputError, match=r"column 'origin': expected 'real'"):
        run(inputs["synthetic"], inputs["synthetic"], inputs["report"], tmp_path / "a", ExportConfig(), model_dir=model)
    with pytest.raises(InputError, match="report not found"):
        run(inputs["real"], inputs["synthetic"], tmp_path / "nowhere", tmp_path / "b", ExportConfig(), model_dir=model)
    broken = _report()
    del broken["gates"]["privacy"]
    with pytest.raises(InputError, match=r"'gates.privacy'"):
        run(inputs["real"], inputs["synthetic"], _write_report(tmp_path / "r1", broken), tmp_path / "c", ExportConfig())
    stranger = _report(flagged=("syn-from-another-run",))
    with pytest.raises(InputError, match="another synthetic dataset"):
        run(inputs["real"], inputs["synthetic"], _write_report(tmp_path / "r2", stranger), tmp_path / "d", ExportConfig())
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(inputs["synthetic"], twin)
    manifest = read_dataset(twin).manifest
    manifest.loc[0, "sample_id"] = "rl0"  # a real sample id
    write_manifest(twin, manifest)
    with pytest.raises(InputError, match="also a real sample id"):
        run(inputs["real"], twin, inputs["report"], tmp_path / "e", ExportConfig())
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.docx").write_text("not an export")
    with pytest.raises(InputError, match="refusing to replace"):
        run(inputs["real"], inputs["synthetic"], inputs["report"], occupied, ExportConfig())
    assert (occupied / "thesis.docx").is_file()
    with pytest.raises(InputError, match="overlaps"):
        run(inputs["real"], inputs["synthetic"], inputs["report"], inputs["real"] / "export", ExportConfig())
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    with pytest.raises(InputError, match="cannot be created: .*notes.txt is a file"):
        run(inputs["real"], inputs["synthetic"], inputs["report"], blocker / "export", ExportConfig())


def test_malformed_model_preprocess_and_report_distances_are_input_errors(inputs: dict, tmp_path: Path) -> None:
    """An edited model.json or report.json is bad input (exit 2), not an unexpected crash, and nothing is written."""
    import shutil

    for key in ("spatial_dims", "window"):
        model = tmp_path / f"model-{key}"
        shutil.copytree(inputs["model"], model)
        info = json.loads((model / "model.json").read_text())
        del info["preprocess"][key]
        (model / "model.json").write_text(json.dumps(info))
        with pytest.raises(InputError, match=rf"model.json: key 'preprocess' .*missing key '{key}'"):
            run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / f"out-{key}", ExportConfig(), model_dir=model)
        assert not (tmp_path / f"out-{key}").exists()
    for edit, message in (({"labels": "lesion,normal"}, "key 'labels' is not valid .*valid list"),
                          ({"config": "default"}, "key 'config' is not valid .*valid dictionary"),
                          ({"spatial_dims": None}, "key 'spatial_dims' is not valid .*valid integer"),
                          ({"latent_dim": "__delete__"}, "key 'latent_dim' is missing")):
        model = tmp_path / "model-edited"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(inputs["model"], model)
        info = json.loads((model / "model.json").read_text())
        info.update(edit)
        info = {key: value for key, value in info.items() if value != "__delete__"}
        (model / "model.json").write_text(json.dumps(info))
        with pytest.raises(InputError, match=message):
            run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out-e", ExportConfig(), model_dir=model)
    report = _report(flagged=())
    ids = read_dataset(inputs["synthetic"]).manifest["sample_id"].tolist()
    for bad in ("far", float("nan")):
        report["privacy"]["per_sample"] = [{"sample_id": sample_id, "distance": 0.9} for sample_id in ids]
        report["privacy"]["per_sample"][3]["distance"] = bad
        with pytest.raises(InputError, match=r"'privacy.per_sample\[3\].distance' is not a number"):
            run(inputs["real"], inputs["synthetic"], _write_report(tmp_path / "r", report), tmp_path / "out-d",
                ExportConfig(min_distance=0.5), model_dir=inputs["model"])


def test_re_export_replaces_the_previous_one(inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(inputs["real"], inputs["synthetic"], _write_report(tmp_path / "r1", _report(flagged=())), out, ExportConfig(),
        model_dir=inputs["model"])
    assert (out / "train" / "lesion" / "syn-lesion-001.nii.gz").is_file()
    first = read_dataset(out).manifest
    run(inputs["real"], inputs["synthetic"], inputs["report"], out, ExportConfig(), model_dir=inputs["model"])
    second = read_dataset(out).manifest
    assert not (out / "train" / "lesion" / "syn-lesion-001.nii.gz").exists()  # now flagged: gone from disk too
    assert len(first) - len(second) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "r1"]  # no staging or backup left


# ------------------------------------------------------------------------------------------
# MLflow lineage and the command line
# ------------------------------------------------------------------------------------------


def test_mlflow_lineage_inputs_output_artifacts_and_links(inputs: dict, mlflow_store: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    with tracking.stage_run("export", "medsynth-export-test") as tracker:
        summary = run(inputs["real"], inputs["synthetic"], inputs["report"], tmp_path / "out", ExportConfig(),
                      model_dir=inputs["model"], tracker=tracker,
                      links={"ingest": "i-run", "train": "t-run", "generate": "g-run", "evaluate": "e-run"})
    record = tracking.get_run(tracker.run_id)
    contexts = {}
    for item in record.inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        contexts[tags["mlflow.data.context"]] = (item.dataset.name, item.dataset.digest, tags)
    assert set(contexts) == {"real", "synthetic", "output"}
    assert contexts["real"][1] == read_dataset(inputs["real"]).digest[:32]
    assert contexts["synthetic"][1] == read_dataset(inputs["synthetic"]).digest[:32]
    assert contexts["output"][0] == "augmented" and contexts["output"][2]["sha256"] == summary.digest
    assert contexts["output"][2]["n_synthetic_train"] == str(summary.synthetic_images)
    tags = record.data.tags
    assert tags["medsynth.report_run_id"] == "e-run" and tags["medsynth.evaluate_run_id"] == "e-run"
    assert tags["medsynth.train_run_id"] == "t-run" and tags["medsynth.generate_run_id"] == "g-run"
    assert tags["medsynth.privacy_gate"] == "pass" and tags["medsynth.augmented_sha256"] == summary.digest
    assert record.data.metrics["excluded_synthetic"] == 2.0
    artifacts = {item.path for item in MlflowClient().list_artifacts(tracker.run_id, "export")}
    assert {"export/data_card.md", "export/manifest.csv", "export/excluded.csv", "export/export.json"} <= artifacts
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert f"| export | `{tracker.run_id}` |" in card


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the `medsynth` entry point in-process; return (exit code, stdout, stderr)."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    captured = capsys.readouterr()
    return int(exited.value.code), captured.out, captured.err


def test_cli_export_success_refusal_and_override(
    inputs: dict, mlflow_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["export", "--real", str(inputs["real"]), "--synthetic", str(inputs["synthetic"]), "--model", str(inputs["model"])]
    code, out, err = _cli([*base, "--report", str(inputs["report"]), "--out", str(tmp_path / "ok")], capsys)
    assert code == 0, err
    assert "Augmented dataset written to" in out and "data_card.md" in out
    code, out, err = _cli([*base, "--report", str(inputs["failed"]), "--out", str(tmp_path / "no")], capsys)
    assert code == 1
    assert err.startswith("check failed: export refused") and "--allow-failed-gates" in err
    assert "Traceback" not in err and not (tmp_path / "no").exists()
    code, out, err = _cli([*base, "--report", str(inputs["failed"]), "--out", str(tmp_path / "forced"),
                           "--allow-failed-gates"], capsys)
    assert code == 0, err
    assert "WARNING" in out
    code, out, err = _cli([*base, "--report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "report not found" in err
    runs = tracking.list_runs("medsynth")
    assert {r.data.tags.get("medsynth.refused") for r in runs} >= {"privacy gate fail"}
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"}
