"""Fixtures of the server tests: one compiled tiny Llama, and a default server over it.

Helpers (servers in this process or as subprocesses, polling, metrics) are in ``server_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from server_helpers import load_engine, serving


@pytest.fixture(scope="session")
def package(tmp_path_factory) -> Path:
    """The tiny Llama (char tokenizer, id == ord(c), 256 positions, a chat template) compiled for cpu."""
    root = tmp_path_factory.mktemp("server")
    checkpoint = save_tiny_model("llama", root / "tiny-llama")
    out = root / "tiny-llama-cpu"
    compile_model(checkpoint, "cpu", out)
    return out


@pytest.fixture(scope="module")
def server(package):
    """A server with default options, shared by a test module."""
    with serving(load_engine(package)) as running:
        yield running
