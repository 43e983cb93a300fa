# tocsin: `make run` starts the daemon, `make test` runs the suite; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

CHROMIUM := /usr/bin/chromium

.PHONY: run test bench bench-all chromium wrk clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed
	mkdir -p var
	$(BIN)/tocsin serve -c config.toml

# The UI's browser tests drive Debian's chromium through Playwright (never `playwright install`);
# without it they skip.
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q chromium; \
	  else false; fi || echo "could not install $(CHROMIUM): the UI browser tests will skip"; }

test: $(BIN)/.installed chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider

# bench/http_ingest.py drives load with Debian's wrk (a C client, not the bottleneck).
WRK := /usr/bin/wrk
wrk:
	@test -x $(WRK) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q wrk; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q wrk; \
	  else false; fi || { echo "could not install $(WRK): bench/http_ingest.py needs it"; false; }; }

bench: $(BIN)/.installed wrk
	$(BIN)/python bench/http_ingest.py

bench-all: bench
	$(BIN)/python bench/smtp_ingest.py
	$(BIN)/python bench/flood.py
	$(BIN)/python bench/ui_pages.py
	$(BIN)/python bench/escalation_lateness.py

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info
