"""Shared by the codegen and standalone-package tests: a cpu target, file hashes, loading a package."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace


class StandInTarget(SimpleNamespace):
    """The few Target attributes codegen reads, for when llmc.target is not importable."""

    def model_dump(self, mode: str = "json", by_alias: bool = True) -> dict:
        return {"name": self.name, "device": self.device, "backend": self.backend,
                "runtime": {"default_dtype": self.runtime.default_dtype}}


def cpu_target(**fields):
    try:
        from llmc.target import load_target
    except ImportError:
        base = dict(name="cpu", device="cpu", backend="torch", runtime=SimpleNamespace(default_dtype="float32"))
        return StandInTarget(**{**base, **fields})
    target = load_target("cpu")
    return target.model_copy(update=fields) if fields else target


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def import_package(package_dir: Path, name: str):
    """Import a compiled package the way ``pip install`` would expose it (its __init__ gives ``load``)."""
    spec = importlib.util.spec_from_file_location(name, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave the package tree untouched
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module
