# The two commands of the README: `make quickstart` (the main job) and `make test`.
# Both install what they need first, so they work on a fresh machine.
PYTHON ?= python3
export NO_MKDOCS_2_WARNING = 1
PIP = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install quickstart test lint docs pytest screenshots

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"

quickstart: install
	$(PYTHON) examples/quickstart.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

docs:
	# not --quiet: it hides the API pages' docstring warnings from --strict
	$(PYTHON) -m mkdocs build --strict --site-dir site

# Two processes, one per core of the project's machines (each test runs single-threaded: see
# tests/conftest.py); a file's tests stay together in one process, with its module fixtures.
# On one of them the suite took 11 min 50 s in one process and 6 min 18 s in two.
PYTEST_WORKERS ?= 2

pytest:
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# Every page of the site in headless Chromium: screenshots and a check of what it shows
# (formulas typeset, no raw markup, no request to another host). Not part of `make test`.
screenshots:
	$(PYTHON) docs/screenshots.py  # PNGs and report.json in /tmp/bilevel-docs-screenshots

test: install lint docs pytest
