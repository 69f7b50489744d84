# The two set-up commands: `make run` serves the site, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench-rating clean

run: $(VENV)/.installed-run
	$(PY) app.py

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-rating: $(VENV)/.installed-run
	$(PY) bench/rating_load.py

$(VENV)/.installed-run: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing tastebud and its libraries: about 6 GB (mostly torch), a few minutes the first time."
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing tastebud, its libraries and the test tools: about 6 GB, a few minutes the first time."
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	touch $@ $(VENV)/.installed-run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
