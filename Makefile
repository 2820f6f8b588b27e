# One entry point for a newcomer and for CI. `make demo` installs everything into .venv and runs
# the pipeline on the sample photos; `make test` installs the same and runs the test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := functions/detect/model/.built

.PHONY: demo test setup lint samples clean

demo: setup samples
	$(BIN)/labelmark run samples/ --out processed

test: setup
	$(BIN)/python -m pytest

setup: $(VENV)/.installed $(MODEL) infra/node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(MODEL): $(VENV)/.installed functions/detect/build_model.py
	$(BIN)/python -m functions.detect.build_model
	touch $@

infra/node_modules/.installed: infra/package.json
	bash infra/setup.sh
	touch $@

samples: $(VENV)/.installed
	$(BIN)/python -m workflow.samples samples

lint: setup
	$(BIN)/ruff check workflow functions infra tests bench
	$(BIN)/mypy workflow functions

clean:
	rm -rf $(VENV) functions/detect/model infra/node_modules infra/cdk.out processed samples
