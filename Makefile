# flowplay — `make run` starts everything embedded; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PORT ?= 4454
# Address the web process listens on: this machine only, unless WEB_HOST=0.0.0.0 (or an address).
WEB_HOST ?= 127.0.0.1

.PHONY: run test test-fleet test-pg bench migrate user lint clean chromium

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' honcho
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

migrate: $(STAMP)
	$(BIN)/python manage.py migrate --noinput

## Start web (Daphne on $(WEB_HOST):$(PORT)), a Celery worker and the scheduler on the embedded default.
run: migrate
	PORT=$(PORT) WEB_HOST=$(WEB_HOST) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

## Create the first user from DJANGO_SUPERUSER_EMAIL / _USERNAME / _PASSWORD.
user: migrate
	$(BIN)/python manage.py createsuperuser --noinput

## Debian's Chromium for the browser tests (Playwright cannot download a browser here).
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && { echo "installing Debian's chromium for the browser tests"; apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: /usr/bin/chromium is missing and cannot be installed here: the browser tests will fail"; }

## The whole suite, on the embedded default (SQLite, filesystem broker) unless
## DATABASE_URL / REDIS_URL say otherwise: the unit tests in two processes (pytest-xdist),
## then the integration tests one at a time (they start their own servers, and some
## restart Redis or PostgreSQL under them: those drills run last, in a run of their own, so
## the servers the other tests share never see a restart). PYTEST_ARGS=... runs just those
## arguments; INTEGRATION=... narrows the integration marker expression.
INTEGRATION ?= integration and not fleet
test: $(STAMP) chromium
ifeq ($(strip $(PYTEST_ARGS)),)
	$(BIN)/python -m pytest -q -m "not integration" -n 2
	$(BIN)/python -m pytest -q -m "$(INTEGRATION)" --ignore=tests/integration/test_faults.py
	$(BIN)/python -m pytest -q -m "$(INTEGRATION)" tests/integration/test_faults.py
else
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
endif

## The fleet suite: hosts in network namespaces with their own PostgreSQL and Redis (root).
test-fleet: $(STAMP)
	$(BIN)/python -m pytest -q -m fleet

bench: migrate
	$(BIN)/python manage.py bench $(BENCH_ARGS)

## Ruff, and the import contracts between apps (pyproject.toml [tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf var .pytest_cache
