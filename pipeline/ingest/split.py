"""Assign train/val/test by subject, stratified by label, reproducibly."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from pipeline.ingest.config import SplitConfig

__all__ = ["split_counts", "assign_splits"]

_SPLITS = ("train", "val", "test")


def split_counts(n: int, fractions: SplitConfig) -> dict[str, int]:
    """Subjects per split for a stratum of ``n`` (largest remainder; ties favour train, then val)."""
    wanted = [n * fractions.train, n * fractions.val, n * fractions.test]
    counts = [int(np.floor(value)) for value in wanted]
    order = sorted(range(3), key=lambda index: (-(wanted[index] - counts[index]), index))
    for index in order[: n - sum(counts)]:
        counts[index] += 1
    return dict(zip(_SPLITS, counts))


def assign_splits(subject_labels: dict[str, list[str]], fractions: SplitConfig, seed: int = 0) -> dict[str, str]:
    """Map each subject to a split.

    Args:
        subject_labels: subject id -> labels of its images; a subject is stratified by its most
            common label (ties: alphabetical), and all its images share one split.
        fractions: split fractions and the split seed.
        seed: the run's global seed, combined with ``fractions.seed``.

    The result depends only on the set of (subject, label) pairs and the two seeds, never on
    the order in which series were processed.
    """
    strata: dict[str, list[str]] = defaultdict(list)
    for subject in sorted(subject_labels):
        counts = Counter(subject_labels[subject])
        label = sorted(counts, key=lambda item: (-counts[item], item))[0]
        strata[label].append(subject)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(fractions.seed)]))
    assignment: dict[str, str] = {}
    for label in sorted(strata):
        subjects = strata[label]
        shuffled = [subjects[index] for index in rng.permutation(len(subjects))]
        counts = split_counts(len(shuffled), fractions)
        start = 0
        for split in _SPLITS:
            for subject in shuffled[start : start + counts[split]]:
                assignment[subject] = split
            start += counts[split]
    return assignment
