"""Benchmark: the whole evaluate stage on 1,000 real vs 1,000 synthetic 64x64 images, 2 CPU threads.

Goal (issue #5): <= 30 s for every metric (torch-fidelity's FID + KID alone took 289 s here).
The datasets come from :mod:`_controlled` (phantom slices; synthetic = independent
draws) and are written once to ``--workdir``; the timed part is ``pipeline.evaluate.run`` end to end:
reading and preprocessing 2,000 NIfTI files, training the encoder, both feature spaces, FID/KID/PRDC
(overall, reference, matched, per class), MS-SSIM, DCR/memorization/MIA with bootstrap intervals,
the augmented classifier, and writing report.json + report.html.

Usage::

    .venv/bin/python benchmarks/evaluate_speed.py [--workdir DIR] [--threads 2] [--repeats 1]

Prints the machine load (1-minute average) before and after: the 2 cores are shared, so a loaded
machine reads slower.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medsynth-evaluate-bench")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the goal is stated for 2 cores)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=500, help="real subjects and synthetic images per class")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from pipeline.contracts.dataset import read_dataset
    from pipeline.evaluate import run
    from pipeline.evaluate.config import EvaluateConfig
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the controlled fixtures live with the tests
    from _controlled import make_real_dataset, make_synthetic_dataset

    real, synthetic = args.workdir / "real", args.workdir / "synthetic"
    if not (synthetic / "manifest.csv").is_file():
        started = time.perf_counter()
        make_real_dataset(real, per_class=args.per_class, size=args.size, seed=0)
        make_synthetic_dataset(synthetic, read_dataset(real), "independent", per_class=args.per_class, seed=1)
        print(f"wrote the datasets to {args.workdir} in {time.perf_counter() - started:.1f} s (not timed)")
    config = EvaluateConfig(num_threads=args.threads)
    for repeat in range(args.repeats):
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        report = run(real, synthetic, args.workdir / "report", config)
        elapsed = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        print(
            f"run {repeat + 1}: {elapsed:.1f} s for {report['inputs']['real']['images']} real vs "
            f"{report['inputs']['synthetic']['images']} synthetic {args.size}x{args.size} images, "
            f"{args.threads} torch threads; load average {load_before:.2f} before, {load_after:.2f} after "
            f"({os.cpu_count()} cores)"
        )
    print(
        "gates: "
        + ", ".join(f"{gate} {report['gates'][gate]}" for gate in ("fidelity", "diversity", "privacy", "utility"))
    )


if __name__ == "__main__":
    main()
