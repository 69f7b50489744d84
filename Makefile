# The two set-up commands: `make run` serves the site, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-scale services lint bench-rating clean

run: $(VENV)/.installed-run
	$(PY) app.py

# The tests that matter when scaled out, run again on real PostgreSQL and Redis servers.
SCALE_TESTS ?= tests/test_migrations.py tests/test_rating.py tests/test_accounts.py \
	tests/test_imports.py tests/test_demo_pack.py tests/test_job_sweeper.py \
	tests/test_stale_jobs.py tests/test_queue_down.py tests/test_scale.py tests/test_idle_ping.py

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-scale

# The scale-out pass alone: starts its own PostgreSQL and Redis on 127.0.0.1 (tests/services.py).
test-scale: $(VENV)/.installed-test services
	$(PY) -m pytest --services $(SCALE_TESTS)

# PostgreSQL and Redis from Debian's packages, if they are not here yet (needs root or sudo).
services:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then \
	  echo "Installing PostgreSQL and Redis (Debian packages) for the scale-out tests."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql redis-server >/dev/null; \
	fi

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
