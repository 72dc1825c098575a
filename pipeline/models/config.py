"""Configuration of the train and generate stages (``model:`` and ``generate:``).

``ModelConfig`` holds six groups of keys (flat, so a flag or a dotted override names one key):
preprocessing (how real volumes become network inputs), network (sizes of the generator and
discriminator), training (losses, optimizers, augmentation, EMA), budget (steps and/or minutes),
bookkeeping (checkpoints, logging, sample grids) and hardware. See ``docs/models.md`` for every key.

The defaults are a CPU-sized recipe (the one ``configs/demo.yaml`` tunes for the phantom cohort):
a run without ``-c`` finishes in minutes on a laptop, not hours. Larger networks and images are
a config away (``docs/models.md``, "Sizing a run").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer, model_validator

from pipeline.core.section import Section
from pipeline.imaging.levels import network_levels

__all__ = ["ModelConfig", "GenerateConfig", "DPConfig", "AUGMENTATIONS", "AUTO", "PLANNED_KEYS", "PATH_KEYS"]

# Keys that hold a filesystem path: a folder may be named after a patient or a site, so model.json and MLflow
# never carry them (model.json's `initialized_from` identifies the start by its checkpoint's digest instead).
PATH_KEYS: frozenset[str] = frozenset({"init_from"})
AUGMENTATIONS: tuple[str, ...] = ("translation", "cutout", "brightness", "contrast")
# `auto`: the key is planned from the dataset's fingerprint when training starts (pipeline.planning).
AUTO = "auto"
PLANNED_KEYS: tuple[str, ...] = (
    "spatial_dims", "image_size", "spacing", "intensity", "window", "percentiles", "batch_size", "augment",
    "max_steps", "max_minutes",
)


class DPConfig(Section):
    """Differentially private training (``model.dp``): DP-SGD on the discriminator, the patient as the unit.

    docs/models.md, "Differential privacy", explains the mechanism and the accounting.
    """

    epsilon: float = Field(
        10.0, gt=0.0, description="Target epsilon: the noise is calibrated so that the planned steps spend it exactly."
    )
    delta: float | Literal["auto"] = Field(
        "auto", description="Target delta; auto: 1 / (10 x training subjects). Must be below 1 / training subjects."
    )
    max_grad_norm: float = Field(
        1.0, gt=0.0, description="Clipping bound of each subject's discriminator gradient (all its slices together)."
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0.0,
        description="Gaussian noise std / max_grad_norm; null: the smallest that keeps max_steps within epsilon. "
        "Set it and training stops when the next step would exceed epsilon.",
    )
    subjects_per_step: int = Field(
        16,
        ge=1,
        description="Expected subjects per discriminator step: each subject is drawn independently with "
        "probability subjects_per_step / training subjects (Poisson sampling; 1 when there are fewer).",
    )
    slices_per_subject: int = Field(
        2, ge=1, le=64, description="2D: slices drawn (with replacement) from each sampled subject; 3D: volumes."
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant: rdp (Renyi DP, Mironov 2017) or prv (Gopi et al. 2021, tighter)."
    )
    frozen_features: bool = Field(
        False,
        description="Keep the discriminator's convolutions at their initial weights (the seeded random "
        "initialisation, or model.init_from's) and train only its heads privately: far fewer noised parameters, "
        "so far less noise in total.",
    )


class ModelConfig(Section):
    """Preprocessing, networks, training and budget of the conditional GAN."""

    # --- preprocessing (saved with the model; evaluate/export apply the same transform) ---
    # Every key that may read `auto` (the default) is planned from the training data (docs/models.md, "Planning").
    spatial_dims: Literal[2, 3, "auto"] = Field("auto", description="2: axial slices; 3: whole volumes; auto: planned.")
    image_size: list[int] | Literal["auto"] = Field(
        "auto",
        description="Network grid in voxels, RAS axis order: [x, y] (2D) or [x, y, z] (3D). Volumes are "
        "center-cropped or padded (with air) to it after resampling. auto: the foreground field of view.",
    )
    spacing: list[float] | Literal["auto"] | None = Field(
        "auto",
        description="Voxel size of the network grid in mm: [x, y] (2D, in-plane) or [x, y, z] (3D); "
        "null: the median native spacing of the training split; auto: planned with image_size.",
    )
    orientation: str = Field(
        "RAS", description="Axis codes volumes are reoriented to (after intensity scaling); 2D slices are taken along the last axis."
    )
    intensity: Literal["ct", "mr", "auto"] = Field(
        "auto",
        description="ct: fixed HU window (`window`); mr: per-image percentiles (`percentiles`; MR, X-ray and any "
        "modality without absolute units); auto: ct for CT data, else mr. Applied first.",
    )
    window: list[float] | Literal["auto"] = Field(
        "auto",
        description="CT window [low, high] in HU mapped to [-1, 1] (values outside are clipped); auto: from "
        "the foreground HU percentiles.",
    )
    percentiles: list[float] | Literal["auto"] = Field(
        "auto", description="mr: per-image percentiles [low, high] mapped to [-1, 1]; auto: planned."
    )
    min_foreground: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="2D: an axial slice is used only if more than this fraction of its pixels is above -0.95 "
        "in [-1, 1] units, i.e. 2.5% of the window above its floor (skips empty slices).",
    )

    # --- network ---
    latent_dim: int = Field(64, ge=4, le=1024, description="Length of the generator's noise vector z.")
    embed_dim: int = Field(16, ge=1, le=512, description="Class embedding joined to z in the generator.")
    g_width: int = Field(8, ge=4, le=512, description="Generator channels at full resolution (doubling per level, max x8).")
    d_width: int = Field(8, ge=4, le=512, description="Discriminator channels at full resolution (doubling per level, max x8).")

    # --- training ---
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        "auto", description="Images per step and per process (DDP: x world size); auto: planned."
    )
    loss: Literal["hinge", "nonsaturating"] = Field("hinge", description="Adversarial loss.")
    lr_g: float = Field(5e-4, gt=0.0, description="Generator learning rate (Adam).")
    lr_d: float = Field(1e-3, gt=0.0, description="Discriminator learning rate (Adam); TTUR: usually > lr_g.")
    betas: list[float] = Field(default_factory=lambda: [0.5, 0.99], description="Adam betas [beta1, beta2].")
    ema_decay: float = Field(
        0.995, ge=0.0, lt=1.0, description="Generator EMA decay (warm-up: min(decay, (1+t)/(10+t)))."
    )
    cls_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the auxiliary classifier loss (AC-GAN on real images; G is pushed to make "
        "fakes classifiable as their label); 0 switches it off.",
    )
    diversity_weight: float = Field(
        0.1,
        ge=0.0,
        description="Weight of the mode-seeking term (Mao et al. 2019): same label, different z must give "
        "different images; counters mode collapse. 0 switches it off.",
    )
    r1_gamma: float = Field(1.0, ge=0.0, description="R1 penalty weight on real images; 0 switches it off.")
    r1_every: int = Field(16, ge=1, description="Lazy R1: apply the penalty every N steps (scaled by N).")
    # CT intensities are absolute (HU): brightness/contrast jitter would teach D wrong intensities.
    augment: list[str] | Literal["auto", "ada"] = Field(
        "auto",
        description="Differentiable augmentations applied to real and fake before D (DiffAugment): "
        "translation, cutout, brightness, contrast; [] switches it off; ada: adaptive (ADA), the operations "
        "`augment_ops` each applied with a probability p tuned from D's overfitting; auto: no brightness/contrast for CT.",
    )
    translation: float = Field(0.0625, ge=0.0, le=0.5, description="DiffAugment: max shift as a fraction of each side.")
    cutout: float = Field(0.25, ge=0.0, le=0.9, description="DiffAugment: cutout box side as a fraction of each side.")
    augment_ops: list[str] = Field(
        default_factory=lambda: ["translation", "cutout"],
        description="augment: ada: the operations p applies (brightness/contrast only where intensities are not absolute).",
    )
    ada_target: float = Field(0.6, gt=0.0, lt=1.0, description="ADA: the target of r_t = E[sign(D(real))].")
    ada_interval: int = Field(4, ge=1, description="ADA: adjust p every N steps.")
    ada_speed_images: int = Field(
        10_000, ge=1, description="ADA: real images over which p can move by 1 (0 -> 1 in this many images)."
    )
    select_every: int = Field(
        200,
        ge=0,
        description="Score the EMA generator on the validation split every N steps (and at the end) and export "
        "the best one; 0: off (the last step is exported).",
    )
    patience: int = Field(
        4, ge=1, description="max_steps: auto stops after this many evaluations without improvement (converged)."
    )

    # --- budget ---
    max_steps: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="The step budget: the plan (null: no step limit, the time budget is the plan; auto: "
        "planned from the number of training images).",
    )
    max_minutes: Annotated[float, Field(gt=0.0)] | Literal["auto"] | None = Field(
        "auto",
        description="Safety cap in minutes of training (summed over resumes; null: none; auto: planned). When "
        "it stops training before max_steps, model.json marks the model stopped_early.",
    )
    guards: Literal["error", "warn", "off"] = Field(
        "error",
        description="Preprocessing guards before training (window clipping, foreground size, class signal): "
        "error: stop with exit 2 and the fix; warn: print and go on; off: skip them.",
    )
    accept_early_stop: bool = Field(
        False,
        description="Accept a model that stopped before max_steps (time cap, Ctrl-C, divergence): `medsynth run` "
        "then goes on with it instead of stopping with exit 1.",
    )

    dp: DPConfig | None = Field(
        None,
        description="Differentially private training (DP-SGD on the discriminator, per patient); null: off. "
        "docs/models.md, 'Differential privacy'.",
    )
    init_from: str | None = Field(
        None,
        description="A MODEL_DIR whose exported networks (EMA generator and discriminator) start this run instead "
        "of a random initialisation: fine-tuning, e.g. of a model trained on public data. Its architecture, "
        "labels and preprocessing must match; under model.dp it must not have been trained on this dataset.",
    )

    # --- bookkeeping ---
    checkpoint_every: int = Field(200, ge=1, description="Write checkpoint.pt every N steps (and at the end).")
    log_every: int = Field(10, ge=1, description="Log losses and images/s every N steps.")
    sample_every: int = Field(300, ge=0, description="Log a per-class sample grid every N steps (0: only at the end).")
    sample_per_class: int = Field(8, ge=1, le=64, description="Images per class in a sample grid.")
    log_model: bool = Field(True, description="Log the EMA generator with mlflow.pytorch.log_model at the end.")

    # --- hardware ---
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    channels_last: bool = Field(True, description="Channels-last memory format (CPU and CUDA; faster convolutions on CUDA).")
    num_threads: int | Literal["auto"] | None = Field(
        "auto",
        description="torch CPU threads per process. auto: 1 for CPU-sized models, torch's default above "
        "(pipeline.models.budget.choose_threads); null: torch's default. The count changes the floating-point "
        "order of CPU convolutions, so it is part of what reproduces a run.",
    )

    @property
    def auto_keys(self) -> list[str]:
        """The keys still reading ``auto`` (planned when training starts)."""
        return [key for key in PLANNED_KEYS if getattr(self, key) == AUTO]

    def tracked(self) -> dict[str, Any]:
        """The section as MLflow params: each path key (PATH_KEYS) only as ``<key>.given``, never its value."""
        values = self.model_dump(mode="json", exclude=PATH_KEYS)
        values.update({f"{key}.given": getattr(self, key) is not None for key in sorted(PATH_KEYS)})
        return values

    @model_serializer(mode="wrap")
    def _decided_only(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # An `auto` key is not a value yet: dumps (MLflow params at a stage's start, digests) carry only
        # decided keys, and train logs the planned values under the same names once it has them.
        return {key: value for key, value in handler(self).items() if value != AUTO or key not in PLANNED_KEYS}

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        dims = self.spatial_dims
        size = self.image_size
        if size != AUTO:
            if dims != AUTO and len(size) != dims:
                raise ValueError(
                    f"image_size needs {dims} values for spatial_dims {dims} (got {len(size)}); "
                    "e.g. [64, 64] for 2D or [64, 64, 16] for 3D"
                )
            if len(size) not in (2, 3):
                raise ValueError("image_size needs 2 values (2D) or 3 values (3D), or auto")
            if any(side < 8 for side in size):
                raise ValueError("every image_size side must be at least 8")
            levels = network_levels(size)
            step = 2**levels
            if any(side % step for side in size):
                raise ValueError(f"every image_size side must be divisible by {step} (the networks use {levels} 2x levels)")
        if isinstance(self.spacing, list):
            wanted = dims if dims != AUTO else len(self.spacing)
            if len(self.spacing) != wanted or wanted not in (2, 3) or any(value <= 0 for value in self.spacing):
                raise ValueError(f"spacing needs {wanted} positive values (mm) for spatial_dims {dims}, null or auto")
        if self.window != AUTO and (len(self.window) != 2 or self.window[0] >= self.window[1]):
            raise ValueError("window must be [low, high] in HU with low < high, or auto")
        if self.percentiles != AUTO and (
            len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100
        ):
            raise ValueError("percentiles must be [low, high] with 0 <= low < high <= 100, or auto")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError("betas must be two values in [0, 1)")
        codes = self.orientation.upper()
        if len(codes) != 3 or any(len(set(codes) & set(pair)) != 1 for pair in ("LR", "AP", "SI")):
            raise ValueError("orientation must be 3 axis codes, one of L/R, A/P and S/I each (e.g. RAS or LPS)")
        if dims != 3 and codes[2] not in "SI":
            raise ValueError("orientation: 2D slices are axial, so the last code must be S or I (e.g. RAS)")
        listed = [] if self.augment in (AUTO, "ada") else list(self.augment)
        unknown = [name for name in [*listed, *self.augment_ops] if name not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation {unknown[0]!r}; allowed: {', '.join(AUGMENTATIONS)}")
        if isinstance(self.num_threads, int) and self.num_threads < 1:
            raise ValueError("num_threads must be at least 1, 'auto' or null")
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("set max_steps and/or max_minutes (training needs a budget)")
        if self.dp is not None:
            _check_dp(self)
        return self


def _check_dp(config: ModelConfig) -> None:
    """Keys that DP training needs set a certain way (the message names the key and why).

    Everything that reads the training images outside the noisy discriminator update would leak
    past the accounted epsilon: the plan (spacing, window, size from dataset statistics), ADA (its p
    follows D's outputs on real images) and model selection (its judge trains on the real images;
    training switches it off under DP and says so).
    """
    planned = [key for key in config.auto_keys if key != "max_steps"]
    if planned:
        raise ValueError(
            f"dp needs every planned key set, not auto ({', '.join(planned)}): the plan derives them from "
            "statistics of the private training data that no noise protects (configs/dp.yaml sets them all)"
        )
    if config.augment == "ada":
        raise ValueError("dp cannot use augment: ada (its p follows the discriminator's outputs on real images, "
                         "outside the privacy accounting): set a fixed list, e.g. [translation, cutout]")
    if config.max_steps in (None, AUTO):
        raise ValueError("dp needs max_steps: the noise is calibrated so that the planned steps spend dp.epsilon")
    if config.spacing is None:
        raise ValueError(
            "dp needs spacing set (e.g. [5.0, 5.0]): null takes the median spacing of the training split, "
            "a statistic of the private data that no noise protects"
        )


class GenerateConfig(Section):
    """How many synthetic images to draw and from which seed."""

    per_class: int = Field(100, ge=1, description="Synthetic images per class.")
    seed: int = Field(0, ge=0, description="Seed of the noise: same model, seed and per_class, same images.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per generator call.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
