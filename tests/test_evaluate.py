"""Acceptance: the evaluate stage tells good synthetic data from bad, on controlled cases.

One real cohort (two classes of phantom slices, NIfTI + manifest with train/val/test splits) and
synthetic sets derived from it whose verdict is known: identical copies, near-copies, independent
draws, one image per class repeated, white noise and swapped labels. Each case runs the whole
stage (``pipeline.evaluate.run``) once; the tests read its report.json and report.html.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pipeline.evaluate import run
from pipeline.evaluate.config import EvaluateConfig
from _controlled import make_real_dataset, make_synthetic_dataset

FAST = {
    "classifier_steps": 150,
    "classifier_batch_size": 32,
    "utility_seeds": 2,
    "bootstrap": 200,
    "kid_subsets": 10,
    "ms_ssim_pairs": 30,
    "match_repeats": 2,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    make_real_dataset(root / "real", per_class=60, size=32, seed=0, fractions=(0.5, 0.25, 0.25))
    return root


@pytest.fixture(scope="module")
def evaluated(cohort: Path):
    """``evaluated(kind)`` -> report dict; each case is generated and evaluated once per module."""
    from pipeline.contracts.dataset import read_dataset

    done: dict[str, dict[str, Any]] = {}

    def evaluate(kind: str) -> dict[str, Any]:
        if kind not in done:
            synthetic = cohort / f"synthetic-{kind}"
            make_synthetic_dataset(synthetic, read_dataset(cohort / "real"), kind, per_class=40, seed=1)
            done[kind] = run(cohort / "real", synthetic, cohort / f"report-{kind}", EvaluateConfig(**FAST))
        return done[kind]

    return evaluate


def test_identical_sets_read_as_the_same_distribution(evaluated) -> None:
    report = evaluated("identical")
    fidelity = report["fidelity"]
    assert fidelity["fid"] == pytest.approx(0.0, abs=1e-6)
    assert fidelity["reference"]["fid"] > 1.0  # held-out real images are a different sample: FID > 0
    assert fidelity["precision"] >= 0.95 and fidelity["recall"] >= 0.95
    assert fidelity["density"] >= 0.95 and fidelity["coverage"] >= 0.95
    assert report["gates"]["fidelity"] == "pass"
    # Exact copies of training images are the extreme of memorization.
    assert report["privacy"]["memorization_rate"] == 1.0
    assert report["gates"]["privacy"] == "fail"


def test_noisy_copies_of_training_images_fail_the_privacy_gate(evaluated, cohort: Path) -> None:
    report = evaluated("noisy_copies")
    privacy = report["privacy"]
    assert privacy["memorization_rate"] > 0.5
    assert privacy["gate"] == report["gates"]["privacy"] == "fail"
    assert privacy["mia_auc"] > 0.9
    assert privacy["dcr_synthetic_to_train"] < privacy["dcr_holdout_to_train"] / 5
    flagged = privacy["flagged"]
    assert len(flagged) == round(privacy["memorization_rate"] * privacy["n_synthetic"])
    # Each flagged near-copy points at the training slice it was copied from (same order as written).
    synthetic = json.loads((cohort / "report-noisy_copies" / "report.json").read_text())["privacy"]["flagged"]
    assert synthetic == flagged
    import pandas as pd

    manifest = pd.read_csv(cohort / "real" / "manifest.csv")
    train_ids = sorted(manifest.loc[manifest["split"] == "train", "sample_id"])
    for entry in flagged:
        index = int(entry["sample_id"].split("-")[1])
        assert entry["nearest_train_sample_id"] == f"{train_ids[index]}#z0"
        assert entry["distance"] < entry["threshold"] == privacy["memorization_threshold"]
    check = {c["name"]: c for c in report["gates"]["checks"]["privacy"]}["memorization_excess"]
    assert check["verdict"] == "fail" and check["passed"] is False
    assert check["threshold"] == report["gates"]["thresholds"]["max_memorization_excess"]
    # Fail on evidence: the excess over the measured null rate and its whole interval lie above 0.
    assert privacy["memorization_excess_ci_low"] > 0 and privacy["memorization_p_value"] < 0.05
    assert privacy["memorization_excess"] == pytest.approx(privacy["memorization_rate"] - privacy["memorization_null_rate"], abs=0.1)
    assert "closer to training images than held-out patients" in report["gates"]["sentences"]["privacy"]


def test_independent_draws_pass_privacy_near_the_baseline(evaluated) -> None:
    report = evaluated("independent")
    privacy = report["privacy"]
    assert privacy["memorization_rate"] < 0.1
    assert privacy["mia_auc"] < 0.65
    # Honest draws are never failed; whether they pass depends on the power this held-out size gives,
    # and the report says which and what a pass would need.
    assert report["gates"]["privacy"] in ("pass", "inconclusive")
    for check in report["gates"]["checks"]["privacy"]:
        assert check["verdict"] in ("pass", "inconclusive") and "would be detected" in check["power"], check
        if check["verdict"] == "inconclusive":
            assert "held-out subjects" in check["finding"]
    for name, attack in privacy["mia_attacks"].items():
        assert 0.0 <= attack["tpr_at_1pct_fpr"] <= attack["tpr_at_10pct_fpr"] <= 1.0, name
    assert report["gates"]["fidelity"] == "pass"
    assert report["gates"]["diversity"] == "pass"
    assert report["gates"]["utility"] == "pass"
    ratios = report["fidelity"]["ratios"]
    assert 0.7 < ratios["precision"] < 1.3 and 0.7 < ratios["coverage"] < 1.3


def test_one_image_per_class_shows_as_collapse(evaluated) -> None:
    collapsed, healthy = evaluated("one_per_class"), evaluated("independent")
    assert collapsed["fidelity"]["recall"] < 0.2 < healthy["fidelity"]["recall"]
    assert collapsed["fidelity"]["coverage"] < healthy["fidelity"]["coverage"] / 2
    assert collapsed["diversity"]["ms_ssim"] > 0.99
    assert collapsed["diversity"]["ms_ssim"] > collapsed["diversity"]["ms_ssim_real"] + 0.3
    assert collapsed["gates"]["diversity"] == "fail"
    for label, entry in collapsed["diversity"]["per_class"].items():
        assert entry["ms_ssim"] > 0.99, label


def test_white_noise_fails_the_fidelity_gate(evaluated) -> None:
    report = evaluated("white_noise")
    assert report["gates"]["fidelity"] == "fail"
    assert report["fidelity"]["precision"] < 0.1
    assert report["fidelity"]["fid"] > 10 * report["fidelity"]["reference"]["fid"]
    for name, section in report["fidelity"]["cross_checks"].items():
        assert section["ratios"]["precision"] < 0.2, name  # the random-init space agrees


def test_swapped_labels_show_in_synthetic_label_accuracy(evaluated) -> None:
    swapped, healthy = evaluated("swapped"), evaluated("independent")
    assert swapped["utility"]["synthetic_label_accuracy"] < 0.4
    assert healthy["utility"]["synthetic_label_accuracy"] > 0.6
    assert swapped["gates"]["utility"] == "fail"


def test_report_keeps_the_contract_and_names_its_sources(evaluated, cohort: Path) -> None:
    report = json.loads((cohort / "report-independent" / "report.json").read_text())
    assert report == json.loads(json.dumps(evaluated("independent")))
    contract = {
        "fidelity": {"fid", "kid", "precision", "recall", "density", "coverage", "feature_space"},
        "diversity": {"ms_ssim", "per_class"},
        "privacy": {
            "memorization_rate",
            "dcr_synthetic_to_train",
            "dcr_holdout_to_train",
            "mia_auc",
            "epsilon",
            "delta",
            "gate",
        },
        "utility": {"synthetic_label_accuracy", "real_only", "real_plus_synthetic", "augmentation_gain"},
        "gates": {"fidelity", "diversity", "privacy", "utility", "thresholds"},
    }
    for section, keys in contract.items():
        assert keys <= set(report[section]), section
    assert report["privacy"]["gate"] == report["gates"]["privacy"]
    assert report["privacy"]["epsilon"] is None and report["privacy"]["delta"] is None
    assert report["privacy"]["epsilon_reason"].startswith("no model directory given")
    assert report["fidelity"]["feature_space"] == "trained-cnn"
    assert set(report["feature_spaces"]) == {"trained-cnn", "random-cnn"}
    from pipeline.contracts.dataset import read_dataset

    assert report["inputs"]["real"]["digest"] == read_dataset(cohort / "real").digest
    assert report["inputs"]["synthetic"]["digest"] == read_dataset(cohort / "synthetic-independent").digest
    assert report["inputs"]["real"]["images_per_split_and_class"]["train"] == {"lesion": 30, "normal": 30}
    assert report["privacy"]["n_holdout"] == 60
    assert report["preprocessing"]["kind"] == "default" and report["preprocessing"]["image_size"] == [32, 32]
    assert report["mlflow"]["run_id"] is None  # not tracked in this test; see test_evaluate_cli
    for arm in ("real_only", "real_plus_synthetic"):
        entry = report["utility"][arm]
        assert entry["balanced_accuracy_ci_low"] <= entry["balanced_accuracy"] <= entry["balanced_accuracy_ci_high"]
    gain = report["utility"]
    assert gain["augmentation_gain_ci_low"] <= gain["augmentation_gain_ci_high"]
    if gain["augmentation_gain_ci_low"] <= 0 <= gain["augmentation_gain_ci_high"]:
        assert gain["augmentation_verdict"] == "no measurable gain"
    _assert_plain_numbers(report)


def _assert_plain_numbers(node: Any, where: str = "") -> None:
    """Every figure is a JSON number, string, bool, list or null, and a null figure has a reason.

    The ``config`` echo is exempt from the reason rule: a null there is the user's own setting.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if value is None and not where.startswith(".config") and key not in (
                "run_id",
                "experiment_id",
                "model_run_id",
                "model",
                "feature_weights",
                "max_epsilon",
                "value",
                "reason",
                "threshold",
            ):
                assert f"{key}_reason" in node, f"{where}.{key} is null without a reason"
            _assert_plain_numbers(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _assert_plain_numbers(value, f"{where}[{index}]")
    else:
        assert node is None or isinstance(node, (int, float, str, bool)), where


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self.sections.append(str(values.get("id")))
        if tag == "img":
            self.images.append(str(values.get("src")))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_html_is_self_contained_with_gates_first(evaluated, cohort: Path) -> None:
    report = evaluated("noisy_copies")
    page = _Page()
    page.feed((cohort / "report-noisy_copies" / "report.html").read_text(encoding="utf-8"))
    assert page.sections[0] == "gates"
    assert {"gates", "fidelity", "grids", "diversity", "privacy", "utility", "provenance"} <= set(page.sections)
    assert len(page.images) >= 2 * 8 + 3 * 9 + 3  # class grids, closest pairs (+ baseline), figures
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(page.text)
    assert "FAIL" in text and "memorization_excess" in text and "memorization rate" in text
    assert f"{report['gates']['thresholds']['max_memorization_excess']:.3f}" in text
    assert "TPR at 1% FPR" in text and "null rate" in text and "would be detected" in text
    html = (cohort / "report-noisy_copies" / "report.html").read_text(encoding="utf-8")
    assert '<nav class="toc"' in html and 'href="#privacy"' in html and 'href="#gate-privacy"' in html
    assert report["inputs"]["real"]["digest"] in text and report["inputs"]["synthetic"]["digest"] in text
    assert report["privacy"]["flagged"][0]["sample_id"] in text
    assert "trained-cnn" in text and "random-cnn" in text
    assert "no measurable gain" in text or "measurable" in text
