# boxoffice: `make up` runs the whole stack, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test bench lint clean

# setuptools says, as information, that an editable install of a package-dir layout uses an import
# finder; there is nothing to act on, so that notice is filtered (by its text, nothing else)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	PYTHONWARNINGS='ignore:Editable installation' \
		$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,local]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/boxoffice up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy bench  # (on its own: it imports the installed package)

test: lint
	$(BIN)/pytest -q

# wrk (Debian's package) drives the holds through ingress: a C client leaves the two cores to the
# servers. Installed when missing and this user may (root, or sudo without a password); else the
# benchmark falls back to its aiohttp loop and its JSON says so.
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk; } \
		|| sudo -n apt-get install -y -qq wrk || echo "wrk not installed: holds driven by aiohttp"
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .boxoffice .pytest_cache
