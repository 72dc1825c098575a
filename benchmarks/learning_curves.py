"""Does augmentation help? Learning curves per demo family, one generator trained per small set.

For each family and each size (real training subjects per class, 4/8/16/32): a seed-drawn subset of
the ingested cohort's training subjects becomes a dataset of its own (val and test unchanged); the
conditional GAN is trained on it with the `auto` recipe (capped at ``--gan-minutes``, the same for
every family and size) and generates 100 images per class; classifiers of the evaluate stage's
recipe are trained on the subset alone and on the subset + synthetic images.

Two phases, so that no choice is made on the test split:

1. **Levers, on the validation split** (the smallest sizes, ``--lever-sizes``): every synthetic
   image (the evaluate default before this benchmark), at most one synthetic image per real one
   (ratio 1), only the synthetic images the real-only classifier reads as their label (filter),
   filter + ratio 1, and pre-training on synthetic images then fine-tuning on the real ones. The
   lever with the best mean validation gain becomes the curve's recipe (and evaluate's default).
2. **Curves, on the test split:** real-only vs real + synthetic (the chosen lever) at every size,
   with the two-level bootstrap of :func:`pipeline.evaluate.learning_curve.paired_comparison`
   (test subjects and seeds).

Class balance is not a lever here: every classifier already draws class-balanced batches.
Each classifier seed draws its own training subjects; one generator is trained per (family, size)
on the subset of the first seed and serves every seed of that size (a generator per seed would
multiply the CPU cost; the other seeds' classifiers therefore see synthetic images of a generator
trained on partly other subjects, stated in docs/models.md).

    nice -n 10 .venv/bin/python benchmarks/learning_curves.py [--data-root /tmp/gen/bench] [--out /tmp/curves]

``--data-root/<family>/data`` is reused when present (benchmarks/generalization.py writes it), else a
cohort of ``--subjects`` subjects is written and ingested there. Writes ``OUT/learning_curves.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.contracts.dataset import read_dataset, write_manifest  # noqa: E402
from pipeline.evaluate.augmentation import Recipe, label_keeping, mixed_training_set  # noqa: E402
from pipeline.evaluate.config import EvaluateConfig  # noqa: E402
from pipeline.evaluate.learning_curve import paired_comparison  # noqa: E402
from pipeline.evaluate.networks import (  # noqa: E402
    ConvNet,
    TrainingJob,
    side_by_side,
    predict_proba,
    train_classifier,
    train_classifiers,
)
from pipeline.evaluate.utility import balanced_accuracy, bootstrap_weights  # noqa: E402
from pipeline.imaging.images import load_image_sets  # noqa: E402
from pipeline.models.config import GenerateConfig, ModelConfig  # noqa: E402

FAMILIES = ("xray-chest", "mr-brain", "ct-abdomen")  # cheapest first
LEVERS: dict[str, Recipe | str] = {
    "all synthetic": Recipe(None, False),
    "ratio 1": Recipe(1.0, False),
    "filter": Recipe(None, True),
    "filter + ratio 1": Recipe(1.0, True),
    "pretrain + fine-tune": "pretrain",
}
CLASSIFIER = EvaluateConfig()  # the evaluate stage's classifier recipe, unchanged
START = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the elapsed minutes and the machine load."""
    print(f"[{(time.perf_counter() - START) / 60:5.1f} min, load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def ensure_cohort(root: Path, family: str, subjects: int, seed: int) -> Path:
    """The family's ingested dataset under ``root/family/data`` (written through the CLI when missing)."""
    data = root / family / "data"
    if (data / "manifest.csv").is_file():
        return data
    raw = root / family / "raw"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (
        ["demo-data", str(raw), "--family", family, "--subjects", str(subjects), "--seed", str(seed)],
        ["ingest", "--source", str(raw / "dicom"), "--source", str(raw / "nifti"), "--labels", str(raw / "labels.csv"),
         "--out", str(data), "--workers", "2", "--no-progress"],
    ):
        subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return data


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def subset_dataset(data: Path, out: Path, keep_subjects: set[str]) -> Path:
    """A dataset folder whose train split holds only ``keep_subjects`` (val/test whole).

    The files are hard links (copies across file systems): every stage refuses an image that resolves
    outside its dataset folder, which a symbolic link to the full cohort would.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in data.iterdir():
        if entry.name == "manifest.csv":
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, out / entry.name)
    manifest = read_dataset(data).manifest
    train = manifest["split"] == "train"
    write_manifest(out, manifest[~train | manifest["subject_id"].isin(keep_subjects)].reset_index(drop=True))
    return out


def train_generator(data: Path, work: Path, steps: int, minutes: float, seed: int) -> tuple[Path, dict[str, Any]]:
    """Train the `auto` GAN on ``data`` (in process) and generate 100 images per class; returns (synthetic, facts).

    The step budget is fixed (``steps``, with ``minutes`` as the safety cap) and checkpoint selection is off:
    on a shared 2-core machine the planned budget and the selection's classifier cost minutes per
    generator, and a time-only budget would make the result depend on the machine's load.
    """
    from pipeline.models import generate, train

    model, synthetic = work / "model", work / "synthetic"
    for folder in (model, synthetic):
        if folder.exists():
            shutil.rmtree(folder)
    config = ModelConfig(max_steps=steps, max_minutes=minutes, select_every=0, accept_early_stop=True, log_model=False)
    start = time.perf_counter()
    summary = train.run(data, model, config, seed=seed)
    seconds = time.perf_counter() - start
    generate.run(model, synthetic, GenerateConfig(per_class=100, seed=seed))
    meta = json.loads((model / "model.json").read_text())
    return synthetic, {"train_seconds": round(seconds, 1), "steps": meta.get("steps"),
                       "selected_step": meta.get("selected_step"), "stopped_early": meta.get("stopped_early"),
                       "summary": str(summary).splitlines()[0] if str(summary) else ""}


def fine_tune(model: ConvNet, images: np.ndarray, labels: np.ndarray, steps: int, seed: int) -> ConvNet:
    """Continue training ``model`` on ``images`` (the evaluate recipe, starting from its weights)."""
    return train_classifier(
        images, labels, int(model.head.out_features),
        feature_dim=CLASSIFIER.feature_dim, steps=steps, batch_size=CLASSIFIER.classifier_batch_size,
        lr=CLASSIFIER.classifier_lr, seed=seed + 7, init=model,
    )


def pretrain_then_fine_tune(job: TrainingJob, synthetic: np.ndarray, synthetic_ids: np.ndarray, n_classes: int) -> ConvNet:
    """Half the steps on synthetic images, half on the real ones (the same cost as one classifier)."""
    half = CLASSIFIER.classifier_steps // 2
    model = train_classifier(
        synthetic, synthetic_ids, n_classes, feature_dim=CLASSIFIER.feature_dim, steps=half,
        batch_size=CLASSIFIER.classifier_batch_size, lr=CLASSIFIER.classifier_lr, seed=job.seed,
    )
    return fine_tune(model, job.images, job.labels, CLASSIFIER.classifier_steps - half, job.seed)


def train_jobs(jobs: list[TrainingJob], n_classes: int) -> list[ConvNet]:
    return train_classifiers(
        jobs, n_classes, workers=2, feature_dim=CLASSIFIER.feature_dim, steps=CLASSIFIER.classifier_steps,
        batch_size=CLASSIFIER.classifier_batch_size, lr=CLASSIFIER.classifier_lr,
    )


def run_size(
    family: str, data: Path, work: Path, size: int, seeds: list[int], levers: list[str], gan: tuple[int, float]
) -> dict[str, Any]:
    """One (family, size): the generator, the real-only classifiers and every lever's, scored on val and test."""
    full = read_dataset(data)
    classes = sorted(full.subset(split="train", origin="real")["label"].unique().tolist())
    train_rows = full.subset(split="train", origin="real")
    subsets: list[set[str]] = []
    for seed in seeds:
        rng = np.random.default_rng([seed, size])
        chosen: set[str] = set()
        for label in classes:
            members = np.unique(train_rows.loc[train_rows["label"] == label, "subject_id"].to_numpy(str))
            chosen |= set(rng.choice(members, size=size, replace=False).tolist())
        subsets.append(chosen)
    union = set().union(*subsets)
    small = subset_dataset(data, work / "data", subsets[0])
    say(f"{family} {size}/class: training the generator on {len(subsets[0])} subjects")
    synthetic_dir, gan_facts = train_generator(small, work, *gan, seed=0)
    say(f"{family} {size}/class: generator {gan_facts['steps']} steps in {gan_facts['train_seconds']} s; classifiers")
    # Load every subject any seed uses, through this generator's preprocessing.
    every = subset_dataset(data, work / "data-all", union)
    real, synthetic, _ = load_image_sets(read_dataset(every), read_dataset(synthetic_dir), model_dir=work / "model")
    index = {label: i for i, label in enumerate(classes)}
    ids = lambda labels: np.array([index[label] for label in labels])  # noqa: E731
    train, val, test = real.split("train"), real.split("val"), real.split("test")
    synthetic = synthetic.select(np.isin(synthetic.labels, classes))
    synthetic_ids = ids(synthetic.labels)
    masks = [np.isin(train.subject_ids.astype(str), sorted(subset)) for subset in subsets]
    real_jobs = [TrainingJob(train.images[m], ids(train.labels[m]), seed) for m, seed in zip(masks, seeds)]
    models: dict[str, list[ConvNet]] = {"real only": train_jobs(real_jobs, len(classes))}
    recipe_jobs: dict[str, list[TrainingJob]] = {}
    added: dict[str, float] = {}
    for lever in levers:
        recipe = LEVERS[lever]
        if not isinstance(recipe, Recipe):
            continue
        jobs, counts = [], []
        for job, model, seed in zip(real_jobs, models["real only"], seeds):
            keep = label_keeping(predict_proba(model, synthetic.images).argmax(1), synthetic_ids) if recipe.filter else None
            images, labels, n = mixed_training_set(
                job.images, job.labels, synthetic.images, synthetic_ids, recipe, np.random.default_rng([seed, size, 1]), keep
            )
            jobs.append(TrainingJob(images, labels, seed))
            counts.append(n)
        recipe_jobs[lever], added[lever] = jobs, float(np.mean(counts))
    flat = [job for jobs in recipe_jobs.values() for job in jobs]
    trained = train_jobs(flat, len(classes)) if flat else []
    for offset, lever in enumerate(recipe_jobs):
        models[lever] = trained[offset * len(seeds) : (offset + 1) * len(seeds)]
    if "pretrain + fine-tune" in levers:
        models["pretrain + fine-tune"] = side_by_side(
            [partial(pretrain_then_fine_tune, job, synthetic.images, synthetic_ids, len(classes)) for job in real_jobs], 2
        )
        added["pretrain + fine-tune"] = float(len(synthetic))
    result: dict[str, Any] = {"family": family, "per_class": size, "generator": gan_facts, "seeds": len(seeds),
                              "n_real_images": float(np.mean([m.sum() for m in masks])), "synthetic_added": added}
    for split_name, split in (("val", val), ("test", test)):
        truth = ids(split.labels)
        weights = bootstrap_weights(split.subject_ids, 1000, np.random.default_rng([size, 99]))
        scores = {}
        for name, arm in models.items():
            predicted = [predict_proba(model, split.images).argmax(1) for model in arm]
            scores[name] = (
                np.array([balanced_accuracy(truth, p) for p in predicted]),
                np.stack([balanced_accuracy(truth, p, weights) for p in predicted]),
            )
        result[split_name] = {
            name: paired_comparison(scores["real only"][1], scores[name][1], scores["real only"][0], scores[name][0],
                                    np.random.default_rng([size, 98]))
            for name in models if name != "real only"
        }
        result[split_name]["n_subjects"] = int(np.unique(split.subject_ids.astype(str)).size)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/gen/bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/medsynth-curves"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--lever-sizes", nargs="+", type=int, default=[4])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=120)
    parser.add_argument("--gan-steps", type=int, default=300, help="GAN step budget per small set.")
    parser.add_argument("--gan-minutes", type=float, default=6.0, help="Safety cap of each GAN's training.")
    parser.add_argument("--lever", default=None, help="Skip phase 1 and use this lever for the curves.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    seeds = list(range(args.seeds))
    results: list[dict[str, Any]] = []
    path = args.out / "learning_curves.json"
    if path.is_file():  # a second invocation (e.g. larger sizes with --lever) adds to the first one's results
        results = json.loads(path.read_text())
    data = {family: ensure_cohort(args.data_root, family, args.subjects, 11) for family in args.families}
    chosen = args.lever
    if chosen is None:
        say(f"phase 1: levers {list(LEVERS)} at {args.lever_sizes} subjects per class, judged on val")
        for family in args.families:
            for size in args.lever_sizes:
                row = run_size(family, data[family], args.out / family / f"n{size}", size, seeds, list(LEVERS), (args.gan_steps, args.gan_minutes))
                results.append(row)
                path.write_text(json.dumps(results, indent=2))
                say(f"{family} {size}/class val gains: " + ", ".join(
                    f"{name} {row['val'][name]['gain']:+.3f}" for name in LEVERS))
        judged = [row for row in results if all(name in row["val"] for name in LEVERS)]
        mean_gain = {name: float(np.mean([row["val"][name]["gain"] for row in judged])) for name in LEVERS}
        chosen = max(mean_gain, key=mean_gain.get)
        say(f"chosen on val: {chosen} (mean val gains {mean_gain})")
    say(f"phase 2: curves with '{chosen}' at {args.sizes}, on test")
    for family in args.families:
        for size in args.sizes:
            done = next((row for row in results if row["family"] == family and row["per_class"] == size), None)
            row = done or run_size(family, data[family], args.out / family / f"n{size}", size, seeds, [chosen], (args.gan_steps, args.gan_minutes))
            row["chosen"] = chosen
            if done is None:
                results.append(row)
            path.write_text(json.dumps(results, indent=2))
            point = row["test"][chosen]
            say(f"{family} {size}/class test: real {point['real_only']['balanced_accuracy']:.3f}, + synthetic "
                f"{point['real_plus_synthetic']['balanced_accuracy']:.3f}, gain {point['gain']:+.3f} "
                f"[{point['gain_ci_low']:+.3f}, {point['gain_ci_high']:+.3f}] {point['verdict']}")
    print(table(results, chosen))
    print(f"written: {path}")
    return 0


def table(results: list[dict[str, Any]], chosen: str) -> str:
    """Markdown: per family and size, both arms and the gain on the test split, with 95% intervals."""
    lines = ["| family | subjects/class | real only | real + synthetic | gain [95% interval] | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in sorted(results, key=lambda r: (r["family"], r["per_class"])):
        point = row["test"].get(chosen)
        if point is None:
            continue
        arm = lambda a: f"{a['balanced_accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"  # noqa: E731
        lines.append(f"| {row['family']} | {row['per_class']} | {arm(point['real_only'])} | "
                     f"{arm(point['real_plus_synthetic'])} | {point['gain']:+.3f} [{point['gain_ci_low']:+.3f}, "
                     f"{point['gain_ci_high']:+.3f}] | {point['verdict']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
