"""Ingest speed: files/s for N real slices, beside the bare pydicom floor and dicognito.

The slices are pydicom's CT_small.dcm and MR_small.dcm, each copied into multi-slice series
(new SOPInstanceUID and ImagePositionPatient per slice, planted PHI), half CT and half MR.

Three figures, each over the same files:

* ``floor``: bare pydicom read + write of every file, split over ``--workers`` processes; the
  least any tool that rewrites DICOM must do.
* ``medsynth``: ``pipeline.ingest.run`` with ``--workers`` processes: scan, group, anonymize with
  the whole Table E.1-1, write anonymized DICOM + one NIfTI per series, manifest, quarantine,
  audit log, and the leak audit of the whole output.
* ``dicognito``: its ``Anonymizer`` (read, anonymize, write), one process, as its CLI runs.

With ``--executor dask`` the rounds compare ingest on the local process pool with the same ingest on
a Dask cluster (``ingest.executor.kind: dask``) of ``--workers`` single-threaded worker processes on
this machine: the cost of the engine. The cluster is started once, outside the timing, as a site's
cluster would already be running; its start-up time is printed apart.

Usage::

    python benchmarks/ingest_speed.py --slices 400 --workers 2
    python benchmarks/ingest_speed.py --slices 2000 --workers 2 --executor dask
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ingest import IngestConfig, run  # noqa: E402


def make_slices(root: Path, count: int, per_series: int = 50) -> list[Path]:
    """Write ``count`` slices as series of ``per_series`` (alternating CT_small / MR_small)."""
    written: list[Path] = []
    series = 0
    while len(written) < count:
        base = ("CT_small.dcm", "MR_small.dcm")[series % 2]
        template = pydicom.dcmread(get_testdata_file(base))
        orientation = np.asarray([float(v) for v in template.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        origin = np.asarray([float(v) for v in template.ImagePositionPatient])
        folder = root / "bench" / f"patient{series:03d}" / f"series{series:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        series_uid = pydicom.uid.generate_uid(entropy_srcs=[f"bench-{series}"])
        template.PatientID = f"PID{series:05d}"
        template.PatientName = f"Doe^Patient{series}"
        template.SeriesInstanceUID = series_uid
        for k in range(min(per_series, count - len(written))):
            template.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"bench-{series}-{k}"])
            template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
            template.InstanceNumber = k + 1
            template.ImagePositionPatient = [float(v) for v in origin + normal * 2.0 * k]
            target = folder / f"slice{k:04d}.dcm"
            template.save_as(target, enforce_file_format=True)
            written.append(target)
        series += 1
    return written


def _read_write(files: list[str], out: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, name in enumerate(files):
            pydicom.dcmread(name).save_as(os.path.join(out, f"{os.getpid()}-{index}.dcm"))
    return len(files)


def floor(files: list[Path], workers: int, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    chunks = [[str(path) for path in files[index::workers]] for index in range(workers)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = sum(pool.map(_read_write, chunks, [str(out)] * workers))
    elapsed = time.perf_counter() - start
    assert done == len(files)
    return len(files) / elapsed


def medsynth(source: Path, workers: int, out: Path, executor: dict | None = None) -> float:
    config = IngestConfig(workers=workers, executor=executor or {"kind": "local"})
    start = time.perf_counter()
    summary = run([source], out / "dataset", config, private=out / "private")
    elapsed = time.perf_counter() - start
    assert summary.dicom_files_written + summary.quarantined_files == summary.files_seen
    return summary.files_seen / elapsed


def dicognito(files: list[Path], out: Path) -> float | None:
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    anonymizer = Anonymizer()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, path in enumerate(files):
            ds = pydicom.dcmread(path)
            anonymizer.anonymize(ds)
            ds.save_as(out / f"{index}.dcm")
    return len(files) / (time.perf_counter() - start)


def compare_dask(root: Path, files: list[Path], workers: int, repeat: int) -> None:
    """Interleaved rounds of ingest on the local pool and on a Dask LocalCluster; print both and the ratio."""
    from distributed import LocalCluster

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    startup = time.perf_counter() - start
    dask = {"kind": "dask", "address": cluster.scheduler_address}
    rounds: list[tuple[float, float]] = []
    try:
        for attempt in range(repeat):
            scratch = root / f"run{attempt}"
            pool = medsynth(root / "src", workers, scratch / "pool")
            engine = medsynth(root / "src", workers, scratch / "dask", dask)
            rounds.append((pool, engine))
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        cluster.close()
    best_pool, best_dask = max(pool for pool, _ in rounds), max(engine for _, engine in rounds)
    print(f"ingest on Dask vs the local pool, {len(files)} slices (CT_small/MR_small series), best of {repeat}:")
    print(f"  local pool ({workers} processes):          {best_pool:8.1f} files/s")
    print(f"  Dask ({workers} worker processes, running): {best_dask:8.1f} files/s")
    print(f"  dask / local pool: {best_dask / best_pool:5.2f}  (goal >= 0.85; per round: "
          + ", ".join(f"{engine / pool:.2f}" for pool, engine in rounds) + ")")
    print(f"  LocalCluster start-up (once per run without an address): {startup:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=400, help="number of slices (files)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the floor and for medsynth")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the best is reported")
    parser.add_argument("--executor", choices=("local", "dask"), default="local",
                        help="dask: compare the local pool with a Dask cluster of --workers processes")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medsynth-bench-"))
    try:
        files = make_slices(root / "src", args.slices)
        if args.executor == "dask":
            compare_dask(root, files, args.workers, args.repeat)
            return
        results: dict[str, float | None] = {"floor": 0.0, "medsynth": 0.0, "dicognito": 0.0}
        rounds: list[tuple[float, float]] = []
        for attempt in range(args.repeat):
            # Interleaved rounds: on a shared machine the load changes between runs, and the
            # ratio within one round is the fairest comparison.
            scratch = root / f"run{attempt}"
            speed_floor = floor(files, args.workers, scratch / "floor")
            speed_ours = medsynth(root / "src", args.workers, scratch / "medsynth")
            rounds.append((speed_floor, speed_ours))
            results["floor"] = max(results["floor"] or 0.0, speed_floor)
            results["medsynth"] = max(results["medsynth"] or 0.0, speed_ours)
            speed = dicognito(files, scratch / "dicognito")
            results["dicognito"] = None if speed is None else max(results["dicognito"] or 0.0, speed)
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"ingest speed, {len(files)} slices (CT_small/MR_small series), best of {args.repeat}:")
        print(f"  floor     (pydicom read+write, {args.workers} processes): {results['floor']:8.1f} files/s")
        print(f"  medsynth  (ingest, {args.workers} workers):                  {results['medsynth']:8.1f} files/s")
        if results["dicognito"] is None:
            print("  dicognito: not installed (pip install dicognito)")
        else:
            print(f"  dicognito (1 process):                            {results['dicognito']:8.1f} files/s")
        ratio_floor = (results["medsynth"] or 0.0) / (results["floor"] or 1.0)
        print(f"  medsynth / floor:     {ratio_floor:5.2f}  (goal >= 0.8; per round: "
              + ", ".join(f"{ours / base:.2f}" for base, ours in rounds) + ")")
        if results["dicognito"]:
            print(f"  medsynth / dicognito: {(results['medsynth'] or 0.0) / results['dicognito']:5.2f}  (goal >= 3)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
