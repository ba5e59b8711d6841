# make demo: set up a virtualenv and run the chat demo.  make test: set up everything and test.
# make docs: build the documentation site into docs/_build/html.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: demo test lint typecheck docs pytest system-deps clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools<81" wheel

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/tornado-sse demo --port $(PORT)

# Debian packages the tests drive for real: redis-server, Chromium, nginx (HTTP/2 and TLS in front
# of the hub: tests/test_nginx.py; bench runs Nchan in it when libnginx-mod-nchan is there),
# valgrind (connect_cost --instructions counts instructions under its callgrind).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v valgrind >/dev/null || missing="$$missing valgrind"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tornado_sse tests demo bench
	$(BIN)/ruff format --check tornado_sse

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# The documentation site (docs/conf.py): warnings are errors, and so is a reference to one of our
# names that does not resolve. -E: read every page again (autodoc does not see a docstring change).
# The test extra includes the docs extra (autodoc imports every module).
docs: $(VENV)/.installed-test
	$(BIN)/sphinx-build -b html -E -W --keep-going -n -q docs docs/_build/html

# The package's bytecode is written first: the tests start the hub and the CLI as processes again
# and again, and where PYTHONDONTWRITEBYTECODE is set (as on CI) each start compiled the package
# anew (0.1-0.2 s).
pytest: $(VENV)/.installed-test system-deps
	$(BIN)/python -m compileall -q tornado_sse
	$(BIN)/pytest --durations=30

# lint, typecheck and docs are independent: side by side (the docs alone take ~30 s), then the
# tests, alone (they start real servers and wait on them; nothing else should load the machine).
test: $(VENV)/.installed-test
	$(MAKE) -j3 --output-sync=target lint typecheck docs
	$(MAKE) pytest

bench: $(VENV)/.installed-test
	$(BIN)/tornado-sse bench

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
