"""Differentially private training: DP-SGD on the discriminator with the patient as the unit of privacy.

Only the discriminator ever sees real images, so only its update needs the mechanism; the
generator learns from the discriminator's scores of its own fakes and the EMA averages the
generator's weights: both are post-processing of the private discriminator and spend nothing.

One private step (:meth:`PrivateTraining.train_step`):

1. **Poisson sampling of subjects.** Each training subject is drawn independently with probability
   ``q = subjects_per_step / N`` (a stream keyed by ``(seed, step)``); each drawn subject gives
   ``slices_per_subject`` of its images (with replacement).
2. **Per-subject gradients.** The discriminator's loss on one subject's images (hinge on real, the
   auxiliary classifier's cross-entropy and, on R1 steps, the R1 penalty of those images) is
   differentiated per subject with ``torch.func`` (``vmap(grad(...))`` over subjects, as Opacus'
   ``grad_sample_mode="functorch"`` does per layer). A subject's slices are one unit: their gradient
   is clipped together. Spectral norm is kept: its power iteration depends on the weights only,
   so it runs once per step outside the per-subject pass (on an all-zero input), and the pass itself
   runs the discriminator in eval mode (the normalised weight, no buffer writes under ``vmap``).
3. **Clip and noise with Opacus.** The per-subject gradients go to Opacus' ``DPOptimizer`` as
   ``grad_sample``: it clips each to ``max_grad_norm``, adds ``N(0, (sigma * max_grad_norm)^2)``
   and divides by the expected batch ``q * N``.
4. **Fakes are not private data.** The gradient of the loss on fakes depends on the current
   (private) discriminator, the generator and fresh noise only; it is added unclipped. Fake labels
   are drawn uniformly, never copied from the sampled subjects.
5. **Accounting.** Opacus' accountant (RDP or PRV) composes ``(sigma, q)`` once per step; its
   history is saved in the checkpoint so a resumed run continues the same account.

Training stops before the step that would take the accountant's epsilon past ``model.dp.epsilon``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.contracts.dp import PRIVACY_UNIT, DPRecord
from pipeline.contracts.model import ModelMeta
from pipeline.core.errors import InputError
from pipeline.core.seeds import stream_seed
from pipeline.imaging.gan import ema_update
from pipeline.models.augment import diff_augment
from pipeline.models.budget import StopRecord
from pipeline.models.config import DPConfig, ModelConfig
from pipeline.models.step import GanModules, StepSetup, TrainingImages, update_generator

__all__ = [
    "HEAD_PREFIXES",
    "PrivateTraining",
    "SubjectSampler",
    "resolve_delta",
    "image_subjects",
    "epsilon_of",
    "check_dp_resume",
    "MECHANISM",
    "ASSUMPTIONS",
    "PUBLIC_START",
]

# The discriminator's heads (projection, class embedding, auxiliary classifier): with
# ``model.dp.frozen_features`` only these are trained, on fixed convolutional features (random, or model.init_from's).
HEAD_PREFIXES = ("linear.", "embed.", "classifier.")

MECHANISM = (
    "DP-SGD on the discriminator (incl. its auxiliary classifier head{r1}): Poisson sampling of "
    "subjects, each subject's gradient clipped as one unit, Gaussian noise (Opacus DPOptimizer); the "
    "generator and its EMA learn only through the discriminator and are post-processing"
)
ASSUMPTIONS = [
    "Neighbouring datasets differ by one subject (patient) with all of their images (add/remove adjacency).",
    "Each subject is drawn independently with the recorded sample rate at every step (Poisson sampling), "
    "as the accountant assumes.",
    "The number of training subjects, the label names and the preprocessing keys are public; the grid "
    "spacing is set in the config, not measured on the training data.",
    "Only the trained networks and what they produce are covered: per-step losses on real images "
    "(losses.csv, MLflow metrics) are not privatized and stay with the real data.",
    "Noise comes from torch's pseudo-random generator (Opacus secure_mode off): a guarantee against "
    "attackers who cannot predict it.",
]


# The account covers this run's updates only; a start from another model's weights is outside it.
PUBLIC_START = (
    "The initial weights (model.init_from, checkpoint {sha}...) were trained on data that holds none of the "
    "training subjects (public data): the guarantee covers this run's updates, not what those weights hold."
)


def resolve_delta(dp: DPConfig, n_subjects: int) -> float:
    """``model.dp.delta``, with ``auto`` as ``1 / (10 N)``; refused unless below ``1 / N``.

    Raises:
        InputError: an explicit delta of at least ``1 / N`` (a mechanism that could publish one
            subject's data whole would meet it).
    """
    if dp.delta == "auto":
        return 1.0 / (10.0 * n_subjects)
    delta = float(dp.delta)
    if not 0.0 < delta < 1.0 / n_subjects:
        raise InputError(
            f"model.dp.delta: {delta:g} must be in (0, 1/N) = (0, {1.0 / n_subjects:.3g}) for N={n_subjects} "
            "training subjects. Fix: set model.dp.delta: auto (1 / 10N) or a smaller value."
        )
    return delta


def image_subjects(rows: pd.DataFrame, image_ids: list[str]) -> list[str]:
    """The subject of each training image (2D ids are ``<sample_id>#z<k>``)."""
    subject_of = dict(zip(rows["sample_id"].astype(str), rows["subject_id"].astype(str)))
    out = []
    for image_id in image_ids:
        sample = image_id if image_id in subject_of else image_id.rsplit("#z", 1)[0]
        out.append(subject_of[sample])
    return out


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """The epsilon Opacus' accountant gives for ``history`` ([(noise, rate, steps), ...]) at ``delta``."""
    from opacus.accountants import create_accountant

    if not history or sum(steps for _, _, steps in history) == 0:
        return 0.0
    counter = create_accountant(accountant)
    counter.history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in history]
    with warnings.catch_warnings():
        # "Optimal order is the largest/smallest alpha": the epsilon is still a valid (if looser) bound, and
        # the budget check asks for it at every step.
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(counter.get_epsilon(delta=delta))


def _merged(history: list[tuple[float, float, int]], noise: float, rate: float, steps: int) -> list[tuple[float, float, int]]:
    """``history`` with ``steps`` more steps at ``(noise, rate)`` (merged into the last phase when it matches)."""
    if steps <= 0:
        return list(history)
    if history and history[-1][0] == noise and history[-1][1] == rate:
        return [*history[:-1], (noise, rate, history[-1][2] + steps)]
    return [*history, (noise, rate, steps)]


class SubjectSampler:
    """Poisson sampling of subjects per step, then a fixed number of images of each drawn subject.

    Args:
        subjects: the subject of each training image.
        sample_rate: the probability of drawing a subject at a step.
        per_subject: images drawn (with replacement) from each drawn subject.
        seed: the run's seed; with the step it keys the draw (a resume draws the same subjects).
    """

    def __init__(self, subjects: list[str], sample_rate: float, per_subject: int, seed: int) -> None:
        names = sorted(set(subjects))
        position = {name: index for index, name in enumerate(names)}
        groups: list[list[int]] = [[] for _ in names]
        for image, subject in enumerate(subjects):
            groups[position[subject]].append(image)
        self.groups = [torch.tensor(images, dtype=torch.long) for images in groups]
        self.sample_rate = sample_rate
        self.per_subject = per_subject
        self.seed = seed

    @property
    def n_subjects(self) -> int:
        return len(self.groups)

    def draw(self, step: int) -> torch.Tensor:
        """Image indices ``(drawn subjects, per_subject)`` for ``step`` (zero rows when none is drawn)."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "dp-subjects", step))
        drawn = (torch.rand(self.n_subjects, generator=generator) < self.sample_rate).nonzero().flatten().tolist()
        rows = []
        for subject in drawn:
            images = self.groups[subject]
            pick = torch.randint(len(images), (self.per_subject,), generator=generator)
            rows.append(images[pick])
        return torch.stack(rows) if rows else torch.zeros((0, self.per_subject), dtype=torch.long)


class PrivateTraining:
    """The private discriminator update, its accountant and the budget stop (one per training run).

    Build it with :meth:`create`; a resume loads the accountant's history with :meth:`resume`.
    """

    def __init__(
        self, config: ModelConfig, sampler: SubjectSampler, delta: float, noise: float, seed: int
    ) -> None:
        assert config.dp is not None
        self.config = config
        self.dp: DPConfig = config.dp
        self.sampler = sampler
        self.delta = delta
        self.noise = noise
        self.seed = seed
        self.history: list[tuple[float, float, int]] = []
        self._allowed: int | None = None
        self._optimizer: Any = None
        self._epsilon_cache: tuple[int, float] | None = None
        self.stop_reason: str | None = None
        self.assumptions: list[str] = list(ASSUMPTIONS)

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def steps(self) -> int:
        """Private steps accounted so far (over resumes)."""
        return sum(steps for _, _, steps in self.history)

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        subjects: list[str],
        world_size: int,
        seed: int,
        initialized_from: dict[str, Any] | None = None,
    ) -> PrivateTraining:
        """The private training of a run: sampling rate, delta and the noise for ``config.dp``.

        Args:
            config: the ``model:`` section (``dp`` set).
            subjects: the subject of each training image.
            world_size: DDP processes (DP runs in one process).
            seed: the run's seed.
            initialized_from: ``model.json``'s ``initialized_from`` record when the weights start from
                another model (its assumption joins the record's), else None.

        Raises:
            InputError: DDP, or an invalid delta.
        """
        assert config.dp is not None and config.max_steps is not None
        if world_size > 1:
            raise InputError(
                f"model.dp: differentially private training runs in one process, not under torchrun "
                f"(world size {world_size}): the subject sampling and the noise are drawn once per step for the "
                "whole batch. Fix: run `medsynth train` without torchrun, or set model.dp: null."
            )
        dp = config.dp
        n_subjects = len(set(subjects))
        rate = min(1.0, dp.subjects_per_step / n_subjects)
        delta = resolve_delta(dp, n_subjects)
        if dp.noise_multiplier is not None:
            noise = float(dp.noise_multiplier)
        else:
            from opacus.accountants.utils import get_noise_multiplier

            noise = float(
                get_noise_multiplier(
                    target_epsilon=dp.epsilon, target_delta=delta, sample_rate=rate, steps=config.max_steps,
                    accountant=dp.accountant, epsilon_tolerance=0.01,
                )
            )
        training = cls(config, SubjectSampler(subjects, rate, dp.slices_per_subject, seed), delta, noise, seed)
        if initialized_from is not None:
            training.assumptions.append(PUBLIC_START.format(sha=initialized_from["checkpoint_sha256"][:16]))
        return training

    # -- the account ------------------------------------------------------------------------------

    def resume(self, state: dict[str, Any], where: str) -> None:
        """Continue the account of the checkpoint being resumed (its history, saved with the weights)."""
        saved = state.get("dp")
        if not saved:
            raise InputError(
                f"{where}: the checkpoint holds no DP account. Fix: resume with the config it was trained with, "
                "or train into a new --out folder."
            )
        if abs(float(saved["delta"]) - self.delta) > 1e-15 * max(1.0, self.delta):
            raise InputError(
                f"{where}: the checkpoint's DP account is at delta {float(saved['delta']):g}, this run's model.dp.delta "
                f"gives {self.delta:g}. Fix: resume with the original model.dp.delta."
            )
        self.history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in saved["history"]]
        self._allowed = None

    def epsilon(self) -> float:
        """The accountant's epsilon at delta after the steps taken so far."""
        steps = self.steps
        if self._epsilon_cache is None or self._epsilon_cache[0] != steps:
            self._epsilon_cache = (steps, epsilon_of(self.history, self.delta, self.dp.accountant))
        return self._epsilon_cache[1]

    def allowed_steps(self) -> int:
        """The largest total step count whose epsilon stays within ``model.dp.epsilon`` (at most max_steps)."""
        if self._allowed is None:
            planned = int(self.config.max_steps or 0)
            done = self.steps

            def within(total: int) -> bool:
                history = _merged(self.history, self.noise, self.sample_rate, total - done)
                return epsilon_of(history, self.delta, self.dp.accountant) <= self.dp.epsilon

            if within(planned):
                self._allowed = planned
            elif not within(done):  # a resume already past the budget (e.g. a lowered model.dp.epsilon)
                self._allowed = done
            else:
                low, high = done, planned  # within(low) holds, within(high) does not
                while high - low > 1:
                    middle = (low + high) // 2
                    low, high = (middle, high) if within(middle) else (low, middle)
                self._allowed = low
        return self._allowed

    def exhausted(self, step: int) -> bool:
        """True when taking step ``step + 1`` would spend more than the budget; records why."""
        if step < self.allowed_steps():
            return False
        after = epsilon_of(_merged(self.history, self.noise, self.sample_rate, 1), self.delta, self.dp.accountant)
        self.stop_reason = (
            f"privacy budget reached at step {step}: epsilon {self.epsilon():.3g} spent of model.dp.epsilon="
            f"{self.dp.epsilon:g} (delta {self.delta:.3g}); one more step would spend {after:.3g}"
        )
        return True

    def stop_record(self, steps_done: int) -> StopRecord:
        """The stop record of a run the budget stopped (model.json marks it stopped early, with the reason)."""
        return StopRecord(steps_done, self.config.max_steps, self.stop_reason)

    def checkpoint_state(self) -> dict[str, Any]:
        """What the checkpoint keeps so that a resume continues the same account."""
        return {"dp": {"history": [list(phase) for phase in self.history], "delta": self.delta}}

    def record(self) -> dict[str, Any]:
        """``model.json``'s ``dp`` object for the steps taken so far."""
        return DPRecord(
            epsilon=round(self.epsilon(), 6),
            delta=self.delta,
            target_epsilon=self.dp.epsilon,
            steps=self.steps,
            privacy_unit=PRIVACY_UNIT,
            n_subjects=self.sampler.n_subjects,
            accountant=self.dp.accountant,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise,
            max_grad_norm=self.dp.max_grad_norm,
            slices_per_subject=self.dp.slices_per_subject,
            mechanism=MECHANISM.format(r1=" and R1 term" if self.config.r1_gamma > 0 else "; R1 off"),
            assumptions=self.assumptions,
            history=[[float(noise), float(rate), int(steps)] for noise, rate, steps in self.history],
            budget_exhausted=self.stop_reason is not None,
            stop_reason=self.stop_reason,
        ).model_dump(mode="json")

    def summary_line(self) -> str:
        """One line for the CLI: what was spent, of what, on which unit."""
        return (
            f"differential privacy: epsilon {self.epsilon():.3g} of {self.dp.epsilon:g} at delta {self.delta:.3g} "
            f"({self.dp.accountant.upper()} accountant, per {PRIVACY_UNIT}, {self.steps} steps, q {self.sample_rate:.3g}, "
            f"noise {self.noise:.3g})"
        )

    # -- the step ---------------------------------------------------------------------------------

    def _dp_optimizer(self, gan: GanModules) -> Any:
        """Opacus' DPOptimizer around the discriminator's Adam (the checkpoint keeps saving the Adam itself)."""
        if self._optimizer is None or self._optimizer.original_optimizer is not gan.opt_d:
            from opacus.optimizers import DPOptimizer

            expected = max(1, round(self.sample_rate * self.sampler.n_subjects))
            self._optimizer = DPOptimizer(
                gan.opt_d,
                noise_multiplier=self.noise,
                max_grad_norm=self.dp.max_grad_norm,
                expected_batch_size=expected,
                loss_reduction="mean",
                generator=torch.Generator(device=next(gan.discriminator.parameters()).device),
            )
        return self._optimizer

    def train_step(self, step: int, setup: StepSetup, gan: GanModules, data: TrainingImages) -> dict[str, torch.Tensor]:
        """One private discriminator step, one generator step and one EMA update (as ``step.train_step``).

        Returns:
            The step's statistics as 0-d tensors, as :func:`pipeline.models.step.train_step` returns
            them, plus ``epsilon`` (spent after this step).
        """
        config, device = setup.config, setup.device
        rng = torch.Generator(device=device).manual_seed(stream_seed(setup.seed, "step", setup.rank, step))
        index = self.sampler.draw(step)
        drawn, per = index.shape
        real = data.images[index.flatten()].to(device)
        real_labels = data.targets[index.flatten()].to(device)
        batch = config.batch_size
        n_classes = int(gan.discriminator.classifier.out_features)
        z = torch.randn(batch, config.latent_dim, generator=rng, device=device)
        # Fake labels are uniform: copying the drawn subjects' labels would pass them on unclipped.
        fake_labels = torch.randint(n_classes, (batch,), generator=rng, device=device)
        half = batch // 2 if config.diversity_weight > 0 else 0
        fake_labels[half : 2 * half] = fake_labels[:half]

        def augment(x: torch.Tensor) -> torch.Tensor:
            return diff_augment(x, config.augment, rng, config.translation, config.cutout) if config.augment else x

        fake = gan.generator(z, fake_labels)
        real_in = augment(real).detach() if drawn else real
        fake_in = augment(fake.detach()).detach()
        apply_r1 = config.r1_gamma > 0 and step % config.r1_every == 0

        discriminator = gan.discriminator
        self._freeze(discriminator)
        params = {name: param.detach() for name, param in discriminator.named_parameters() if param.requires_grad}
        trained = [param for param in discriminator.parameters() if param.requires_grad]
        with torch.no_grad():  # spectral norm's power iteration: a function of the weights alone
            discriminator.train()
            discriminator(torch.zeros_like(fake_in[:1]), fake_labels[:1])
        discriminator.eval()
        try:
            per_subject, parts = self._per_subject_gradients(
                discriminator, params, real_in.reshape(drawn, per, *real_in.shape[1:]),
                real_labels.reshape(drawn, per), apply_r1, config,
            )
            d_fake = discriminator(fake_in, fake_labels)
            loss_fake = F.relu(1.0 + d_fake).mean() if config.loss == "hinge" else F.softplus(d_fake).mean()
            # The classifier head has no loss on fakes: its gradient here is zero.
            fake_grads = torch.autograd.grad(loss_fake, trained, allow_unused=True, materialize_grads=True)
        finally:
            discriminator.train()

        optimizer = self._dp_optimizer(gan)
        optimizer.generator.manual_seed(stream_seed(self.seed, "dp-noise", step))
        optimizer.zero_grad(set_to_none=True)
        for name, param in discriminator.named_parameters():
            if param.requires_grad:
                param.grad_sample = per_subject[name]
        optimizer.pre_step()  # clip per subject, add the noise, divide by the expected batch
        for param, fake_grad in zip(trained, fake_grads):
            param.grad = param.grad + fake_grad
        gan.opt_d.step()
        optimizer.zero_grad(set_to_none=True)
        self.history = _merged(self.history, self.noise, self.sample_rate, 1)

        loss_g, cls_fake, diversity = update_generator(  # post-processing: no real image
            gan, config, z, fake, fake_labels, half,
            lambda images: gan.discriminator(augment(images), fake_labels, with_class_logits=True),
        )
        self._freeze(discriminator)  # the generator's step set every discriminator parameter trainable again
        decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
        ema_update(gan.ema, gan.generator, decay)
        log_now = self.dp.accountant == "rdp" or (step + 1) % config.log_every == 0 or step + 1 == config.max_steps
        epsilon = self.epsilon() if log_now or self._epsilon_cache is None else self._epsilon_cache[1]
        zero = torch.zeros((), device=device)
        return {
            "loss_d": parts.get("loss_real", zero) + loss_fake.detach(),
            "loss_g": loss_g.detach(),
            "d_real": parts.get("d_real", zero),
            "d_fake": d_fake.detach().mean(),
            "r1": parts.get("r1", zero),
            "cls_real": parts.get("cls_real", zero),
            "cls_fake": cls_fake.detach(),
            "diversity": diversity.detach(),
            # No count of drawn subjects here: it would be a per-step statistic of the data outside the noise.
            "epsilon": torch.tensor(epsilon, device=device),
        }

    def _freeze(self, discriminator: nn.Module) -> None:
        """With ``frozen_features``: only the heads are trained (the convolutions keep their initial weights)."""
        if self.dp.frozen_features:
            for name, param in discriminator.named_parameters():
                param.requires_grad_(name.startswith(HEAD_PREFIXES))

    def _per_subject_gradients(
        self,
        discriminator: nn.Module,
        params: dict[str, torch.Tensor],
        real: torch.Tensor,
        labels: torch.Tensor,
        apply_r1: bool,
        config: ModelConfig,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each drawn subject's discriminator gradient ``{name: (subjects, *shape)}`` and the mean loss parts."""
        if len(real) == 0:
            empty = {name: torch.zeros((0, *value.shape), device=value.device) for name, value in params.items()}
            return empty, {}
        fixed = {name: value for name, value in discriminator.named_parameters() if name not in params}
        buffers = {**dict(discriminator.named_buffers()), **{name: value.detach() for name, value in fixed.items()}}
        r1_weight = 0.5 * config.r1_gamma * config.r1_every

        def scores(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return functional_call(discriminator, (p, buffers), (x, y), {"with_class_logits": True})

        def subject_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            logits, class_logits = scores(p, x, y)
            real_term = F.relu(1.0 - logits).mean() if config.loss == "hinge" else F.softplus(-logits).mean()
            cls_term = F.cross_entropy(class_logits, y)
            loss = real_term + config.cls_weight * cls_term
            r1 = torch.zeros((), device=x.device)
            if apply_r1:
                input_grad = grad(lambda images: scores(p, images, y)[0].sum())(x)
                r1 = input_grad.pow(2).flatten(1).sum(1).mean()
                loss = loss + r1_weight * r1
            aux = {"loss_real": real_term + config.cls_weight * cls_term, "d_real": logits.mean(), "cls_real": cls_term, "r1": r1}
            return loss, aux

        gradients, aux = vmap(grad(subject_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
            params, real, labels
        )
        return gradients, {key: value.detach().mean() for key, value in aux.items()}


def check_dp_resume(previous: ModelMeta, config: ModelConfig, where: str) -> None:
    """Refuse to resume across DP on/off: the account would silently start or stop mid-run.

    Raises:
        InputError: a checkpoint trained without DP resumed with ``model.dp`` (its earlier steps have
            no bound), or one trained with DP resumed without it (the model would lose its record).
    """
    if previous.dp and config.dp is None:
        raise InputError(
            f"{where}: the checkpoint was trained with differential privacy (model.dp) and this run has none; "
            "its account would end silently. Fix: resume with the original model.dp, or train into a new --out folder."
        )
    if not previous.dp and config.dp is not None and previous.steps > 0:
        raise InputError(
            f"{where}: the checkpoint's {previous.steps} steps were trained without differential privacy, so no "
            "epsilon bounds them. Fix: train with model.dp from the start, into a new --out folder."
        )
