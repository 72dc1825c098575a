"""Train the conditional GAN on a dataset's ``train`` split: budgeted, tracked, resumable, DDP-ready.

This module runs the stage: it reads the training images, builds or resumes the networks, loops
over steps within the step and time budgets, and records the run. The step itself is in
:mod:`pipeline.models.step`, checkpoints in :mod:`pipeline.models.checkpoint`, the ``torchrun``
plumbing in :mod:`pipeline.models.distributed`.

Reproducibility: every random draw of a step comes from a stream keyed by ``(seed, rank, step)``,
so a resumed run continues exactly where the interrupted one stopped (same seed on CPU:
bit-identical weights). Checkpoints hold the networks, the EMA, both optimizers, the step and the
process's RNG states, written atomically.

Training changes process-wide torch state (thread count, the global RNG it seeds for the initial
weights, the current CUDA device) only for its own duration: :func:`run` gives it back on return.

Budgets (:mod:`pipeline.models.budget`): the steps are the plan, or with ``max_steps: auto``
convergence of the held-out selection criterion; when the time cap, Ctrl-C or a diverged loss
stops training short of it, ``model.json`` says so (``stopped_early``, ``stop_reason``).

Self-tuning (docs/models.md, "Recipe"): with ``augment: ada`` the augmentation probability follows
the discriminator's overfitting signal (:class:`pipeline.models.augment.AdaController`); with
``select_every`` the EMA generator is scored on the validation split and the best one is exported
(:mod:`pipeline.models.selection`), not the last. Ctrl-C is taken at the next step boundary: the checkpoint is written for that
step and ``KeyboardInterrupt`` raised again, so ``--resume`` continues exactly. Per-step losses
go to ``losses.csv`` (and ``losses.png``) beside the checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.contracts.dataset import Dataset, read_dataset
from pipeline.contracts.model import (
    CHECKPOINT,
    LOSSES_CSV,
    LOSSES_PNG,
    MODEL_JSON,
    SAMPLES_DIR,
    SELECTED_GRID,
    ModelMeta,
    check_image_size,
    read_losses,
    read_model_meta,
    write_model_meta,
)
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.faults import environment_failure
from pipeline.core.files import atomic_path
from pipeline.core.paths import refuse_escaping_folders
from pipeline.core.seeds import stream_seed
from pipeline.core.torch_state import preserved_torch_rng, torch_threads
from pipeline.imaging.gan import ema_copy
from pipeline.imaging.model_dir import build_discriminator, build_generator, load_checkpoint, select_device
from pipeline.imaging.preprocess import Preprocessor, build_spec
from pipeline.models.augment import AdaController
from pipeline.models.budget import (
    ETA_PROBE_SECONDS,
    ETA_PROBE_STEPS,
    StopRecord,
    choose_threads,
    eta_warning,
    planned_steps,
)
from pipeline.models.checkpoint import (
    check_resume_compatible,
    check_start_unchanged,
    initialize_from,
    preserved_host_rng,
    restore_modules,
    restore_rng_states,
    save_checkpoint,
    weights_digest,
)
from pipeline.models.config import PATH_KEYS, ModelConfig
from pipeline.models.distributed import (
    DistContext,
    check_same_weights,
    init_distributed,
    reduce_stats,
    shutdown_distributed,
    wrap_ddp,
)
from pipeline.models.dp import PrivateTraining, check_dp_resume, image_subjects
from pipeline.models.grid import save_loss_plot, save_sample_grid
from pipeline.models.selection import HeldOutJudge, SelectionScore, Selector
from pipeline.models.step import BatchOrder, GanModules, StepSetup, TrainingImages, train_step
from pipeline.tracking import NullTracker, Tracker

__all__ = ["run", "TrainSummary", "TrainingDiverged"]

_log = logging.getLogger(__name__)


class TrainingDiverged(CheckFailed):
    """A loss became NaN or infinite; the last good checkpoint is kept (exit 1)."""


@dataclass
class TrainSummary:
    """What a training run did (returned by :func:`run`; :meth:`lines` is what the CLI prints)."""

    model_dir: Path
    steps: int
    start_step: int
    stopped_by: str
    labels: list[str]
    n_volumes: int
    n_images: int
    images_per_second: float
    session_seconds: float
    train_seconds: float
    world_size: int
    device: str
    run_id: str | None
    weights_digest: str
    losses: dict[str, float] = field(default_factory=dict)
    sample_grid: Path | None = None
    steps_planned: int | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    num_threads: int = 1
    seconds_per_step: float = 0.0
    warnings: list[str] = field(default_factory=list)
    converged: bool = False
    selected: SelectionScore | None = None
    augment_p: float | None = None
    privacy: str | None = None

    def lines(self) -> list[str]:
        """Human-readable summary (an early stop first, then what was done)."""
        resumed = f" (resumed at step {self.start_step})" if self.start_step else ""
        losses = ", ".join(f"{key} {value:.3f}" for key, value in self.losses.items())
        planned = f" of {self.steps_planned} planned" if self.steps_planned is not None else ""
        lines = [f"STOPPED EARLY: {self.stop_reason}; model.json marks the model stopped_early"] if self.stopped_early else []
        lines += [
            f"Trained {self.steps} steps{planned}{resumed} on {self.n_images} images from {self.n_volumes} volumes "
            f"({', '.join(self.labels)}); stopped by {self.stopped_by}",
            f"  {self.session_seconds:.0f} s this session, {self.train_seconds:.0f} s in total, "
            f"{self.images_per_second:.0f} images/s on {self.world_size} x {self.device}"
            + (f" ({self.num_threads} thread{'s' if self.num_threads != 1 else ''})" if self.device == "cpu" else ""),
        ]
        if self.selected is not None:
            best = self.selected
            lines.append(
                f"  exported: the EMA generator of step {best.step} (best on the validation split: FID {best.fid:.2f}, "
                f"label accuracy {best.label_accuracy:.3f} vs {best.real_accuracy:.3f} on real images)"
                + ("; converged" if self.converged else "")
            )
        if self.augment_p is not None:
            lines.append(f"  ADA: augmentation probability p = {self.augment_p:.3f} at the end")
        lines += [f"  warning: {warning}" for warning in self.warnings]
        if self.privacy:
            lines.append(f"  {self.privacy}")
        if losses:
            lines.append(f"  last losses: {losses}")
        lines.append(f"  model: {self.model_dir}")
        if self.sample_grid is not None:
            lines.append(f"  samples: {self.sample_grid}")
        if self.run_id:
            lines.append(f"  MLflow run: {self.run_id}")
        return lines


@dataclass(frozen=True)
class _TrainingData:
    """The real training split, preprocessed onto the model grid.

    Attributes:
        dataset: the dataset folder's contract (manifest, digest).
        rows: its real ``train`` rows (one per volume).
        labels: the class names, sorted; index i is label id i.
        spec: the resolved preprocessing spec (recorded in ``model.json``).
        images: the preprocessed images, ``(N, 1, *image_size)`` float32 in [-1, 1].
        targets: their label ids, ``(N,)`` int64.
        image_ids: each image's id (``<sample_id>#z<k>`` for a 2D slice): DP samples by subject.
    """

    dataset: Dataset
    rows: pd.DataFrame
    labels: list[str]
    spec: dict[str, Any]
    images: torch.Tensor
    targets: torch.Tensor
    image_ids: list[str] = field(default_factory=list)


def _train_rows(dataset: Dataset, data: Path) -> pd.DataFrame:
    rows = dataset.subset(split="train", origin="real")
    if rows.empty:
        raise InputError(
            f"{data / 'manifest.csv'}: no real images in split 'train'. "
            "Fix: train on a dataset written by `medsynth ingest` (it assigns splits by subject)."
        )
    return rows


def _load_training_data(data: Path, config: ModelConfig) -> _TrainingData:
    """Read the dataset's real ``train`` split and preprocess it as ``config`` says."""
    dataset = read_dataset(data)
    rows = _train_rows(dataset, data)
    # Every row's checksum was checked by the plan (pipeline.planning.stage.plan_training) as training began.
    labels = sorted(rows["label"].unique().tolist())
    spec = build_spec(config, dataset, rows)
    images_np, image_labels, image_ids = Preprocessor(spec).dataset_images(dataset, rows)
    if len(images_np) == 0:
        raise InputError(
            f"{data / 'manifest.csv'}: no usable image in split 'train' after preprocessing (every slice empty). "
            "Fix: check model.window / model.intensity against the images, or lower model.min_foreground."
        )
    _refuse_unusable(data, labels, images_np, image_labels, image_ids)
    class_index = {label: index for index, label in enumerate(labels)}
    targets = torch.tensor([class_index[label] for label in image_labels], dtype=torch.long)
    return _TrainingData(dataset, rows, labels, spec, torch.from_numpy(images_np), targets, image_ids)


def _check_writable_model_dir(out: Path, config: ModelConfig) -> None:
    """Refuse, before any data is read, a generator too large to allocate or a samples folder linked elsewhere."""
    problem = check_image_size(list(config.image_size), config.spatial_dims)
    if problem is not None:
        raise InputError(
            f"model.image_size {list(config.image_size)} {problem}. Fix: set a smaller model.image_size "
            "(e.g. 64 x 64 slices or 64^3 volumes)."
        )
    refuse_escaping_folders(out, ("samples",))


def _refuse_unusable(
    data: Path, labels: list[str], images: np.ndarray, image_labels: list[str], image_ids: list[str]
) -> None:
    """Refuse training data a GAN cannot learn from: a class without a usable image, a non-finite image.

    A class whose volumes all preprocess to nothing (empty or NaN) would still get a label id,
    and the generator would learn it from no data at all; one NaN image turns every loss NaN.

    Raises:
        InputError: names the class, or the sample, and the fix (exit 2).
    """
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    usable = Counter(label for label, ok in zip(image_labels, finite) if ok)
    for label in labels:
        if usable[label] == 0:
            raise InputError(
                f"{data / 'manifest.csv'}: class {label!r} has no usable image in split 'train' (its images are empty "
                "after preprocessing or hold NaN/infinite values). Fix: re-ingest (ingest quarantines unusable "
                "images), add usable images of the class, or remove its rows."
            )
    if not finite.all():
        sample = image_ids[int(np.flatnonzero(~finite)[0])].split("#", 1)[0]
        raise InputError(
            f"{data / 'manifest.csv'}: sample {sample} holds NaN or infinite values after preprocessing. "
            "Fix: re-ingest (ingest quarantines unusable images) or remove its row."
        )


def _validation_images(train: _TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """The real ``val`` split on the model grid, with label ids (labels unknown to training are left out)."""
    rows = train.dataset.subset(split="val", origin="real")
    rows = rows[rows["label"].isin(train.labels)]
    if rows.empty:
        return np.zeros((0, 1, *train.images.shape[2:]), dtype=np.float32), np.zeros(0, dtype=np.int64)
    images, image_labels, _ = Preprocessor(train.spec).dataset_images(train.dataset, rows)
    class_index = {label: index for index, label in enumerate(train.labels)}
    return images, np.array([class_index[label] for label in image_labels], dtype=np.int64)


def _selection_setup(
    train: _TrainingData, config: ModelConfig, seed: int, main: bool, data: Path
) -> tuple[HeldOutJudge | None, str | None]:
    """The held-out judge when selection is on and possible (rank 0 only), else a warning saying why not.

    Raises:
        InputError: ``max_steps: auto`` without a usable validation split (nothing could say when to stop).
    """
    if config.dp is not None:  # max_steps: auto is refused with dp when the config loads
        return None, ("DP training: model selection is off (its judge would read the training images outside the "
                      "privacy accounting); the last step is exported")
    if config.select_every == 0:
        if config.max_steps == "auto":
            raise InputError(
                "config key 'model.max_steps': auto stops on the validation criterion, but model.select_every is 0. "
                "Fix: set model.select_every (e.g. 100) or a number of steps."
            )
        return None, None
    val_images, val_targets = _validation_images(train)
    if len(val_targets) < 2:
        if config.max_steps == "auto":
            raise InputError(
                f"{data / 'manifest.csv'}: model.max_steps: auto needs real images in split 'val' to tell when "
                "training has converged, and there are fewer than 2. Fix: ingest with a val split "
                "(ingest.split.val > 0), or set model.max_steps to a number."
            )
        return None, "no real validation images: model selection is off and the last step is exported"
    if not main:
        return None, None
    judge = HeldOutJudge(
        train.images, train.targets, val_images, val_targets, len(train.labels), config.latent_dim, seed
    )
    return judge, None


def _model_meta(config: ModelConfig, seed: int, train: _TrainingData, run_id: str | None, world_size: int) -> ModelMeta:
    """``model.json`` of a run that has not taken a step yet."""
    from pipeline import __version__ as version  # noqa: PLC0415 - package metadata only

    spacing = list(train.spec["spacing"])
    return ModelMeta(
        medsynth_version=version,
        spatial_dims=config.spatial_dims,
        image_size=list(config.image_size),
        spacing=spacing,
        labels=train.labels,
        latent_dim=config.latent_dim,
        mlflow_run_id=run_id,
        mlflow_run_ids=[run_id] if run_id else [],
        seed=seed,
        steps=0,
        steps_planned=planned_steps(config),
        images_seen=0,
        train_seconds=0.0,
        world_size=world_size,
        n_train_volumes=len(train.rows),
        n_train_images=len(train.images),
        # resolved: the spacing used, and the thread count (it changes the CPU float order, hence the weights)
        config={**config.model_dump(mode="json", exclude=PATH_KEYS), "spacing": spacing, "num_threads": torch.get_num_threads()},
        preprocess=train.spec,
        dp=None,
        train_dataset_digest=train.dataset.digest,
        augmentation=_augmentation_record(config, []),
    )


def _augmentation_record(config: ModelConfig, p_history: list[list[float]]) -> dict[str, Any]:
    """``model.json``'s ``augmentation``: the mode and ops, and ADA's p over time."""
    if config.augment == "ada":
        return {
            "mode": "ada",
            "ops": list(config.augment_ops),
            "target": config.ada_target,
            "speed_images": config.ada_speed_images,
            "p_history": p_history,
        }
    return {"mode": "fixed", "ops": list(config.augment), "p_history": []}


@contextlib.contextmanager
def _process_state(num_threads: int | None, device: torch.device) -> Iterator[None]:
    """Set the thread count and CUDA device for training; give back every process-wide state it changes.

    The global RNGs are restored too: training seeds torch's for the initial weights, and a resume
    sets torch's, numpy's and Python's to the checkpoint's.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(num_threads))
        stack.enter_context(preserved_torch_rng())
        stack.enter_context(preserved_host_rng())
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        yield


def run(
    data: Path,
    out: Path,
    config: ModelConfig,
    seed: int = 0,
    resume: bool = False,
    tracker: Tracker = NullTracker(),
    progress: bool = False,
) -> TrainSummary:
    """Train a conditional GAN on ``data``'s real ``train`` split and write MODEL_DIR ``out``.

    The thread count, the current CUDA device and the global random states are the same after
    the call as before it.

    Args:
        data: a dataset folder (manifest.csv + NIfTI files).
        out: MODEL_DIR to write (``model.json``, ``checkpoint.pt``, ``samples/``).
        config: the ``model:`` section.
        seed: seed of weights, data order, noise and augmentation.
        resume: continue from ``out/checkpoint.pt`` (starts fresh when there is none).
        tracker: where to record params, metrics, sample grids, the model and the input dataset.
        progress: show a progress bar (rank 0 only).

    Returns:
        A :class:`TrainSummary`.

    Raises:
        InputError: unusable dataset or config, or an existing checkpoint without ``resume``.
        TrainingDiverged: a loss became NaN/inf (the last good checkpoint is kept).
        EnvironmentFailure: disk full, I/O error or permission while writing ``out`` (exit 1; the
            last complete checkpoint is kept, ``--resume`` continues from it).
    """
    data, out = Path(data), Path(out)
    from pipeline.planning.stage import prepare_training  # noqa: PLC0415 - plan `auto` keys, guard the preprocessing

    config = prepare_training(data, out, config, seed=seed, tracker=tracker)
    ddp = init_distributed(config.device)
    try:
        device = select_device(config.device, ddp.local_rank)
        with _process_state(choose_threads(config), device):
            return _run(data, out, config, seed, resume, tracker if ddp.main else NullTracker(), progress, ddp, device)
    except OSError as exc:
        failure = environment_failure(
            exc, f"writing the model folder {out}",
            "nothing was lost: the last complete checkpoint is kept, and --resume continues from it",
        )
        if failure is None:
            raise
        raise failure from exc
    finally:
        shutdown_distributed(ddp)


def _build_gan(meta: ModelMeta, config: ModelConfig, seed: int) -> GanModules:
    """Fresh networks and optimizers: the same initial weights on every rank (seeded from ``seed``)."""
    torch.manual_seed(stream_seed(seed, "init"))  # the caller restores the global RNG after training
    generator = build_generator(meta)
    discriminator = build_discriminator(meta)
    ema = ema_copy(generator)
    betas = tuple(float(b) for b in config.betas)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=betas)
    return GanModules(generator, generator, discriminator, discriminator, ema, opt_g, opt_d)


def _to_device(
    gan: GanModules, device: torch.device, memory_format: torch.memory_format, ddp: DistContext
) -> GanModules:
    """Move networks and optimizer state to ``device``; wrap the trained networks in DDP when distributed."""
    for module in (gan.generator, gan.discriminator, gan.ema):
        module.to(device, memory_format=memory_format)
    _optimizer_to(gan.opt_g, device)
    _optimizer_to(gan.opt_d, device)
    return dataclasses.replace(
        gan, g_train=wrap_ddp(gan.generator, device, ddp), d_train=wrap_ddp(gan.discriminator, device, ddp)
    )


def _run(
    data: Path,
    out: Path,
    config: ModelConfig,
    seed: int,
    resume: bool,
    tracker: Tracker,
    progress: bool,
    ddp: DistContext,
    device: torch.device,
) -> TrainSummary:
    session_start = time.perf_counter()
    use_bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")
    if config.precision == "bf16" and device.type != "cuda":
        use_bf16 = False  # bf16 autocast is a CUDA feature here; CPU runs stay fp32 (and deterministic)
    memory_format = _memory_format(config)
    _check_writable_model_dir(out, config)
    planned = planned_steps(config)

    # -- data -----------------------------------------------------------------------------------
    train = _load_training_data(data, config)
    labels = train.labels

    # -- state ----------------------------------------------------------------------------------
    checkpoint_path = out / CHECKPOINT
    meta = _model_meta(config, seed, train, tracker.run_id, ddp.world_size)
    if checkpoint_path.exists() and not resume:
        raise InputError(
            f"{out}: already holds a checkpoint. Fix: pass --resume to continue it, or choose an empty --out folder."
        )
    warnings: list[str] = []
    judge, selection_note = _selection_setup(train, config, seed, ddp.main, data)
    if selection_note is not None and ddp.main:
        warnings.append(selection_note)
        _log.warning("warning: %s", selection_note)
    selector = Selector(config.patience) if judge is not None else None
    ada = (
        AdaController(config.ada_target, config.ada_interval, config.ada_speed_images, config.batch_size * ddp.world_size)
        if config.augment == "ada"
        else None
    )
    p_history: list[list[float]] = []
    resumed_converged = False  # known on every rank (rank 0 alone holds the selector)
    gan = _build_gan(meta, config, seed)
    start_step, train_seconds, images_seen = 0, 0.0, 0
    private = None  # differential privacy (model.dp): the private discriminator step and its accountant
    previous = read_model_meta(out) if resume and checkpoint_path.exists() else None
    if previous is not None:
        check_start_unchanged(previous, config, out)
        meta.initialized_from = previous.initialized_from  # the weights already carry the start
    elif config.init_from is not None:
        meta.initialized_from = initialize_from(Path(config.init_from), gan, meta, config)
    if config.dp is not None:
        private = PrivateTraining.create(
            config, image_subjects(train.rows, train.image_ids), ddp.world_size, seed, meta.initialized_from
        )
    if previous is not None:
        check_resume_compatible(previous, meta, config, out)
        check_dp_resume(previous, config, str(out / MODEL_JSON))
        state = load_checkpoint(out)
        if private is not None:
            private.resume(state, str(out / CHECKPOINT))
        restore_modules(state, gan)
        _set_lr(gan.opt_g, config.lr_g)  # the config's learning rates win (e.g. lowered after a divergence)
        _set_lr(gan.opt_d, config.lr_d)
        start_step = int(state["step"])
        train_seconds = float(state["train_seconds"])
        images_seen = int(state["images_seen"])
        meta.steps, meta.train_seconds, meta.images_seen = start_step, round(train_seconds, 3), images_seen
        restore_rng_states(state["rng"])
        meta.mlflow_run_ids = [*previous.mlflow_run_ids, *([tracker.run_id] if tracker.run_id else [])]
        if tracker.run_id is None:
            meta.mlflow_run_id = previous.mlflow_run_id
        if ada is not None and "ada" in state:
            ada.load_state_dict(state["ada"])
            p_history = [list(pair) for pair in (previous.augmentation or {}).get("p_history", []) if pair[0] <= start_step]
        if "selection" in state:
            saved = state["selection"]
            resumed_converged = saved.get("best_step") is not None and int(saved["stale"]) >= config.patience
        if selector is not None and "selection" in state:
            selector.load_state_dict(
                state["selection"], {"ema": state["ema"], "discriminator": state["discriminator"]}
            )
    gan = _to_device(gan, device, memory_format, ddp)

    # -- tracking -------------------------------------------------------------------------------
    _log_params(tracker, config, seed, train, ddp, device, start_step)

    # -- loop -----------------------------------------------------------------------------------
    setup = StepSetup(config, seed, ddp.rank, device, use_bf16, memory_format)
    images = TrainingImages(
        train.images, train.targets, BatchOrder(len(train.images), config.batch_size, ddp.world_size, ddp.rank, seed)
    )
    grid_noise = torch.Generator().manual_seed(stream_seed(seed, "grid"))
    grid_z = torch.randn(len(labels) * config.sample_per_class, config.latent_dim, generator=grid_noise)
    grid_y = torch.arange(len(labels)).repeat_interleave(config.sample_per_class)
    out.mkdir(parents=True, exist_ok=True)
    last_saved = start_step if checkpoint_path.exists() else None
    loss_log = _LossLog(out / LOSSES_CSV, start_step, enabled=ddp.main)

    def note_p(step_now: int) -> None:
        """ADA's p at the end of ``step_now`` (after that step's adjustment), for model.json."""
        if ada is not None and (not p_history or p_history[-1][0] != step_now):
            p_history.append([step_now, round(ada.p, 5)])

    def save(step_now: int, record: StopRecord) -> None:
        nonlocal last_saved
        _apply_stop(meta, record)
        note_p(step_now)
        meta.augmentation = _augmentation_record(config, p_history)
        meta.dp = private.record() if private is not None else None
        exported = None
        if selector is not None:
            meta.selection = selector.record()
            meta.selected_step = selector.best.step if selector.best is not None else None
            if selector.best is not None and selector.best.step != step_now:
                exported = selector.best_state
        if ddp.main:
            loss_log.flush()  # the rows up to the checkpoint's step, so a resume continues the file exactly
            save_checkpoint(
                out, meta, step_now, gan, train_seconds, images_seen,
                ada=ada.state_dict() if ada is not None else None,
                selection=selector.state_dict() if selector is not None else None,
                exported=exported,
                extra=private.checkpoint_state() if private is not None else None,
            )
        last_saved = step_now

    def evaluate(step_now: int) -> None:
        """Score the EMA generator on the validation split (rank 0) and keep it when it is the best so far."""
        assert judge is not None and selector is not None
        score = judge.score(gan.ema, step_now, device, ada.p if ada is not None else None)
        improved = selector.update(score, gan.ema, gan.discriminator)
        tracker.log_metrics(
            {"select_fid": score.fid, "select_label_accuracy": score.label_accuracy, "select_criterion": score.criterion},
            step=step_now,
        )
        if improved:
            tracker.set_tags({"medsynth.selected_step": step_now})

    def grid(step_now: int) -> Path | None:
        if not ddp.main:
            return None
        path = out / "samples" / f"step_{step_now:06d}.png"
        with torch.no_grad():
            fakes = gan.ema(grid_z.to(device), grid_y.to(device)).float().cpu()
        save_sample_grid(fakes, labels, path, config.sample_per_class)
        tracker.log_artifact(path, "samples")
        return path

    step = start_step
    stopped_by = "max_steps"
    losses: dict[str, float] = {}
    window_images, window_start = 0, time.perf_counter()
    throughput = 0.0
    total_images_session = 0
    session_train_seconds = 0.0
    eta_checked = False
    bar = _progress_bar(progress and ddp.main, planned, start_step)
    try:
        with _deferred_interrupt() as interrupt:
            while True:
                if planned is not None and step >= planned:
                    stopped_by = "max_steps"
                    break
                if config.max_steps == "auto" and resumed_converged:
                    stopped_by = "converged"  # a resumed run that had already converged
                    break
                if config.max_minutes is not None and train_seconds >= config.max_minutes * 60.0:
                    stopped_by = "max_minutes"  # a resumed run whose time budget was already spent
                    break
                if private is not None and private.exhausted(step):
                    stopped_by = "privacy_budget"  # the next step would spend more than model.dp.epsilon
                    break
                step_start = time.perf_counter()
                if private is not None:
                    stats = private.train_step(step, setup, gan, images)
                else:
                    stats = train_step(step, setup, gan, images, ada.p if ada is not None else 1.0)
                step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # kernels run asynchronously: time the work, not its launch
                step_seconds = time.perf_counter() - step_start
                train_seconds += step_seconds
                session_train_seconds += step_seconds
                images_seen += config.batch_size * ddp.world_size
                window_images += config.batch_size * ddp.world_size
                total_images_session += config.batch_size * ddp.world_size
                # Stop when one more step would overrun the time budget, so the budget is never exceeded.
                time_up = config.max_minutes is not None and train_seconds + step_seconds > config.max_minutes * 60.0
                # Selection runs on rank 0 only; its verdict reaches every rank with the step's flags.
                converged = False
                if selector is not None and step % config.select_every == 0:
                    evaluate(step)
                    converged = config.max_steps == "auto" and selector.converged
                stats = reduce_stats(
                    stats, {"time_up": time_up, "interrupted": interrupt.is_set(), "converged": converged}, ddp
                )
                losses = {key: value for key, value in stats.items() if key not in ("time_up", "interrupted", "converged")}
                bad = [key for key in ("loss_d", "loss_g") if not math.isfinite(losses[key])]
                if bad:
                    tracker.set_tags({"medsynth.diverged_at_step": step})
                    if last_saved is not None and ddp.main:
                        # model.json goes on describing the kept checkpoint, now marked as a stopped run.
                        _apply_stop(meta, StopRecord.diverged(last_saved, config, step, bad[0], losses[bad[0]]))
                        write_model_meta(out, meta)
                    kept = (
                        f"the last good checkpoint (step {last_saved}) is kept in {checkpoint_path}"
                        if last_saved is not None
                        else "no checkpoint had been written yet"
                    )
                    raise TrainingDiverged(
                        f"training diverged at step {step}: {bad[0]} is {losses[bad[0]]}; {kept}. "
                        "Fix: lower model.lr_d and model.lr_g (or set model.r1_gamma), then re-run with --resume."
                    )
                if ada is not None:
                    # p used by this step, then adjusted from the sign of D(real) (same on every rank: reduced).
                    losses["augment_p"] = ada.p
                    ada.observe(step, losses["real_sign"])
                loss_log.add(step, losses)
                if step % config.log_every == 0 or step == planned:
                    elapsed = time.perf_counter() - window_start
                    throughput = window_images / elapsed if elapsed > 0 else 0.0
                    tracker.log_metrics({**losses, "images_per_s": throughput}, step=step)
                    window_images, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(d=f"{losses['loss_d']:.3f}", g=f"{losses['loss_g']:.3f}", ips=f"{throughput:.0f}")
                    bar.update(1)
                session_steps = step - start_step
                if not eta_checked and (session_steps >= ETA_PROBE_STEPS or session_train_seconds >= ETA_PROBE_SECONDS):
                    eta_checked = True
                    warning = eta_warning(config, device.type, step, session_train_seconds / session_steps, train_seconds)
                    if warning is not None and ddp.main:
                        warnings.append(warning)
                        _log.warning("warning: %s", warning)
                        tracker.set_tags({"medsynth.eta_warning": warning})
                if stats["interrupted"] > 0:
                    # Ctrl-C: this step is complete, so its checkpoint resumes exactly; then stop as asked.
                    save(step, StopRecord.interrupted(step, config))
                    raise KeyboardInterrupt
                if config.sample_every and step % config.sample_every == 0:
                    grid(step)
                if step % config.checkpoint_every == 0:
                    save(step, StopRecord.in_progress(step, config))
                if stats["converged"] > 0:
                    stopped_by = "converged"
                    break
                if stats["time_up"] > 0:
                    stopped_by = "max_minutes"
                    break
    finally:
        if bar is not None:
            bar.close()

    # -- finish ---------------------------------------------------------------------------------
    evaluated_now = selector is not None and step > 0 and step not in selector.evaluated_steps
    if evaluated_now:
        evaluate(step)  # the last step is a candidate too
    converged = selector is not None and selector.converged
    record = StopRecord.finished(
        step, config, by_time=stopped_by == "max_minutes", converged=config.max_steps == "auto" and converged,
        progress=_progress_note(selector),
    )
    if stopped_by == "privacy_budget" and private is not None:
        record = private.stop_record(step)
    if last_saved != step or evaluated_now:
        save(step, record)
    else:
        _apply_stop(meta, record)
        meta.dp = private.record() if private is not None else None
        if ddp.main:
            write_model_meta(out, meta)  # the same checkpoint, now described as finished (or stopped)
    grid_path = grid(step)
    exported_ema = gan.ema
    if selector is not None and selector.best_state is not None and ddp.main:
        exported_ema = build_generator(meta).to(device)
        exported_ema.load_state_dict(selector.best_state["ema"])
        grid_path = _selected_grid(exported_ema, grid_z, grid_y, device, labels, out, config, tracker)
    if ddp.main:
        save_loss_plot(read_losses(out), out / LOSSES_PNG)
        tracker.set_tags(
            {"medsynth.stopped_early": str(record.stopped_early).lower(), "medsynth.converged": str(record.converged).lower()}
        )
    weights = weights_digest(gan.generator, gan.discriminator, gan.ema)
    check_same_weights(weights, ddp)
    if ddp.main:
        if private is not None:
            tracker.log_metrics({"dp_epsilon": private.epsilon(), "dp_delta": private.delta}, step=step)
        _log_final(tracker, out, meta, exported_ema)
    session_seconds = time.perf_counter() - session_start
    session_steps = step - start_step
    return TrainSummary(
        model_dir=out,
        steps=step,
        start_step=start_step,
        stopped_by=stopped_by,
        labels=labels,
        n_volumes=len(train.rows),
        n_images=len(train.images),
        images_per_second=total_images_session / session_train_seconds if session_train_seconds > 0 else 0.0,
        session_seconds=session_seconds,
        train_seconds=train_seconds,
        world_size=ddp.world_size,
        device=device.type,
        run_id=tracker.run_id,
        weights_digest=weights,
        losses=losses,
        sample_grid=grid_path,
        steps_planned=record.steps_planned,
        stopped_early=record.stopped_early,
        stop_reason=record.reason,
        num_threads=torch.get_num_threads(),
        seconds_per_step=session_train_seconds / session_steps if session_steps else 0.0,
        warnings=warnings,
        converged=record.converged,
        selected=selector.best if selector is not None else None,
        augment_p=ada.p if ada is not None else None,
        privacy=private.summary_line() if private is not None else None,
    )


def _progress_note(selector: Selector | None) -> str:
    """Where the selection criterion stood, for a time-capped ``max_steps: auto`` run's reason."""
    if selector is None or selector.best is None:
        return ""
    return (
        f" (best at step {selector.best.step}, {selector.stale} of model.patience={selector.patience} "
        "evaluations since); raise model.max_minutes and --resume to let it converge"
    )


def _selected_grid(
    ema: nn.Module,
    grid_z: torch.Tensor,
    grid_y: torch.Tensor,
    device: torch.device,
    labels: list[str],
    out: Path,
    config: ModelConfig,
    tracker: Tracker,
) -> Path:
    """The exported (selected) generator's sample grid, ``samples/selected.png``."""
    path = out / SAMPLES_DIR / SELECTED_GRID
    with torch.no_grad():
        fakes = ema(grid_z.to(device), grid_y.to(device)).float().cpu()
    save_sample_grid(fakes, labels, path, config.sample_per_class)
    tracker.log_artifact(path, "samples")
    return path


def _apply_stop(meta: ModelMeta, record: StopRecord) -> None:
    """Copy a stop record into ``model.json``'s fields (written with the next checkpoint)."""
    meta.steps_planned = record.steps_planned
    meta.stopped_early = record.stopped_early
    meta.stop_reason = record.reason
    meta.converged = record.converged


class _LossLog:
    """``losses.csv``: one row per step, appended at each checkpoint.

    On a resume the rows after the checkpoint's step (a session that diverged or was killed after
    it) are dropped first, so the file always ends at the step the checkpoint holds.
    """

    def __init__(self, path: Path, start_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[dict[str, float]] = []
        if not enabled:
            return
        kept = read_losses(path.parent) if start_step else {}
        steps = kept.get("step", [])
        keep = [index for index, value in enumerate(steps) if value <= start_step]
        if not keep:
            self.path.unlink(missing_ok=True)
            return
        # Rewritten atomically: a full disk must not cost the rows of the earlier sessions.
        self.rows = [{name: column[index] for name, column in kept.items()} for index in keep]
        with atomic_path(self.path) as tmp:
            self._append(tmp, new=True)
        self.rows = []

    def add(self, step: int, losses: dict[str, float]) -> None:
        if self.enabled:
            self.rows.append({"step": step, **losses})

    def flush(self) -> None:
        if not self.enabled or not self.rows:
            return
        self._append(self.path, new=not self.path.exists())
        self.rows = []

    def _append(self, path: Path, new: bool) -> None:
        with path.open("a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            if new:
                writer.writeheader()
            for row in self.rows:
                writer.writerow({key: int(value) if key == "step" else f"{value:.6g}" for key, value in row.items()})


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C (SIGINT) into a flag the loop checks after each step; a second one interrupts at once.

    A ``KeyboardInterrupt`` raised in the middle of a step would leave the discriminator updated and
    the generator not: a checkpoint of that state could not resume exactly. Outside the main thread
    (where signal handlers cannot be set) the flag is never set and Ctrl-C behaves as usual.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: give back the usual KeyboardInterrupt
        previous = signal.default_int_handler

    def handler(signum: int, frame: object) -> None:
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _log_params(
    tracker: Tracker,
    config: ModelConfig,
    seed: int,
    train: _TrainingData,
    ddp: DistContext,
    device: torch.device,
    start_step: int,
) -> None:
    """The run's parameters and its input dataset (a resumed session is its own MLflow run: it logs all of it)."""
    from pipeline.core.section import flatten

    tracker.log_params(
        {
            **flatten({"model": config.tracked()}),
            "train.seed": seed,
            "train.labels": json.dumps(train.labels),
            "train.n_volumes": len(train.rows),
            "train.n_images": len(train.images),
            "train.world_size": ddp.world_size,
            "train.device": device.type,
            "train.resolved_spacing": json.dumps(train.spec["spacing"]),
            "train.start_step": start_step,
            **({"train.resumed_from_step": start_step} if start_step else {}),
        }
    )
    tracker.set_tags({"medsynth.train_dataset_digest": train.dataset.digest})
    tracker.log_dataset(train.dataset, context="training")


def _memory_format(config: ModelConfig) -> torch.memory_format:
    if not config.channels_last:
        return torch.contiguous_format
    return torch.channels_last if config.spatial_dims == 2 else torch.channels_last_3d


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def _progress_bar(enabled: bool, total: int | None, initial: int):
    if not enabled:
        return None
    from pipeline.core.progress import progress

    return progress(total, "train", "step", enabled=True, initial=initial)


def _log_final(tracker: Tracker, out: Path, meta: ModelMeta, ema: nn.Module) -> None:
    """The EMA generator as an MLflow model (noise + label inputs) and the MODEL_DIR files as artifacts."""
    tracker.log_artifact(out / CHECKPOINT, "checkpoint")
    tracker.log_artifact(out / MODEL_JSON, "checkpoint")
    for name in (LOSSES_CSV, LOSSES_PNG):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "training")
    if not meta.config["log_model"] or tracker.run_id is None:
        return
    exported = build_generator(meta)
    exported.load_state_dict({key: value.detach().cpu() for key, value in ema.state_dict().items()})
    exported.eval().requires_grad_(False)
    example_noise = np.zeros((2, meta.latent_dim), dtype=np.float32)
    example_labels = np.arange(2, dtype=np.int64) % len(meta.labels)
    with torch.no_grad():
        example_out = exported(torch.from_numpy(example_noise), torch.from_numpy(example_labels)).numpy()
    uri = tracker.log_torch_model(
        exported,
        name="generator",
        example_inputs={"noise": example_noise, "labels": example_labels},
        output_example=example_out,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    if uri:
        tracker.set_tags({"medsynth.model_uri": uri})

