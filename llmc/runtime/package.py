"""Loading a compiled package: plan.json, the generated model.py, the weights, the KV page layout,
the device and the stop ids. The engine (``engine.py``), the multi-process launcher
(``launcher.py``) and the speculative decoder's draft model all load packages through these."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .paged_attention import KVPool
from .tokenizer import PackageTokenizer

WEIGHTS_FILE = "weights/model.safetensors"
DRAFT_DIR = "draft"  # the draft model's own package inside a package compiled with --draft
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int8: 1, torch.float8_e4m3fn: 1}


class PackageError(Exception):
    """A problem the user can fix (missing file, bad token id, no CUDA); the CLI prints one line."""


def read_plan(package_dir: str | Path) -> dict:
    path = Path(package_dir) / "plan.json"
    if not path.is_file():
        raise PackageError(f"{path} not found: {package_dir} is not an llmc package (run llmc compile)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None


def load_model_module(path: Path) -> types.ModuleType:
    """Execute the generated model.py as a fresh module.

    compile+exec rather than an import: nothing lands in sys.modules (two packages can be loaded
    side by side) and no __pycache__ is written into the package directory.
    """
    if not path.is_file():
        raise PackageError(f"{path} not found: the package is incomplete; compile it again")
    module = types.ModuleType(f"llmc_package_model_{abs(hash(str(path.resolve())))}")
    module.__file__ = str(path)
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
    return module


def load_model(package_dir: Path, device: torch.device) -> tuple[Callable, dict[str, torch.Tensor]]:
    """A package's ``(forward, weights)``, the weights on ``device`` in their load-time layouts."""
    module = load_model_module(package_dir / "model.py")
    weights = load_weights(package_dir / WEIGHTS_FILE, device)
    if hasattr(module, "prepare_weights"):  # load-time layouts (packed int4, expanded fp8/2:4)
        weights = module.prepare_weights(weights)
    return module.forward, weights


CPU_ALIGNMENT = 64  # bytes: one cache line, one AVX-512 register


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if its data starts on a 64-byte boundary, else an aligned copy.

    safetensors packs tensors back to back, so a tensor loaded from the file can start at any byte
    (8 past a cache line is common). ATen's AVX-512 kernels assume aligned weights: its weight-only
    int8 GEMM (``_weight_int8pack_mm``) crashes with a segmentation fault on an int8 weight 24 bytes
    past a line (Xeon with AVX-512/AMX, torch 2.13), and MKL picks another summation order for
    misaligned float32 weights (outputs differ by ~1e-7 with the same bytes). torch's own CPU
    allocator aligns to 64 bytes, so a copy is aligned."""
    return tensor if tensor.data_ptr() % CPU_ALIGNMENT == 0 else tensor.clone()


def load_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A package's safetensors weight file on ``device``; on the CPU every tensor 64-byte aligned."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise PackageError(f"{path} not found: the package is incomplete; compile it again")
    weights = load_file(str(path), device=str(device))
    return {name: aligned(t) for name, t in weights.items()} if device.type == "cpu" else weights


@dataclass(frozen=True)
class KVLayout:
    """What a package's KV pool looks like: page size, per-layer shapes, activation and page dtypes."""

    block_size: int
    layer_shapes: dict[int, tuple]
    dtype: torch.dtype
    kv_dtype: torch.dtype

    @classmethod
    def of(cls, plan: dict, weights: dict[str, torch.Tensor]) -> "KVLayout":
        runtime, kv = plan.get("target", {}).get("runtime", {}), plan.get("kv_cache", {})
        layer_shapes = {int(k): tuple(v) for k, v in kv.get("layers", {}).items()}
        if not layer_shapes:
            raise PackageError("plan.json records no paged attention layers (kv_cache.layers): the package was "
                               "compiled without the attention_lowering pass; compile it again")
        # The activations' dtype, as plan.json records it; packages from before it was recorded: that
        # of the largest floating weight (quantized packages also hold float scales and fp8 storage).
        dtype = getattr(torch, kv.get("activation_dtype") or "", None)
        if not isinstance(dtype, torch.dtype):
            floats = [t for t in weights.values() if t.is_floating_point() and t.element_size() > 1]
            dtype = max(floats, key=torch.Tensor.numel).dtype if floats else torch.float32
        # Pages are stored in the activations' dtype unless the graph quantizes them (quantize_kv
        # writes int8 / float8_e4m3fn into plan.json): a quarter of float32's bytes buys 4x the pages.
        kv_dtype = kv.get("dtype")
        if kv_dtype and not isinstance(getattr(torch, kv_dtype, None), torch.dtype):
            raise PackageError(f"plan.json: kv_cache.dtype {kv_dtype!r} is not a torch dtype; compile it again")
        return cls(int(kv.get("page_size") or runtime.get("kv_page_size") or 16), layer_shapes, dtype,
                   getattr(torch, kv_dtype) if kv_dtype else dtype)

    def bytes_per_block(self) -> int:
        return KVPool.bytes_per_block(self.block_size, self.layer_shapes, DTYPE_BYTES.get(self.kv_dtype, 4))

    def pool(self, num_blocks: int, device: torch.device) -> KVPool:
        return KVPool(num_blocks, self.block_size, self.kv_dtype, device, self.layer_shapes)


def resolve_device(requested: str | None, plan: dict) -> torch.device:
    """The device asked for, else the target's; a CUDA package on a machine without CUDA is an error."""
    name = requested or plan.get("target", {}).get("device", "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PackageError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PackageError(f"the package targets {name} but this machine has no CUDA device; "
                           "run it with --device cpu")
    return device


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep a CPU step's large temporaries off fresh pages; True when glibc's malloc was tuned.

    glibc serves blocks above its mmap threshold (128 KiB at first) with newly mapped pages and
    unmaps them on free, so every step's multi-MiB temporaries (page gathers, activations, logits)
    page-fault in again: a third of a batch-16 decode step of a 150M model on the dev machine
    (154 -> 121 ms per step, 37 -> 29 ms at batch 1 once tuned). The fix jemalloc/tcmalloc give
    by LD_PRELOAD, in process: the mmap threshold at its maximum (32 MiB) and up to 1 GiB of freed
    heap kept for reuse. Process-wide and idempotent; ``LLMC_CPU_MALLOC=default`` leaves malloc
    alone; a no-op off Linux/glibc."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("LLMC_CPU_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                            and mallopt(m_top_pad, 64 << 20))
    return _ALLOCATOR_TUNED


def stop_ids(package_dir: Path, tokenizer: PackageTokenizer | None) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's (an int or a list, as HF generate uses them),
    else the tokenizer's eos token."""
    path = package_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        return tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    return () if eos is None else (eos,)
