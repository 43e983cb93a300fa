# tocsin: `make run` starts the daemon, `make test` runs the suite; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed
	mkdir -p var
	$(BIN)/tocsin serve -c config.toml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(BIN)/.installed
	$(BIN)/python bench/http_ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info
