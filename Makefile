# Development tasks. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpoll-installed

.PHONY: demo test lint check bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)          ## run the main job
	$(BIN)/kvpoll demo

test: $(STAMP)          ## run the whole test suite
	$(BIN)/python -m pytest

lint: $(STAMP)          ## ruff and mypy --strict
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

check: lint test

bench: $(STAMP)
	$(BIN)/kvpoll bench statemachine

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
