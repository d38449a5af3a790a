# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the demo needs the package only; the tests also need the dev extras (gradio, onnx, selenium, ...)
BASE_STAMP := $(VENV)/.installed-base

# Passive OpenMP waiting: spinning threads make torch 4-12x slower when anything else shares the cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-slow bench gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# constraints.txt: the tested versions (pyproject.toml allows ranges).
# pip byte-compiles what it installs one file at a time (a third of the install, torch being most of it):
# install without, then compile the venv on every core (the same .pyc files; errors in packages' own
# test fixtures are ignored, as pip ignores them).
COMPILE := $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true

$(BASE_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e .
	$(COMPILE)
	@# a mismatched torch/torchvision pair installs fine and fails at the first NMS call
	$(BIN)/python -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ok')"
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev]"
	$(COMPILE)
	touch $(STAMP)

setup: $(STAMP)

demo: $(BASE_STAMP)
	$(BIN)/gridclip-lab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/gridclip-lab bench --doc docs/benchmarks.md

# one CUDA node, <= 5 min: AMP training steps, fp16 FPS at batch 1 and 8, one NCCL DDP step (exit 3 without a GPU)
gpu-check: $(STAMP)
	$(BIN)/gridclip-lab gpu-check --doc docs/benchmarks.md

clean:
	rm -rf $(VENV) runs
