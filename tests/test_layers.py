"""The layers of docs/architecture.md, checked by the real ``lint-imports`` (import-linter).

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``); ``make test`` runs them before
pytest. Here they run on the real tree, and on copies of the package with one forbidden import
planted, to show each contract fails when broken and names itself. A last check keeps config
loading light: ``import pipeline.config`` (every CLI command does it) must not load the heavy
libraries the stages use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

LAYERS = "Layers: core < contracts < imaging | tracking < stages < config < registry < workflow < cli"
STAGES_WITHOUT_CONFIG = "Stages never import pipeline.config"
COMPUTE_WITHOUT_SIDE_CHANNELS = "Compute modules never import tracking, click or progress"
MLFLOW_BEHIND_TRACKING = "Only pipeline.tracking imports mlflow"

# What the stages load: none of it may come with the config (`medsynth --help`, a config typo).
HEAVY = ("pandas", "pydicom", "nibabel", "isal", "torch", "mlflow", "monai", "matplotlib", "scipy")
STAGE_PACKAGES = ("pipeline.ingest", "pipeline.models", "pipeline.evaluate", "pipeline.export")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with the project's contracts on the ``pipeline`` package found from ``cwd``."""
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} not found: install the dev extra (pip install -e '.[dev]')")
    # lint-imports puts its working directory first on sys.path, so `pipeline` is the copy there;
    # PYTHONPATH says the same for the interpreter that starts it.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(PYPROJECT)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _contract_names(text: str) -> list[str]:
    """The contract names of ``pyproject.toml``, in order."""
    import tomllib

    contracts = tomllib.loads(text)["tool"]["importlinter"]["contracts"]
    return [contract["name"] for contract in contracts]


def test_contracts_are_the_documented_ones() -> None:
    assert _contract_names(PYPROJECT.read_text()) == [
        LAYERS,
        STAGES_WITHOUT_CONFIG,
        COMPUTE_WITHOUT_SIDE_CHANNELS,
        MLFLOW_BEHIND_TRACKING,
    ]


def test_the_tree_keeps_every_contract() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract", "chain"),
    [
        ("core/errors.py", "import pipeline.cli", LAYERS, "pipeline.core.errors -> pipeline.cli"),
        ("ingest/split.py", "import pipeline.export", LAYERS, "pipeline.ingest.split -> pipeline.export"),
        ("models/grid.py", "import pipeline.config", STAGES_WITHOUT_CONFIG, "pipeline.models.grid -> pipeline.config"),
        ("evaluate/fidelity.py", "import click", COMPUTE_WITHOUT_SIDE_CHANNELS, "pipeline.evaluate.fidelity -> click"),
        (
            "ingest/deid.py",
            "from pipeline.core import progress",
            COMPUTE_WITHOUT_SIDE_CHANNELS,
            "pipeline.ingest.deid -> pipeline.core.progress",
        ),
        ("export/stage.py", "import mlflow", MLFLOW_BEHIND_TRACKING, "pipeline.export.stage -> mlflow"),
    ],
)
def test_a_planted_import_breaks_its_contract(
    tmp_path: Path, module: str, planted: str, contract: str, chain: str
) -> None:
    copy = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{planted}\n", encoding="utf-8")

    result = _lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts", 1)[-1]
    # import-linter wraps long names at 80 columns; compare without the line breaks.
    assert contract in " ".join(broken.split()), result.stdout
    assert chain in broken, result.stdout


def test_config_loads_without_the_stages_heavy_libraries() -> None:
    code = (
        "import sys, pipeline.config\n"
        f"print(' '.join(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == []


@pytest.mark.parametrize("package", STAGE_PACKAGES)
def test_stage_packages_resolve_every_public_name(package: str) -> None:
    # Names load lazily, so a stale entry would fail only when someone uses it: use each one here.
    code = (
        "import importlib\n"
        f"package = importlib.import_module({package!r})\n"
        "for name in package.__all__:\n"
        "    getattr(package, name)  # raises, naming the module, when the entry is stale\n"
        "assert sorted(package.__all__) == sorted(package._LAZY), 'every lazy name is public and listed'\n"
        "print(len(package.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


def test_ingest_audit_stays_the_function_after_its_module_loads() -> None:
    # `audit` is both a submodule and the function the package exports; the function keeps the name.
    code = (
        "import pipeline.ingest.stage\n"
        "from pipeline.ingest import audit\n"
        "import pipeline.ingest.audit as by_attribute\n"
        "import sys\n"
        "assert callable(audit) and audit is by_attribute, (audit, by_attribute)\n"
        "assert audit is sys.modules['pipeline.ingest.audit'].audit\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
