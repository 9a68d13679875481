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

from llmc.compiler import compile_model  # noqa: E402
from llmc.examples_tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def full_load(request) -> bool:
    return bool(request.config.getoption("--full-load"))


@pytest.fixture(scope="session")
def reliability_package(tmp_path_factory) -> Path:
    """The tiny Llama (char tokenizer, id == ord(c), 256 positions, a chat template) compiled for cpu."""
    root = tmp_path_factory.mktemp("reliability")
    checkpoint = save_tiny_model("llama", root / "tiny-llama")
    out = root / "tiny-llama-cpu"
    compile_model(checkpoint, "cpu", out)
    return out
