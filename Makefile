# Quick start: `make demo` and `make test`. Each target builds the venv it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MANS   := man/smarthost.8 man/smarthost-sendmail.8 man/smarthost.toml.5

.PHONY: all demo test lint manlint pytest bench bench-fleet torture clean

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
	$(BIN)/mypy smarthost

manlint:
	@for m in $(MANS); do \
	  out=$$(LC_ALL=C.UTF-8 groff -man -ww -z $$m 2>&1); \
	  if [ -n "$$out" ]; then echo "$$m:"; echo "$$out"; exit 1; fi; \
	done; echo "man pages: no warnings"

# Three workers (pytest-xdist): most tests wait on sockets and processes, not the CPU.
pytest: $(BIN)/smarthost
	$(BIN)/pytest -n 3

test: lint manlint pytest

bench: $(BIN)/smarthost
	$(BIN)/python bench/bench.py

# Three relays sharing one rate through a redis-server on this machine (SPEC §12).
bench-fleet: $(BIN)/smarthost
	$(BIN)/python bench/fleet.py

# The torture suite at full size: every fault scenario, long rounds, then the report.
TORTURE_REPORT := torture-report.jsonl
torture: $(BIN)/smarthost
	rm -f $(TORTURE_REPORT)
	SMARTHOST_TORTURE_REPORT=$(CURDIR)/$(TORTURE_REPORT) $(BIN)/pytest --torture \
	  tests/test_torture_*.py tests/test_hostile.py; status=$$?; \
	  $(BIN)/python scripts/torture_report.py $(TORTURE_REPORT) && exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache torture-report.jsonl
