"""Shared by the quantized-linear kernel tests: real quantized layouts, rendered kernel modules.

The weights are quantized by the quantize pass's own storage code (``passes/quantize.py``), so a
kernel test reads exactly the bytes a compiled package stores, not a layout re-derived here.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llmc.codegen.triton_kernels import load_kernel_module, write_kernel
from llmc.ir.types import Param, TensorType
from llmc.passes.quantize import QuantizeOptions, _storage


def quantized_weight(scheme: str, weight: torch.Tensor, group_size: int = 128,
                     act_absmax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``weight`` [out, in] float32 -> the stored tensors of ``scheme`` keyed by their suffix
    (qweight, scale / scales, zeros, smooth). ``act_absmax`` [in] drives SmoothQuant for w8a8."""
    opts = QuantizeOptions(scheme=scheme, group_size=group_size)
    param = Param("layer.weight", TensorType(tuple(weight.shape), "float32"), loader=lambda: weight)
    node = SimpleNamespace(ref="%layer")  # only read through the calibration stats
    stats = None
    if act_absmax is not None:
        stats = SimpleNamespace(by_node={node.ref: SimpleNamespace(absmax=act_absmax, hessian=None)})
    _op, storage, _attrs = _storage(scheme, opts, node, param, stats)
    return {p.name.rsplit(".", 1)[1]: p.load() for p in storage}


def kernel_module(name: str, out_dir, **params):
    """Render ``codegen/templates/triton/<name>.py.jinja`` into ``out_dir`` and import it."""
    return load_kernel_module(write_kernel(name, out_dir, **params))


def activations(tokens: int, features: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Activations with a few outlier channels, as real hidden states have (and SmoothQuant targets)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen)
    x[:, :: max(1, features // 5)] *= 8.0
    return x.to(dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|: one number comparable across shapes and dtypes."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
