# Two entry points (see README): `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml requirements/onnx2tf-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r requirements/onnx2tf-nodeps.txt
	touch $(STAMP)

venv: $(STAMP)

# The main job: the all-in-one demo on loopback (embedded broker, edge, device, zeroconf).
demo: $(STAMP)
	$(BIN)/iotoffload demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache *.egg-info
