"""Triton kernel templates: render ``templates/triton/<name>.py.jinja`` into a kernel module, load it.

One kernel per template file. A rendered module reads like a Triton tutorial: ``_<name>_kernel``
(``@triton.jit``) -> a launcher that picks the grid and block sizes -> a wrapper with the same
signature and semantics as the torch function it replaces (``llmc/runtime/functional.py``,
``paged_attention.py``, ``quant.py``), so generated model code can call either. Template
parameters are compile-time facts (shapes the model fixes, the target's tile configs).

Triton compiles a ``@triton.jit`` function from its source file (``inspect.getsource``), so a
rendered module is written to a file and imported from there, never exec'd from a string. Under
``TRITON_INTERPRET=1`` (set before triton is imported) the same module runs on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

_ENV = Environment(loader=PackageLoader("llmc.codegen", "templates/triton"), undefined=StrictUndefined,
                   keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def render_kernel(name: str, **params: Any) -> str:
    """The source of kernel module ``name`` with ``params`` filled in (an unknown name raises)."""
    return _ENV.get_template(f"{name}.py.jinja").render(**params)


def load_kernel_module(path: str | Path) -> types.ModuleType:
    """Import a rendered kernel module from its file under a name unique to that path."""
    path = Path(path).resolve()
    name = f"llmc_kernel_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton resolves the jit function's globals through its module
    spec.loader.exec_module(module)
    return module


def write_kernel(name: str, out_dir: str | Path, **params: Any) -> Path:
    """Render kernel ``name`` into ``out_dir/<name>.py`` and return the path."""
    path = Path(out_dir) / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_kernel(name, **params), encoding="utf-8")
    return path
