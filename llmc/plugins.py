"""Plugins: packages extend llmc through the entry-point group ``llmc.plugins``.

An entry point names a callable (called once with no arguments) or a module (imported) that
registers passes, ops, raising patterns, kernel templates and targets with the functions below.
Plugins load lazily: when a pass name is not among the built-ins (``llmc.pipeline.PASSES``), when a
target name is not built in, or when asked by name. Each loads at most once; two plugins of one
name, or two registrations of one name, raise ``PluginError``. See examples/llmc-plugin-example.
"""

from __future__ import annotations

import difflib
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

from llmc.errors import PluginError
from llmc.ir.opdef import register_op
from llmc.pipeline import register_pass

__all__ = ["GROUP", "register_pass", "register_op", "register_pattern", "register_kernel_template",
           "register_target", "kernel_template", "plugin_target_path", "load_plugins", "available_plugins"]

GROUP = "llmc.plugins"

KERNEL_TEMPLATES: dict[str, Path] = {}   # kernel name -> .py.jinja file
TARGETS: dict[str, Path] = {}            # target name -> YAML file
_LOADED: dict[str, str] = {}             # plugin name -> entry point value, e.g. "pkg:register"
_FAILED: dict[str, str] = {}             # plugin name -> why it failed (reported again on every load)


# ---- registration --------------------------------------------------------------------------------

def register_pattern(ops: str | Sequence[str], doc: str) -> Callable:
    """Decorator: ``fn(rx, node, args) -> value | None`` raises the ATen op(s) ``ops`` into IR.

    Plugin patterns go after the built-in ones, so they fire only where no built-in pattern applies.
    """
    from llmc.frontend import patterns

    ops = (ops,) if isinstance(ops, str) else tuple(ops)

    def wrap(fn: Callable) -> Callable:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if any(f"{p.fn.__module__}.{p.fn.__qualname__}" == name for p in patterns.PATTERNS):
            raise PluginError(f"raising pattern {name} is already registered")
        patterns.PATTERNS.append(patterns.Pattern(ops, fn, doc))
        return fn

    return wrap


def _register_file(registry: dict[str, Path], what: str, name: str, path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"{what} {name!r}: {path} is not a file")
    if name in registry:
        raise PluginError(f"{what} {name!r} is already registered ({registry[name]}); cannot add {path}")
    registry[name] = path
    return path


def register_kernel_template(name: str, path: str | Path) -> Path:
    """Register the Jinja template of a Triton kernel (one kernel per ``.py.jinja`` file)."""
    return _register_file(KERNEL_TEMPLATES, "kernel template", name, path)


def register_target(name: str, path: str | Path) -> Path:
    """Register a target YAML under ``name``; built-in target names cannot be shadowed."""
    from llmc.resources import available_targets

    if name in available_targets():
        raise PluginError(f"target {name!r} is built in; a plugin cannot replace it (pick another name)")
    return _register_file(TARGETS, "target", name, path)


def _find(registry: dict[str, Path], name: str) -> Path | None:
    if name not in registry:
        load_plugins()
    return registry.get(name)


def kernel_template(name: str) -> Path | None:
    """The template file registered as ``name`` by a plugin (plugins load on a miss), else None."""
    return _find(KERNEL_TEMPLATES, name)


def plugin_target_path(name: str) -> Path | None:
    """The YAML file of plugin target ``name`` (``x`` or ``x.yaml``; plugins load on a miss), else None."""
    return _find(TARGETS, name.removesuffix(".yaml"))


# ---- loading -------------------------------------------------------------------------------------

def _dist(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def available_plugins() -> dict[str, EntryPoint]:
    """Installed plugins by name; two different entry points under one name are an error."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise PluginError(f"two plugins are named {ep.name!r}: {other.value} (from {_dist(other)}) and "
                              f"{ep.value} (from {_dist(ep)}); uninstall one of them")
        found[ep.name] = ep
    return found


def _load(name: str, ep: EntryPoint) -> None:
    if name in _FAILED:
        raise PluginError(_FAILED[name])
    if name in _LOADED:
        return
    _LOADED[name] = ep.value  # before loading, so a plugin that looks up a pass does not recurse
    try:
        target = ep.load()
        if callable(target) and not isinstance(target, ModuleType):
            target()
    except Exception as exc:  # a broken plugin is reported by name, with what it raised
        del _LOADED[name]
        _FAILED[name] = (f"plugin {name!r} ({ep.value}, from {_dist(ep)}) failed to load: "
                         f"{type(exc).__name__}: {exc}")
        raise PluginError(_FAILED[name]) from exc


def load_plugins(name: str | None = None) -> list[str]:
    """Load plugin ``name`` (or every installed plugin); safe to repeat. Returns the loaded names."""
    found = available_plugins()
    if name is not None:
        if name not in found:
            close = difflib.get_close_matches(name, found, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PluginError(f"no plugin named {name!r} in entry-point group {GROUP!r}{hint} "
                              f"(installed: {', '.join(sorted(found)) or 'none'})")
        found = {name: found[name]}
    for plugin in sorted(found):
        _load(plugin, found[plugin])
    return sorted(_LOADED)
