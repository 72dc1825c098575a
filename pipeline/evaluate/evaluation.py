"""One evaluation of in-memory image sets: feature spaces, the four metric sections and the gates.

:func:`evaluate_sets` is what the stage runs between reading the datasets and writing the report;
notebooks and tests call it directly on :class:`pipeline.imaging.images.ImageSet` objects, without
files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts.model import ModelMeta
from pipeline.contracts.report import GateName
from pipeline.core.progress import progress as progress_bar
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.features import FeatureSpace, random_space, trained_space, user_space
from pipeline.evaluate.fidelity import standardize
from pipeline.evaluate.figures import Evidence
from pipeline.evaluate.gates import decide_gates
from pipeline.evaluate.networks import ConvNet, embed
from pipeline.evaluate.sections.diversity import diversity_section
from pipeline.evaluate.sections.common import single_threaded
from pipeline.evaluate.sections.fidelity import SpaceFeatures, fidelity_in_space
from pipeline.evaluate.sections.privacy import GATED_ATTACKS, PrivacyInputs, attack_figures, privacy_section
from pipeline.evaluate.sections.reidentification import ATTACK_NAME as REID_ATTACK
from pipeline.evaluate.sections.reidentification import reidentification_block
from pipeline.evaluate.sections.utility import train_all, utility_section
from pipeline.evaluate.seeds import purpose_seed
from pipeline.imaging.images import ImageSet

__all__ = ["Evidence", "Evaluation", "evaluate_sets"]


@dataclass
class Evaluation:
    """The report's four metric sections and gates, plus the evidence for report.html."""

    sections: dict[str, Any]
    evidence: Evidence


class _Steps:
    """Progress over the evaluation's phases (see :mod:`pipeline.core.progress`; silent unless asked).

    Each phase's label says what it is doing, with its counts; the count advances when a phase ends.
    """

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = progress_bar(total, "evaluate", "step", enabled)
        self.started = False

    def phase(self, label: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(label)

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()


def evaluate_sets(
    real: ImageSet,
    synthetic: ImageSet,
    config: EvaluateConfig,
    *,
    model_dir: Path | None = None,
    model: ModelMeta | None = None,
    progress: bool = False,
) -> Evaluation:
    """Compute fidelity, diversity, privacy, utility and the gates for two image sets.

    Args:
        real: real images with splits (train is the reference; val + test are held out).
        synthetic: synthetic images.
        config: the ``evaluate`` section.
        model_dir: the generator's folder (enables the white-box attack).
        model: the ``model.json`` of ``model_dir`` (its DP record and labels).
        progress: show a progress bar on stderr.

    Returns:
        The report sections (``fidelity``, ``diversity``, ``privacy``, ``utility``, ``gates``,
        ``feature_spaces``) and the evidence arrays for report.html.
    """
    steps = _Steps(progress, total=8)
    train, holdout, test = real.split("train"), real.split("val", "test"), real.split("test")
    holdout_reason = _holdout_reason(holdout, config)
    classes = sorted(set(train.labels.tolist()))
    steps.phase(
        f"classifiers: {config.utility_seeds} seed(s) x {config.classifier_steps} steps on {_n(len(train))} "
        f"training images (+ as many with {_n(len(synthetic))} synthetic)"
    )
    trained = train_all(classes, train, test, synthetic, config)
    spaces = _feature_spaces(train, trained.real[0] if trained.real else None, config)
    sets = {"train": train, "holdout": holdout, "synthetic": synthetic}
    steps.phase(
        f"features: {len(spaces)} space(s) x {_n(len(train))} train + {_n(len(holdout))} held-out + "
        f"{_n(len(synthetic))} synthetic images"
    )
    features = _embed_all(spaces, sets)
    holdout_subjects = _subjects(holdout)
    steps.phase(
        f"fidelity: FID/KID/PRDC in {len(spaces)} space(s), {config.match_repeats} matched draws of "
        f"{holdout_subjects} held-out subjects"
    )
    evidence = Evidence(grids=_grid_evidence(train, synthetic, config))
    headline = spaces[0]
    fidelity_by_space = {}
    for space in spaces:
        space_features = features[space.name]
        with single_threaded():
            section, bars = fidelity_in_space(
                SpaceFeatures(
                    train=space_features["train"],
                    synthetic=space_features["synthetic"],
                    holdout=space_features.get("holdout") if holdout_reason is None else None,
                    train_labels=train.labels,
                    synthetic_labels=synthetic.labels,
                    train_groups=train.subject_ids,
                    holdout_groups=holdout.subject_ids if holdout_reason is None else None,
                ),
                config,
                holdout_reason,
            )
        section["feature_space"] = space.name
        fidelity_by_space[space.name] = section
        evidence.prdc[space.name] = bars
    fidelity = fidelity_by_space[headline.name]
    fidelity["cross_checks"] = {name: section for name, section in fidelity_by_space.items() if name != headline.name}
    fidelity["n_holdout"], fidelity["n_synthetic"] = len(holdout), len(synthetic)
    steps.phase(f"diversity: MS-SSIM of up to {config.ms_ssim_pairs} same-class pairs x {len(classes)} class(es)")
    diversity, evidence.ms_ssim = diversity_section(train, synthetic, config)
    diversity["feature_space"] = headline.name
    for key in ("recall", "coverage"):
        diversity[f"{key}_ratio"] = fidelity["ratios"].get(key)
    steps.phase(
        f"privacy: distances of {_n(len(holdout) + len(synthetic))} images to {_n(len(train))} training images, "
        f"attacks with {_n(config.bootstrap)} bootstrap resamples"
    )
    privacy, privacy_evidence = privacy_section(
        PrivacyInputs(
            train=train,
            holdout=holdout,
            synthetic=synthetic,
            features=features[headline.name],
            space_name=headline.name,
            # The trained encoder saw the members (training split) and maps them differently from
            # any unseen image: attacking in its space would measure the encoder, not the generator.
            attack_features={space.name: features[space.name] for space in spaces if space.name != "trained-cnn"},
            holdout_reason=holdout_reason,
            model_dir=model_dir,
            model=model,
        ),
        config,
    )
    evidence.closest_pairs = privacy_evidence.closest_pairs
    evidence.baseline_pair = privacy_evidence.baseline_pair
    evidence.dcr = privacy_evidence.dcr
    steps.phase(
        f"re-identification: siamese network, {config.reid_steps} steps on {_n(len(train))} images of "
        f"{_subjects(train)} training subjects; scoring {_n(len(synthetic))} synthetic + {_n(len(holdout))} held-out"
    )
    _add_reidentification(privacy, evidence, train, holdout, synthetic, config, holdout_reason)
    steps.phase(f"utility: {len(trained.real) + len(trained.augmented)} classifier(s) on {_n(len(test))} test images")
    utility = utility_section(trained, classes, train, holdout, test, synthetic, config)
    steps.phase("gates")
    sections = {
        GateName.FIDELITY: fidelity,
        GateName.DIVERSITY: diversity,
        GateName.PRIVACY: privacy,
        GateName.UTILITY: utility,
    }
    gates = decide_gates(sections, config.gates, holdout_reason)
    privacy["gate"] = gates.privacy
    steps.close()
    return Evaluation(
        sections={
            **{gate.value: section for gate, section in sections.items()},
            "gates": gates.as_dict(),
            "feature_spaces": {space.name: space.description for space in spaces},
        },
        evidence=evidence,
    )


def _n(count: int) -> str:
    """A count with thousands separators, as progress labels show them."""
    return f"{count:,}"


def _subjects(images: ImageSet) -> int:
    return int(np.unique(images.subject_ids.astype(str)).size)


def _add_reidentification(
    privacy: dict[str, Any],
    evidence: Evidence,
    train: ImageSet,
    holdout: ImageSet,
    synthetic: ImageSet,
    config: EvaluateConfig,
    holdout_reason: str | None,
) -> None:
    """``privacy.reidentification``, its entry in ``privacy.mia_attacks`` and its image pairs for report.html.

    The attack's entry is built by the privacy section's own :func:`attack_figures`, so it carries
    every figure the other attacks carry (interval, TPR at low FPR, power); whether it is gated is
    the privacy section's :data:`GATED_ATTACKS`.
    """
    result = reidentification_block(train, holdout, synthetic, config, holdout_reason)
    privacy["reidentification"] = result.block
    evidence.reid_pairs = result.pairs
    if result.synthetic_scores is None or result.holdout_scores is None or result.weights is None:
        return
    attack = attack_figures(
        result.synthetic_scores,
        result.holdout_scores,
        result.weights,
        len(synthetic),
        _subjects(holdout),
        config,
    )
    attack["gated"] = REID_ATTACK in GATED_ATTACKS
    privacy.setdefault("mia_attacks", {})[REID_ATTACK] = attack


def _holdout_reason(holdout: ImageSet, config: EvaluateConfig) -> str | None:
    """Why the held-out real images cannot serve as the real-vs-real baseline (None: they can)."""
    holdout_subjects = int(np.unique(holdout.subject_ids.astype(str)).size)
    if holdout_subjects >= config.min_holdout:
        return None
    return (
        f"only {holdout_subjects} held-out real subjects (val + test, {len(holdout)} images) after "
        f"preprocessing; at least {config.min_holdout} are needed for a real-vs-real baseline "
        "(evaluate.min_holdout)"
    )


def _feature_spaces(train: ImageSet, classifier: ConvNet | None, config: EvaluateConfig) -> list[FeatureSpace]:
    """The feature spaces, headline first: the user's extractor, the trained encoder, the random cross-check."""
    spaces: list[FeatureSpace] = []
    if config.feature_weights is not None:
        spaces.append(user_space(Path(config.feature_weights), train.images))
    if classifier is not None:
        spaces.append(trained_space(classifier, config.feature_dim, config.classifier_steps))
    if config.cross_check or not spaces:
        spaces.append(
            random_space(
                train.images.ndim - 2,
                tuple(train.images.shape[2:]),
                config.feature_dim,
                purpose_seed(config, "random_space"),
            )
        )
    return spaces


def _embed_all(spaces: list[FeatureSpace], sets: dict[str, ImageSet]) -> dict[str, dict[str, np.ndarray]]:
    """Features of every set in every space, z-scored with the real training set's statistics."""
    features: dict[str, dict[str, np.ndarray]] = {}
    for space in spaces:
        raw = {name: embed(space.extractor, image_set.images) for name, image_set in sets.items() if len(image_set)}
        names = list(raw)
        scaled = standardize(raw["train"], *[raw[name] for name in names if name != "train"])
        features[space.name] = dict(zip(["train", *[name for name in names if name != "train"]], scaled))
    return features


def _grid_evidence(train: ImageSet, synthetic: ImageSet, config: EvaluateConfig) -> dict[str, dict[str, np.ndarray]]:
    """A few images per class of each set, drawn with the seed, for report.html's grids."""
    rng = np.random.default_rng(purpose_seed(config, "grids"))
    grids: dict[str, dict[str, np.ndarray]] = {}
    for label in sorted(set(train.labels.tolist()) | set(synthetic.labels.tolist())):
        entry = {}
        for name, images in (("real", train), ("synthetic", synthetic)):
            members = np.flatnonzero(images.labels == label)
            pick = (
                rng.choice(members, size=min(config.grid_per_class, members.size), replace=False)
                if members.size
                else members
            )
            entry[name] = images.images[np.sort(pick), 0]
        grids[str(label)] = entry
    return grids
