# The two commands of the README. Both set everything up on a fresh machine first.
VENV ?= .venv
CONFIG ?= config.example.yaml
PYTEST_ARGS ?=

.PHONY: serve test setup bench

serve:
	@ops/setup.sh
	$(VENV)/bin/mlxd serve --config $(CONFIG)

test:
	@ops/setup.sh --test
	$(VENV)/bin/ruff check --select F daemon tests ops
	LD_PRELOAD=$$($(VENV)/bin/python -m daemon.worker.blas --path) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

setup:
	@ops/setup.sh --test
