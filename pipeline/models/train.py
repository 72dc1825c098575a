"""Train the conditional GAN on a dataset's ``train`` split: budgeted, tracked, resumable, DDP-ready.

One step: the generator draws a batch of fakes for the real batch's labels; the discriminator
sees real and fake together (one call, DiffAugment applied to both) and takes a hinge (or
non-saturating) step; then the generator takes a step against the updated discriminator; then the
EMA copy of the generator moves towards it.

Reproducibility: every random draw of step ``t`` on rank ``r`` comes from a generator seeded with
``(seed, r, t)`` and the data order of epoch ``e`` from ``(seed, e)``. A resumed run therefore
continues exactly where the interrupted one stopped (same seed on CPU: bit-identical weights),
without replaying any random stream. Checkpoints hold the networks, the EMA, both optimizers, the
step and the process's RNG states, written atomically.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1) both networks are wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 alone logs and writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.contracts.dataset import Dataset, read_dataset
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.seeds import stream_seed
from pipeline.core.files import atomic_path, atomic_write_json
from pipeline.models.augment import diff_augment
from pipeline.models.config import ModelConfig
from pipeline.models.grid import save_sample_grid
from pipeline.models.model_dir import (
    CHECKPOINT,
    build_discriminator,
    build_generator,
    load_checkpoint,
    read_model_json,
    select_device,
)
from pipeline.models.networks import ema_copy, ema_update
from pipeline.imaging.preprocess import MODEL_JSON, Preprocessor, build_spec
from pipeline.tracking import NullTracker, Tracker

__all__ = ["run", "TrainSummary", "TrainingDiverged", "FORMAT_VERSION", "ARCHITECTURE_KEYS"]

FORMAT_VERSION = 1
# Keys of ModelConfig that shape the networks or their inputs: a resumed run must keep them.
ARCHITECTURE_KEYS = ("spatial_dims", "image_size", "latent_dim", "embed_dim", "g_width", "d_width")


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

    def lines(self) -> list[str]:
        """Human-readable summary."""
        resumed = f" (resumed at step {self.start_step})" if self.start_step else ""
        losses = ", ".join(f"{key} {value:.3f}" for key, value in self.losses.items())
        lines = [
            f"Trained {self.steps} steps{resumed} on {self.n_images} images from {self.n_volumes} volumes "
            f"({', '.join(self.labels)}); stopped by {self.stopped_by}",
            f"  {self.session_seconds:.0f} s this session, {self.train_seconds:.0f} s in total, "
            f"{self.images_per_second:.0f} images/s on {self.world_size} x {self.device}",
        ]
        if losses:
            lines.append(f"  last losses: {losses}")
        lines.append(f"  model: {self.model_dir}")
        if self.sample_grid is not None:
            lines.append(f"  samples: {self.sample_grid}")
        if self.run_id:
            lines.append(f"  MLflow run: {self.run_id}")
        return lines


# ------------------------------------------------------------------------------------------------
# Randomness that depends only on (seed, stream, counters): nothing to replay on resume
# ------------------------------------------------------------------------------------------------


class _BatchOrder:
    """Which training images rank ``rank`` uses at step ``t``: epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n_images: int, batch_size: int, world_size: int, rank: int, seed: int) -> None:
        self.n = n_images
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(stream_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=generator)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        start = (step * self.world_size + self.rank) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs = positions // self.n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[positions[mask] % self.n]
        return out


# ------------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        owns_group=owns,
    )


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _weights_digest(*modules: nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with contiguous CPU tensors (channels-last and CUDA tensors saved portably)."""
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _train_rows(dataset: Dataset, data: Path):
    rows = dataset.subset(split="train", origin="real")
    if rows.empty:
        raise InputError(
            f"{data / 'manifest.csv'}: no real images in split 'train'. "
            "Fix: train on a dataset written by `medsynth ingest` (it assigns splits by subject)."
        )
    return rows


def _check_resume_compatible(
    meta: dict[str, Any], config: ModelConfig, seed: int, labels: list[str], spec: dict, digest: str, out: Path
) -> None:
    where = out / MODEL_JSON
    for key in ARCHITECTURE_KEYS:
        before = meta["config"].get(key)
        now = getattr(config, key)
        if before != now:
            raise InputError(
                f"{where}: the checkpoint was trained with model.{key} = {before!r}, the config now says {now!r}. "
                "Fix: resume with the original value, or train into a new --out folder."
            )
    if meta.get("seed") != seed:
        raise InputError(
            f"{where}: the checkpoint was trained with seed {meta.get('seed')!r}, this run says {seed!r}; "
            "a different seed would silently change the noise and data order mid-run. "
            "Fix: resume with the original --seed, or train into a new --out folder."
        )
    if meta["labels"] != labels:
        raise InputError(
            f"{where}: the checkpoint's labels {meta['labels']} differ from the dataset's {labels}. "
            "Fix: resume on the same dataset, or train into a new --out folder."
        )
    if meta["preprocess"] != spec:
        raise InputError(
            f"{where}: the preprocessing changed since the checkpoint was written. "
            "Fix: resume with the original preprocessing keys, or train into a new --out folder."
        )
    if meta.get("train_dataset_digest") != digest:
        raise InputError(
            f"{where}: the training data changed since the checkpoint was written (digest differs). "
            "Fix: resume on the same dataset, or train into a new --out folder."
        )


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
    """
    data, out = Path(data), Path(out)
    ddp = _init_distributed(config.device)
    try:
        return _run(data, out, config, seed, resume, tracker if ddp.main else NullTracker(), progress, ddp)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    data: Path,
    out: Path,
    config: ModelConfig,
    seed: int,
    resume: bool,
    tracker: Tracker,
    progress: bool,
    ddp: _Dist,
) -> TrainSummary:
    session_start = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = select_device(config.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")
    if config.precision == "bf16" and device.type != "cuda":
        use_bf16 = False  # bf16 autocast is a CUDA feature here; CPU runs stay fp32 (and deterministic)
    memory_format = _memory_format(config)

    # -- data -----------------------------------------------------------------------------------
    dataset = read_dataset(data)
    rows = _train_rows(dataset, data)
    labels = sorted(rows["label"].unique().tolist())
    spec = build_spec(config, dataset, rows)
    preprocessor = Preprocessor(spec)
    images_np, image_labels, _ = preprocessor.dataset_images(dataset, rows)
    if len(images_np) == 0:
        raise InputError(
            f"{data / 'manifest.csv'}: no usable image in split 'train' after preprocessing (every slice empty). "
            "Fix: check model.window / model.intensity against the images, or lower model.min_foreground."
        )
    class_index = {label: index for index, label in enumerate(labels)}
    images = torch.from_numpy(images_np)
    targets = torch.tensor([class_index[label] for label in image_labels], dtype=torch.long)
    digest = dataset.digest

    # -- state ----------------------------------------------------------------------------------
    checkpoint_path = out / CHECKPOINT
    meta = _model_meta(config, seed, labels, spec, digest, tracker.run_id, ddp.world_size, len(rows), len(images))
    if checkpoint_path.exists() and not resume:
        raise InputError(
            f"{out}: already holds a checkpoint. Fix: pass --resume to continue it, or choose an empty --out folder."
        )
    torch.manual_seed(stream_seed(seed, "init"))  # identical initial weights on every rank
    generator = build_generator(meta)
    discriminator = build_discriminator(meta)
    ema = ema_copy(generator)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=tuple(float(b) for b in config.betas))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=tuple(float(b) for b in config.betas))
    start_step, train_seconds, images_seen = 0, 0.0, 0
    if resume and checkpoint_path.exists():
        previous = read_model_json(out)
        _check_resume_compatible(previous, config, seed, labels, spec, digest, out)
        state = load_checkpoint(out)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        _set_lr(opt_g, config.lr_g)  # the config's learning rates win (e.g. lowered after a divergence)
        _set_lr(opt_d, config.lr_d)
        start_step = int(state["step"])
        train_seconds = float(state["train_seconds"])
        images_seen = int(state["images_seen"])
        _restore_rng_states(state["rng"])
        meta["mlflow_run_ids"] = [*previous.get("mlflow_run_ids", []), *([tracker.run_id] if tracker.run_id else [])]
        if tracker.run_id is None:
            meta["mlflow_run_id"] = previous.get("mlflow_run_id")

    generator.to(device, memory_format=memory_format)
    discriminator.to(device, memory_format=memory_format)
    ema.to(device, memory_format=memory_format)
    _optimizer_to(opt_g, device)
    _optimizer_to(opt_d, device)
    g_train, d_train = generator, discriminator
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        g_train = DDP(generator, device_ids=ids)
        d_train = DDP(discriminator, device_ids=ids)

    # -- tracking -------------------------------------------------------------------------------
    from pipeline.core.section import flatten

    tracker.log_params(
        {
            **flatten({"model": config.model_dump(mode="json")}),
            "train.seed": seed,
            "train.labels": json.dumps(labels),
            "train.n_volumes": len(rows),
            "train.n_images": len(images),
            "train.world_size": ddp.world_size,
            "train.device": device.type,
            "train.resolved_spacing": json.dumps(spec["spacing"]),
            # A resumed session is its own MLflow run: it logs the full config too, plus where it started.
            "train.start_step": start_step,
            **({"train.resumed_from_step": start_step} if start_step else {}),
        }
    )
    tracker.set_tags({"medsynth.train_dataset_digest": digest})
    tracker.log_dataset(dataset, context="training")

    # -- loop -----------------------------------------------------------------------------------
    order = _BatchOrder(len(images), config.batch_size, ddp.world_size, ddp.rank, seed)
    grid_noise = torch.Generator().manual_seed(stream_seed(seed, "grid"))
    grid_z = torch.randn(len(labels) * config.sample_per_class, config.latent_dim, generator=grid_noise)
    grid_y = torch.arange(len(labels)).repeat_interleave(config.sample_per_class)
    out.mkdir(parents=True, exist_ok=True)
    last_saved = start_step if checkpoint_path.exists() else None

    def save(step_now: int) -> None:
        nonlocal last_saved
        if ddp.main:
            _save_checkpoint(out, meta, step_now, generator, discriminator, ema, opt_g, opt_d, train_seconds, images_seen)
        last_saved = step_now

    def grid(step_now: int) -> Path | None:
        if not ddp.main:
            return None
        path = out / "samples" / f"step_{step_now:06d}.png"
        with torch.no_grad():
            fakes = ema(grid_z.to(device), grid_y.to(device)).float().cpu()
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
    bar = _progress_bar(progress and ddp.main, config.max_steps, start_step)
    try:
        while True:
            if config.max_steps is not None and step >= config.max_steps:
                stopped_by = "max_steps"
                break
            if config.max_minutes is not None and train_seconds >= config.max_minutes * 60.0:
                stopped_by = "max_minutes"  # a resumed run whose time budget was already spent
                break
            step_start = time.perf_counter()
            stats = _train_step(
                step, config, seed, ddp, device, use_bf16, memory_format, images, targets, order,
                generator, g_train, discriminator, d_train, ema, opt_g, opt_d,
            )
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
            stats = _reduce(stats, time_up, ddp)
            losses = {key: value for key, value in stats.items() if key != "time_up"}
            bad = [key for key in ("loss_d", "loss_g") if not math.isfinite(losses[key])]
            if bad:
                tracker.set_tags({"medsynth.diverged_at_step": step})
                kept = (
                    f"the last good checkpoint (step {last_saved}) is kept in {checkpoint_path}"
                    if last_saved is not None
                    else "no checkpoint had been written yet"
                )
                raise TrainingDiverged(
                    f"training diverged at step {step}: {bad[0]} is {losses[bad[0]]}; {kept}. "
                    "Fix: lower model.lr_d and model.lr_g (or set model.r1_gamma), then re-run with --resume."
                )
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                throughput = window_images / elapsed if elapsed > 0 else 0.0
                tracker.log_metrics({**losses, "images_per_s": throughput}, step=step)
                window_images, window_start = 0, time.perf_counter()
            if bar is not None:
                bar.set_postfix(d=f"{losses['loss_d']:.3f}", g=f"{losses['loss_g']:.3f}", ips=f"{throughput:.0f}")
                bar.update(1)
            if config.sample_every and step % config.sample_every == 0:
                grid(step)
            if step % config.checkpoint_every == 0:
                save(step)
            if stats["time_up"] > 0:
                stopped_by = "max_minutes"
                break
    finally:
        if bar is not None:
            bar.close()

    # -- finish ---------------------------------------------------------------------------------
    if last_saved != step:
        save(step)
    grid_path = grid(step)
    weights = _weights_digest(generator, discriminator, ema)
    if ddp.enabled:
        digests: list[str | None] = [None] * ddp.world_size
        dist.all_gather_object(digests, weights)
        if len(set(digests)) != 1:
            raise CheckFailed("DDP ranks ended with different weights; this is a bug, please report it.")
    if ddp.main:
        _log_final(tracker, out, meta, ema, device)
    session_seconds = time.perf_counter() - session_start
    return TrainSummary(
        model_dir=out,
        steps=step,
        start_step=start_step,
        stopped_by=stopped_by,
        labels=labels,
        n_volumes=len(rows),
        n_images=len(images),
        images_per_second=total_images_session / session_train_seconds if session_train_seconds > 0 else 0.0,
        session_seconds=session_seconds,
        train_seconds=train_seconds,
        world_size=ddp.world_size,
        device=device.type,
        run_id=tracker.run_id,
        weights_digest=weights,
        losses=losses,
        sample_grid=grid_path,
    )


def _train_step(
    step: int,
    config: ModelConfig,
    seed: int,
    ddp: _Dist,
    device: torch.device,
    use_bf16: bool,
    memory_format: torch.memory_format,
    images: torch.Tensor,
    targets: torch.Tensor,
    order: _BatchOrder,
    generator: nn.Module,
    g_train: nn.Module,
    discriminator: nn.Module,
    d_train: nn.Module,
    ema: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
) -> dict[str, float]:
    rng = torch.Generator(device=device).manual_seed(stream_seed(seed, "step", ddp.rank, step))
    index = order.indices(step)
    real = images[index].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    labels = targets[index].to(device, non_blocking=True)
    batch = len(index)
    z = torch.randn(batch, config.latent_dim, generator=rng, device=device)
    # Fakes get the real batch's labels; with the diversity term, the second half repeats the
    # first half's labels so that fakes i and i + half form same-class pairs.
    half = batch // 2 if config.diversity_weight > 0 else 0
    fake_labels = labels.clone()
    fake_labels[half : 2 * half] = labels[:half]
    policy = config.augment

    def augment(x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, policy, rng, config.translation, config.cutout) if policy else x

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # Discriminator: one call on real + fake (DDP-safe, and one pass instead of two).
    with autocast:
        fake = g_train(z, fake_labels)
    apply_r1 = config.r1_gamma > 0 and step % config.r1_every == 0
    real_in = augment(real).detach()
    if apply_r1:
        real_in.requires_grad_(True)
    with autocast:
        both = torch.cat([real_in, augment(fake.detach())]).contiguous(memory_format=memory_format)
        logits, class_logits = d_train(both, torch.cat([labels, fake_labels]), with_class_logits=True)
    logits = logits.float()
    d_real, d_fake = logits[:batch], logits[batch:]
    if config.loss == "hinge":
        loss_d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    else:
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    # Auxiliary classifier: learns the labels of real images only (the weight may be 0; the head
    # still takes part so DDP sees every parameter used).
    cls_real = F.cross_entropy(class_logits[:batch].float(), labels)
    loss_d = loss_d + config.cls_weight * cls_real
    r1 = torch.zeros((), device=device)
    if apply_r1:
        (gradient,) = torch.autograd.grad(d_real.sum(), real_in, create_graph=True)
        r1 = gradient.float().pow(2).flatten(1).sum(1).mean()
        loss_d = loss_d + 0.5 * config.r1_gamma * config.r1_every * r1
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    # Generator: against the updated discriminator (its own gradients are not needed).
    discriminator.requires_grad_(False)
    try:
        with autocast:
            scores, class_logits_g = discriminator(
                augment(fake).contiguous(memory_format=memory_format), fake_labels, with_class_logits=True
            )
        scores = scores.float()
        loss_g = -scores.mean() if config.loss == "hinge" else F.softplus(-scores).mean()
        cls_fake = F.cross_entropy(class_logits_g.float(), fake_labels)
        if config.cls_weight > 0:
            loss_g = loss_g + config.cls_weight * cls_fake
        diversity = torch.zeros((), device=device)
        if half:
            # Mode seeking (Mao et al. 2019): same class, different z -> different images.
            image_gap = (fake[:half] - fake[half : 2 * half]).float().abs().mean()
            noise_gap = (z[:half] - z[half : 2 * half]).abs().mean()
            diversity = image_gap / noise_gap
            loss_g = loss_g + config.diversity_weight / (diversity + 1e-5)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    finally:
        discriminator.requires_grad_(True)

    decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
    ema_update(ema, generator, decay)
    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": d_real.detach().mean(),
        "d_fake": d_fake.detach().mean(),
        "r1": r1.detach(),
        "cls_real": cls_real.detach(),
        "cls_fake": cls_fake.detach(),
        "diversity": diversity.detach(),
    }


def _reduce(stats: dict[str, torch.Tensor], time_up: bool, ddp: _Dist) -> dict[str, float]:
    """Average the step's statistics over ranks (one small all-reduce; also agrees on stopping)."""
    keys = list(stats)
    values = torch.stack([stats[key].float() for key in keys] + [torch.tensor(float(time_up), device=stats[keys[0]].device)])
    if ddp.enabled:
        dist.all_reduce(values)
        values[:-1] /= ddp.world_size
    numbers = values.cpu().tolist()
    return {**dict(zip(keys, numbers[:-1])), "time_up": numbers[-1]}


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


def _model_meta(
    config: ModelConfig,
    seed: int,
    labels: list[str],
    spec: dict[str, Any],
    digest: str,
    run_id: str | None,
    world_size: int,
    n_volumes: int,
    n_images: int,
) -> dict[str, Any]:
    from pipeline import __version__ as version  # noqa: PLC0415 - package metadata only

    return {
        "format_version": FORMAT_VERSION,
        "medsynth_version": version,
        "spatial_dims": config.spatial_dims,
        "image_size": list(config.image_size),
        "spacing": list(spec["spacing"]),
        "labels": labels,
        "latent_dim": config.latent_dim,
        "mlflow_run_id": run_id,
        "mlflow_run_ids": [run_id] if run_id else [],
        "seed": seed,
        "steps": 0,
        "images_seen": 0,
        "train_seconds": 0.0,
        "world_size": world_size,
        "n_train_volumes": n_volumes,
        "n_train_images": n_images,
        "config": {**config.model_dump(mode="json"), "spacing": list(spec["spacing"])},  # resolved
        "preprocess": spec,
        "dp": None,
        "train_dataset_digest": digest,
    }


def _save_checkpoint(
    out: Path,
    meta: dict[str, Any],
    step: int,
    generator: nn.Module,
    discriminator: nn.Module,
    ema: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    train_seconds: float,
    images_seen: int,
) -> None:
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "generator": _plain_state(generator),
        "discriminator": _plain_state(discriminator),
        "ema": _plain_state(ema),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "train_seconds": train_seconds,
        "images_seen": images_seen,
        "rng": _rng_states(),
    }
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    meta.update(steps=step, train_seconds=round(train_seconds, 3), images_seen=images_seen)
    atomic_write_json(out / MODEL_JSON, meta)


def _log_final(tracker: Tracker, out: Path, meta: dict[str, Any], ema: nn.Module, device: torch.device) -> None:
    """The EMA generator as an MLflow model (noise + label inputs) and the MODEL_DIR files as artifacts."""
    tracker.log_artifact(out / CHECKPOINT, "checkpoint")
    tracker.log_artifact(out / MODEL_JSON, "checkpoint")
    if not meta["config"]["log_model"] or tracker.run_id is None:
        return
    from pipeline.models.model_dir import build_generator as _build

    exported = _build(meta)
    exported.load_state_dict({key: value.detach().cpu() for key, value in ema.state_dict().items()})
    exported.eval().requires_grad_(False)
    example_noise = np.zeros((2, meta["latent_dim"]), dtype=np.float32)
    example_labels = np.arange(2, dtype=np.int64) % len(meta["labels"])
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

