"""Model selection on the validation split and the convergence budget (`max_steps: auto`).

Everything is real: phantom NIfTI files, tiny real torch training on the CPU, the real train stage
entry of the registry (what `medsynth run` calls and turns into its exit code).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.contracts.model import read_losses, read_model_meta
from pipeline.core.errors import CheckFailed, InputError
from pipeline.models.selection import MIN_IMPROVEMENT, SelectionScore, Selector, selection_criterion
from test_models import _InterruptAt, _state_tensors, make_phantom_dataset, tiny_config


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("selection") / "real")


def _score(step: int, fid: float, accuracy: float = 1.0) -> SelectionScore:
    return SelectionScore(step, fid, accuracy, 1.0, selection_criterion(fid, accuracy, 1.0))


def test_the_criterion_ranks_label_correctness_before_sharpness() -> None:
    assert selection_criterion(10.0, 0.96, 1.0) == 10.0  # labels as good as 95 % of real: FID alone
    assert selection_criterion(10.0, 0.90, 1.0) == pytest.approx(20.0)  # 5 points short: one more FID
    assert selection_criterion(4.0, 0.5, 1.0) > selection_criterion(12.0, 0.97, 1.0)  # sharp, wrong class: loses


def test_the_selector_keeps_the_best_and_counts_evaluations_without_improvement() -> None:
    network = torch.nn.Linear(2, 2)
    selector = Selector(patience=2)
    assert selector.update(_score(10, 20.0), network, network)
    with torch.no_grad():
        network.weight.add_(1.0)
    assert selector.update(_score(20, 10.0), network, network)  # a better one: its weights are kept
    kept = selector.best_state["ema"]["weight"].clone()
    with torch.no_grad():
        network.weight.add_(1.0)
    assert not selector.update(_score(30, 10.0 * (1 - MIN_IMPROVEMENT / 2)), network, network)  # within the noise
    assert not selector.converged
    assert not selector.update(_score(40, 15.0), network, network)
    assert selector.converged and selector.best.step == 20 and torch.equal(selector.best_state["ema"]["weight"], kept)
    restored = Selector(patience=2)
    restored.load_state_dict(json.loads(json.dumps(selector.state_dict())), selector.best_state)
    assert (restored.best, restored.stale, restored.history) == (selector.best, selector.stale, selector.history)


def test_the_exported_generator_is_the_best_evaluated_step_not_the_last(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train
    from pipeline.models.generate import load_generator

    config = tiny_config(max_steps=8, select_every=2, checkpoint_every=4, sample_every=0, augment="ada")
    summary = train.run(phantom_data, tmp_path / "long", config, seed=2)
    meta = read_model_meta(tmp_path / "long")
    history = meta.selection["history"]
    assert [item["step"] for item in history] == [2, 4, 6, 8]
    # Replay the rule on the recorded criteria: a new best lowers the best so far by more than the margin.
    best = history[0]
    for item in history[1:]:
        if item["criterion"] < best["criterion"] * (1 - MIN_IMPROVEMENT):
            best = item
    assert meta.selected_step == best["step"] == meta.selection["selected_step"] == summary.selected.step
    assert all(item["real_accuracy"] == history[0]["real_accuracy"] for item in history)  # one judge per run
    # The exported EMA is the training EMA of that step: a run stopped there holds the same weights.
    train.run(phantom_data, tmp_path / "short", config.model_copy(update={"max_steps": best["step"]}), seed=2)
    exported = load_generator(tmp_path / "long").state_dict()
    at_best = load_generator(tmp_path / "short").state_dict()
    assert all(torch.equal(exported[key], at_best[key]) for key in exported)
    state = torch.load(tmp_path / "long" / "checkpoint.pt", weights_only=True)
    assert ("train_ema" in state) == (best["step"] != 8)  # training's own EMA is kept for --resume
    assert (tmp_path / "long" / "samples" / "selected.png").is_file()


def test_a_plateau_stop_is_converged_not_early_and_the_run_goes_on(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.config import MedsynthConfig
    from pipeline.registry import StageContext, stage

    # A generator that cannot learn (lr 1e-9) gives the same criterion at every evaluation: a plateau.
    config = tiny_config(max_steps="auto", select_every=2, patience=2, lr_g=1e-9, checkpoint_every=100,
                         sample_every=0, log_model=False)
    context = StageContext(
        MedsynthConfig(model=config.model_dump()), {"ingested": phantom_data, "model": tmp_path / "model"}
    )
    result = stage("train").run(context)
    assert result.incomplete is None  # `medsynth run` goes on (exit 0)
    meta = read_model_meta(tmp_path / "model")
    assert meta.converged is True and meta.stopped_early is False and meta.stop_reason is None
    assert meta.steps == 6 and meta.steps_planned is None and meta.selected_step == 2
    assert any("stopped by converged" in line for line in result.lines)
    assert not any("STOPPED EARLY" in line for line in result.lines)


def test_the_time_cap_cutting_an_improving_run_is_an_early_stop(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.config import MedsynthConfig
    from pipeline.registry import StageContext, stage

    config = tiny_config(max_steps="auto", max_minutes=0.004, select_every=1, patience=1000, checkpoint_every=100,
                         sample_every=0, log_model=False)
    context = StageContext(
        MedsynthConfig(model=config.model_dump()), {"ingested": phantom_data, "model": tmp_path / "model"}
    )
    result = stage("train").run(context)
    with pytest.raises(CheckFailed, match="stopped early"):
        result.raise_if_incomplete()  # `medsynth run` exits 1
    meta = read_model_meta(tmp_path / "model")
    assert meta.stopped_early is True and meta.converged is False
    assert "while the selection criterion was still improving" in meta.stop_reason
    assert "model.patience=1000" in meta.stop_reason


def test_auto_steps_need_a_validation_split(phantom_data: Path, tmp_path: Path) -> None:
    import pandas as pd

    from pipeline.contracts.dataset import read_dataset, write_manifest
    from pipeline.models import train

    no_val = tmp_path / "no_val"
    no_val.mkdir()
    dataset = read_dataset(phantom_data)
    manifest = dataset.manifest.copy()
    manifest = manifest[manifest["split"] != "val"]
    for rel in manifest["path"]:
        target = no_val / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((phantom_data / rel).read_bytes())
    write_manifest(no_val, pd.DataFrame(manifest))
    with pytest.raises(InputError, match="split 'val'"):
        train.run(no_val, tmp_path / "m1", tiny_config(max_steps="auto"), seed=0)
    summary = train.run(no_val, tmp_path / "m2", tiny_config(max_steps=2, select_every=1), seed=0)
    assert summary.selected is None and any("selection is off" in warning for warning in summary.warnings)


def test_resume_continues_the_same_p_and_best_so_far(phantom_data: Path, tmp_path: Path) -> None:
    from pipeline.models import train

    config = tiny_config(max_steps=8, checkpoint_every=4, sample_every=0, select_every=2, augment="ada",
                         ada_speed_images=40, ada_interval=2)
    straight = train.run(phantom_data, tmp_path / "straight", config, seed=4)
    with pytest.raises(KeyboardInterrupt):
        train.run(phantom_data, tmp_path / "resumed", config, seed=4, tracker=_InterruptAt(7))
    halfway = read_model_meta(tmp_path / "resumed")
    assert halfway.steps == 4 and len(halfway.selection["history"]) == 2
    resumed = train.run(phantom_data, tmp_path / "resumed", config, seed=4, resume=True)
    assert resumed.start_step == 4 and resumed.augment_p == straight.augment_p
    a, b = read_model_meta(tmp_path / "straight"), read_model_meta(tmp_path / "resumed")
    assert a.selection == b.selection and a.selected_step == b.selected_step
    assert a.augmentation == b.augmentation and a.augmentation["p_history"][-1][1] == straight.augment_p
    assert read_losses(tmp_path / "straight")["augment_p"] == read_losses(tmp_path / "resumed")["augment_p"]
    first, second = _state_tensors(tmp_path / "straight"), _state_tensors(tmp_path / "resumed")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
