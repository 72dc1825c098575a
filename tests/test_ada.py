"""Adaptive discriminator augmentation: the controller, the stochastic pipeline, and p in real training.

Everything is real: phantom NIfTI files and tiny real torch training on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.contracts.model import read_losses, read_model_meta
from pipeline.models.augment import AdaController, ada_augment, diff_augment
from test_models import make_phantom_dataset, tiny_config


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("ada") / "real")


def test_the_controller_moves_p_at_the_set_speed_and_stays_in_0_1() -> None:
    ada = AdaController(target=0.6, interval=4, speed_images=1000, images_per_step=25)
    for step in range(1, 41):  # D calls every real image real: r_t = 1 > 0.6
        ada.observe(step, 1.0)
    assert ada.p == pytest.approx(40 * 25 / 1000) and ada.last_rt == 1.0  # 0 -> 1 in speed_images images
    for step in range(41, 81):
        ada.observe(step, 1.0)
    assert ada.p == 1.0  # capped
    for step in range(81, 85):  # D unsure: r_t = 0.2 < 0.6 lowers p by 4 steps' worth of images
        ada.observe(step, 0.2)
    assert ada.p == pytest.approx(1.0 - 4 * 25 / 1000)
    ada.observe(85, 1.0)  # between adjustments only the accumulator moves
    assert ada.p == pytest.approx(0.9) and ada.sign_steps == 1
    restored = AdaController(target=0.6, interval=4, speed_images=1000, images_per_step=25)
    restored.load_state_dict(ada.state_dict())
    assert restored == ada
    low = AdaController(target=0.6, interval=1, speed_images=10, images_per_step=5)
    low.observe(1, -1.0)
    assert low.p == 0.0  # never below 0


def test_ada_augment_is_identity_at_p_0_differentiable_and_draws_the_same_numbers_for_any_p() -> None:
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    ops = ["translation", "cutout", "brightness", "contrast"]
    draws = {}
    for p in (0.0, 0.3, 1.0):
        rng = torch.Generator().manual_seed(7)
        out = ada_augment(images, ops, p, rng, 0.25, 0.25)
        draws[p] = torch.rand(1, generator=rng).item()  # the stream position after the call
        if p == 0.0:
            assert torch.equal(out, images)
        if p == 1.0:
            assert all(not torch.equal(out[i], images[i]) for i in range(6))
    assert draws[0.0] == draws[0.3] == draws[1.0]
    fake = images.clone().requires_grad_(True)
    ada_augment(fake, ops, 0.5, torch.Generator().manual_seed(1), 0.25, 0.25).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    # The fixed list (DiffAugment) is unchanged: every op on every image.
    fixed = diff_augment(images, ["translation", "cutout"], torch.Generator().manual_seed(3), 0.25, 0.25)
    assert fixed.shape == images.shape and not torch.equal(fixed, images)


def _train_ada(data: Path, out: Path, **changes) -> tuple[float, list[list[float]]]:
    from pipeline.models import train

    config = tiny_config(max_steps=60, augment="ada", ada_speed_images=200, select_every=0, sample_every=0,
                         checkpoint_every=20, **changes)
    summary = train.run(data, out, config, seed=0)
    meta = read_model_meta(out)
    assert meta.augmentation["mode"] == "ada" and meta.augmentation["ops"] == ["translation", "cutout"]
    assert summary.augment_p == meta.augmentation["p_history"][-1][1]
    losses = read_losses(out)
    assert len(losses["augment_p"]) == 60 and len(losses["real_sign"]) == 60
    return float(summary.augment_p), meta.augmentation["p_history"]


def test_p_rises_when_the_discriminator_memorises_a_tiny_real_set_and_stays_low_otherwise(
    phantom_data: Path, tmp_path: Path
) -> None:
    # 4 training volumes (24 slices): D learns to call every real slice real within a few dozen steps.
    p_overfit, history = _train_ada(phantom_data, tmp_path / "overfit")
    assert p_overfit > 0.3, history
    assert [step for step, _ in history] == [20, 40, 60]  # p at the end of every checkpointed step
    assert history[0][1] <= history[-1][1]
    # The same data and steps with a discriminator too slow to separate anything: sign(D(real)) stays
    # below the target, so nothing calls for augmentation.
    p_calm, _ = _train_ada(phantom_data, tmp_path / "calm", lr_d=1e-7)
    assert p_calm < 0.05
