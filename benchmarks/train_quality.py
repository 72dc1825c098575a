"""GAN-test label accuracy of the demo model (Shmelkov et al. 2018) and its training wall time.

Writes a fresh phantom cohort, turns it into a dataset (through ``pipeline.ingest.run`` when it
works, else directly from ``pipeline.demo.phantom_volume`` with the same subject/label/split
scheme), trains ``configs/demo.yaml``'s model, generates 100 images per class, trains a small CNN
classifier on the *real train split* (the model's preprocessing) and reports the share of
synthetic images whose label it predicts correctly. The classifier's accuracy on the real
held-out splits is reported beside it (a judge that cannot read real images proves nothing).

Goal: >= 0.95 label accuracy with <= 5 minutes of training on 2 CPU cores.

    .venv/bin/python benchmarks/train_quality.py [--config configs/demo.yaml] [--out runs/bench-quality]

Exit status 0 when the goal is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.contracts.dataset import read_dataset, write_manifest  # noqa: E402
from pipeline.core.files import sha256_file, write_nifti  # noqa: E402

GOAL_ACCURACY = 0.95
GOAL_MINUTES = 5.0


def phantom_dataset(root: Path, subjects: int, seed: int, fractions: tuple[float, float, float]) -> Path:
    """A real dataset written straight from ``phantom_volume`` (the ingest-free fallback)."""
    from pipeline.demo import LABELS, phantom_affine, phantom_volume

    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(subjects)]
    rng.shuffle(labels)
    rows = []
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    split_of: dict[int, str] = {}
    for members in by_label.values():  # stratified by label, like ingest's split
        n_train = round(len(members) * fractions[0])
        n_val = round(len(members) * fractions[1])
        for position, index in enumerate(members):
            split_of[index] = "train" if position < n_train else "val" if position < n_train + n_val else "test"
    seeds = rng.integers(0, 2**32, size=subjects)
    for index, label in enumerate(labels):
        subject_rng = np.random.default_rng(seeds[index])
        hu, spacing = phantom_volume(subject_rng, label)
        rel = f"images/sub-{index:04d}.nii.gz"
        write_nifti(root / rel, hu, phantom_affine(spacing, hu.shape, -350.0))
        rows.append(
            {
                "sample_id": f"sub-{index:04d}",
                "subject_id": f"sub-{index:04d}",
                "label": label,
                "split": split_of[index],
                "path": rel,
                "origin": "real",
                "sha256": sha256_file(root / rel),
            }
        )
    write_manifest(root, pd.DataFrame(rows))
    return root


def real_dataset(work: Path, subjects: int, seed: int, config, force_fallback: bool) -> tuple[Path, str]:
    """The real dataset and how it was made (``ingest`` or ``phantom fallback: <reason>``)."""
    data = work / "ingested"
    fractions = (config.ingest.split.train, config.ingest.split.val, config.ingest.split.test)
    if not force_fallback:
        try:
            from pipeline.demo import make_cohort
            from pipeline.ingest import run as ingest_run

            raw = work / "raw"
            make_cohort(raw, subjects=subjects, seed=seed)
            ingest_run([raw / "dicom", raw / "nifti"], data, config.ingest, labels=raw / "labels.csv",
                       private=work / "private", seed=seed)
            read_dataset(data)
            return data, "ingest (make_cohort -> pipeline.ingest.run)"
        except Exception as exc:  # any failure of the parallel-built ingest: fall back, say why
            reason = f"{type(exc).__name__}: {str(exc)[:160]}"
            shutil.rmtree(data, ignore_errors=True)
    else:
        reason = "--fallback given"
    phantom_dataset(data, subjects, seed, fractions)
    return data, f"phantom fallback (phantom_volume -> NIfTI + manifest; {reason})"


class Judge(nn.Module):
    """A small CNN classifier (2D or 3D) used as the GAN-test judge: 3 levels of two 3x3 convs with
    GroupNorm, global max pooling (a lesion is a local finding), a linear head."""

    def __init__(self, spatial_dims: int, classes: int, width: int = 8, levels: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        channels = 1
        for level in range(levels):
            out = width * 2**level
            layers += [conv(channels, out, 3, padding=1), nn.GroupNorm(4, out), nn.ReLU(),
                       conv(out, out, 3, padding=1), nn.GroupNorm(4, out), nn.ReLU(), pool(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(2).amax(dim=2))


def train_judge(images: np.ndarray, labels: np.ndarray, spatial_dims: int, classes: int, seed: int, epochs: int) -> Judge:
    """Train the judge on real images: AdamW, small shifts and intensity jitter (no flips: anatomy has a side)."""
    torch.manual_seed(seed)
    judge = Judge(spatial_dims, classes)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-3)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    spatial = tuple(range(2, x.dim()))
    for _ in range(epochs):
        judge.train()
        for batch in torch.randperm(len(x), generator=generator).split(32):
            xb = x[batch]
            shifts = torch.randint(-3, 4, (len(spatial),), generator=generator).tolist()
            xb = torch.roll(xb, shifts=shifts, dims=spatial)
            shape = (len(xb),) + (1,) * (x.dim() - 1)
            xb = xb * (1 + 0.2 * (torch.rand(shape, generator=generator) - 0.5)) + 0.2 * (torch.rand(shape, generator=generator) - 0.5)
            loss = nn.functional.cross_entropy(judge(xb), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


@torch.no_grad()
def accuracy(judge: Judge, images: np.ndarray, labels: np.ndarray) -> float:
    if len(images) == 0:
        return float("nan")
    predictions = torch.cat([judge(chunk).argmax(1) for chunk in torch.from_numpy(images).split(128)])
    return float((predictions.numpy() == labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-quality")
    parser.add_argument("--subjects", type=int, default=80)  # as `medsynth demo`
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--fallback", action="store_true", help="Skip ingest; build the dataset from phantom_volume.")
    parser.add_argument("--reuse-data", action="store_true", help="Reuse OUT/ingested if it exists (tuning runs).")
    parser.add_argument("--judge-epochs", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key (YAML value), e.g. --set model.max_steps=100.")
    args = parser.parse_args()

    import yaml

    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = load_config(args.config, overrides)
    work = args.out
    started = time.perf_counter()
    if args.reuse_data and (work / "ingested" / "manifest.csv").is_file():
        data, how = work / "ingested", "reused from an earlier run"
    else:
        shutil.rmtree(work, ignore_errors=True)
        data, how = real_dataset(work, args.subjects, args.seed, config, args.fallback)
    print(f"dataset: {how} ({time.perf_counter() - started:.0f} s)")
    print(f"load before training: {os.getloadavg()[0]:.2f} (1-min average), torch threads {torch.get_num_threads()}")

    from pipeline.models import generate, train
    from pipeline.models.config import GenerateConfig
    from pipeline.imaging.preprocess import Preprocessor

    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    wall = time.perf_counter()
    summary = train.run(data, model_dir, config.model, seed=config.seed, progress=sys.stderr.isatty())
    wall = time.perf_counter() - wall
    load_after = os.getloadavg()
    for line in summary.lines():
        print(line)

    synthetic = work / "synthetic"
    shutil.rmtree(synthetic, ignore_errors=True)
    generated = generate.run(model_dir, synthetic, GenerateConfig(per_class=args.per_class, seed=config.generate.seed))

    preprocessor = Preprocessor.from_model_dir(model_dir)
    labels = json.loads((model_dir / "model.json").read_text())["labels"]
    index = {label: i for i, label in enumerate(labels)}
    real = read_dataset(data)
    train_x, train_labels, _ = preprocessor.dataset_images(real, real.subset(split="train", origin="real"))
    held_x, held_labels, _ = preprocessor.dataset_images(real, real.manifest[real.manifest["split"] != "train"])
    syn_x, syn_labels, _ = preprocessor.dataset_images(generated)
    to_ids = lambda names: np.array([index[name] for name in names], dtype=np.int64)  # noqa: E731
    judge_start = time.perf_counter()
    judge = train_judge(train_x, to_ids(train_labels), preprocessor.spatial_dims, len(labels), args.seed, args.judge_epochs)
    real_accuracy = accuracy(judge, held_x, to_ids(held_labels))
    gan_test = accuracy(judge, syn_x, to_ids(syn_labels))
    per_class = {
        label: accuracy(judge, syn_x[np.array(syn_labels) == label], to_ids([l for l in syn_labels if l == label]))
        for label in labels
    }
    minutes = summary.train_seconds / 60.0
    result = {
        "gan_test_accuracy": gan_test,
        "gan_test_per_class": per_class,
        "judge_accuracy_real_heldout": real_accuracy,
        "n_real_train_images": len(train_x),
        "n_real_heldout_images": len(held_x),
        "n_synthetic_images": len(syn_x),
        "train_minutes": round(minutes, 2),
        "train_wall_seconds_incl_setup": round(wall, 1),
        "steps": summary.steps,
        "images_per_second": round(summary.images_per_second, 1),
        "load_average_after_training": [round(value, 2) for value in load_after],
        "dataset": how,
        "config": str(args.config),
        "overrides": overrides,
        "sample_grid": str(summary.sample_grid),
        "synthetic_preview": str(synthetic / generate.GRID_NAME),
        "judge_seconds": round(time.perf_counter() - judge_start, 1),
    }
    (work / "train_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"GAN-test label accuracy: {gan_test:.3f} ({', '.join(f'{k} {v:.2f}' for k, v in per_class.items())}) "
          f"on {len(syn_x)} synthetic images; judge on real held-out: {real_accuracy:.3f}")
    print(f"training: {minutes:.2f} min ({summary.steps} steps, {summary.images_per_second:.0f} images/s), "
          f"wall incl. preprocessing {wall:.0f} s; load average after: {' '.join(f'{v:.2f}' for v in load_after)}")
    print(f"sample grid: {summary.sample_grid}; results: {work / 'train_quality.json'}")
    ok = gan_test >= GOAL_ACCURACY and minutes <= GOAL_MINUTES
    print(f"goal (>= {GOAL_ACCURACY} in <= {GOAL_MINUTES:g} min): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
