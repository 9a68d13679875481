"""Fixtures of the server tests: one compiled tiny Llama, and a default server over it.

Helpers (servers in this process or as subprocesses, polling, metrics) are in ``server_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server_helpers import load_engine, serving


@pytest.fixture(scope="session")
def package(tiny_llama_cpu_package) -> Path:
    """The tiny Llama compiled for cpu (tests/conftest.py)."""
    return tiny_llama_cpu_package


@pytest.fixture(scope="module")
def server(package):
    """A server with default options, shared by a test module."""
    with serving(load_engine(package)) as running:
        yield running
