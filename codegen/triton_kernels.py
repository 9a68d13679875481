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


# Tile configs per GPU generation, keyed by the target's compute capability major version. Decode is
# memory bound: the attention key tile only needs to be wide enough for full 128-byte reads, and
# the split count fills the SMs when batch x KV heads alone cannot. Prefill's query tile is the MMA
# M side (times the GQA group). Ampere/Ada (8.x) has less shared memory per SM than Hopper (9.x),
# hence the smaller prefill tiles there.
_TILES = {
    9: {"attn_block_n": 64, "attn_block_m": 64, "max_splits": 16, "num_warps": 4},
    8: {"attn_block_n": 32, "attn_block_m": 32, "max_splits": 16, "num_warps": 4},
}
# Elementwise kernels (norms, activations, gathers) move one row per program.
ELEMENTWISE_BLOCK = 1024


def kernel_configs(target: Any) -> dict[str, dict[str, Any]]:
    """Template parameters of every kernel for ``target`` (a ``llmc.target.Target``), by kernel name.

    The one place where target facts become tile sizes; ``render_kernel(name, **configs[name])``.
    """
    major = int(str(target.compute_capability or "9.0").split(".")[0])
    tiles = _TILES.get(major, _TILES[9] if major > 9 else _TILES[8])
    common = {"target": target.name, "num_warps": tiles["num_warps"]}
    # float32 models multiply in IEEE float32 (the reference's numbers); bfloat16/float16 ones in
    # tf32, which holds their operands exactly (8 and 10 mantissa bits fit in tf32's 10).
    precision = "ieee" if target.runtime.default_dtype == "float32" else "tf32"
    attention = {**common, "block_n": tiles["attn_block_n"], "dot_precision": precision}
    return {
        "rms_norm": common,
        "add_rms_norm": common,
        "rope": common,
        "act_mul": {**common, "block": ELEMENTWISE_BLOCK},
        "embedding": {**common, "block": ELEMENTWISE_BLOCK},
        "kv_cache_write": common,
        "paged_decode_attention": {**attention, "sm_count": target.sm_count or 1,
                                   "max_splits": tiles["max_splits"]},
        "paged_prefill_attention": {**attention, "block_m": tiles["attn_block_m"]},
        # The quantized GEMMs pick their own decode/prefill tiles; they need the SMs to fill.
        **{f"linear_{scheme}": {"sm_count": target.sm_count or 1} for scheme in ("int4", "int8", "fp8", "w8a8")},
    }
