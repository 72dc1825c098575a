"""``MODEL_DIR/checkpoint.pt``: saving, loading, and checking that a resume continues the same run.

A checkpoint holds the three networks (generator, discriminator, EMA generator), both optimizers,
the step, the training time and images seen so far, and the process's RNG states; it is written
atomically together with ``model.json``, so the two always describe the same step: both are
written in full to temporary files before either replaces its predecessor, so a full disk or an
I/O error leaves the previous pair intact (and nothing half-written).

``ema`` and ``discriminator`` are what every later stage loads: the *exported* model. When model
selection kept an earlier step, they hold that step's networks and the ones training goes on
with are saved as ``train_ema`` and ``train_discriminator``; a resume restores those. ADA's state
(``ada``: p and its accumulator) and the selection history (``selection``) travel with it, so a
resumed run continues with the same p and the same best-so-far.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.contracts.model import CHECKPOINT, FORMAT_VERSION, MODEL_JSON, ModelMeta, read_model_meta
from pipeline.core.errors import InputError
from pipeline.core.files import atomic_path, sha256_file
from pipeline.models.config import ModelConfig
from pipeline.models.step import GanModules

__all__ = [
    "ARCHITECTURE_KEYS",
    "save_checkpoint",
    "restore_modules",
    "check_resume_compatible",
    "initialize_from",
    "check_start_unchanged",
    "restore_rng_states",
    "preserved_host_rng",
    "weights_digest",
]

# Keys of ModelConfig that shape the networks or their inputs: a resumed run must keep them.
ARCHITECTURE_KEYS = ("spatial_dims", "image_size", "latent_dim", "embed_dim", "g_width", "d_width")


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


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set torch's, numpy's and Python's global random states to those a checkpoint saved.

    Callers wrap training in :func:`pipeline.core.torch_state.preserved_torch_rng` and
    :func:`preserved_host_rng`, so the states set here last only as long as the run.
    """
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def preserved_host_rng() -> Iterator[None]:
    """Restore numpy's and Python's global random states on exit (a resume sets them from the checkpoint)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def weights_digest(*modules: nn.Module) -> str:
    """SHA-256 of the modules' state dicts (names and float32 values): equal digests, equal weights."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with contiguous CPU tensors (channels-last and CUDA tensors saved portably)."""
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def save_checkpoint(
    out: Path,
    meta: ModelMeta,
    step: int,
    gan: GanModules,
    train_seconds: float,
    images_seen: int,
    ada: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    exported: dict[str, dict[str, torch.Tensor]] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``checkpoint.pt``, then ``model.json`` updated to the same step (both atomically).

    Args:
        out: the MODEL_DIR.
        meta: the model's metadata; its ``steps``, ``train_seconds`` and ``images_seen`` are
            updated in place before it is written.
        step: optimizer steps done.
        gan: the networks (saved as plain CPU state dicts, unwrapped from DDP) and optimizers.
        train_seconds: wall-clock training time so far, summed over resumes.
        images_seen: real images shown to the discriminator so far.
        ada: :meth:`pipeline.models.augment.AdaController.state_dict` (None without ADA).
        selection: :meth:`pipeline.models.selection.Selector.state_dict` (None without selection).
        exported: ``{"ema": ..., "discriminator": ...}`` state dicts of the selected step (None: the current ones).
        extra: more entries to keep with the weights (the DP accountant's history).
    """
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "generator": _plain_state(gan.generator),
        "discriminator": _plain_state(gan.discriminator),
        "ema": _plain_state(gan.ema),
        "opt_g": gan.opt_g.state_dict(),
        "opt_d": gan.opt_d.state_dict(),
        "train_seconds": train_seconds,
        "images_seen": images_seen,
        "rng": _rng_states(),
        **(extra or {}),
    }
    if exported is not None:
        state["train_ema"], state["train_discriminator"] = state["ema"], state["discriminator"]
        state["ema"], state["discriminator"] = exported["ema"], exported["discriminator"]
    if ada is not None:
        state["ada"] = ada
    if selection is not None:
        state["selection"] = selection
    # Serialized in memory and written by Python: a full disk then raises OSError(ENOSPC), where
    # torch's own file writer raises a RuntimeError that does not say why.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    meta.steps, meta.train_seconds, meta.images_seen = step, round(train_seconds, 3), images_seen
    # What pipeline.contracts.model.write_model_meta writes (the digest of the checkpoint beside it),
    # prepared before either file is replaced: a failed write must not pair a new checkpoint with
    # an old model.json, which later stages would refuse as a tampered checkpoint.
    meta.checkpoint_sha256 = hashlib.sha256(buffer.getbuffer()).hexdigest()
    meta_text = json.dumps(meta.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    # Exits in reverse: the checkpoint is renamed into place first, then model.json, as before.
    with atomic_path(out / MODEL_JSON) as meta_tmp, atomic_path(out / CHECKPOINT) as checkpoint_tmp:
        with open(checkpoint_tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
        meta_tmp.write_text(meta_text, encoding="utf-8")


def check_resume_compatible(previous: ModelMeta, current: ModelMeta, config: ModelConfig, out: Path) -> None:
    """Refuse to resume when the run would silently change what the checkpoint was trained on.

    Args:
        previous: ``model.json`` of the checkpoint being resumed.
        current: the metadata this run computed (seed, labels, preprocessing, dataset digest).
        config: this run's ``model:`` section.
        out: the MODEL_DIR (named in the messages).

    Raises:
        InputError: an architecture key, the seed, the labels, the preprocessing or the training
            data differ; the message names what differs and how to proceed.
    """
    where = out / MODEL_JSON
    for key in ARCHITECTURE_KEYS:
        before = previous.config.get(key)
        now = getattr(config, key)
        if before != now:
            raise InputError(
                f"{where}: the checkpoint was trained with model.{key} = {before!r}, the config now says {now!r}. "
                "Fix: resume with the original value, or train into a new --out folder."
            )
    if previous.seed != current.seed:
        raise InputError(
            f"{where}: the checkpoint was trained with seed {previous.seed!r}, this run says {current.seed!r}; "
            "a different seed would silently change the noise and data order mid-run. "
            "Fix: resume with the original --seed, or train into a new --out folder."
        )
    if previous.labels != current.labels:
        raise InputError(
            f"{where}: the checkpoint's labels {previous.labels} differ from the dataset's {current.labels}. "
            "Fix: resume on the same dataset, or train into a new --out folder."
        )
    if previous.preprocess != current.preprocess:
        raise InputError(
            f"{where}: the preprocessing changed since the checkpoint was written. "
            "Fix: resume with the original preprocessing keys, or train into a new --out folder."
        )
    if previous.train_dataset_digest != current.train_dataset_digest:
        raise InputError(
            f"{where}: the training data changed since the checkpoint was written (digest differs). "
            "Fix: resume on the same dataset, or train into a new --out folder."
        )


def restore_modules(state: dict[str, Any], gan: GanModules) -> None:
    """Load a checkpoint's training networks and optimizers (as :func:`save_checkpoint` wrote them) into ``gan``.

    The networks training goes on with: ``train_ema``/``train_discriminator`` when selection
    exported an earlier step, else ``ema``/``discriminator``.
    """
    gan.generator.load_state_dict(state["generator"])
    gan.discriminator.load_state_dict(state.get("train_discriminator", state["discriminator"]))
    gan.ema.load_state_dict(state.get("train_ema", state["ema"]))
    gan.opt_g.load_state_dict(state["opt_g"])
    gan.opt_d.load_state_dict(state["opt_d"])


# Preprocessing keys measured on the training data rather than set (2D: the median slice thickness, written
# into exported volumes only): a start trained on other data may differ in them without changing its networks.
_MEASURED_PREPROCESS_KEYS = frozenset({"slice_spacing"})


def _starts(record: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """An ``initialized_from`` record and the records of the starts it was itself fine-tuned from."""
    while record:
        yield record
        record = record.get("initialized_from")


def initialize_from(source_dir: Path, gan: GanModules, current: ModelMeta, config: ModelConfig) -> dict[str, Any]:
    """Start ``gan`` from another model's exported networks (``model.init_from``) and say which.

    The EMA generator the source exports starts both the generator and its EMA; its exported
    discriminator (of the same step) starts the discriminator. The optimizers start fresh: the
    source's Adam moments belong to its own data.

    Args:
        source_dir: the source MODEL_DIR.
        gan: freshly built networks (same architecture), loaded in place.
        current: this run's metadata (labels, preprocessing, training-data digest).
        config: this run's ``model:`` section.

    Returns:
        ``model.json``'s ``initialized_from`` record: the source's checkpoint SHA-256, steps,
        training-data digest, DP epsilon (None without DP) and its own start (``initialized_from``,
        so a chain of fine-tunes stays visible). The folder's path is not recorded.

    Raises:
        InputError: no model there, a checkpoint that changed since its model.json or does not fit,
            or an architecture key, the labels or the preprocessing differ; under ``model.dp``, a
            source trained, or started from a model trained, on this very dataset (its weights would
            carry the private subjects outside the account).
    """
    where = source_dir / MODEL_JSON
    if not where.is_file():
        raise InputError(
            f"model.init_from: {where} not found. Fix: point model.init_from at a MODEL_DIR written by `medsynth train`."
        )
    source = read_model_meta(source_dir)
    for key in ARCHITECTURE_KEYS:
        if source.config.get(key) != getattr(config, key):
            raise InputError(
                f"model.init_from: {where} was trained with model.{key} = {source.config.get(key)!r}, this run has "
                f"{getattr(config, key)!r}. Fix: set model.{key}: {source.config.get(key)!r} (as in {where}), or "
                "start from a model trained with this run's value."
            )
    if source.labels != current.labels:
        raise InputError(
            f"model.init_from: {where} has labels {source.labels}, this dataset {current.labels}. "
            "Fix: start from a model trained on the same label names, in the same order."
        )
    changed = sorted(
        key for key in (set(source.preprocess) | set(current.preprocess)) - _MEASURED_PREPROCESS_KEYS
        if source.preprocess.get(key) != current.preprocess.get(key)
    )
    if changed:
        raise InputError(
            f"model.init_from: {where} preprocessed its images differently ({', '.join(changed)}). Fix: set "
            f"model.{changed[0]}: {source.preprocess.get(changed[0])!r} (as in its model.json, key 'preprocess'), "
            "or start from a model preprocessed as this run is."
        )
    record = {
        "checkpoint_sha256": "",
        "steps": source.selected_step if source.selected_step is not None else source.steps,
        "train_dataset_digest": source.train_dataset_digest,
        "dp_epsilon": (source.dp or {}).get("epsilon"),
        "initialized_from": source.initialized_from,
    }
    if config.dp is not None and any(
        start["train_dataset_digest"] == current.train_dataset_digest for start in _starts(record)
    ):
        raise InputError(
            f"model.init_from: {where} was trained (or started from a model trained) on this run's training data; "
            "under model.dp its weights would carry the private subjects outside the privacy account. Fix: start "
            "from a model trained on public data only, or set model.init_from: null."
        )
    record["checkpoint_sha256"], state = _read_verified(source_dir, source)
    try:
        gan.generator.load_state_dict(state["ema"])
        gan.ema.load_state_dict(state["ema"])
        gan.discriminator.load_state_dict(state["discriminator"])
    except (RuntimeError, KeyError, TypeError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InputError(
            f"model.init_from: {source_dir / CHECKPOINT} does not fit the networks {where} describes ({detail}). "
            "Fix: point model.init_from at a MODEL_DIR written by this medsynth version's `medsynth train`."
        ) from None
    return record


def _read_verified(source_dir: Path, source: ModelMeta) -> tuple[str, dict[str, Any]]:
    """The source checkpoint's SHA-256 and its state, from one read (the hash is of the bytes loaded).

    Raises:
        InputError: missing, unreadable, or not the checkpoint its model.json records.
    """
    path = source_dir / CHECKPOINT
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(
            f"model.init_from: {path} cannot be read ({exc.strerror or type(exc).__name__}). "
            "Fix: point model.init_from at a MODEL_DIR written by `medsynth train`."
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if source.checkpoint_sha256 is not None and digest != source.checkpoint_sha256:
        raise InputError(
            f"model.init_from: {path} does not match the checksum recorded in {MODEL_JSON} (key 'checkpoint_sha256'): "
            "the weights changed since train wrote them. Fix: restore the checkpoint, or train that model again."
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise InputError(
            f"model.init_from: {path} is not a readable checkpoint ({type(exc).__name__}). Fix: train that model again."
        ) from None
    if not isinstance(state, dict) or "ema" not in state or "discriminator" not in state:
        raise InputError(f"model.init_from: {path} is not a medsynth checkpoint. Fix: train that model again.")
    return digest, state


def check_start_unchanged(previous: ModelMeta, config: ModelConfig, out: Path) -> None:
    """Refuse a resume whose ``model.init_from`` says something else than the checkpoint's start.

    Raises:
        InputError: the key was added or removed since, or it now names a model whose checkpoint
            is not the one training started from.
    """
    started = previous.initialized_from
    if config.init_from is None and started is None:
        return
    now = Path(config.init_from) / CHECKPOINT if config.init_from is not None else None
    if now is not None and not now.is_file():
        raise InputError(
            f"model.init_from: {now} not found (a resume checks that training started from it). "
            "Fix: restore that model, or train into a new --out folder."
        )
    digest = sha256_file(now) if now is not None else None
    if started is None or digest != started.get("checkpoint_sha256"):
        was = "no model.init_from" if started is None else f"the model with checkpoint {started['checkpoint_sha256'][:16]}..."
        raise InputError(
            f"{out / MODEL_JSON}: training started from {was}; model.init_from now "
            f"{'names another model' if config.init_from is not None else 'is null'}. Fix: resume with the original "
            "model.init_from, or train into a new --out folder."
        )
