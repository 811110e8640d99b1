# The two Quick-start commands (see README.md): `make run` and `make test`.
# Each creates its own virtual environment on first use and installs what it needs.

PYTHON ?= python3
RUN_VENV := .venv
TEST_VENV := .venv-test

.PHONY: run test bench clean

$(RUN_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install --quiet --upgrade pip
	$(RUN_VENV)/bin/pip install --quiet -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install --quiet --upgrade pip
	$(TEST_VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

## run: the gateway on the embedded defaults (127.0.0.1:2525, Maildir in var/maildir, SQLite state)
run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/gateway serve --config gateway.toml

## test: the whole test suite
test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q

## bench: the throughput benchmark (gateway vs. direct-to-sink, same run)
bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python bench/throughput.py

clean:
	rm -rf $(RUN_VENV) $(TEST_VENV) var
