# jagpt: `make demo` runs the whole pipeline on the embedded sample site;
# `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean-data chromium libtpu

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("jagpt needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/jagpt pipeline

# One pytest worker per core; a test file stays on one worker, so its module fixtures run once.
test: install chromium libtpu
	$(BIN)/pytest -n auto --dist loadfile

# The planner's TPU compile (`jagpt plan --compiler tpu`) needs libtpu, the version the
# installed jax[tpu] pins. It goes in its own folder, not site-packages: the planner puts it
# on the compile's path, and no other JAX process on a machine without TPUs tries to start it.
LIBTPU_PIN = $(BIN)/python -c "from importlib.metadata import requires; \
  print(next(r.split(';')[0] for r in requires('jax') if r.startswith('libtpu')))"
libtpu: $(VENV)/libtpu/.installed
$(VENV)/libtpu/.installed: $(BIN)/.installed
	$(BIN)/pip install --quiet --target $(VENV)/libtpu "$$($(LIBTPU_PIN))"
	touch $@

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
