# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch first (it lies on local disk), then the project: pip then sees torch
# satisfied and never pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medsynth demo

# The import contracts (pyproject.toml [tool.importlinter]) first: a broken layer fails in a second.
# make reports any failing recipe as exit 2, so pytest's "no tests collected" (exit 5) is named here.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; \
	exit $$rc

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
