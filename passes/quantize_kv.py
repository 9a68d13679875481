"""Quantize the KV cache to int8 or fp8 with static per-layer, per-KV-head scales from calibration.

Every ``attention`` / ``paged_attention`` node gets ``kv_dtype`` (``int8`` or ``float8_e4m3fn``)
and ``k_scale`` / ``v_scale``, one float per KV head: the runtime stores ``k / scale`` in one byte
per element (int8 rounds and clamps to ±127, fp8 e4m3fn clamps to ±448 and rounds on the cast) and
multiplies by the scale when it reads the pages back (``llmc/runtime/functional.py`` quantize_kv /
dequantize_kv). A quarter of float32's KV bytes: the same ``kv_cache_bytes`` holds 4x the tokens.

Scales are static, as in vLLM's and TensorRT-LLM's calibrated KV cache: a scale per (layer, KV
head) is ``clip / qmax`` with ``clip`` the largest ``|k|`` (``|v|``) that head stores over every
calibration token and feature (or the ``percentile`` of those values, to spend the int8 grid on the
bulk rather than on one outlier; values past the clip saturate). Per head rather than per tensor
because heads' ranges differ by several times; per token (dynamic) scales would need a scale stored
per cached row and a reduction at every write. The statistics are of what the cache really keeps:
the calibration runs record the k/v each attention writes (after rotary embedding, wherever that is
computed), on the graph without KV quantization.

Options: ``scheme`` (``none`` leaves the graph alone, so the pass can sit in every pipeline and be
switched on with ``--set quantize_kv.scheme=int8``), ``percentile``, ``calibration``. The graph's
``meta["kv_dtype"]`` tells the package's plan (``kv_cache.dtype``) what its pages hold. Stats:
``quantized`` attention nodes, ``kv_dtype``, the ``calibration`` source and its ``tokens``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field

from llmc.calibration import CalibrationOptions, calibration_set
from llmc.errors import LlmcError
from llmc.ir import OPS, ContiguousKVCache, ExecutionContext, Graph, Interpreter
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass

ATTENTION_OPS = ("attention", "paged_attention")
KV_DTYPE = {"int8": "int8", "fp8": "float8_e4m3fn"}
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}  # largest int8 step used (symmetric) / finite e4m3fn
NO_QUANTIZATION = {"kv_dtype": None, "k_scale": None, "v_scale": None}


class QuantizeKVOptions(PassOptions):
    scheme: Literal["none", "int8", "fp8"] = "none"
    # Clip each head's range at this percentile of |k| (|v|) over calibration values; 100 = absmax.
    percentile: float = Field(100.0, gt=50, le=100)
    calibration: CalibrationOptions = CalibrationOptions()


class _RecordingKVCache(ContiguousKVCache):
    """A contiguous cache that also hands every write's k/v (``[T, kv_heads, D]``) to ``record``."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def append(self, layer, k, v, positions):
        self.record(layer, k, v)
        return super().append(layer, k, v, positions)


class _HeadRange:
    """Per-KV-head clip value of ``|x|`` over everything recorded: the max, or a percentile."""

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.absmax: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []    # [kv_heads, n] |x| per head, for a percentile

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().transpose(0, 1).reshape(x.shape[1], -1)
        m = a.amax(dim=1)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.percentile < 100:
            self.values.append(a)

    def clip(self) -> torch.Tensor:
        if self.percentile >= 100:
            return self.absmax
        a = torch.cat(self.values, dim=1)
        k = max(1, min(a.shape[1], round(a.shape[1] * self.percentile / 100)))
        return a.kthvalue(k, dim=1).values


def _calibration_graph(graph: Graph) -> Graph:
    """``graph`` with plain ``attention`` (a contiguous cache we can watch) and no KV quantization."""
    attention = OPS["attention"]
    nodes = tuple(dataclasses.replace(n, op=attention, attrs=tuple(sorted({**n.attr_dict, **NO_QUANTIZATION}.items())))
                  if n.op.name in ATTENTION_OPS else n for n in graph.nodes)
    return Graph(graph.inputs, graph.params, nodes, graph.outputs, graph.meta)


def kv_ranges(graph: Graph, sequences: list[list[int]],
              percentile: float = 100.0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (k clip, v clip) per KV head over the k/v each attention layer writes to its cache
    when ``graph`` (without KV quantization) runs each sequence as one prefill."""
    ranges: dict[int, tuple[_HeadRange, _HeadRange]] = {}

    def record(layer, k, v):
        rk, rv = ranges.setdefault(layer, (_HeadRange(percentile), _HeadRange(percentile)))
        rk.add(k)
        rv.add(v)

    calib_graph = _calibration_graph(graph)
    interp = Interpreter(calib_graph)
    for seq in sequences:
        ids = torch.tensor(seq, dtype=torch.int64)
        interp.run({"input_ids": ids, "positions": torch.arange(len(seq))},
                   ExecutionContext(_RecordingKVCache(record)))
    return {layer: (rk.clip(), rv.clip()) for layer, (rk, rv) in ranges.items()}


def _scales(clip: torch.Tensor, qmax: float) -> tuple[float, ...]:
    # A head that only ever stored zeros still needs a positive scale (its values stay 0).
    return tuple(float(s) for s in (clip.float() / qmax).clamp(min=torch.finfo(torch.float32).tiny))


@register_pass("quantize_kv", options=QuantizeKVOptions, lossy=True)
def quantize_kv(graph: Graph, ctx: PassContext) -> PassResult:
    """Quantize the KV cache to int8 or fp8 with static per-layer, per-KV-head scales from calibration.

    ``attention(q, k, v, pos) -> attention(q, k, v, pos) {kv_dtype, k_scale, v_scale}`` (likewise
    ``paged_attention``): same nodes and wiring, the cache's storage and its scales recorded as
    attrs. See the module docstring for the scales.
    """
    opts: QuantizeKVOptions = ctx.options  # type: ignore[assignment]
    attention_nodes = [n for n in graph.nodes if n.op.name in ATTENTION_OPS]
    if opts.scheme == "none" or not attention_nodes:
        return PassResult(graph, changed=False, stats={"quantized": 0})
    kv_dtype, qmax = KV_DTYPE[opts.scheme], QMAX[KV_DTYPE[opts.scheme]]
    calib = calibration_set(graph, opts.calibration)
    ranges = kv_ranges(graph, calib.sequences, opts.percentile)
    nodes = []
    for node in graph.nodes:
        if node.op.name in ATTENTION_OPS:
            layer = node.attr("layer")
            if layer not in ranges:
                raise LlmcError(f"quantize_kv: attention layer {layer} ({node.ref}) wrote nothing during calibration")
            k_clip, v_clip = ranges[layer]
            attrs = {**node.attr_dict, "kv_dtype": kv_dtype,
                     "k_scale": _scales(k_clip, qmax), "v_scale": _scales(v_clip, qmax)}
            node = dataclasses.replace(node, attrs=tuple(sorted(attrs.items())))
        nodes.append(node)
    result = Graph(graph.inputs, graph.params, tuple(nodes), graph.outputs, {**graph.meta, "kv_dtype": kv_dtype})
    return PassResult(result, changed=True, stats={"quantized": len(attention_nodes), "kv_dtype": kv_dtype,
                                                   "calibration": calib.source, "tokens": calib.tokens})
