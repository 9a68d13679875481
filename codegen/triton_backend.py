"""Triton backend: the final IR -> ``model.py`` calling Triton kernels, plus the ``kernels/*.py`` it loads.

The model code is the torch backend's (``torch_backend.render_model``: one line per IR node, one
function per layer kind); what differs is where the ops' functions come from. Each Triton kernel
module's wrapper has the name, signature and semantics of the torch helper it replaces
(``rms_norm``, ``rope``, ``paged_decode_attention``, ``linear_int4`` ...), so the emitted lines
are the torch backend's and only the definitions change: model.py loads them from the package's
``kernels/`` directory (rendered by ``triton_kernels`` with the target's tile configs) instead of
pasting the torch helpers' source. Ops without a kernel (plain linears go to cuBLAS through
``F.linear``; ``select_rows``, slices, adds) keep the torch backend's code.

``LLMC_TRITON_INTERPRET=1`` makes model.py set ``TRITON_INTERPRET=1`` before the kernel modules
load, so a package compiled for a GPU target runs on CPU (``--device cpu``) in Triton's
interpreter: slow, but it proves the kernels the package ships compute the right thing.
"""

from __future__ import annotations

from typing import Any

from llmc.errors import LlmcError
from llmc.ir import Graph

from . import torch_backend
from .triton_kernels import kernel_configs, render_kernel

# op -> the kernel modules it needs and the names model.py takes from each (the wrappers).
KERNEL_OPS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "embedding": (("embedding", ("embedding",)),),
    "rms_norm": (("rms_norm", ("rms_norm",)),),
    "add_rms_norm": (("add_rms_norm", ("add_rms_norm",)),),
    "rope": (("rope", ("rope",)),),
    "act_mul": (("act_mul", ("act_mul",)),),
    "act_mul_packed": (("act_mul", ("act_mul_packed",)),),
    "paged_attention": (("rope", ("rope",)), ("kv_cache_write", ("write_kv",)),
                        ("paged_decode_attention", ("paged_decode_attention",)),
                        ("paged_prefill_attention", ("paged_prefill_attention_varlen",))),
    "linear_int4": (("linear_int4", ("linear_int4",)),),
    "linear_int8": (("linear_int8", ("linear_int8",)),),
    "linear_fp8": (("linear_fp8", ("linear_fp8",)),),
    "linear_w8a8": (("linear_w8a8", ("linear_w8a8",)),),
}

# The one op whose helper is glue rather than a kernel: one step's attention is a rope launch per
# q/k, the cache write, one decode launch for all decode rows and one varlen prefill launch for all
# prefill chunks (the torch helper loops over prefill sequences in Python).
PAGED_ATTENTION = '''\
def paged_attention(q, k, v, positions, kv, layer, num_heads, num_kv_heads, head_dim, scale, causal,
                    sliding_window, softcap, kv_dtype=None, k_scale=None, v_scale=None,
                    inv_freq=None, rope_dim=0, rope_interleaved=False, rope_scaling=1.0):
    """Rotate q/k, write this step's k/v into the layer's pages, attend over them (decodes, then
    prefill chunks); the same result as the paged_attention op's reference, in q's dtype."""
    if rope_dim:
        q = rope(q, positions, inv_freq, head_dim, rope_dim, rope_interleaved, rope_scaling)
        k = rope(k, positions, inv_freq, head_dim, rope_dim, rope_interleaved, rope_scaling)
    k = k.unflatten(1, (num_kv_heads, head_dim))
    v = v.unflatten(1, (num_kv_heads, -1))
    k_pages, v_pages = kv.pool.layer(layer, num_kv_heads, head_dim, v.shape[-1])
    if kv_dtype:
        k_scale = torch.tensor(k_scale, dtype=torch.float32, device=q.device)
        v_scale = torch.tensor(v_scale, dtype=torch.float32, device=q.device)
    write_kv(k_pages, v_pages, k, v, kv.slot_mapping, kv_dtype, k_scale, v_scale)
    options = dict(num_heads=num_heads, head_dim=head_dim, scale=scale, causal=causal,
                   sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    out = torch.empty(q.shape[0], num_heads * v.shape[-1], dtype=q.dtype, device=q.device)
    nd = kv.num_decodes
    if nd:
        paged_decode_attention(q[:nd], k_pages, v_pages, kv.block_tables[:nd], kv.seq_lens[:nd],
                               positions[:nd], **options, out=out[:nd])
    if len(kv.query_start) - 1 > nd:
        paged_prefill_attention_varlen(q, k_pages, v_pages, kv.block_tables[nd:], kv.seq_lens[nd:],
                                       kv.query_start[nd:], positions, **options, out=out)
    return out'''

PREAMBLE = '''\
import os
import sys
import types
from pathlib import Path

# LLMC_TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's interpreter (slow: for tests
# and machines without a GPU). Triton reads TRITON_INTERPRET when it defines a jit function, its
# own triton.language helpers included, so it must be set before triton is first imported.
if os.environ.get("LLMC_TRITON_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise RuntimeError("LLMC_TRITON_INTERPRET=1, but triton was imported before this package's model.py; "
                           "set TRITON_INTERPRET=1 in the environment before starting Python instead")
    os.environ["TRITON_INTERPRET"] = "1"
KERNEL_DIR = Path(__file__).resolve().parent / "kernels"


def load_kernels(name):
    """Execute kernels/<name>.py as a module (no bytecode is written into the package). Triton
    reads a kernel's source from its file and its globals through sys.modules, hence the entry
    there, under a name unique to this package directory."""
    path = KERNEL_DIR / f"{name}.py"
    module = types.ModuleType(f"llmc_kernels_{abs(hash(str(path)))}_{name}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
    return module
'''

# prepare_weights: fail early, with the fix, where a GPU package meets CPU tensors.
PREPARE_CHECK = [
    'if any(t.device.type != "cuda" for t in w.values()) and os.environ.get("TRITON_INTERPRET") != "1":',
    '    raise RuntimeError("this package runs Triton kernels, which need CUDA tensors; on CPU run it under "',
    '                       "Triton\'s interpreter: LLMC_TRITON_INTERPRET=1 python PKG generate --device cpu ...")',
]
RESERVED = frozenset({"os", "sys", "types", "Path", "KERNEL_DIR", "load_kernels"}) | frozenset(
    name for modules in KERNEL_OPS.values() for _, names in modules for name in names) | {
    "paged_prefill_attention_varlen", "write_kv"}


def kernels_used(graph: Graph) -> dict[str, tuple[str, ...]]:
    """Kernel module -> the wrapper names model.py takes from it, for the ops ``graph`` has."""
    used: dict[str, list[str]] = {}
    for op in sorted({n.op.name for n in graph.nodes} & set(KERNEL_OPS)):
        for module, names in KERNEL_OPS[op]:
            used.setdefault(module, [])
            used[module] += [n for n in names if n not in used[module]]
    return {module: tuple(names) for module, names in sorted(used.items())}


def render_model(graph: Graph, *, target_name: str, device: str, backend: str) -> str:
    """The source of model.py for ``graph``: the torch backend's lines over the kernels' wrappers."""
    if device != "cuda":
        raise LlmcError(f"target {target_name!r}: the triton backend generates CUDA kernels, but the target's "
                        f"device is {device!r}; use backend: torch for it")
    emitters = {**torch_backend.EMITTERS, "embedding": lambda a, k: f"embedding({a[0]}, {a[1]})"}
    helpers = {op: fns for op, fns in torch_backend.TEMPLATE_HELPERS.items() if op not in KERNEL_OPS}
    helpers["paged_attention"] = (PAGED_ATTENTION,)
    loads = []
    for module, names in kernels_used(graph).items():
        if len(names) == 1:
            loads.append(f'{names[0]} = load_kernels("{module}").{names[0]}')
        else:
            loads.append(f'_{module} = load_kernels("{module}")')
            loads.append(f"{', '.join(names)} = {', '.join(f'_{module}.{n}' for n in names)}")
    preamble = PREAMBLE + ("\n\n" + "\n".join(loads) if loads else "")
    return torch_backend.render_model(graph, target_name=target_name, device=device, backend=backend,
                                      emitters=emitters, helpers=helpers, preamble=preamble,
                                      prepare_body=PREPARE_CHECK, reserved=RESERVED)


def kernel_files(graph: Graph, target: Any) -> dict[str, str]:
    """``kernels/<name>.py`` -> source of every kernel module the model loads, rendered for ``target``."""
    configs = kernel_configs(target)
    return {f"kernels/{module}.py": render_kernel(module, **configs[module]) for module in kernels_used(graph)}
