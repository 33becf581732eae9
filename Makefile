# Development tasks. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpoll-installed

.PHONY: demo test lint check bench clean

# nixl: the meta package SGLang's own nixl backend imports (``nixl``); it loads the
# installed nixl-cu12 (--no-deps: it also asks for the CUDA 13 build)
SGLANG := sglang==0.5.23 compressed-tensors==0.20.1 nixl==1.5.1

$(STAMP): pyproject.toml requirements-dev.txt requirements-sglang.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	# SGLang for the backend's tests, without its CUDA requirements (see requirements-sglang.txt)
	$(BIN)/python -m pip install --quiet --no-deps $(SGLANG)
	$(BIN)/python -m pip install --quiet -r requirements-sglang.txt
	touch $(STAMP)

demo: $(STAMP)          ## run the main job
	$(BIN)/kvpoll demo

test: $(STAMP)          ## run the whole test suite, one worker per core
	$(BIN)/python -m pytest -n auto --dist worksteal

lint: $(STAMP)          ## ruff and mypy --strict
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

check: lint test

fuzz: $(STAMP)          ## fuzz every wire message against live endpoints (KVPOLL_FUZZ_CASES, default 100000)
	KVPOLL_FUZZ_CASES=$${KVPOLL_FUZZ_CASES:-100000} $(BIN)/python -m pytest -q tests/test_fuzz.py

bench: $(STAMP)
	$(BIN)/kvpoll bench statemachine

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
