# HandCLIP: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the PyTorch build pip takes on this project's machines (a CUDA build that also runs on CPU)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help install demo test test-quick bench docs lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-11s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install HandCLIP with its test and documentation tools

demo: install  ## train the tiny CLIP on synthetic hands on the CPU, printing baseline and final Rank-1/mAP
	$(BIN)/python train.py experiment=demo overwrite=true

# one test process per core (pytest-xdist); the test that builds the pretrained tiny backbone starts first
test: install  ## run the whole test suite (what CI runs)
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --durations=10 $(PYTEST_ARGS)

test-quick: install  ## run the tests without the slow end-to-end runs
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto -m "not slow" $(PYTEST_ARGS)

# ARGS go to the benchmark (make bench ARGS="--policies last_2 --steps 3"); ARGS=--help answers without installing
BENCH_HELP := $(filter -h --help,$(ARGS))
bench: $(if $(BENCH_HELP),,install)  ## benchmarks: image cache vs decoding; plain loop, open_clip, HandCLIP, HandCLIP cached per policy
	$(if $(BENCH_HELP),$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)),$(BIN)/python) -m handclip.benchmark --json bench.json $(ARGS)

# the NO_/DISABLE_ variables silence the banners Material for MkDocs and mkdocs-gen-files print about
# MkDocs' future (see docs/development.md); real warnings still fail the build
docs: install  ## build the documentation site into site/ (strict: a broken link or any warning fails)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/python -m mkdocs build --strict --site-dir site

lint: install  ## ruff
	$(BIN)/ruff check handclip tests train.py

clean:  ## remove runs, caches and the built site (keeps .venv and data/)
	rm -rf runs .cache .pytest_cache site
