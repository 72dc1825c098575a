"""One training step of the conditional GAN, and the order in which it draws the training images.

One step: the generator draws a batch of fakes for the real batch's labels; the discriminator
sees real and fake together (one call, DiffAugment applied to both) and takes a hinge (or
non-saturating) step; then the generator takes a step against the updated discriminator; then the
EMA copy of the generator moves towards it.

Every random draw of step ``t`` on rank ``r`` comes from a generator seeded with ``(seed, r, t)``
and the data order of epoch ``e`` from ``(seed, e)``: a resumed run continues exactly where the
interrupted one stopped without replaying any random stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.seeds import stream_seed
from pipeline.models.augment import ada_augment, diff_augment
from pipeline.models.config import ModelConfig
from pipeline.imaging.gan import ema_update

__all__ = ["BatchOrder", "StepSetup", "GanModules", "TrainingImages", "train_step", "update_generator"]


class BatchOrder:
    """Which training images rank ``rank`` uses at step ``t``: epoch permutations seeded by (seed, epoch).

    Args:
        n_images: training images in all.
        batch_size: images per rank and step.
        world_size: ranks taking part (each takes its own slice of the global batch).
        rank: this process's rank.
        seed: the run's seed.
    """

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
        """The indices (into the training images) of this rank's batch at ``step``."""
        start = (step * self.world_size + self.rank) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs = positions // self.n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[positions[mask] % self.n]
        return out


@dataclass(frozen=True)
class StepSetup:
    """What stays the same for every step of a run.

    Attributes:
        config: the ``model:`` section (losses, weights, augmentation, EMA decay).
        seed: the run's seed; with ``rank`` and the step it keys the step's random stream.
        rank: this process's rank (0 without DDP).
        device: where the networks and the batch live.
        use_bf16: run the forward passes under bf16 autocast (CUDA only).
        memory_format: channels-last or contiguous, as the networks were moved.
    """

    config: ModelConfig
    seed: int
    rank: int
    device: torch.device
    use_bf16: bool
    memory_format: torch.memory_format


@dataclass(frozen=True)
class GanModules:
    """The networks and optimizers a step updates.

    Attributes:
        generator: the generator itself (its state is what is saved).
        g_train: the module called to draw fakes: ``generator`` or its DDP wrapper.
        discriminator: the discriminator itself (the generator's step calls it unwrapped, frozen).
        d_train: the module called for the discriminator's step: ``discriminator`` or its DDP wrapper.
        ema: the exponential moving average of the generator (what ``generate`` samples from).
        opt_g: the generator's optimizer.
        opt_d: the discriminator's optimizer.
    """

    generator: nn.Module
    g_train: nn.Module
    discriminator: nn.Module
    d_train: nn.Module
    ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


@dataclass(frozen=True)
class TrainingImages:
    """The preprocessed training images and the order in which steps draw them.

    Attributes:
        images: ``(N, 1, *image_size)`` float32 in [-1, 1], on the CPU.
        targets: ``(N,)`` int64 label ids (indices into the model's labels).
        order: which images each step's batch holds.
    """

    images: torch.Tensor
    targets: torch.Tensor
    order: BatchOrder


def train_step(
    step: int, setup: StepSetup, gan: GanModules, data: TrainingImages, augment_p: float = 1.0
) -> dict[str, torch.Tensor]:
    """Take one discriminator step, one generator step and one EMA update.

    Args:
        step: the step's index (0 for the first step of a run, also after a resume).
        setup: what stays the same for every step.
        gan: the networks and optimizers, updated in place.
        data: the training images.
        augment_p: with ``augment: ada``, the probability with which each augmentation hits each
            image (:class:`pipeline.models.augment.AdaController` moves it); ignored for a fixed list.

    Returns:
        The step's statistics as 0-d tensors on the device (losses, mean scores, R1, the
        classifier losses, the diversity term and ``real_sign``, the mean of ``sign(D(real))``
        that drives ADA); the caller reduces them over ranks.
    """
    config, device, memory_format = setup.config, setup.device, setup.memory_format
    rng = torch.Generator(device=device).manual_seed(stream_seed(setup.seed, "step", setup.rank, step))
    index = data.order.indices(step)
    real = data.images[index].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    labels = data.targets[index].to(device, non_blocking=True)
    batch = len(index)
    z = torch.randn(batch, config.latent_dim, generator=rng, device=device)
    # Fakes get the real batch's labels; with the diversity term, the second half repeats the
    # first half's labels so that fakes i and i + half form same-class pairs.
    half = batch // 2 if config.diversity_weight > 0 else 0
    fake_labels = labels.clone()
    fake_labels[half : 2 * half] = labels[:half]
    adaptive = config.augment == "ada"
    policy = config.augment_ops if adaptive else config.augment

    def augment(x: torch.Tensor) -> torch.Tensor:
        if not policy:
            return x
        if adaptive:
            return ada_augment(x, policy, augment_p, rng, config.translation, config.cutout)
        return diff_augment(x, policy, rng, config.translation, config.cutout)

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=setup.use_bf16)

    # Discriminator: one call on real + fake (DDP-safe, and one pass instead of two).
    with autocast:
        fake = gan.g_train(z, fake_labels)
    apply_r1 = config.r1_gamma > 0 and step % config.r1_every == 0
    real_in = augment(real).detach()
    if apply_r1:
        real_in.requires_grad_(True)
    with autocast:
        both = torch.cat([real_in, augment(fake.detach())]).contiguous(memory_format=memory_format)
        logits, class_logits = gan.d_train(both, torch.cat([labels, fake_labels]), with_class_logits=True)
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
    gan.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    gan.opt_d.step()

    def judge(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            return gan.discriminator(
                augment(images).contiguous(memory_format=memory_format), fake_labels, with_class_logits=True
            )

    loss_g, cls_fake, diversity = update_generator(gan, config, z, fake, fake_labels, half, judge)

    decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
    ema_update(gan.ema, gan.generator, decay)
    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": d_real.detach().mean(),
        "d_fake": d_fake.detach().mean(),
        "r1": r1.detach(),
        "cls_real": cls_real.detach(),
        "cls_fake": cls_fake.detach(),
        "diversity": diversity.detach(),
        "real_sign": torch.sign(d_real.detach()).mean(),
    }


def update_generator(
    gan: GanModules,
    config: ModelConfig,
    z: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    half: int,
    judge: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One generator step against the just-updated discriminator; returns (loss_g, cls_fake, diversity).

    ``judge(fake)`` gives the discriminator's scores and class logits for the fakes, augmented as
    the discriminator saw them (the plain and the private step differ only there). The terms:
    the adversarial loss, the auxiliary classifier pushing fakes towards their label, and mode
    seeking (Mao et al. 2019: same class, different z -> different images) on the first ``2 * half``
    fakes. The discriminator's own gradients are not needed, so they are switched off meanwhile.
    """
    gan.discriminator.requires_grad_(False)
    try:
        scores, class_logits = judge(fake)
        scores = scores.float()
        loss_g = -scores.mean() if config.loss == "hinge" else F.softplus(-scores).mean()
        cls_fake = F.cross_entropy(class_logits.float(), fake_labels)
        if config.cls_weight > 0:
            loss_g = loss_g + config.cls_weight * cls_fake
        diversity = torch.zeros((), device=fake.device)
        if half:
            image_gap = (fake[:half] - fake[half : 2 * half]).float().abs().mean()
            noise_gap = (z[:half] - z[half : 2 * half]).abs().mean()
            diversity = image_gap / noise_gap
            loss_g = loss_g + config.diversity_weight / (diversity + 1e-5)
        gan.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        gan.opt_g.step()
    finally:
        gan.discriminator.requires_grad_(True)
    return loss_g, cls_fake, diversity
