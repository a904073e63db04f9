# The README's two commands, for a fresh machine that has Python 3 and the package registries:
#
#   make demo   a virtual environment in .venv, charloom in it, a few minutes of training on the
#               bundled Nietzsche corpus, then samples at temperatures 0.2, 0.5, 1.0 and 1.2
#   make test   the same environment with the test extras (and Debian's Chromium, as root), then pytest
#
# Every set-up step runs once: a stamp file inside the environment records it, so a second `make`
# goes straight to the work (delete .venv to start over). A changed pyproject.toml reinstalls.

PYTHON ?= python3
VENV ?= .venv
# torch first, pinned: left to pip, charloom's "torch>=2.6" would pull the newest CUDA build (GBs).
TORCH ?= torch==2.13.0
DEMO_TIME ?= 3m
DEMO_TEMPERATURES ?= 0.2,0.5,1.0,1.2
DEMO_LENGTH ?= 300
PYTEST_ARGS ?=
TEST_WORKERS ?= auto

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test install dev browser

demo: $(VENV)/.charloom-stamp
	@run="runs/demo-$$(date +%Y%m%d-%H%M%S)"; \
	echo "training on the bundled Nietzsche corpus for $(DEMO_TIME) into $$run"; \
	$(BIN)/charloom train --max-time $(DEMO_TIME) --out "$$run" && \
	echo && echo "samples from $$run at temperatures $(DEMO_TEMPERATURES):" && \
	$(BIN)/charloom generate "$$run" --temperature $(DEMO_TEMPERATURES) --length $(DEMO_LENGTH) --seed 1

# Two passes: every core's worker on the tests not marked serial, then the serial ones alone (they need
# free cores or steady timing; tests/conftest.py splits them). pytest's exit status is make's: any
# failure fails `make test`, and so does 5 (no tests collected) in the first pass; the second may have
# none left once PYTEST_ARGS selects.
test: $(VENV)/.dev-stamp browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)
	$(BIN)/python -m pytest --serial-only $(PYTEST_ARGS) || [ $$? -eq 5 ]

install: $(VENV)/.charloom-stamp

dev: $(VENV)/.dev-stamp

# The stamp is written only once the environment has pip, so a failed attempt is retried.
$(VENV)/.venv-stamp:
	$(PYTHON) -m venv $(VENV) || { \
	  echo "make: cannot create $(VENV) with $(PYTHON) (on Debian or Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
	@touch $@

$(VENV)/.torch-stamp: $(VENV)/.venv-stamp
	$(PIP) install $(TORCH)
	@echo "$(TORCH)" > $@

$(VENV)/.charloom-stamp: $(VENV)/.torch-stamp pyproject.toml
	$(PIP) install -e .
	@touch $@

$(VENV)/.dev-stamp: $(VENV)/.torch-stamp pyproject.toml
	$(PIP) install -e ".[dev]"
	@touch $@ $(VENV)/.charloom-stamp

# The browser tests drive Debian's Chromium at /usr/bin/chromium; without it they are skipped.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "apt-get update && apt-get install -y chromium   # Debian's Chromium, for the browser tests"; \
	  apt-get update && apt-get install -y chromium; \
	else \
	  echo "make: /usr/bin/chromium is missing (as root: apt-get install -y chromium); the browser tests will be skipped" >&2; \
	fi
