"""Packaging: the wheel holds every subpackage and the target YAML, and works installed elsewhere."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from llmc.errors import LlmcError
from llmc.resources import target_text

REPO = Path(__file__).resolve().parents[1]

# Repo directory -> where pyproject's package-dir puts it inside the wheel.
PACKAGE_DIRS = {
    "llmc": "llmc",
    "passes": "llmc/passes",
    "codegen": "llmc/codegen",
    "targets": "llmc/targets",
}


def test_target_text_reads_cpu_yaml():
    text = target_text("cpu")
    assert "name: cpu" in text
    assert target_text("cpu.yaml") == text


def test_unknown_target_lists_the_available_ones():
    with pytest.raises(LlmcError, match=r"unknown target 'tpu'.*\bcpu\b"):
        target_text("tpu")


def test_target_name_cannot_leave_the_targets_package():
    with pytest.raises(LlmcError):
        target_text("../pyproject")


def _run(command: list[str], cwd: Path) -> str:
    # No PYTHONPATH: it could point at the repo and hide a package missing from the wheel.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the repo's sources (top-level files + package dirs)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and a
    # stale build/lib would leak deleted modules into the wheel.
    source = tmp / "source"
    source.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, source / entry.name)
    for directory in PACKAGE_DIRS:
        shutil.copytree(
            REPO / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__")
        )
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(source)],
        cwd=tmp,
    )
    (built,) = dist.glob("llmc-*.whl")
    return built


def test_wheel_holds_every_subpackage_and_the_targets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "llmc/__init__.py",
        "llmc/ir/__init__.py",
        "llmc/frontend/__init__.py",
        "llmc/passes/__init__.py",
        "llmc/codegen/__init__.py",
        *(f"llmc/targets/{target.name}" for target in (REPO / "targets").glob("*.yaml")),
    ]:
        assert required in names
    # Every package in the repo, so a new directory not yet listed in pyproject fails here.
    for directory, installed_as in PACKAGE_DIRS.items():
        for init in (REPO / directory).rglob("__init__.py"):
            relative = init.relative_to(REPO / directory).as_posix()
            assert f"{installed_as}/{relative}" in names, f"{init} is missing from the wheel"


def test_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # No pip or dependencies of its own: it borrows pip, torch & co from the environment running
    # this test (which, under .ci/run, is itself a venv, not the system), and pip run by the
    # venv's python installs into the venv.
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    borrowed = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (env_dir / "lib" / version / "site-packages" / "borrowed.pth").write_text("\n".join(borrowed))
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(wheel)],
         cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check = (
        "import llmc, llmc.passes, llmc.codegen\n"
        "from llmc.resources import target_text\n"
        "assert 'cpu' in target_text('cpu')\n"
        "print(llmc.__file__)\n"
    )
    llmc_file = Path(_run([str(python), "-c", check], cwd=outside).strip()).resolve()
    assert llmc_file.is_relative_to(env_dir.resolve()), llmc_file
    assert not llmc_file.is_relative_to(REPO), llmc_file
