"""Quantize linear weights: bf16 / int8 / int4 group-wise / fp8 weight-only, or W8A8 with SmoothQuant.

Each selected ``linear(x, W, b)`` becomes the quantized op of its scheme (layouts in
``llmc/runtime/quant.py``), its storage computed from ``W`` when the package is written:

- ``bf16``: the weight rounded to bfloat16 and a bf16 GEMM, ``linear_bf16``; activations stay in
  the model's dtype between linears (float32 norms, attention and KV cache on the CPU target,
  where float16 is unusable and bf16 elementwise math is no faster);
- ``int8``: symmetric per output channel, ``linear_int8``; ``method: gptq`` corrects the rounding
  error column by column with the calibration Hessian (``passes/gptq.py``);
- ``int4``: asymmetric group-wise (``group_size`` 32/64/128 inputs), two values per byte,
  ``linear_int4``; round-to-nearest or GPTQ (``act_order`` processes columns by decreasing
  Hessian diagonal, storing the same plain group layout);
- ``fp8``: float8 e4m3fn with a per-channel scale, ``linear_fp8``, for targets listing fp8;
- ``w8a8``: int8 weights and per-token dynamic int8 activations, ``linear_w8a8``; SmoothQuant
  (Xiao et al. 2023) first moves activation outliers into the weights with the per-input factor
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``x / s`` at run time, ``W * s`` quantized).

``include``/``exclude`` are globs on weight names; the embedding and LM head are kept by default.
``overrides`` maps globs to another scheme for the linears they match, whether or not ``include``/
``exclude`` select them: ``{'lm_head.*': bf16}`` with ``scheme: int4`` keeps the LM head, where
rounding costs the most quality, at 16 bits, and on a CPU with AMX its bf16 GEMM is 7x the float32
one at 16 rows (bench/RESULTS.md).
Stats: ``quantized`` linears, their ``bytes_before`` and ``bytes_after`` (as stored) and
``bf16_bytes`` (what the same weights take in bfloat16), the ``calibration`` source when used.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch
from pydantic import Field

from llmc.calibration import CalibrationOptions, calibration_set, linear_input_stats
from llmc.errors import LlmcError
from llmc.ir import Graph, Node, Param
from llmc.passes import gptq
from llmc.passes.rewrite import (DEFAULT_EXCLUDE, cached, derived_param, make_node, replace_nodes, select_linears,
                                 stem, weight_name)
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass
from llmc.runtime.quant import FP8_MAX, pack_int4


class QuantizeOptions(PassOptions):
    scheme: Literal["none", "bf16", "int8", "int4", "fp8", "w8a8"] = "none"
    group_size: Literal[32, 64, 128] = 128          # int4
    method: Literal["rtn", "gptq"] = "rtn"          # int8 / int4: round-to-nearest or GPTQ
    act_order: bool = False                         # gptq
    damp: float = Field(0.01, gt=0)                 # gptq: fraction of mean(diag H) added to H
    smoothquant_alpha: float | None = Field(0.5, ge=0, le=1)  # w8a8; null = no smoothing
    include: list[str] = ["*"]
    exclude: list[str] = list(DEFAULT_EXCLUDE)
    overrides: dict[str, Literal["bf16", "int8", "int4", "fp8", "w8a8"]] = {}  # weight glob -> scheme
    calibration: CalibrationOptions = CalibrationOptions()


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def _smooth_factors(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    if alpha is None:
        return torch.ones(w.shape[1])
    w_max = w.abs().amax(dim=0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)
    return s.clamp(min=1e-5)


def _storage(scheme: str, opts: QuantizeOptions, node: Node, weight: Param, stats) -> tuple[str, list[Param], dict]:
    """The op replacing ``node`` and its storage params (loaded lazily from ``weight``)."""
    prefix, (out, n) = stem(weight.name), weight.type.shape
    hessian = stats.by_node[node.ref].hessian if stats is not None and opts.method == "gptq" else None
    meta = {"scheme": scheme, "source": weight.name}

    def grid(w: torch.Tensor, bits: int, group: int | None, symmetric: bool):
        if hessian is not None:
            return gptq.gptq_quantize(w, hessian, bits=bits, group_size=group, symmetric=symmetric,
                                      act_order=opts.act_order, damp=opts.damp)
        return gptq.rtn_quantize(w, bits=bits, group_size=group, symmetric=symmetric)

    if scheme == "bf16":
        return "linear_bf16", [
            derived_param(f"{prefix}.qweight", (out, n), "bfloat16", lambda: weight.load().to(torch.bfloat16), "bf16",
                          meta),
        ], {}
    if scheme == "int8":
        res = cached(lambda: grid(weight.load().float(), 8, None, True))
        return "linear_int8", [
            derived_param(f"{prefix}.qweight", (out, n), "int8", lambda: res().q.to(torch.int8), "int8", meta),
            derived_param(f"{prefix}.scale", (out,), "float32", lambda: res().scale.reshape(out).float(), "int8", meta),
        ], {}
    if scheme == "int4":
        g = opts.group_size
        if n % g:
            raise LlmcError(f"quantize int4: {weight.name} has {n} input features, not a multiple of group_size {g}; "
                            f"exclude it or choose another group_size")
        res = cached(lambda: grid(weight.load().float(), 4, g, False))
        return "linear_int4", [
            derived_param(f"{prefix}.qweight", (out, n // 2), "uint8", lambda: pack_int4(res().q), "int4", meta),
            derived_param(f"{prefix}.scales", (out, n // g), "float32", lambda: res().scale.float(), "int4", meta),
            derived_param(f"{prefix}.zeros", (out, n // g), "uint8", lambda: res().zero.to(torch.uint8), "int4", meta),
        ], {"group_size": g}
    if scheme == "fp8":
        res = cached(lambda: _fp8(weight.load().float()))
        return "linear_fp8", [
            derived_param(f"{prefix}.qweight", (out, n), "float8_e4m3fn", lambda: res()[0], "fp8", meta),
            derived_param(f"{prefix}.scale", (out,), "float32", lambda: res()[1], "fp8", meta),
        ], {}
    # w8a8: smooth, then int8 per channel (round to nearest: the activations dominate the error)
    act = stats.by_node[node.ref].absmax if stats is not None else None

    def smoothed():
        w = weight.load().float()
        s = _smooth_factors(w, act, opts.smoothquant_alpha) if act is not None else torch.ones(n)
        r = gptq.rtn_quantize(w * s[None, :], bits=8, group_size=None, symmetric=True)
        return r, s

    res = cached(smoothed)
    return "linear_w8a8", [
        derived_param(f"{prefix}.qweight", (out, n), "int8", lambda: res()[0].q.to(torch.int8), "w8a8", meta),
        derived_param(f"{prefix}.scale", (out,), "float32", lambda: res()[0].scale.reshape(out).float(), "w8a8", meta),
        derived_param(f"{prefix}.smooth", (n,), "float32", lambda: res()[1].float(), "w8a8", meta),
    ], {}


def _schemes(graph: Graph, opts: QuantizeOptions) -> dict[str, str]:
    """The scheme of every linear the pass rewrites: ``scheme`` for those ``include``/``exclude``
    select, the first matching ``overrides`` glob's for any linear it names."""
    chosen = {n.ref: opts.scheme for n in select_linears(graph, opts.include, opts.exclude)} \
        if opts.scheme != "none" else {}
    overridden: set[str] = set()
    for pattern, scheme in opts.overrides.items():
        matched = select_linears(graph, [pattern], [])
        if not matched:
            names = sorted(weight_name(n) for n in select_linears(graph, ["*"], []))
            raise LlmcError(f"quantize.overrides: {pattern!r} matches no linear weight; they are named like "
                            f"{', '.join(names[:3])}, ...")
        for node in matched:
            if node.ref not in overridden:  # the first glob naming a linear decides
                chosen[node.ref] = scheme
                overridden.add(node.ref)
    return chosen


@register_pass("quantize", options=QuantizeOptions, requires=("canonical",), lossy=True)
def quantize(graph: Graph, ctx: PassContext) -> PassResult:
    """Quantize linear weights: bf16 / int8 / int4 group-wise / fp8 weight-only, or W8A8 with SmoothQuant."""
    opts: QuantizeOptions = ctx.options
    schemes = _schemes(graph, opts)  # node ref -> its scheme
    if not schemes:
        return PassResult(graph, changed=False, stats={"quantized": 0})
    if "fp8" in schemes.values() and "float8_e4m3fn" not in ctx.target.dtypes:
        raise LlmcError(f"quantize fp8: target {ctx.target.name!r} does not list float8_e4m3fn in its dtypes, so it "
                        "has no fp8 kernels (the weights would be expanded at load); use int8/int4, or add the "
                        "dtype to the target (--set 'dtypes=[...,float8_e4m3fn]') to compile anyway")
    nodes = [n for n in graph.nodes if n.ref in schemes]
    params = graph.param_map
    # GPTQ needs each input's Hessian, SmoothQuant its per-channel max |x|: from calibration text.
    used = set(schemes.values())
    want = ({"hessian"} if opts.method == "gptq" and used & {"int8", "int4"} else set()) | (
        {"absmax"} if "w8a8" in used and opts.smoothquant_alpha is not None else set())
    stats = calib = None
    if want and nodes:
        calib = calibration_set(graph, opts.calibration)
        stats = linear_input_stats(graph, calib, [n.ref for n in nodes], want)
    types = graph.value_types()
    replacements: dict[str, list[Node]] = {}
    new_params: list[Param] = []
    before = after = bf16 = 0
    for node in nodes:
        weight = params[node.inputs[1][1:]]
        op, storage, attrs = _storage(schemes[node.ref], opts, node, weight, stats)
        for p in storage:
            types["@" + p.name] = p.type
        inputs = [node.inputs[0], *("@" + p.name for p in storage), *node.inputs[2:]]
        replacements[node.ref] = [make_node(node.name, op, inputs, types, node.meta, **attrs)]
        new_params.extend(storage)
        before += weight.type.nbytes
        after += sum(p.type.nbytes for p in storage)
        bf16 += weight.type.nbytes // weight.type.torch_dtype.itemsize * 2
    if not replacements:
        return PassResult(graph, changed=False, stats={"quantized": 0})
    result = replace_nodes(graph, replacements, new_params)
    out_stats = {"quantized": len(replacements), "scheme": opts.scheme, "bytes_before": before,
                 "bytes_after": after, "bf16_bytes": bf16, "ratio_to_bf16": round(after / bf16, 4)}
    if opts.overrides:
        out_stats["by_scheme"] = dict(sorted(Counter(schemes.values()).items()))
    if calib is not None:
        out_stats["calibration"] = f"{calib.source}, {calib.tokens} tokens"
    return PassResult(result, changed=True, stats=out_stats)

