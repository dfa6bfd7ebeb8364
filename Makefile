# evertrain: `make demo` (set up, then scripts/demo.sh: train, append, fork, report on CPU) and `make test`.
# A GPU machine keeps its own CUDA torch: make setup TORCH_SPEC="torch" (or any spec pip accepts).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
DATA := data/shakespeare

.PHONY: setup demo test lint fmt data data-sweep clean-runs gpu-check

setup: $(VENV)/.installed corpus/.unpacked

# torch first (the CPU wheel on these machines; never let pip pull a CUDA build as a dependency),
# then DeepSpeed without compiling its ops, then everything else.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

corpus/.unpacked: corpus/unpack.py $(VENV)/.installed
	$(PY) corpus/unpack.py --out corpus
	touch $@

data: $(DATA)/manifest.json

$(DATA)/manifest.json: corpus/.unpacked
	$(VENV)/bin/evertrain data prepare --input corpus/train/*.txt --val corpus/val/*.txt \
		--out $(DATA) --vocab-size 4096

# the horizon sweep's data (configs/sweep.yaml): the same corpus with a 512-piece vocabulary
data-sweep: data/shakespeare512/manifest.json

data/shakespeare512/manifest.json: corpus/.unpacked
	$(VENV)/bin/evertrain data prepare --input corpus/train/*.txt --val corpus/val/*.txt \
		--out data/shakespeare512 --vocab-size 512

# scripts/demo.sh prepares its own data dir (data/demo) and prints its wall time at the end
demo: setup
	bash scripts/demo.sh

test: setup lint
	$(VENV)/bin/python -m pytest -q tests

# The style CI holds (rules in pyproject.toml [tool.ruff]): checked by `make test`, applied by `make fmt`.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# On a CUDA machine: the GPU path measured in one process (< 8 min on one H100), written to
# docs/gpu_check.md and docs/gpu_check.json. Two ways:
#   make gpu-check PY=python3      the given interpreter as it is: no venv, no pip, nothing installed
#                                  (an offline GPU image; sections needing a missing package, e.g.
#                                  DeepSpeed, are skipped with one line; scripts/gpu_wheels.sh makes the
#                                  wheels to carry there)
#   make gpu-check TORCH_SPEC=torch    our venv, keeping whatever CUDA torch pip finds (needs a network)
gpu-check: $(if $(filter command line,$(origin PY)),,setup)
	$(PY) bench/gpu_check.py

clean-runs:
	rm -rf runs/demo
