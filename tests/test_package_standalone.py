"""A compiled package runs in a fresh virtualenv that has only its four dependencies, not llmc.

The venv is built without system site-packages (llmc is installed system-wide, so a venv that
sees them would prove nothing) and cached under tests/.cache/, keyed by the requirement list, so
only the first run pays for the install (torch installs from the local wheel in ~25 s).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from llmc.codegen import emit_package
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import generate_greedy
from package_helpers import cpu_target, lowered

# What a package needs (its pyproject's dependencies); torch pinned: unpinned, pip would fetch a
# multi-GB CUDA build.
REQUIREMENTS = ["torch==2.13.0", "safetensors", "tokenizers", "jinja2"]
CACHE = Path(__file__).parent / ".cache"


def _env() -> dict[str, str]:
    # No PYTHONPATH (it could point at the repo) and no user site-packages.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=_env(), capture_output=True, text=True)


@pytest.fixture(scope="session")
def package_venv() -> Path:
    """The python of a cached venv holding exactly REQUIREMENTS (rebuilt when the list changes)."""
    key = hashlib.sha256(f"{sys.version_info[:2]}|{'|'.join(REQUIREMENTS)}".encode()).hexdigest()[:12]
    root = CACHE / f"pkg-venv-{key}"
    python = root / "bin" / "python"
    ready = root / ".ready"  # written last: a half-built venv (interrupted install) is rebuilt
    if not ready.is_file():
        shutil.rmtree(root, ignore_errors=True)
        venv.create(root, system_site_packages=False, with_pip=True, clear=True)
        done = _run([python, "-m", "pip", "install", "--quiet", *REQUIREMENTS], cwd=CACHE)
        assert done.returncode == 0, f"installing {REQUIREMENTS} failed:\n{done.stdout}\n{done.stderr}"
        ready.write_text("\n".join(REQUIREMENTS) + "\n")
    return python


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("standalone")
    ckpt = save_tiny_model("qwen3", root / "tiny-qwen3")
    imported = load_hf(ckpt)
    return emit_package(lowered(imported.graph), cpu_target(), root / "pkg", checkpoint_dir=ckpt, report={}), imported


def test_venv_has_no_llmc(package_venv, tmp_path):
    done = _run([package_venv, "-c", "import llmc"], cwd=tmp_path)
    assert done.returncode != 0 and "No module named 'llmc'" in done.stderr, done.stderr
    done = _run([package_venv, "-c", "import torch, safetensors, tokenizers, jinja2; print(torch.__version__)"],
                cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("2.13.0"), done.stderr


def test_package_generates_without_llmc(package_venv, package, tmp_path):
    pkg, imported = package
    done = _run([package_venv, pkg, "generate", "--tokens", "1,2,3", "--max-tokens", "4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected, _ = generate_greedy(imported.graph, [1, 2, 3], 4)
    assert done.stdout == ",".join(map(str, expected)) + "\n"
    done = _run([package_venv, pkg, "generate", "--prompt", "Hi", "--chat", "--max-tokens", "3"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # tokenizers + the jinja2 chat template
