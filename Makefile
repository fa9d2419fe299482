# llmlab: the two commands a newcomer needs are `make run` and `make test`.
#
# Python (a project-local venv, overridable with LLMLAB_VENV) provides libtorch (torch==2.11.0,
# CUDA-enabled build) for tch to link against, plus the reference tools the tests call.
SHELL := /bin/bash
VENV ?= $(if $(LLMLAB_VENV),$(LLMLAB_VENV),.venv)
VENV_ABS := $(abspath $(VENV))
PY := $(VENV_ABS)/bin/python
REQS_RUN := tests/reference/requirements-run.txt
REQS := tests/reference/requirements.txt
REQS_NODEPS := tests/reference/requirements-nodeps.txt
STAMP_RUN := $(VENV_ABS)/.llmlab-setup-run
STAMP := $(VENV_ABS)/.llmlab-setup
# uv installs the wheels (torch and its CUDA libraries are ~4.5 GB unpacked) in parallel: 15 s
# for torch from an empty cache here, where pip takes 53 s from a warm one. pip is the fallback.
UV_VERSION := 0.13.9
UV := $(VENV_ABS)/bin/uv
INSTALL = if [ -x $(UV) ]; then $(UV) pip install --quiet --python $(PY) $(1); \
	else $(PY) -m pip install --quiet --disable-pip-version-check $(1); fi

export VIRTUAL_ENV := $(VENV_ABS)
export PATH := $(VENV_ABS)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export LLMLAB_PYTHON := $(PY)
# Offline data: use ../shared/data when it exists and no mirror was given.
ifeq ($(origin LLMLAB_DATA_MIRROR), undefined)
  ifneq ($(wildcard ../shared/data/README.md),)
    export LLMLAB_DATA_MIRROR := $(abspath ../shared/data)
  endif
endif

BIN := target/release/llmlab

.PHONY: setup setup-run services build run test bench bench-deps tensorboard notebooks fmt lint clean help

help:
	@echo "make run    - install, build, run the default experiment"
	@echo "make test   - install, build, fmt/clippy checks and all tests"
	@echo "make bench  - llmlab vs PyTorch benchmarks (figures + ratios)"
	@echo "make bench-deps - bench-only references (llama-cpp-python, compiled)"
	@echo "make setup | setup-run | services | build | tensorboard | notebooks | clean"

# Idempotent: installs only when the requirements change or the venv is missing.
# setup-run: what building and `make run` need (torch for libtorch, the SmolLM2 GGUF package);
# setup: that and the reference tools the tests, benchmarks, notebooks and TensorBoard use.
setup-run: $(STAMP_RUN)
$(STAMP_RUN): $(REQS_RUN) $(REQS_NODEPS)
	@test -x $(PY) || python3 -m venv $(VENV_ABS)
	@test -x $(UV) || $(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) \
		|| echo "uv not installed: installing with pip"
	$(call INSTALL,-r $(REQS_RUN))
	$(call INSTALL,--no-deps -r $(REQS_NODEPS))
	@touch $(STAMP_RUN)

setup: $(STAMP)
$(STAMP): $(STAMP_RUN) $(REQS)
	$(call INSTALL,-r $(REQS))
	@touch $(STAMP)

build: setup-run
	cargo build --release
	@ldd $(BIN) | grep -q libtorch_cuda.so || { echo "error: $(BIN) does not link libtorch_cuda.so"; exit 1; }

# The default experiment: SmolLM2-135M-Instruct fine-tuned into a spam classifier, 6 trials
# (trainable layers x the token the head reads); a second `make run` skips the finished trials.
run: build
	$(BIN) run experiments/quickstart.yaml

# System packages the tests need (headless Chromium and its WebDriver), as root with apt-get.
services:
	@bash scripts/test_services.sh

test: setup services
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	cargo test --release -- --test-threads=1

bench: setup build
	$(PY) tests/reference/bench.py --llmlab $(BIN) --config gpt2-small --threads 2 --rounds 3
	$(PY) tests/reference/bench_freeze.py --llmlab $(BIN) --threads 2
	$(PY) tests/reference/bench_mmlu.py --llmlab $(BIN) --threads 2
	$(PY) tests/reference/bench_dpo.py --llmlab $(BIN) --threads 2
	$(PY) tests/reference/bench_serve.py --llmlab $(BIN) --threads 2
	$(PY) tests/reference/bench_llamacpp.py --llmlab $(BIN) --threads 2

# Bench-only references, not part of `make setup`: llama.cpp's OpenAI server through
# llama-cpp-python, compiled from its source package (several minutes on 2 cores).
bench-deps: setup
	$(PY) -m pip install "llama-cpp-python[server]==0.3.36"

# Runs the freeze sweep (skips finished trials) and executes its notebook in place.
notebooks: setup build
	$(BIN) run experiments/freeze_sweep.yaml
	LLMLAB_EXPERIMENT_DIR=$(abspath runs/freeze-sweep) $(PY) tests/reference/run_notebook.py notebooks/freeze_sweep.ipynb notebooks/freeze_sweep.ipynb

tensorboard: setup
	$(PY) -m tensorboard.main --logdir runs --host 127.0.0.1

fmt:
	cargo fmt

clean:
	cargo clean
