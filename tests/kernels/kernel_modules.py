"""Shared by the kernel tests: a kernel module rendered with a GPU target's configs, loaded once.

Rendering goes through the backend's own path (``triton_kernels.kernel_configs`` -> ``write_kernel``
-> ``load_kernel_module``), so a test runs the very file a compiled package ships.
"""

from __future__ import annotations

import tempfile
from functools import cache

import torch

from llmc.codegen.triton_kernels import kernel_configs, load_kernel_module, write_kernel
from llmc.target import load_target

_DIR = tempfile.mkdtemp(prefix="llmc-kernels-")


@cache
def kernel_module(name: str, target: str = "h100", dtype: str = "float32"):
    """Kernel ``name`` rendered for ``target`` (``dtype``: the target's runtime.default_dtype)."""
    configs = kernel_configs(load_target(target, [f"runtime.default_dtype={dtype}"]))
    path = write_kernel(name, f"{_DIR}/{target}-{dtype}", **configs[name])
    return load_kernel_module(path)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
