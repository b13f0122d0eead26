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

# The browser tests (Prefect UI, the serve demo page) need Debian's chromium, and a
# Japanese font for readable screenshots; installed with apt when missing (as root,
# or with passwordless sudo).
chromium:
	@if ! command -v chromium >/dev/null 2>&1 || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "chromium or fonts-noto-cjk is missing: apt-get install -y chromium fonts-noto-cjk (as root)"; exit 1; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk; \
	fi

clean-data:
	rm -rf data
