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

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .boxoffice .pytest_cache
