"""Export on the real chain: the phantom cohort ingested, a tiny trained model, its generated images,
a real evaluate report.

Three synthetic images are exact copies of preprocessed real training slices (what a memorizing
generator would emit): the report must flag them, export must leave them out, and export's own
distance measurement (used for images the report did not audit) must agree with the report's.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import scan_for_markers
from pipeline import evaluate, ingest
from pipeline.demo import make_cohort
from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.core.errors import CheckFailed, InputError
from pipeline.evaluate.config import EvaluateConfig
from pipeline.export import ExportConfig, run
from pipeline.export.card import format_number
from pipeline.core.files import sha256_file, write_nifti
from pipeline.ingest import audit
from pipeline.ingest.config import IngestConfig
from pipeline.models import generate, train
from pipeline.models.config import GenerateConfig, ModelConfig
from pipeline.imaging.preprocess import Preprocessor

pytestmark = pytest.mark.slow
COPIES = 3


def _add_copies(synthetic: Path, real: Path, model: Path) -> list[tuple[str, str]]:
    """Append COPIES exact copies of real training slices to the synthetic dataset; return (copy id, slice id)."""
    pre = Preprocessor.from_model_dir(model)
    dataset = read_dataset(synthetic)
    real_ds = read_dataset(real)
    images, labels, ids = pre.dataset_images(real_ds, real_ds.subset(split="train"))
    template = dataset.manifest.iloc[0]
    rows, pairs = [], []
    for k, index in enumerate(np.linspace(0, len(ids) - 1, COPIES).astype(int)):
        sample_id = f"syn-copy-{k:03d}"
        rel = f"images/{sample_id}.nii.gz"
        hu = np.asarray(pre.to_intensity(images[index, 0]), dtype=np.float32)[:, :, None]
        write_nifti(synthetic / rel, hu, pre.grid_affine(), descrip="synthetic (medsynth copy)")
        rows.append({**template.to_dict(), "sample_id": sample_id, "subject_id": sample_id, "label": labels[index],
                     "path": rel, "sha256": sha256_file(synthetic / rel)})
        pairs.append((sample_id, ids[index]))
    write_manifest(synthetic, pd.concat([dataset.manifest, pd.DataFrame(rows)], ignore_index=True))
    return pairs


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("chain")
    cohort = make_cohort(root / "raw", subjects=8, seed=5)
    ingest.run([root / "raw" / "dicom", root / "raw" / "nifti"], root / "real", IngestConfig(workers=1),
               labels=root / "raw" / "labels.csv", private=root / "private")
    # The phantom's 320 mm field of view on a 32 x 32 grid.
    train.run(root / "real", root / "model", ModelConfig(
        image_size=[32, 32], spacing=[10.0, 10.0], max_steps=20, batch_size=16, g_width=8, d_width=8, latent_dim=16,
        sample_every=0, log_model=False, checkpoint_every=100,
    ))
    generate.run(root / "model", root / "synthetic", GenerateConfig(per_class=6, seed=3))
    pairs = _add_copies(root / "synthetic", root / "real", root / "model")
    report = evaluate.run(root / "real", root / "synthetic", root / "report", EvaluateConfig(
        classifier_steps=20, bootstrap=20, kid_subsets=5, ms_ssim_pairs=10, min_holdout=2, min_test_subjects=2,
        match_repeats=1, feature_dim=16,
    ), model_dir=root / "model")
    return {"root": root, "report": report, "pairs": pairs, "phi": cohort.planted_phi}


def test_export_of_a_real_report_excludes_the_memorized_copies(chain: dict, tmp_path: Path) -> None:
    root, report = chain["root"], chain["report"]
    flagged = {entry["sample_id"]: entry for entry in report["privacy"]["flagged"]}
    copies = dict(chain["pairs"])
    assert set(copies) <= set(flagged)  # the report caught every copy
    summary = run(root / "real", root / "synthetic", root / "report", tmp_path / "out", ExportConfig(dicom=True),
                  model_dir=root / "model", allow_failed_gates=True)
    manifest = read_dataset(tmp_path / "out").manifest
    excluded = pd.read_csv(tmp_path / "out" / "excluded.csv", dtype=str, keep_default_na=False).set_index("sample_id")
    assert set(excluded.index) == set(flagged)
    assert not set(flagged) & set(manifest["sample_id"])
    for copy, source in copies.items():
        assert float(excluded.loc[copy, "distance"]) < 1e-3  # float32 round trip through HU
        assert excluded.loc[copy, "nearest_train_sample_id"] == source
    assert summary.synthetic_images == len(read_dataset(root / "synthetic").manifest) - len(flagged)
    assert set(manifest.loc[manifest["origin"] == "synthetic", "split"]) == {"train"}
    # The card carries the real report's numbers, gates and checks.
    card = (tmp_path / "out" / "data_card.md").read_text()
    for section, keys in (("fidelity", ("fid", "kid", "precision", "recall", "density", "coverage")),
                          ("diversity", ("ms_ssim",)),
                          ("privacy", ("memorization_rate", "dcr_synthetic_to_train", "dcr_holdout_to_train", "mia_auc")),
                          ("utility", ("synthetic_label_accuracy", "augmentation_gain"))):
        for key in keys:
            value = report[section][key]
            shown = format_number(value) if value is not None else f"not measured: {report[section][f'{key}_reason']}"
            assert f"| {key} | {shown} |" in card, (section, key)
    for gate in ("fidelity", "diversity", "privacy", "utility"):
        for check in report["gates"]["checks"][gate]:
            assert f"| {gate} | {check['name']} |" in card
    assert report["fidelity"]["feature_space"] in card
    if report["gates"]["privacy"] != "pass":
        assert card.splitlines()[1].startswith("# WARNING: the privacy gate")
        with pytest.raises(CheckFailed) as refused:
            run(root / "real", root / "synthetic", root / "report", tmp_path / "refused", ExportConfig(),
                model_dir=root / "model")
        for check in report["gates"]["checks"]["privacy"]:
            if check.get("verdict") == "fail":
                assert f"{check['name'].replace('_', ' ')} {check['value']:.4g}" in str(refused.value)
    # generate ran without MLflow: the card says the images are traced by model digest and seed.
    assert "untracked (no MLflow run)" in card and "model digest and seed" in card
    # Provenance comes from ingest's own record, quarantine list and audit log.
    record = json.loads((root / "real" / "ingest.json").read_text())
    assert f"edition {record['profile']['edition']}" in card
    for reason, count in record["quarantined"].items():
        assert f"| {reason} | {count} |" in card
    # Nothing planted as PHI in the raw cohort reaches the export.
    assert scan_for_markers(tmp_path / "out", chain["phi"]) == []


def test_export_measures_distances_as_the_report_does(chain: dict, tmp_path: Path) -> None:
    """With the report made to look as if it audited fewer images, export re-measures every image
    against the report's memorization threshold and must find exactly the images the report flagged."""
    root, report = chain["root"], json.loads((chain["root"] / "report" / "report.json").read_text())
    flagged = {entry["sample_id"] for entry in report["privacy"]["flagged"]}
    report["privacy"]["flagged"] = []
    report["privacy"]["n_synthetic"] = 1
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    run(root / "real", root / "synthetic", tmp_path / "report", tmp_path / "out", ExportConfig(),
        model_dir=root / "model", allow_failed_gates=True)
    excluded = pd.read_csv(tmp_path / "out" / "excluded.csv", dtype=str, keep_default_na=False)
    assert set(excluded["sample_id"]) == flagged


def _raw_patient_name(raw: Path) -> tuple[str, str]:
    """(family, given) name of a real patient of the raw cohort, as its DICOM headers hold it."""
    first = next(path for path in sorted((raw / "dicom").rglob("*")) if path.is_file() and path.suffix == ".dcm")
    name = pydicom.dcmread(first, stop_before_pixels=True).PatientName
    return str(name.family_name), str(name.given_name)


def test_the_export_passes_the_leak_audit_and_a_planted_name_is_found(chain: dict, tmp_path: Path) -> None:
    """`medsynth audit` agrees with export: its synthetic markers are no finding, a real patient's name is."""
    root = chain["root"]
    out = tmp_path / "out"
    run(root / "real", root / "synthetic", root / "report", out, ExportConfig(dicom=True), model_dir=root / "model",
        allow_failed_gates=True)
    sources = [root / "raw" / "dicom", root / "raw" / "nifti"]
    clean = audit(out, sources)
    assert clean.ok, clean.lines()
    assert clean.files > 0 and clean.identifiers > 0
    assert audit(out).ok  # structure only: the marker texts of a synthetic file are no finding either

    family, given = _raw_patient_name(root / "raw")
    series = sorted((out / "dicom").rglob("*.dcm"))
    planted = pydicom.dcmread(series[0])
    planted.SeriesDescription = f"SYNTHETIC lesion {family}"
    planted.save_as(series[0], enforce_file_format=True)
    synthetic_nifti = out / read_dataset(out).manifest.query("origin == 'synthetic'")["path"].iloc[0]
    image = nib.load(synthetic_nifti)
    header = image.header.copy()
    header["descrip"] = f"synthetic {given} {family}".encode()
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), synthetic_nifti)
    found = audit(out, sources)
    assert {(finding.path, finding.where, finding.kind) for finding in found.findings} == {
        (series[0].relative_to(out).as_posix(), "(0008,103E) SeriesDescription", "person name"),
        (synthetic_nifti.relative_to(out).as_posix(), "NIfTI descrip", "person name"),
    }
    shown = "\n".join(found.lines()).lower()
    assert family.lower() not in shown and given.lower() not in shown

    # Without the sources, a marker text with anything added to it is no longer a marker.
    planted = pydicom.dcmread(series[1])
    planted.StudyDescription = f"SYNTHETIC medsynth export of {family}"
    planted.save_as(series[1], enforce_file_format=True)
    structure = audit(out)
    assert [(finding.path, finding.where) for finding in structure.findings] == [
        (series[1].relative_to(out).as_posix(), "(0008,1030) StudyDescription")
    ]


def test_export_without_a_model_refuses_to_mix_grids(chain: dict, tmp_path: Path) -> None:
    """Real volumes on their native grid beside synthetic slices on the model grid: refused unless asked for."""
    root = chain["root"]
    real_shapes = {nib.load(path).shape for path in (root / "real" / "images").rglob("*.nii.gz")}
    assert all(len(shape) == 3 and shape[2] > 1 for shape in real_shapes)  # volumes; the model makes 32 x 32 slices
    with pytest.raises(InputError) as refused:
        run(root / "real", root / "synthetic", root / "report", tmp_path / "mixed", ExportConfig(),
            allow_failed_gates=True)
    message = str(refused.value)
    assert "not on the synthetic images' grid" in message and "32x32x1 voxels" in message
    assert "pass --model MODEL_DIR" in message and "export.real_grid: native" in message
    assert not (tmp_path / "mixed").exists()
    summary = run(root / "real", root / "synthetic", root / "report", tmp_path / "native",
                  ExportConfig(real_grid="native"), allow_failed_gates=True)
    assert summary.preprocessing == "copied unchanged"
    assert any("no model folder" in note for note in summary.warnings)
