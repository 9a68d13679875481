# Developer shortcuts; .ci/run does what `make setup test` does, in a fresh venv.
PYTHON ?= python3

.PHONY: setup test

# torch first and pinned: unpinned, pip would pull a multi-GB CUDA build.
setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev]'

test:
	$(PYTHON) -m pytest -q -x --timeout=600 tests
