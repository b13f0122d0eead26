# jagpt: `make demo` runs the whole pipeline on the embedded sample site;
# `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean-data chromium

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("jagpt needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/jagpt pipeline

test: install chromium
	$(BIN)/pytest

# The Prefect UI test (tests/test_prefect_server.py) needs Debian's chromium; installed
# with apt when it is missing (as root, or with passwordless sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "chromium is missing: apt-get install -y chromium (as root)"; exit 1; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

clean-data:
	rm -rf data
