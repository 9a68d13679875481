"""Shared test helpers: cpu targets (plain or with a custom pipeline), lowering a raised graph for
the runtime, file hashes, loading a package."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import yaml

from llmc.resources import target_text
from llmc.target import load_target


def cpu_target(**fields):
    target = load_target("cpu")
    return target.model_copy(update=fields) if fields else target


def target_with(tmp_path: Path, pipeline: list[dict], file_name: str = "target.yaml"):
    """The built-in cpu target with ``pipeline`` swapped in, loaded from a YAML file like a user's."""
    data = yaml.safe_load(target_text("cpu"))
    data["pipeline"] = pipeline
    path = tmp_path / file_name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_target(str(path)), str(path)


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


def lowered(graph):
    """``graph`` with attention lowered to paged attention, as every package's runtime needs it."""
    from llmc.pipeline import PASSES, PassContext

    info = PASSES["attention_lowering"]
    return info.fn(graph, PassContext(target=cpu_target(), options=info.options())).graph
