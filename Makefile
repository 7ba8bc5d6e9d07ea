# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the offline demo
#   make test   installs everything into .venv and runs the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FT     := $(BIN)/finetune-cli
STAMP  := $(VENV)/.installed

.PHONY: demo test test-heavy test-slow lint install clean demo-data

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo-data: $(STAMP)
	$(FT) synth data/demo/source --task source --per-class 300 --size 64 --seed 0 --force --quiet
	$(FT) synth data/demo/target --task target --per-class 60 --size 64 --seed 1 --force --quiet

# Step 1 trains a base on one synthetic task; step 2 fine-tunes that base
# (weights: runs/demo-source/latest/base.weights.h5) on another task in two
# phases; step 3 runs the same schedule from random weights, for comparison.
demo: demo-data
	$(FT) finetune configs/demo-source.yaml
	$(FT) finetune configs/demo.yaml
	$(FT) finetune configs/demo.yaml --set experiment.name=demo-from-scratch --set model.weights=none
	$(BIN)/python -m finetune_cli.demo_summary runs/demo/latest runs/demo-from-scratch/latest

# Style and the no-TensorFlow-at-import rule for cli/config (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check finetune_cli tests bench
	$(BIN)/ruff format --check finetune_cli tests bench

# Two workers: child processes (crash, lock, promotion tests) overlap with
# in-process training. A test file's tests stay on one worker (they share
# module fixtures); the finished run in conftest.py is shared by all.
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

test: lint
	$(PYTEST) -m "not slow and not heavy" tests

# Whole runs in child processes: the kill-at-every-point resume chain, the
# bit-identical kill-and-resume, the tf.distribute clusters, every export
# format, a kill at each promotion step. CI (.ci/run) runs them after
# `make test`.
test-heavy: $(STAMP)
	$(PYTEST) -m "heavy and not slow" tests

# Tests on ../shared/assets (real photos and ImageNet weights); they skip
# when the folder is absent.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow tests

clean:
	rm -rf $(VENV) runs data/demo
