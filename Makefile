# The two commands of a fresh machine: `make demo` (the main job) and `make test` (the test suite).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m scalegen demo --out runs/demo

test: setup
	$(PY) -m pytest -q -x
