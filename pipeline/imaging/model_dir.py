"""MODEL_DIR: what ``train`` writes and every later stage reads.

``model.json`` (metadata, resolved config, preprocessing spec, label map, MLflow run id; parsed by
:func:`pipeline.contracts.model.read_model_meta`) and ``checkpoint.pt`` (state dicts for resuming
and sampling; :mod:`pipeline.models.checkpoint` writes it). See docs/model_interface.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.contracts.model import CHECKPOINT, MODEL_JSON, ModelMeta, read_model_meta
from pipeline.core.errors import InputError
from pipeline.core.files import sha256_file
from pipeline.imaging.gan import Discriminator, Generator

__all__ = [
    "CHECKPOINT_KEYS",
    "load_checkpoint",
    "verify_checkpoint",
    "build_generator",
    "build_discriminator",
    "load_generator",
    "load_discriminator",
    "noise",
    "sample",
    "select_device",
]


# What a checkpoint holds (pipeline.models.checkpoint.save_checkpoint): a resume needs all of it.
CHECKPOINT_KEYS: tuple[str, ...] = (
    "step", "generator", "discriminator", "ema", "opt_g", "opt_d", "train_seconds", "images_seen", "rng",
)


def load_checkpoint(
    model_dir: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    require: tuple[str, ...] = CHECKPOINT_KEYS,
) -> dict[str, Any]:
    """The state dicts in ``checkpoint.pt`` (loaded with ``weights_only=True``).

    Args:
        model_dir: the MODEL_DIR.
        map_location: where the tensors go.
        require: the keys the caller reads (all of them for a resume).

    Raises:
        InputError: the file is missing, not a readable checkpoint, or lacks a required key.
    """
    path = Path(model_dir) / CHECKPOINT
    if not path.is_file():
        raise InputError(f"{path}: not found. Fix: pass a MODEL_DIR written by `medsynth train`.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise InputError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}). Fix: re-run `medsynth train` (or --resume)."
        ) from exc
    missing = [key for key in require if not isinstance(state, dict) or key not in state]
    if missing:
        raise InputError(
            f"{path}: not a medsynth checkpoint: key '{missing[0]}' is missing. "
            "Fix: pass a MODEL_DIR written by `medsynth train` (re-run train if the file was replaced)."
        )
    return state


def verify_checkpoint(model_dir: str | os.PathLike[str], meta: ModelMeta) -> str:
    """The checkpoint's SHA-256, checked against the one ``model.json`` records (when it records one).

    Raises:
        InputError: the checkpoint is missing or changed since train described it.
    """
    path = Path(model_dir) / CHECKPOINT
    if not path.is_file():
        raise InputError(f"{path}: not found. Fix: pass a MODEL_DIR written by `medsynth train`.")
    digest = sha256_file(path)
    if meta.checkpoint_sha256 is not None and digest != meta.checkpoint_sha256:
        raise InputError(
            f"{path}: does not match the checksum recorded in {MODEL_JSON} (key 'checkpoint_sha256'): the weights "
            "changed since train wrote them. Fix: restore the checkpoint, or re-run `medsynth train`."
        )
    return digest


def _load_weights(module: nn.Module, state: Any, path: Path, part: str, meta: ModelMeta) -> None:
    """Load ``state`` into ``module``; a state of another shape (labels, sizes edited in model.json) is bad input."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InputError(
            f"{path}: its '{part}' weights do not fit the network {MODEL_JSON} describes ({len(meta.labels)} labels, "
            f"image_size {meta.image_size}): {detail}. Fix: pass the model.json written with this checkpoint "
            "(re-run `medsynth train` if either was edited)."
        ) from None


def build_generator(meta: ModelMeta) -> Generator:
    """An untrained generator with the architecture recorded in ``meta`` (model.json)."""
    config = meta.config
    return Generator(
        spatial_dims=int(meta.spatial_dims),
        image_size=list(meta.image_size),
        num_classes=len(meta.labels),
        latent_dim=int(config["latent_dim"]),
        embed_dim=int(config["embed_dim"]),
        width=int(config["g_width"]),
    )


def build_discriminator(meta: ModelMeta) -> Discriminator:
    """An untrained discriminator with the architecture recorded in ``meta`` (model.json)."""
    return Discriminator(
        spatial_dims=int(meta.spatial_dims),
        image_size=list(meta.image_size),
        num_classes=len(meta.labels),
        width=int(meta.config["d_width"]),
    )


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the CUDA device of this process when CUDA is present, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA device is available. Fix: set device: auto or cpu.")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_generator(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Generator:
    """The EMA generator of a trained model, in eval mode, frozen.

    Call it as ``generator(noise (N, latent_dim) float32, labels (N,) int64)``; ``labels`` index
    ``ModelMeta.labels``. See :func:`sample`.
    """
    meta = read_model_meta(model_dir)
    verify_checkpoint(model_dir, meta)
    state = load_checkpoint(model_dir, require=("ema",))
    generator = build_generator(meta)
    _load_weights(generator, state["ema"], Path(model_dir) / CHECKPOINT, "ema", meta)
    generator.requires_grad_(False)
    return generator.eval().to(device)


class _Scores(nn.Module):
    """Wraps the discriminator so it returns one raw score per image (higher: looks more real)."""

    def __init__(self, discriminator: Discriminator) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.discriminator(images, labels).float()


def load_discriminator(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The trained discriminator as a callable ``(images (N, 1, *spatial) in [-1, 1], label ids (N,)) -> (N,)``.

    In eval mode (spectral-norm power iterations frozen), parameters frozen; for the white-box
    membership attack. Images must be preprocessed with the model's :class:`Preprocessor`.
    """
    meta = read_model_meta(model_dir)
    verify_checkpoint(model_dir, meta)
    state = load_checkpoint(model_dir, require=("discriminator",))
    discriminator = build_discriminator(meta)
    _load_weights(discriminator, state["discriminator"], Path(model_dir) / CHECKPOINT, "discriminator", meta)
    scores = _Scores(discriminator)
    scores.requires_grad_(False)
    return scores.eval().to(device)


def noise(count: int, latent_dim: int, seed: int) -> torch.Tensor:
    """The noise vectors drawn by :func:`sample` (CPU, float32): same seed, same noise on any device."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(count, latent_dim, generator=generator)


@torch.no_grad()
def sample(generator: nn.Module, labels: torch.Tensor, seed: int, batch_size: int = 256) -> torch.Tensor:
    """Draw one image per label: ``(N, 1, *image_size)`` float32 in [-1, 1] on the CPU.

    Image ``i`` depends only on ``(seed, i, labels[i])``, not on ``batch_size`` or the device.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    latent_dim = int(getattr(generator, "latent_dim"))
    device = next(generator.parameters()).device
    z = noise(len(labels), latent_dim, seed)
    chunks = []
    for start in range(0, len(labels), batch_size):
        stop = start + batch_size
        chunks.append(generator(z[start:stop].to(device), labels[start:stop].to(device)).float().cpu())
    if not chunks:
        return torch.zeros((0, 1))
    return torch.cat(chunks)
