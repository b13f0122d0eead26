# jagpt: `make demo` runs the whole pipeline on the embedded sample site;
# `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean-data

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("jagpt needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/jagpt pipeline

test: install
	$(BIN)/pytest

clean-data:
	rm -rf data
