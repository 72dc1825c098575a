"""Training throughput (images/s) and GPU utilisation: 2D at 64² and 128², 3D at 64³.

Runs the real training path (``pipeline.models.train.run``: DiffAugment, EMA, bf16 autocast and
channels-last on CUDA) for a fixed number of steps on small phantom datasets, and reports the
images/s of the steps after a warm-up. On CUDA a background thread samples ``nvidia-smi`` for the
GPU utilisation. Without CUDA it says so and reports CPU figures (fewer steps).

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--out runs/bench-throughput]

Under ``torchrun --nproc_per_node N`` each setting runs data-parallel (figures are for all ranks).

``--threads`` measures instead what the thread count does on a shared CPU: the default (CPU-sized)
recipe trained with 1 and 2 torch threads, on a quiet machine and with ``--busy N`` CPU-bound
processes beside it (started with ``nice -n 0``, killed after), and which count ``model.num_threads:
auto`` picks (docs/models.md, "Threads")::

    .venv/bin/python benchmarks/train_throughput.py --threads [--steps 60] [--busy 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.contracts.dataset import write_manifest  # noqa: E402
from pipeline.core.files import sha256_file, write_nifti  # noqa: E402
from pipeline.models.config import ModelConfig  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    spatial_dims: int
    image_size: list[int]
    spacing: list[float]
    volume_shape: tuple[int, int, int]
    volume_spacing: tuple[float, float, float]
    width: int
    batch_size: int
    cpu_batch_size: int


SETTINGS = (
    Setting("2D 64x64", 2, [64, 64], [5.0, 5.0], (128, 128, 16), (2.5, 2.5, 4.0), 32, 64, 32),
    Setting("2D 128x128", 2, [128, 128], [2.5, 2.5], (128, 128, 16), (2.5, 2.5, 4.0), 32, 64, 16),
    Setting("3D 64x64x64", 3, [64, 64, 64], [5.0, 5.0, 5.0], (64, 64, 64), (5.0, 5.0, 5.0), 16, 8, 2),
)


def phantom_set(root: Path, setting: Setting, subjects: int = 4) -> Path:
    """A few phantom volumes of the setting's geometry, all in split train."""
    from pipeline.demo import phantom_affine, phantom_volume

    if (root / "manifest.csv").is_file():
        return root
    rows = []
    for index in range(subjects):
        label = ("normal", "lesion")[index % 2]
        hu, spacing = phantom_volume(np.random.default_rng(index), label, setting.volume_shape, setting.volume_spacing)
        rel = f"images/sub-{index}.nii.gz"
        write_nifti(root / rel, hu, phantom_affine(spacing, hu.shape, 0.0))
        rows.append({"sample_id": f"sub-{index}", "subject_id": f"sub-{index}", "label": label, "split": "train",
                     "path": rel, "origin": "real", "sha256": sha256_file(root / rel)})
    write_manifest(root, pd.DataFrame(rows))
    return root


class GpuSampler:
    """Samples GPU utilisation (%) with nvidia-smi every 0.2 s while active."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        command = ["nvidia-smi", f"--id={self.device_index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=6)

    @property
    def mean(self) -> float | None:
        # drop the first second (start-up, preprocessing) when there is enough to spare
        samples = self.samples[5:] if len(self.samples) > 10 else self.samples
        return float(np.mean(samples)) if samples else None


def measure(setting: Setting, work: Path, steps: int, cuda: bool) -> dict:
    from pipeline.models import train

    data = phantom_set(work / "data" / setting.name.replace(" ", "_"), setting)
    batch = setting.batch_size if cuda else setting.cpu_batch_size
    common = dict(
        spatial_dims=setting.spatial_dims, image_size=setting.image_size, spacing=setting.spacing,
        g_width=setting.width, d_width=setting.width, batch_size=batch, sample_every=0, log_every=10_000,
        checkpoint_every=10_000_000, log_model=False, latent_dim=128, embed_dim=32,
    )
    out = work / "model"
    # Warm-up run (cuDNN autotuning, allocator, first-call overheads), then the measured run.
    warm = max(2, steps // 10)
    shutil.rmtree(out, ignore_errors=True)
    train.run(data, out, ModelConfig(**common, max_steps=warm), seed=0)
    shutil.rmtree(out, ignore_errors=True)
    device_index = int(os.environ.get("LOCAL_RANK", "0"))
    sampler = GpuSampler(device_index) if cuda and shutil.which("nvidia-smi") else None
    if sampler is not None:
        sampler.__enter__()
    try:
        summary = train.run(data, out, ModelConfig(**common, max_steps=steps), seed=0)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    return {
        "setting": setting.name,
        "batch_per_process": batch,
        "width": setting.width,
        "steps": steps,
        "world_size": summary.world_size,
        "images_per_s": round(summary.images_per_second, 1),
        "gpu_utilisation_percent": None if sampler is None or sampler.mean is None else round(sampler.mean, 1),
        "device": summary.device,
    }


def _busy_processes(count: int) -> list[subprocess.Popen]:
    """``count`` CPU-bound processes at normal priority (the other work of a shared machine)."""
    return [
        subprocess.Popen(["nice", "-n", "0", sys.executable, "-c", "while True: pass"]) for _ in range(count)
    ]


def thread_table(work: Path, steps: int, busy: int) -> list[dict]:
    """images/s of the default recipe with 1 and 2 threads, quiet and with ``busy`` CPU-bound processes."""
    from pipeline.models import train
    from pipeline.models.budget import choose_threads

    setting = SETTINGS[0]
    data = phantom_set(work / "data" / setting.name.replace(" ", "_"), setting)
    base = ModelConfig(spacing=setting.spacing, sample_every=0, log_every=10_000, checkpoint_every=10_000_000,
                       log_model=False, device="cpu")
    auto = choose_threads(base)
    rows = []
    for load in ("quiet", "busy"):
        workers = _busy_processes(busy) if load == "busy" else []
        try:
            time.sleep(1.0 if workers else 0.0)
            for threads in (1, 2):
                out = work / "model"
                shutil.rmtree(out, ignore_errors=True)
                config = base.model_copy(update={"num_threads": threads, "max_steps": steps})
                summary = train.run(data, out, config, seed=0)
                rows.append({"load": load, "busy_processes": len(workers), "threads": threads,
                             "auto_choice": auto is not None and auto == threads,
                             "images_per_s": round(summary.images_per_second, 1),
                             "load_average": round(os.getloadavg()[0], 2)})
                print(f"{load:5s} ({len(workers)} busy processes): {threads} thread(s): "
                      f"{rows[-1]['images_per_s']:7.1f} images/s{'  <- auto' if rows[-1]['auto_choice'] else ''}",
                      flush=True)
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="Measured steps per setting (default 60 CUDA, 6 CPU).")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-throughput")
    parser.add_argument("--only", choices=[s.name for s in SETTINGS], action="append", default=None)
    parser.add_argument("--threads", action="store_true", help="1 vs 2 CPU threads, quiet vs busy (default recipe).")
    parser.add_argument("--busy", type=int, default=4, help="CPU-bound processes beside training for --threads.")
    args = parser.parse_args()
    if args.threads:
        print(f"{os.cpu_count()} CPUs, default recipe (model.num_threads: auto), {args.steps or 60} steps per figure")
        rows = thread_table(args.out, args.steps or 60, args.busy)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_threads.json").write_text(json.dumps({"cpus": os.cpu_count(), "results": rows}, indent=2) + "\n")
        return 0
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        if cuda:
            print(f"CUDA device: {torch.cuda.get_device_name(0)} (bf16 autocast, channels-last)")
        else:
            print("no CUDA device: GPU throughput and utilisation not measured; CPU figures follow "
                  f"({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}).")
    steps = args.steps or (60 if cuda else 6)
    results = []
    for setting in SETTINGS:
        if args.only and setting.name not in args.only:
            continue
        result = measure(setting, args.out, steps, cuda)
        results.append(result)
        if rank == 0:
            gpu = result["gpu_utilisation_percent"]
            gpu_text = f", GPU utilisation {gpu:.0f}%" if gpu is not None else ""
            print(f"{setting.name:12s} width {setting.width:3d} batch {result['batch_per_process']:3d} x "
                  f"{result['world_size']}: {result['images_per_s']:8.1f} images/s on {result['device']}{gpu_text}")
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_throughput.json").write_text(json.dumps(
            {"cuda": cuda, "load_average": os.getloadavg(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
