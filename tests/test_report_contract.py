"""The report contract (pipeline.contracts.report): one parser, one gate list, one set of headline figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.contracts.report import (
    GATE_STATUSES,
    SCHEMA,
    GateName,
    Report,
    headline_figures,
    read_report,
)
from pipeline.core.errors import InputError
from pipeline.evaluate.config import GateThresholds
from pipeline.evaluate.gates import decide_gates
from pipeline.evaluate.report import summary_lines


def _document(privacy_gate: str = "pass") -> dict:
    """A report as evaluate writes it: nulls with reasons, nested extras, keys in a non-declared order."""
    return {
        "schema": SCHEMA,
        "created_utc": "2025-01-01T00:00:00Z",
        "fidelity": {
            "n_real": 40,
            "n_compared": 20,
            "fid": 12.5,
            "kid": 0.01,
            "kid_std": 0.002,
            "kid_subset_size": 20,
            "precision": 0.7,
            "recall": 0.6,
            "density": 0.9,
            "coverage": 0.8,
            "reference": {"n_real": 40, "n_compared": 20, "fid": 10.0, "kid": 0.008},
            "matched": {"n": 20, "recall": 0.5},
            "ratios": {"precision": 0.95, "density": 0.9, "recall": 0.85, "coverage": 0.9},
            "per_class": {"lesion": {"fid": 20.0}},
            "feature_space": "trained-cnn",
            "cross_checks": {},
        },
        "diversity": {"ms_ssim": 0.3, "ms_ssim_real": 0.28, "ms_ssim_excess": 0.02, "per_class": {}},
        "privacy": {
            "memorization_space": "pixel",
            "memorization_rate": 0.04,
            "memorization_threshold": 0.2,
            "flagged": [{"sample_id": "syn-1", "distance": 0.1, "nearest_train_sample_id": "r#z3", "threshold": 0.2}],
            "mia_auc": 0.52,
            "mia_attacks": {"blackbox_pixel": {"auc": 0.52, "gated": True}},
            "epsilon": None,
            "epsilon_reason": "the model was trained without differential privacy",
            "delta": None,
            "delta_reason": "the model was trained without differential privacy",
            "gate": privacy_gate,
        },
        "utility": {
            "synthetic_label_accuracy": 0.9,
            "real_only": {"training_data": "real train", "balanced_accuracy": 0.8},
            "real_plus_synthetic": {},
            "augmentation_gain": None,
            "augmentation_gain_reason": "balanced accuracy undefined on the test split",
            "augmentation_verdict": "not run",
        },
        "gates": {
            "fidelity": "pass",
            "diversity": "fail",
            "privacy": privacy_gate,
            "utility": "not_run",
            "thresholds": {"max_memorization_rate": 0.1, "max_mia_auc": 0.6},
            "checks": {
                "privacy": [
                    {
                        "name": "memorization_rate",
                        "value": 0.04,
                        "comparison": "<=",
                        "threshold": 0.1,
                        "passed": True,
                        "meaning": "near-copies",
                        "reason": None,
                    }
                ]
            },
        },
        "feature_spaces": {"trained-cnn": "the encoder"},
        "inputs": {"real": {"name": "real", "digest": "abc", "images": 60}, "synthetic": {"images": 20}, "model": None},
        "preprocessing": {"kind": "default"},
        "mlflow": {"run_id": None, "experiment_id": None, "model_run_id": None},
        "config": {"seed": 0},
    }


def _write(folder: Path, document: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(document), encoding="utf-8")
    return folder


def test_gate_names_and_statuses_are_defined_once() -> None:
    assert [gate.value for gate in GateName] == ["fidelity", "diversity", "privacy", "utility"]
    assert f"{GateName.PRIVACY}" == "privacy" and json.dumps([GateName.UTILITY]) == '["utility"]'
    assert GATE_STATUSES == ("pass", "fail", "inconclusive", "not_run")


def test_a_report_reads_back_to_the_same_document_in_the_same_order(tmp_path: Path) -> None:
    document = _document()
    report = read_report(_write(tmp_path / "r", document))
    assert json.dumps(report.as_dict(), indent=2) == json.dumps(document, indent=2)
    assert report.privacy.flagged[0].sample_id == "syn-1"
    assert report.gates.checks["privacy"][0].passed is True
    # A check written before verdicts existed reads with the verdict its `passed` implies.
    assert report.gates.checks["privacy"][0].verdict == "pass"
    assert report.gates.statuses() == {"fidelity": "pass", "diversity": "fail", "privacy": "pass", "utility": "not_run"}
    assert report.privacy.reason("epsilon") == "the model was trained without differential privacy"
    # Declared keys the file does not hold are defaults for readers, never written back.
    assert "per_sample" not in report.privacy.as_dict() and report.privacy.per_sample is None


def test_a_hand_written_report_without_provenance_is_read(tmp_path: Path) -> None:
    document = {key: value for key, value in _document().items() if key in {*GateName, "gates"}}
    del document["gates"]["checks"]
    report = read_report(_write(tmp_path / "r", document) / "report.json")
    assert report.schema_id is None and report.inputs is None
    assert report.as_dict() == document


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("utility"), r"key 'utility' is missing or not an object"),
        (lambda d: d["gates"].update(privacy="maybe"), r"key 'gates.privacy' is 'maybe', not one of pass, fail, inconclusive"),
        (lambda d: d["privacy"].update(gate="fail"), r"'privacy.gate' \('fail'\) disagrees with 'gates.privacy'"),
        (lambda d: d["privacy"]["flagged"].append({"distance": 0.1}), r"'privacy.flagged\[1\]' has no 'sample_id'"),
        (lambda d: d.update(schema="acme.report/1"), r"key 'schema' is 'acme.report/1', not a medsynth evaluation"),
        (lambda d: d.update(schema="medsynth.evaluate/2"), r"'schema' is 'medsynth.evaluate/2'; this medsynth reads"),
        (lambda d: d["privacy"].update(memorization_rate="high"), r"key 'privacy.memorization_rate': "),
        (lambda d: d["gates"]["checks"]["privacy"][0].pop("meaning"), r"key 'gates.checks.privacy.0.meaning': "),
    ],
)
def test_a_malformed_report_is_an_input_error_naming_the_file_and_key(tmp_path: Path, edit, message: str) -> None:
    document = _document()
    edit(document)
    folder = _write(tmp_path / "r", document)
    with pytest.raises(InputError, match=message) as caught:
        read_report(folder)
    assert str(folder / "report.json") in str(caught.value) and "Fix:" in str(caught.value)


def test_unreadable_files_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="report not found. Fix: run `medsynth evaluate"):
        read_report(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        read_report(tmp_path / "bad")
    with pytest.raises(InputError, match="the top level must be an object"):
        read_report(_write(tmp_path / "list", [1, 2]))


def test_headline_figures_are_flat_metrics_with_gate_flags() -> None:
    document = _document()
    document["fidelity"]["kid"] = math.nan  # not finite: not a metric
    figures = headline_figures(Report.model_validate(document))
    assert figures["fid"] == 12.5 and figures["reference_fid"] == 10.0 and figures["precision_ratio"] == 0.95
    assert figures["kid"] is None and figures["epsilon"] is None and figures["augmentation_gain"] is None
    assert figures["real_only_balanced_accuracy"] == 0.8 and figures["real_plus_synthetic_balanced_accuracy"] is None
    gate_flags = (figures["gate_fidelity_pass"], figures["gate_diversity_pass"], figures["gate_utility_pass"])
    assert gate_flags == (1.0, 0.0, None)
    document["gates"]["privacy"] = document["privacy"]["gate"] = "inconclusive"
    assert headline_figures(Report.model_validate(document))["gate_privacy_pass"] == 0.0  # never a pass
    assert list(figures)[-4:] == [f"gate_{gate}_pass" for gate in GateName]


def test_summary_lines_lead_with_the_gates(tmp_path: Path) -> None:
    lines = summary_lines(Report.model_validate(_document()), tmp_path)
    assert lines[0].startswith("Evaluated 20 synthetic vs 60 real images (feature space trained-cnn)")
    assert lines[1] == "  gates: fidelity pass, diversity FAIL, privacy pass, utility not run"
    assert "1 flagged" in lines[4] and "(max 0.6;" in lines[4]
    assert lines[5].endswith(": not run")
    # Every gate that did not pass gets a line with its sentence; an inconclusive one reads distinctly.
    assert [line.split(":")[0] for line in lines[6:]] == ["  diversity", "  utility"]
    document = _document("inconclusive")
    lines = summary_lines(Report.model_validate(document), tmp_path)
    assert "privacy INCONCLUSIVE" in lines[1]
    assert any(line.startswith("  privacy: INCONCLUSIVE: Privacy could not be certified") for line in lines)


def _privacy_section(**memorization) -> dict:
    """A privacy section as the section builder writes it: the memorization test and one gated attack."""
    section = {
        "n_holdout_subjects": 80,
        "memorization_rate": 0.05,
        "memorization_null_rate": 0.05,
        "memorization_excess": 0.0,
        "memorization_excess_ci_low": -0.04,
        "memorization_excess_ci_high": 0.04,
        "memorization_excess_upper": 0.033,
        "memorization_p_value": 0.5,
        "memorization_detectable_excess": 0.09,
        "memorization_powered": True,
        "memorization_subjects_needed": 40,
        "epsilon": None,
        "mia_attacks": {
            "blackbox_pixel": {
                "auc": 0.5, "auc_ci_low": 0.44, "auc_ci_high": 0.56, "auc_se": 0.03, "auc_lower": 0.44,
                "auc_upper": 0.55, "tpr_at_1pct_fpr": 0.01, "tpr_at_10pct_fpr": 0.1, "detectable_auc": 0.68,
                "powered": True, "subjects_needed": 50, "gated": True,
            }
        },
    }
    section.update(memorization)
    return section


def test_decided_gates_are_the_contracts_checks() -> None:
    sections = {
        GateName.FIDELITY: {"ratios": {"precision": 0.95, "density": 0.2, "recall": None, "coverage": None}},
        GateName.DIVERSITY: {"ms_ssim_excess": None, "ms_ssim_excess_reason": "too few pairs"},
        GateName.PRIVACY: _privacy_section(),
        GateName.UTILITY: {"synthetic_label_accuracy_ratio": 1.0, "augmentation_gain_ci_high": 0.1},
    }
    gates = decide_gates(sections, GateThresholds(), None)
    assert gates.statuses() == {"fidelity": "fail", "diversity": "not_run", "privacy": "pass", "utility": "pass"}
    written = gates.as_dict()
    assert list(written) == ["fidelity", "diversity", "privacy", "utility", "thresholds", "checks", "sentences"]
    assert list(written["checks"]) == [gate.value for gate in GateName]
    check = written["checks"]["diversity"][2]
    assert list(check) == ["name", "value", "comparison", "threshold", "passed", "verdict", "meaning", "reason"]
    assert check["name"] == "ms_ssim_excess" and check["verdict"] == "not_run" and check["reason"] == "too few pairs"
    # The privacy pass on images that fail fidelity carries the caveat.
    assert "fidelity gate failed" in written["sentences"]["privacy"]
    assert "density_ratio 0.2 is below the minimum 0.5" in written["sentences"]["fidelity"]
    # What was written reads back through the contract.
    from pipeline.contracts.report import Gates

    assert Gates.model_validate(written).as_dict() == written


def test_a_gate_with_a_missing_mandatory_check_is_not_a_pass() -> None:
    thresholds = GateThresholds()
    sections = {
        GateName.FIDELITY: {"ratios": {"precision": 0.95, "density": None, "recall": 1.0, "coverage": 1.0}},
        GateName.DIVERSITY: {"ms_ssim_excess": 0.0},
        GateName.PRIVACY: _privacy_section(),
        GateName.UTILITY: {
            "synthetic_label_accuracy_ratio": None,
            "synthetic_label_accuracy_ratio_reason": "no held-out image of a class",
            "augmentation_gain_ci_high": 0.1,
        },
    }
    gates = decide_gates(sections, thresholds, None)
    # density and label accuracy did not run: their gates are inconclusive, never pass.
    assert gates.fidelity == "inconclusive" and gates.utility == "inconclusive"
    assert gates.diversity == "pass" and gates.privacy == "pass"
    assert "label_accuracy_ratio did not run: no held-out image of a class" in gates.as_dict()["sentences"]["utility"]


def test_a_gate_sentence_follows_the_direction_of_the_failure() -> None:
    sections = {
        GateName.FIDELITY: {"ratios": {"precision": 0.9, "density": 0.9, "recall": 0.2, "coverage": 0.3}},
        # Synthetic pairs far LESS alike than real pairs (0.205 vs 0.648): not mode collapse.
        GateName.DIVERSITY: {"ms_ssim_excess": 0.205 - 0.648},
        GateName.PRIVACY: _privacy_section(),
        GateName.UTILITY: {"synthetic_label_accuracy_ratio": 1.0, "augmentation_gain_ci_high": 0.1},
    }
    sentence = decide_gates(sections, GateThresholds(), None).as_dict()["sentences"]["diversity"]
    assert sentence.startswith("Failed on variety: coverage_ratio 0.3 is below the minimum 0.5")
    assert "recall_ratio 0.2 is below the minimum 0.3" in sentence
    assert "less alike than real pairs" in sentence and "near-duplicates" not in sentence
    # Near-duplicates read the other way.
    sections[GateName.DIVERSITY] = {"ms_ssim_excess": 0.4}
    sections[GateName.FIDELITY]["ratios"].update(recall=1.0, coverage=1.0)
    sentence = decide_gates(sections, GateThresholds(), None).as_dict()["sentences"]["diversity"]
    assert "ms_ssim_excess 0.4 is above the maximum 0.25" in sentence and "near-duplicates (mode collapse)" in sentence
