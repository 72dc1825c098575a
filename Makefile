# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch first (it lies on local disk), then the project: pip then sees torch
# satisfied and never pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo demo-dp demo-certify test install notebook clean

# pip prints each package it collects: the first install takes minutes and should be seen to move.
$(STAMP): pyproject.toml
	@echo "[install 1/3] virtual environment $(VENV) and a current pip"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "[install 2/3] $(TORCH) (CPU build)"
	$(BIN)/python -m pip install --progress-bar on $(TORCH)
	@echo "[install 3/3] medsynth and its dependencies, with the dev extra (a few minutes the first time)"
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	touch $(STAMP)
	@echo "installed: run tools as .venv/bin/medsynth, or 'source .venv/bin/activate' first"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medsynth demo

# The demo sized to certify privacy (README, "A demo that certifies privacy"): 320 subjects, about 10 minutes.
demo-certify: $(STAMP)
	$(BIN)/medsynth demo -c configs/demo_certify.yaml

# The private demo (docs/models.md, "Differential privacy"): the model it starts from, trained without DP on a
# public stand-in cohort, then the DP fine-tune on the demo cohort with epsilon on the card.
demo-dp: $(STAMP)
	$(BIN)/medsynth demo -c configs/dp_public.yaml
	$(BIN)/medsynth demo -c configs/dp.yaml

# The import contracts (pyproject.toml [tool.importlinter]) first: a broken layer fails in a second.
# make reports any failing recipe as exit 2, so pytest's "no tests collected" (exit 5) is named here.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; \
	exit $$rc

# Re-execute the walkthrough in place (smoke config, 12 phantom subjects) so it ships with its outputs;
# tests/test_notebook.py checks those outputs for errors, machine paths and planted PHI.
notebook: $(STAMP)
	cd notebooks && ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=900 walkthrough.ipynb
	rm -rf notebooks/runs

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
