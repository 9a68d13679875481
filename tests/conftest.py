"""Shared test options: ``--update-golden`` rewrites the recorded outputs under tests/golden/."""

import os
from pathlib import Path

import pytest

# Kernel tests run Triton in its CPU interpreter; the variable must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.json from the current outputs instead of comparing")
    parser.addoption("--full-load", action="store_true", default=False,
                     help="run the reliability load suites (soak) at their full counts instead of the CI counts")
    parser.addoption("--bench", action="store_true", default=False,
                     help="collect tests/bench (pytest-benchmark timings of runtime hot paths); off by default")


def pytest_ignore_collect(collection_path, config):
    """tests/bench holds timings, not checks: collected only with --bench."""
    if collection_path == Path(__file__).parent / "bench" and not config.getoption("--bench"):
        return True
    return None


@pytest.fixture(scope="session")
def tiny_llama_cpu_package(tmp_path_factory):
    """The tiny Llama (char tokenizer, id == ord(c), 256 positions, a chat template) compiled for cpu,
    compiled once per session for the server and reliability suites."""
    from llmc.compiler import compile_model
    from llmc.examples_tiny import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-llama-package")
    out = root / "tiny-llama-cpu"
    compile_model(save_tiny_model("llama", root / "tiny-llama"), "cpu", out)
    return out
