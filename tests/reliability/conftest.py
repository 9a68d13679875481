"""Fixtures of the reliability suites: the tiny Llama compiled for cpu, shared by every suite.

Server helpers (in-process and subprocess servers, /health polling) come from
``tests/server/server_helpers.py``. Each suite prints its figures at the end (``pytest -s``);
the full-count runs of the load suites are recorded in ``tests/reliability/RESULTS.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))


@pytest.fixture(scope="session")
def full_load(request) -> bool:
    return bool(request.config.getoption("--full-load"))


@pytest.fixture(scope="session")
def reliability_package(tiny_llama_cpu_package) -> Path:
    """The tiny Llama compiled for cpu (tests/conftest.py), shared with the server suite."""
    return tiny_llama_cpu_package
