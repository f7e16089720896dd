# The two set-up commands: `make demo` and `make test`. Each installs what it needs.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint format redis-server postgres pgbouncer clean

demo: $(STAMP) redis-server
	$(BIN)/leadscore demo

test: $(STAMP) redis-server postgres pgbouncer
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .

$(STAMP): pyproject.toml constraints.txt
	@scripts/ensure-venv $(PYTHON) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

redis-server:
	@scripts/ensure-apt redis-server command -v redis-server

postgres:
	@scripts/ensure-apt postgresql sh -c 'ls /usr/lib/postgresql/*/bin/initdb'

pgbouncer:
	@scripts/ensure-apt pgbouncer sh -c 'command -v pgbouncer || test -x /usr/sbin/pgbouncer'

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
