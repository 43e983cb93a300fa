# tocsin: `make run` starts the daemon, `make test` runs the suite; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

CHROMIUM := /usr/bin/chromium

.PHONY: run test bench bench-all test-packages wrk clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Two stamps: `make run` installs the runtime dependencies only (never pytest or
# Playwright); `make test` adds the test extras.
$(BIN)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed-run
	mkdir -p var
	$(BIN)/tocsin serve -c config.toml

# Debian packages the tests drive as real peers: chromium (the UI's browser tests, through
# Playwright; never `playwright install`) and dovecot-imapd (a real IMAP server for the mailbox
# tests). Without them those tests skip with one line; .ci/run sets TOCSIN_CI=1, where they fail.
TEST_PACKAGES := chromium:$(CHROMIUM) dovecot-imapd:/usr/sbin/dovecot

test-packages:
	@missing=""; for p in $(TEST_PACKAGES); do test -x "$${p#*:}" || missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $$missing; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q $$missing; \
	  else false; fi || echo "could not install$$missing: their tests will skip"; }; fi

test: $(BIN)/.installed-test test-packages
	$(BIN)/python -m pytest -q -p no:cacheprovider

# bench/http_ingest.py drives load with Debian's wrk (a C client, not the bottleneck).
WRK := /usr/bin/wrk
wrk:
	@test -x $(WRK) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q wrk; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q wrk; \
	  else false; fi || { echo "could not install $(WRK): bench/http_ingest.py needs it"; false; }; }

bench: $(BIN)/.installed-test wrk
	$(BIN)/python bench/http_ingest.py

bench-all: bench
	$(BIN)/python bench/smtp_ingest.py
	$(BIN)/python bench/flood.py
	$(BIN)/python bench/grouping_scale.py
	$(BIN)/python bench/ui_pages.py
	$(BIN)/python bench/escalation_lateness.py

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info
