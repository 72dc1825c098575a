"""Quality at a given epsilon: the demo cohort trained at epsilon 1, 4, 10 and without DP, audited with canaries.

For each epsilon (``inf``: the same recipe with ``model.dp: null``) the script trains the model of
``--config`` (default ``configs/dp.yaml``) with the train stage, generates, evaluates with the
evaluate stage and reads ``report.json``: FID and the size-matched real-vs-real reference FID,
GAN-test balanced accuracy (``utility.synthetic_label_accuracy``: a classifier trained on real
images labels the synthetic ones), the pixel-distance membership attack's AUC and TPR at 1% FPR,
the gates, and the training time and its overhead against the non-private run.

Canaries: ``--canaries`` phantom subjects carrying a bright marker (a cross in every slice) join
the training split as members, as many more are written beside it as non-members. After each
run the discriminator's mean score per canary subject is the membership attack, and
:func:`pipeline.evaluate.dp_audit.epsilon_lower_bound` turns it into the epsilon it proves; the
script checks that it stays below the accountant's epsilon.

Public start (``--public-subjects N``): the model of ``--public-config`` (default
``configs/dp_public.yaml``) is first trained without DP on a phantom cohort of its own seed (other
patients: a public stand-in), and every run starts from its weights (``model.init_from``); a
"public only" row evaluates that model as it is, so the table shows what the private fine-tuning
adds. Without it every run starts from random weights.

    nice -n 10 .venv/bin/python benchmarks/dp_tradeoff.py [--epsilons 1,4,10,inf] [--out runs/bench-dp] [--public-subjects 80]

Exit status 0 when every audited lower bound stays below its accounted epsilon, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline.config import load_config  # noqa: E402
from pipeline.contracts.dataset import read_dataset, write_manifest  # noqa: E402
from pipeline.core.files import sha256_file, write_nifti  # noqa: E402

CANARY_PREFIX = "canary"


def canary_volume(rng: np.random.Generator, label: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A phantom subject with a bright cross (200 HU, inside the soft-tissue window) at a random place in the body."""
    from pipeline.demo import phantom_volume

    hu, spacing = phantom_volume(rng, label)
    nx, ny, _ = hu.shape
    cx, cy = int(rng.integers(nx * 3 // 8, nx * 5 // 8)), int(rng.integers(ny * 3 // 8, ny * 5 // 8))
    arm, width = nx // 10, max(2, nx // 40)
    hu[cx - arm : cx + arm, cy - width : cy + width, :] = 200.0
    hu[cx - width : cx + width, cy - arm : cy + arm, :] = 200.0
    return hu, spacing


def add_canaries(data: Path, non_members: Path, count: int, seed: int) -> tuple[list[str], list[str]]:
    """Add ``count`` canary subjects to ``data``'s train split and write ``count`` more to dataset ``non_members``.

    Returns:
        The member and the non-member canary subject ids.
    """
    from pipeline.demo import LABELS, phantom_affine

    rng = np.random.default_rng(seed)
    dataset = read_dataset(data)
    rows_in, rows_out = [], []
    for index in range(2 * count):
        label = LABELS[index % len(LABELS)]
        hu, spacing = canary_volume(np.random.default_rng(rng.integers(2**32)), label)
        member = index % 2 == 0 if count else False
        root = data if member else non_members
        name = f"{CANARY_PREFIX}-{index:03d}"
        rel = f"images/{name}.nii.gz"
        write_nifti(root / rel, hu, phantom_affine(spacing, hu.shape, -350.0))
        row = {"sample_id": name, "subject_id": name, "label": label, "split": "train", "path": rel,
               "origin": "real", "sha256": sha256_file(root / rel)}
        (rows_in if member else rows_out).append(row)
    manifest = dataset.manifest
    extra = [column for column in manifest.columns if column not in rows_in[0]]
    for row in rows_in + rows_out:
        row.update({column: "" for column in extra})
    write_manifest(data, pd.concat([manifest, pd.DataFrame(rows_in)], ignore_index=True))
    write_manifest(non_members, pd.DataFrame(rows_out)[list(manifest.columns)])
    return [row["subject_id"] for row in rows_in], [row["subject_id"] for row in rows_out]


def audit(model_dir: Path, data: Path, non_members: Path, members: list[str], delta: float) -> dict:
    """The canary membership attack on ``model_dir`` and the epsilon it proves at ``delta``."""
    from pipeline.evaluate.dp_audit import epsilon_lower_bound, subject_scores

    inside = subject_scores(model_dir, data)
    outside = subject_scores(model_dir, non_members)
    result = epsilon_lower_bound(np.array([inside[m] for m in members]), np.array(list(outside.values())), delta)
    return result.as_dict()


def model_config_at(config, epsilon: float, **changes):
    """``config.model`` at ``epsilon`` (inf: ``dp: null``) with ``changes``, validated as a config file would be."""
    from pipeline.models.config import DPConfig

    dp = None if math.isinf(epsilon) else DPConfig(**{**(config.model.dp.model_dump() if config.model.dp else {}), "epsilon": epsilon})
    model_config = config.model.model_copy(update={"dp": dp, **changes})
    return type(model_config).model_validate(model_config.model_dump())


def train_public_model(public_config, work: Path, subjects: int) -> Path:
    """The model ``public_config`` trains without DP on a public stand-in: a phantom cohort of its own seed.

    Its seed differs from the private config's, so its patients are others; its weights start every
    private run (``model.init_from``), and the private training data never reaches it.
    """
    from pipeline.models import train

    public = work / f"public_{subjects}_seed{public_config.seed}"
    if not (public / "model" / "model.json").is_file():
        shutil.rmtree(public, ignore_errors=True)
        from train_quality import real_dataset

        data, how = real_dataset(public, subjects, public_config.seed, public_config, force_fallback=False)
        print(f"public dataset: {how}")
        model_config = model_config_at(public_config, math.inf, init_from=None)
        print(f"public model: {model_config.max_steps} steps without DP (load {os.getloadavg()[0]:.2f})", flush=True)
        summary = train.run(data, public / "model", model_config, seed=public_config.seed)
        for line in summary.lines():
            print(f"  {line}")
    return public / "model"


def run_one(
    epsilon: float,
    config,
    data: Path,
    non_members: Path,
    members: list[str],
    work: Path,
    init_from: Path | None = None,
    trained: Path | None = None,
) -> dict:
    """Train, generate, evaluate and audit at ``epsilon`` (inf: DP off); the figures of one row.

    ``init_from``: start training from this model's weights. ``trained``: evaluate this model as it
    is, without training on ``data`` (the public-only row).
    """
    from pipeline import evaluate
    from pipeline.contracts.report import Report, headline_figures
    from pipeline.models import generate, train

    folder = work / ("public_only" if trained else "eps_inf" if math.isinf(epsilon) else f"eps_{epsilon:g}")
    shutil.rmtree(folder, ignore_errors=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if trained is None:
        model_config = model_config_at(config, epsilon, init_from=str(init_from) if init_from else None)
        summary = train.run(data, folder / "model", model_config, seed=config.seed)
    else:
        shutil.copytree(trained, folder / "model")
        meta_public = json.loads((trained / "model.json").read_text())
        summary = argparse.Namespace(
            steps=0, stopped_early=False, train_seconds=0.0,
            lines=lambda: [f"no private training: the public model ({meta_public['steps']} steps) as it is"],
        )
    train_wall = time.perf_counter() - started
    for line in summary.lines():
        print(f"  {line}")
    generate.run(folder / "model", folder / "synthetic", config.generate)
    report = evaluate.run(data, folder / "synthetic", folder / "report", config.evaluate, model_dir=folder / "model")
    figures = headline_figures(Report.model_validate(report))
    meta = json.loads((folder / "model" / "model.json").read_text())
    delta = meta["dp"]["delta"] if meta["dp"] else 1.0 / (10 * meta["n_train_volumes"])
    canary = audit(folder / "model", data, non_members, members, delta) if members else None
    gates = {name: value["status"] if isinstance(value, dict) else value for name, value in report["gates"].items()
             if name in ("fidelity", "diversity", "privacy", "utility")}
    return {
        "row": "public only" if trained else None,
        "epsilon_target": None if math.isinf(epsilon) else epsilon,
        "epsilon_accounted": figures["epsilon"],
        "delta": figures["delta"],
        "noise_multiplier": meta["dp"]["noise_multiplier"] if meta["dp"] else None,
        "sample_rate": meta["dp"]["sample_rate"] if meta["dp"] else None,
        "steps": summary.steps,
        "stopped_early": summary.stopped_early,
        "fid": figures["fid"],
        "reference_fid": figures["reference_fid"],
        "gan_test_balanced_accuracy": figures["synthetic_label_accuracy"],
        "mia_auc": figures["mia_auc"],
        "mia_tpr_at_1pct_fpr": figures["mia_tpr_at_1pct_fpr"],
        "gates": gates,
        "train_seconds": round(summary.train_seconds, 1),
        "train_wall_seconds": round(train_wall, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "canary_audit": canary,
    }


def _show(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "dp.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-dp")
    parser.add_argument("--epsilons", default="1,4,10,inf", help="Comma-separated; inf trains without DP.")
    parser.add_argument("--subjects", type=int, default=80, help="Phantom subjects (as `medsynth demo`).")
    parser.add_argument("--canaries", type=int, default=8, help="Member canaries (as many non-members).")
    parser.add_argument("--reuse-data", action="store_true", help="Reuse OUT/ingested (and its canaries).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a config key (YAML).")
    parser.add_argument(
        "--public-subjects", type=int, default=0,
        help="Train --public-config's model without DP on a public stand-in cohort of this many phantom subjects "
        "(its own seed: other patients) and start every run from it (model.init_from); adds a 'public only' row. "
        "0: every run starts from random weights.",
    )
    parser.add_argument("--public-config", type=Path, default=REPO / "configs" / "dp_public.yaml")
    args = parser.parse_args()

    import yaml

    from train_quality import real_dataset

    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = load_config(args.config, overrides)
    work = args.out
    state = work / "canaries.json"
    if args.reuse_data and state.is_file():
        members = json.loads(state.read_text())["members"]
        data = work / "ingested"
    else:
        shutil.rmtree(work, ignore_errors=True)
        data, how = real_dataset(work, args.subjects, config.seed, config, force_fallback=False)
        print(f"dataset: {how}")
        members, _ = add_canaries(data, work / "non_member_canaries", args.canaries, config.seed) if args.canaries else ([], [])
        state.write_text(json.dumps({"members": members}) + "\n")
    epsilons = [float(value) for value in args.epsilons.split(",")]
    rows = []
    public_model = None
    if args.public_subjects:
        public_model = train_public_model(load_config(args.public_config), work, args.public_subjects)
        print(f"public only (load {os.getloadavg()[0]:.2f})", flush=True)
        rows.append(run_one(math.inf, config, data, work / "non_member_canaries", members, work, trained=public_model))
    for epsilon in epsilons:
        print(f"epsilon {epsilon:g}: training (load {os.getloadavg()[0]:.2f})", flush=True)
        rows.append(run_one(epsilon, config, data, work / "non_member_canaries", members, work, init_from=public_model))
        (work / "dp_tradeoff.json").write_text(json.dumps(rows, indent=2) + "\n")
    baseline = next((row for row in rows if row["epsilon_target"] is None and not row.get("row")), None)
    header = ("eps target", "eps spent", "delta", "noise", "FID (ref)", "GAN-test bal. acc", "MIA AUC", "TPR@1%FPR",
              "train s", "overhead", "canary eps_lb", "gates F/D/P/U", "load")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    ok = True
    for row in rows:
        overhead = row["train_seconds"] / baseline["train_seconds"] if baseline and baseline["train_seconds"] else None
        lower = row["canary_audit"]["epsilon_lower_bound"] if row["canary_audit"] else None
        if lower is not None and row["epsilon_accounted"] is not None and lower > row["epsilon_accounted"]:
            ok = False
        gates = "/".join(str(row["gates"].get(name, "n/a"))[:4] for name in ("fidelity", "diversity", "privacy", "utility"))
        print("| " + " | ".join([
            row.get("row") or (_show(row["epsilon_target"]) if row["epsilon_target"] else "inf (no DP)"), _show(row["epsilon_accounted"]),
            _show(row["delta"]), _show(row["noise_multiplier"]), f"{_show(row['fid'])} ({_show(row['reference_fid'])})",
            _show(row["gan_test_balanced_accuracy"]), _show(row["mia_auc"]), _show(row["mia_tpr_at_1pct_fpr"]),
            _show(row["train_seconds"]), f"{overhead:.2f}x" if overhead else "n/a", _show(lower), gates,
            f"{row['load_before']:.1f}-{row['load_after']:.1f}",
        ]) + " |")
    print(f"results: {work / 'dp_tradeoff.json'}")
    print("canary audit: every lower bound below its accounted epsilon" if ok else "canary audit: a lower bound EXCEEDS epsilon")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
