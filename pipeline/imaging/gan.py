"""Conditional generator and projection discriminator, 2D or 3D (``spatial_dims`` is a parameter).

MONAI has no conditional GAN, so the networks are written here from small parts; MONAI's layer
factory picks the 2D or 3D convolution. Design (see docs/models.md):

- Generator: z joined to a class embedding -> linear -> ``levels`` x (nearest 2x upsample, 3x3
  conv, class-conditional GroupNorm, ReLU) -> 3x3 conv -> tanh. Conditional *group* norm (not
  batch norm) keeps a sample a function of (z, label) alone: no batch statistics, nothing to
  synchronise under DDP, and the EMA copy needs no running stats.
- Discriminator: spectral-normalised convolutions with LeakyReLU, 4x4 stride-2 downsampling,
  global sum pooling, and a projection head (Miyato & Koyama 2018):
  ``D(x, y) = w . h(x) + embed(y) . h(x)``; plus an optional auxiliary classifier head on h(x)
  (AC-GAN, Odena et al. 2017; trained on real images only) for a stronger class signal. No normalisation layers, so one D call on a
  concatenated real+fake batch is DDP-safe.
"""

from __future__ import annotations

import copy
import math

import torch
from monai.networks.layers import Conv
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.imaging.levels import network_levels

__all__ = ["Generator", "Discriminator", "ConditionalNorm", "ema_copy", "ema_update"]


def _conv(spatial_dims: int, *args, **kwargs) -> nn.Module:
    return Conv[Conv.CONV, spatial_dims](*args, **kwargs)


def _groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class ConditionalNorm(nn.Module):
    """GroupNorm without affine, then a per-class gain and bias (conditional normalisation)."""

    def __init__(self, channels: int, num_classes: int, spatial_dims: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)
        self._view = (-1, channels) + (1,) * spatial_dims

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gain = self.gain(labels).view(self._view)
        bias = self.bias(labels).view(self._view)
        return self.norm(x) * (1.0 + gain) + bias


class Generator(nn.Module):
    """Maps (noise (N, latent_dim), class ids (N,) int64) to images (N, 1, *image_size) in [-1, 1].

    Args:
        spatial_dims: 2 or 3.
        image_size: output grid (each side divisible by 2**levels, see ``network_levels``).
        num_classes: number of labels.
        latent_dim: length of z.
        embed_dim: length of the class embedding joined to z.
        width: channels at full resolution (doubling towards low resolution, at most 8x).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: list[int],
        num_classes: int,
        latent_dim: int = 128,
        embed_dim: int = 32,
        width: int = 32,
    ) -> None:
        super().__init__()
        levels = network_levels(image_size)
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        self.start = [side >> levels for side in image_size]
        channels = [width * min(2 ** (levels - i), 8) for i in range(levels + 1)]
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(latent_dim + embed_dim, channels[0] * math.prod(self.start))
        self.norm0 = ConditionalNorm(channels[0], num_classes, spatial_dims)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.convs = nn.ModuleList(
            _conv(spatial_dims, channels[i], channels[i + 1], kernel_size=3, padding=1) for i in range(levels)
        )
        self.norms = nn.ModuleList(ConditionalNorm(channels[i + 1], num_classes, spatial_dims) for i in range(levels))
        self.out = _conv(spatial_dims, channels[-1], 1, kernel_size=3, padding=1)
        self._channels0 = channels[0]

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([noise, self.embed(labels)], dim=1))
        h = h.view(-1, self._channels0, *self.start)
        h = torch.relu(self.norm0(h, labels))
        for conv, norm in zip(self.convs, self.norms):
            h = torch.relu(norm(conv(self.up(h)), labels))
        return torch.tanh(self.out(h))


class Discriminator(nn.Module):
    """Projection discriminator with spectral norm: (images (N, 1, *size), class ids (N,)) -> scores (N,).

    Args:
        spatial_dims: 2 or 3.
        image_size: input grid.
        num_classes: number of labels.
        width: channels at full resolution (doubling per level, at most 8x).
    """

    def __init__(self, spatial_dims: int, image_size: list[int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        levels = network_levels(image_size)
        channels = [width * min(2**i, 8) for i in range(levels + 1)]
        self.spatial_dims = spatial_dims
        self.stem = spectral_norm(_conv(spatial_dims, 1, channels[0], kernel_size=3, padding=1))
        self.downs = nn.ModuleList(
            spectral_norm(_conv(spatial_dims, channels[i], channels[i + 1], kernel_size=4, stride=2, padding=1))
            for i in range(levels)
        )
        self.linear = spectral_norm(nn.Linear(channels[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, channels[-1]))
        # Auxiliary classifier head (AC-GAN style, used when model.cls_weight > 0): trained on real
        # images only, it gives G a direct class-consistency signal; cheap, so always present.
        self.classifier = spectral_norm(nn.Linear(channels[-1], num_classes))
        self._pool_dims = tuple(range(2, 2 + spatial_dims))

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, with_class_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.leaky_relu(self.stem(images), 0.2)
        for down in self.downs:
            h = nn.functional.leaky_relu(down(h), 0.2)
        h = h.sum(dim=self._pool_dims)  # global sum pooling, as in SN-GAN's projection D
        scores = self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)
        if with_class_logits:
            return scores, self.classifier(h)
        return scores


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to hold the exponential moving average of its weights."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
