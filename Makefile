# Quick start: `make demo` and `make test`. Each target builds the venv it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MANS   := man/smarthost.8 man/smarthost-sendmail.8 man/smarthost.toml.5

.PHONY: all demo test lint manlint pytest bench clean

all: test

$(BIN)/smarthost: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/smarthost

demo: $(BIN)/smarthost
	$(BIN)/python scripts/demo.py

lint: $(BIN)/smarthost
	$(BIN)/ruff check smarthost tests scripts bench setup.py
	$(BIN)/ruff format --check smarthost tests scripts bench setup.py
	$(BIN)/vermin -q -t=3.9- --violations --no-tips --eval-annotations smarthost

manlint:
	@for m in $(MANS); do \
	  out=$$(LC_ALL=C.UTF-8 groff -man -ww -z $$m 2>&1); \
	  if [ -n "$$out" ]; then echo "$$m:"; echo "$$out"; exit 1; fi; \
	done; echo "man pages: no warnings"

pytest: $(BIN)/smarthost
	$(BIN)/pytest

test: lint manlint pytest

bench: $(BIN)/smarthost
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
