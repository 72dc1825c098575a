"""Config loading: typed models, one clear message per problem, flags override the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import config_digest, flatten, load_config
from pipeline.core.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    for name in ("demo.yaml", "smoke.yaml", "dp.yaml", "dp_public.yaml", "demo_certify.yaml"):
        config = load_config(REPO / "configs" / name)
        assert config.name in name


def test_the_demo_cohort_size_comes_from_the_config(tmp_path: Path) -> None:
    assert load_config(REPO / "configs" / "demo.yaml").demo_subjects == 80
    assert load_config(REPO / "configs" / "demo_certify.yaml").demo_subjects == 320  # 160 held out: certifiable
    path = tmp_path / "small.yaml"
    path.write_text("demo_subjects: 2\n")
    with pytest.raises(InputError, match="key 'demo_subjects'"):
        load_config(path)


def test_unknown_key_names_the_key_path_and_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngenerate:\n  per_clas: 3\n")
    with pytest.raises(InputError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "unknown key 'generate.per_clas'" in message
    assert "per_class" in message  # the allowed keys are listed


def test_wrong_type_names_the_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("generate:\n  per_class: many\n")
    with pytest.raises(InputError) as caught:
        load_config(path)
    assert "key 'generate.per_class'" in str(caught.value)
    assert "'many'" in str(caught.value)


def test_wrong_choice_lists_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  spatial_dims: 4\n")
    with pytest.raises(InputError) as caught:
        load_config(path)
    assert "key 'model.spatial_dims'" in str(caught.value)
    assert "2" in str(caught.value) and "3" in str(caught.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(broken)


def test_flags_override_file_and_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  per_class: 3\n")
    assert load_config(path, {"generate.per_class": 7}).generate.per_class == 7
    assert load_config(path, {"generate.per_class": None}).generate.per_class == 3
    with pytest.raises(InputError, match="generate.per_class"):
        load_config(path, {"generate.per_class": 0})


def test_flatten_and_digest_are_stable() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    flat = flatten(config.model_dump(mode="json"))
    assert flat["generate.per_class"] == config.generate.per_class
    assert config_digest(config) == config_digest(load_config(REPO / "configs" / "demo.yaml"))
    assert config_digest(config) != config_digest(load_config(REPO / "configs" / "smoke.yaml"))


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("generate:\n  per_clas: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "generate.per_clas" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
