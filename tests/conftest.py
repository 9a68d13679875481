"""Shared test options: ``--update-golden`` rewrites the recorded outputs under tests/golden/."""

import os

# Kernel tests run Triton in its CPU interpreter; the variable must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.json from the current outputs instead of comparing")
    parser.addoption("--full-load", action="store_true", default=False,
                     help="run the reliability load suites (soak) at their full counts instead of the CI counts")
