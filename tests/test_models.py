"""Train and generate: preprocessing, 2D/3D training, generation, MLflow, resume, NaN guard, CLI.

Everything is real: phantom NIfTI files, a real MLflow sqlite store, tiny real torch training.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.contracts.dataset import read_dataset, write_manifest
from pipeline.demo import phantom_affine, phantom_volume
from pipeline.core.errors import InputError
from pipeline.core.files import sha256_file, write_nifti
from pipeline.models.config import GenerateConfig, ModelConfig
from pipeline.tracking import NullTracker, Tracker

SMALL_SHAPE = (64, 64, 6)
SMALL_SPACING = (5.0, 5.0, 4.0)


def make_phantom_dataset(root: Path, subjects: int = 6, seed: int = 0) -> Path:
    """A small real dataset (alternating labels; 4 train subjects, then val and test)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(subjects):
        label = ("normal", "lesion")[index % 2]
        hu, spacing = phantom_volume(np.random.default_rng(rng.integers(2**32)), label, SMALL_SHAPE, SMALL_SPACING)
        rel = f"images/sub-{index:03d}.nii.gz"
        write_nifti(root / rel, hu, phantom_affine(spacing, hu.shape, -350.0))
        split = "train" if index < 4 else ("val" if index == 4 else "test")
        rows.append(
            {"sample_id": f"sub-{index:03d}", "subject_id": f"p{index:03d}", "label": label, "split": split,
             "path": rel, "origin": "real", "sha256": sha256_file(root / rel)}
        )
    write_manifest(root, pd.DataFrame(rows))
    return root


def tiny_config(**changes) -> ModelConfig:
    """A model that trains in well under a second per step on one CPU thread."""
    values = dict(
        spatial_dims=2, image_size=[32, 32], spacing=[10.0, 10.0], intensity="ct", window=[-160.0, 240.0],
        percentiles=[1.0, 99.0], augment=["translation", "cutout"], latent_dim=16, embed_dim=4, g_width=8, d_width=8,
        batch_size=8, max_steps=4, max_minutes=None, checkpoint_every=2, log_every=1, sample_every=2,
        sample_per_class=2, num_threads=1, device="cpu",
        guards="off",  # tiny grids on purpose: the preprocessing guards are tested in the planning tests
    )
    values.update(changes)
    return ModelConfig(**values)


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "real")


def _state_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(model_dir / "checkpoint.pt", weights_only=True)
    tensors = {}
    for part in ("generator", "discriminator", "ema"):
        tensors.update({f"{part}.{key}": value for key, value in state[part].items()})
    for part in ("opt_g", "opt_d"):
        for param_id, param_state in state[part]["state"].items():
            tensors.update({f"{part}.{param_id}.{key}": value for key, value in param_state.items()})
    return tensors


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


def test_preprocess_slices_volumes_and_inverts_synthetic_exactly(phantom_data: Path) -> None:
    from pipeline.imaging.preprocess import Preprocessor, build_spec

    dataset = read_dataset(phantom_data)
    rows = dataset.subset(split="train")
    spec = build_spec(tiny_config(spacing=None), dataset, rows)
    assert spec["spacing"] == [5.0, 5.0]  # null spacing: the median native spacing
    assert spec["slice_spacing"] == 4.0

    pre = Preprocessor(build_spec(tiny_config(), dataset, rows))
    hu, spacing = phantom_volume(np.random.default_rng(1), "lesion", SMALL_SHAPE, SMALL_SPACING)
    affine = phantom_affine(spacing, hu.shape, 0.0)
    hu[:, :, 0] = -1000  # an empty (air-only) slice is skipped
    slices = pre.volume_to_images(hu, affine)
    assert slices.shape == (5, 32, 32)
    assert slices.min() >= -1.0 and slices.max() <= 1.0
    # The phantom is stored LPS-like (x towards the patient's left); RAS puts the liver (patient's
    # right) at high x after reorientation: compare liver-side and spleen-side mean intensity.
    assert slices[:, 20:, 12:20].mean() > slices[:, :12, 12:20].mean()

    images, labels, ids = pre.dataset_images(dataset, rows)
    assert images.shape == (4 * 6, 1, 32, 32) and labels.count("lesion") == 12
    assert ids[0] == f"{rows.iloc[0]['sample_id']}#z0"

    # A synthetic 2D file (model grid, HU) comes back to the same [-1, 1] image.
    fake = np.random.default_rng(2).uniform(-1, 1, (32, 32)).astype(np.float32)
    back = pre.volume_to_images(pre.to_intensity(fake)[:, :, None], pre.grid_affine(), origin="synthetic")
    np.testing.assert_allclose(back[0], fake, atol=1e-5)

    pre3 = Preprocessor(build_spec(tiny_config(spatial_dims=3, image_size=[32, 32, 8], spacing=[10.0, 10.0, 4.0]), dataset, rows))
    volume = pre3.volume_to_images(hu, affine)
    assert volume.shape == (1, 32, 32, 8)
    assert np.all(volume[0, :, :, [0, 7]] == -1.0)  # 6 slices padded symmetrically to 8 with air
    assert volume[0, :, :, 4].max() > 0.5


def test_config_rejects_inconsistent_keys(tmp_path: Path) -> None:
    from pipeline.config import load_config

    with pytest.raises(InputError, match="image_size needs 3 values"):
        load_config(None, {"model.spatial_dims": 3, "model.image_size": [64, 64]})
    with pytest.raises(InputError, match="divisible by"):
        load_config(None, {"model.image_size": [60, 64]})
    no_budget = tmp_path / "no_budget.yaml"
    no_budget.write_text("model: {max_steps: null, max_minutes: null}\n")
    with pytest.raises(InputError, match="budget"):
        load_config(no_budget)
    with pytest.raises(InputError, match="unknown augmentation"):
        load_config(None, {"model.augment": ["rotate"]})
    with pytest.raises(InputError, match="unknown augmentation 'flip'"):
        load_config(None, {"model.augment": "ada", "model.augment_ops": ["translation", "flip"]})
    assert load_config(None, {"model.augment": "ada", "model.max_steps": "auto"}).model.augment == "ada"


# ------------------------------------------------------------------------------------------------
# 2D: train + MLflow + generate
# ------------------------------------------------------------------------------------------------


def test_train_2d_logs_to_mlflow_and_generates_a_valid_dataset(
    phantom_data: Path, tmp_path: Path, mlflow_store: Path
) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.models import generate, load_discriminator, load_generator, sample, train
    from pipeline.imaging.preprocess import Preprocessor

    model_dir = tmp_path / "model"
    with tracking.stage_run("train", "medsynth-test") as tracker:
        summary = train.run(phantom_data, model_dir, tiny_config(), seed=3, tracker=tracker)
    assert summary.steps == 4 and summary.n_volumes == 4  # split 'train' only (6 subjects in the dataset)
    assert any("Trained 4 steps" in line for line in summary.lines())

    meta = json.loads((model_dir / "model.json").read_text())
    for key in ("spatial_dims", "image_size", "spacing", "labels", "latent_dim", "mlflow_run_id", "seed", "steps",
                "config", "preprocess", "dp", "train_dataset_digest"):
        assert key in meta, key
    assert meta["labels"] == ["lesion", "normal"] and meta["steps"] == 4 and meta["seed"] == 3
    assert meta["mlflow_run_id"] == tracker.run_id and meta["dp"] is None
    assert meta["train_dataset_digest"] == read_dataset(phantom_data).digest

    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.data.params["model.g_width"] == "8" and run.data.params["train.n_volumes"] == "4"
    history = client.get_metric_history(tracker.run_id, "loss_d")
    assert [metric.step for metric in history] == [1, 2, 3, 4]
    assert run.data.metrics["images_per_s"] > 0
    artifacts = {info.path for info in client.list_artifacts(tracker.run_id, "samples")}
    assert {"samples/step_000002.png", "samples/step_000004.png"} <= artifacts
    assert {info.path for info in client.list_artifacts(tracker.run_id, "checkpoint")} >= {
        "checkpoint/checkpoint.pt", "checkpoint/model.json"}
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == read_dataset(phantom_data).digest[:32]

    # The logged model (torch.export, noise + int64 labels) equals the EMA generator, any batch size.
    logged = mlflow.pytorch.load_model(run.data.tags["medsynth.model_uri"])
    generator = load_generator(model_dir)
    noise, labels = torch.randn(5, 16), torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(logged(noise, labels), generator(noise, labels))
    images = sample(generator, labels, seed=7)
    assert images.shape == (5, 1, 32, 32) and images.abs().max() <= 1.0
    torch.testing.assert_close(sample(generator, labels, seed=7, batch_size=2), images)

    scores = load_discriminator(model_dir)(images, labels)
    assert scores.shape == (5,) and torch.isfinite(scores).all()

    out = tmp_path / "synthetic"
    with tracking.stage_run("generate", "medsynth-test") as gen_tracker:
        dataset = generate.run(model_dir, out, GenerateConfig(per_class=3, seed=7), tracker=gen_tracker)
    manifest = read_dataset(out).manifest
    assert len(manifest) == 6 and set(manifest["origin"]) == {"synthetic"} and set(manifest["split"]) == {"train"}
    assert manifest.groupby("label").size().to_dict() == {"lesion": 3, "normal": 3}
    assert set(manifest["generator_run_id"]) == {tracker.run_id} and set(manifest["seed"]) == {"7"}
    assert set(manifest["model_digest"]) == {sha256_file(model_dir / "checkpoint.pt")}
    image = nib.load(out / manifest.iloc[0]["path"])
    assert image.header["descrip"].tobytes().rstrip(b"\0").decode() == f"synthetic (medsynth {tracker.run_id})"
    assert image.shape == (32, 32, 1)
    np.testing.assert_allclose(np.sqrt((image.affine[:3, :3] ** 2).sum(0)), [10.0, 10.0, 4.0])
    assert client.get_run(gen_tracker.run_id).inputs.dataset_inputs  # the output dataset is logged

    # evaluate/export read it back with the model's transform: the generator's images, exactly.
    pre = Preprocessor.from_model_dir(model_dir)
    back, back_labels, back_ids = pre.dataset_images(dataset)
    lesion_first = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = sample(generator, lesion_first, seed=7).numpy()
    order = np.argsort(back_ids)  # manifest rows are sorted by sample id: lesion-00000.., normal-00000..
    np.testing.assert_allclose(back[order], expected, atol=1e-5)
    assert back_labels == ["lesion"] * 3 + ["normal"] * 3

    # Same model and seed: same bytes.
    again = generate.run(model_dir, tmp_path / "again", GenerateConfig(per_class=3, seed=7))
    assert list(again.manifest["sha256"]) == list(manifest["sha256"])


# ------------------------------------------------------------------------------------------------
# 3D
# ------------------------------------------------------------------------------------------------


def test_train_3d_and_generate_volumes(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import generate, train
    from pipeline.imaging.preprocess import Preprocessor

    config = tiny_config(spatial_dims=3, image_size=[16, 16, 8], spacing=[20.0, 20.0, 4.0], batch_size=2, max_steps=2)
    summary = train.run(phantom_data, tmp_path / "model3d", config, seed=0)
    assert summary.steps == 2 and summary.n_images == 4  # one image per volume
    dataset = generate.run(tmp_path / "model3d", tmp_path / "syn3d", GenerateConfig(per_class=2, seed=1))
    image = nib.load(dataset.root / dataset.manifest.iloc[0]["path"])
    assert image.shape == (16, 16, 8)
    np.testing.assert_allclose(np.sqrt((image.affine[:3, :3] ** 2).sum(0)), [20.0, 20.0, 4.0])
    images, _, _ = Preprocessor.from_model_dir(tmp_path / "model3d").dataset_images(dataset)
    assert images.shape == (4, 1, 16, 16, 8)


# ------------------------------------------------------------------------------------------------
# Resume and divergence
# ------------------------------------------------------------------------------------------------


class _InterruptAt(Tracker):
    """Raises KeyboardInterrupt when the metrics of ``step`` are logged (a Ctrl-C mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption_equals_uninterrupted_run(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    config = tiny_config(max_steps=6, checkpoint_every=3, sample_every=0, r1_gamma=1.0, r1_every=2, cls_weight=0.5)
    straight = train.run(phantom_data, tmp_path / "straight", config, seed=5)

    with pytest.raises(KeyboardInterrupt):
        train.run(phantom_data, tmp_path / "resumed", config, seed=5, tracker=_InterruptAt(5))
    assert json.loads((tmp_path / "resumed" / "model.json").read_text())["steps"] == 3  # last checkpoint kept
    with pytest.raises(InputError, match="--resume"):
        train.run(phantom_data, tmp_path / "resumed", config, seed=5)
    resumed = train.run(phantom_data, tmp_path / "resumed", config, seed=5, resume=True)

    assert resumed.start_step == 3 and resumed.steps == 6
    assert resumed.weights_digest == straight.weights_digest
    a, b = _state_tensors(tmp_path / "straight"), _state_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_a_changed_architecture(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=2, sample_every=0), seed=0)
    with pytest.raises(InputError, match="g_width"):
        train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=4, g_width=16), seed=0, resume=True)
    with pytest.raises(InputError, match="original --seed"):
        train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=4), seed=1, resume=True)
    # A time budget already spent: the resumed run stops before its first step.
    spent = train.run(phantom_data, tmp_path / "model", tiny_config(max_steps=4, max_minutes=1e-9), seed=0, resume=True)
    assert spent.steps == 2 and spent.stopped_by == "max_minutes"


class _ThreadSpy(Tracker):
    """Records the intra-op thread count each time training logs metrics (i.e. while it runs)."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.threads.append(torch.get_num_threads())


def _global_random_states() -> tuple:
    import random

    numpy_state = np.random.get_state()
    return torch.get_rng_state(), (numpy_state[0], numpy_state[1].copy(), *numpy_state[2:]), random.getstate()


def _assert_same_random_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])  # torch's global generator
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1]) and before[1][2:] == after[1][2:]
    assert before[2] == after[2]  # Python's random


def test_training_gives_back_the_thread_count_and_global_random_states(phantom_data: Path, tmp_path: Path) -> None:
    """train.run sets the thread count and seeds the global RNGs (a resume restores saved ones) only while it runs."""
    import random

    from pipeline.models import train

    outside = torch.get_num_threads()
    inside = 2 if outside == 1 else 1
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    for resume, max_steps in ((False, 2), (True, 4)):
        before = _global_random_states()
        spy = _ThreadSpy()
        summary = train.run(
            phantom_data, tmp_path / "model", tiny_config(max_steps=max_steps, sample_every=0, num_threads=inside),
            seed=0, resume=resume, tracker=spy,
        )
        assert summary.start_step == (2 if resume else 0) and summary.steps == max_steps
        assert spy.threads and set(spy.threads) == {inside}  # the config's thread count while training
        assert torch.get_num_threads() == outside
        _assert_same_random_states(before, _global_random_states())
    # Same seed, same weights: training draws from its own streams, whatever the caller's global state.
    torch.manual_seed(99)
    config = tiny_config(max_steps=4, sample_every=0, num_threads=inside)
    again = train.run(phantom_data, tmp_path / "again", config, seed=0)
    assert again.weights_digest == summary.weights_digest


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import load_generator, train
    from pipeline.models.train import TrainingDiverged

    model_dir = tmp_path / "model"
    train.run(phantom_data, model_dir, tiny_config(max_steps=2, sample_every=0), seed=0)
    before = (model_dir / "checkpoint.pt").read_bytes()
    exploding = tiny_config(max_steps=20, sample_every=0, lr_g=1e30, lr_d=1e30)
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 2\)"):
        train.run(phantom_data, model_dir, exploding, seed=0, resume=True)
    assert (model_dir / "checkpoint.pt").read_bytes() == before
    assert json.loads((model_dir / "model.json").read_text())["steps"] == 2
    generator = load_generator(model_dir)
    assert all(torch.isfinite(p).all() for p in generator.parameters())


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _cli(args: list[str]) -> int:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code)


def test_cli_train_generate_and_errors(
    phantom_data: Path, tmp_path: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        "name: clitest\n"
        "model: {image_size: [32, 32], spacing: [10.0, 10.0], latent_dim: 16, embed_dim: 4, g_width: 8, d_width: 8,\n"
        "        batch_size: 4, max_steps: 50, checkpoint_every: 1, sample_every: 0, log_model: false, num_threads: 1}\n"
        "generate: {per_class: 2}\n"
    )
    model_dir = tmp_path / "model"
    assert _cli(["train", "--data", str(phantom_data), "--out", str(model_dir), "-c", str(config_file),
                 "--max-steps", "2"]) == 0
    assert "Trained 2 steps" in capsys.readouterr().out
    assert _cli(["train", "--data", str(phantom_data), "--out", str(model_dir), "-c", str(config_file)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _cli(["train", "--data", str(phantom_data), "--out", str(model_dir), "-c", str(config_file),
                 "--max-steps", "3", "--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert _cli(["generate", "--model", str(model_dir), "--out", str(tmp_path / "syn"), "-c", str(config_file),
                 "--per-class", "3", "--seed", "4"]) == 0
    assert "6 synthetic images" in capsys.readouterr().out
    manifest = read_dataset(tmp_path / "syn").manifest
    assert set(manifest["seed"]) == {"4"} and len(manifest) == 6
    # Writing synthetic images over a real dataset is refused.
    assert _cli(["generate", "--model", str(model_dir), "--out", str(phantom_data), "-c", str(config_file)]) == 2
    assert "real images" in capsys.readouterr().err
    assert _cli(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m2")]) == 2


def test_null_tracker_default_and_no_split_train(tmp_path: Path, phantom_data: Path) -> None:
    from pipeline.models import train

    manifest = read_dataset(phantom_data).manifest.copy()
    manifest["split"] = "test"
    only_test = tmp_path / "only_test"
    for rel in manifest["path"]:
        (only_test / rel).parent.mkdir(parents=True, exist_ok=True)
        (only_test / rel).write_bytes((phantom_data / rel).read_bytes())
    write_manifest(only_test, manifest)
    with pytest.raises(InputError, match="no real images in split 'train'"):
        train.run(only_test, tmp_path / "m", tiny_config(), tracker=NullTracker())
