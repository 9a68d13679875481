"""Prune linear weights: magnitude or Wanda scores, unstructured or 2:4 semi-structured.

Each selected ``linear(x, W, b)`` gets the lowest-scoring fraction ``sparsity`` of its weights set
to zero, the new weight computed from ``W`` when the package is written:

- ``method: magnitude``: score ``|W_ij|``; ``scope: layer`` zeroes that fraction of each linear,
  ``scope: global`` applies one threshold to all selected weights at once (layers with small
  weights lose more of them);
- ``method: wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| * ||X_j||_2``, the input channel's norm over calibration tokens, compared within each
  output row as in the paper. The norms come from one run of the unpruned graph (the paper's
  one-shot variant; it needs no weight update);
- ``pattern: "2:4"``: of every 4 consecutive inputs of a row the 2 best-scoring are kept (exactly
  50%), and the linear becomes ``linear_24`` storing half the values plus 2 bits of position per
  kept value (layout in ``llmc/runtime/quant.py``), so the package really shrinks;
  ``pattern: unstructured`` keeps a ``linear`` whose weight holds the zeros (same bytes).

``include``/``exclude`` are globs on weight names; the embedding and LM head are kept by default.
Stats: ``pruned`` linears, ``sparsity`` (the fraction of their weights the pass zeroes; weights
that were zero already may be among them), ``bytes_before``/``bytes_after`` of those weights as
stored, the ``calibration`` source for Wanda.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from llmc.calibration import CalibrationOptions, calibration_set, linear_input_stats
from llmc.errors import LlmcError
from llmc.ir import Graph, Node, Param, TensorType
from llmc.passes.rewrite import (DEFAULT_EXCLUDE, cached, derived_param, make_node, replace_nodes, select_linears,
                                 stem)
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass
from llmc.runtime.quant import compress_24

SEXAGESIMAL_2_4 = 2 * 60 + 4  # YAML 1.1 (PyYAML, so target files and --set) reads an unquoted 2:4 as 124


class PruneOptions(PassOptions):
    method: Literal["none", "magnitude", "wanda"] = "none"
    sparsity: float = Field(0.5, gt=0, lt=1)          # fraction zeroed; 2:4 is always 0.5
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    scope: Literal["layer", "global"] = "layer"       # magnitude unstructured: per linear or one threshold
    include: list[str] = ["*"]
    exclude: list[str] = list(DEFAULT_EXCLUDE)
    calibration: CalibrationOptions = CalibrationOptions()

    @field_validator("pattern", mode="before")
    @classmethod
    def _unquoted_2_4(cls, value):
        return "2:4" if value == SEXAGESIMAL_2_4 else value

    @model_validator(mode="after")
    def _consistent(self) -> PruneOptions:
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"pattern 2:4 zeroes exactly half the weights; sparsity {self.sparsity} cannot apply "
                             "(leave it at 0.5 or use pattern: unstructured)")
        if self.scope == "global" and (self.pattern == "2:4" or self.method == "wanda"):
            raise ValueError("scope global is one magnitude threshold over all selected weights: it applies to "
                             "method magnitude with pattern unstructured (2:4 fixes the ratio per group of 4, "
                             "Wanda compares scores within each output row)")
        return self


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """True where a weight survives: the top scores of each group of 4 (2:4), of each row, or of the
    whole matrix. Exactly ``round(sparsity * n)`` are dropped: chosen by rank (topk), not by a
    threshold, so a bfloat16 checkpoint's many equal magnitudes still give the asked sparsity."""
    out, n = scores.shape
    if pattern == "2:4":
        groups = scores.reshape(out, n // 4, 4)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        return mask.scatter_(-1, groups.topk(2, dim=-1).indices, True).reshape(out, n)
    rows = scores if per_row else scores.reshape(1, -1)
    dropped = rows.topk(round(sparsity * rows.shape[1]), dim=1, largest=False).indices
    return torch.ones_like(rows, dtype=torch.bool).scatter_(1, dropped, False).reshape(out, n)


def _global_masks(weights: list[Param], sparsity: float):
    """One magnitude threshold over all ``weights``: a function giving each one's keep mask (computed
    once). All selected weights are held as float32 at once, fine up to a few billion params."""

    @cached
    def masks() -> dict[str, torch.Tensor]:
        mags = [p.load().float().abs() for p in weights]
        flat = torch.cat([m.reshape(-1) for m in mags])[None, :]
        parts = keep_mask(flat, sparsity, "unstructured", per_row=False)[0].split([m.numel() for m in mags])
        return {p.name: part.reshape(m.shape) for p, m, part in zip(weights, mags, parts)}

    return lambda name: masks()[name]


def _storage(weight: Param, opts: PruneOptions, norms: torch.Tensor | None, global_mask, values_dtype: str,
             new_name: str) -> list[Param]:
    """The params replacing ``weight``: the pruned dense weight (unstructured, named ``new_name``),
    or 2:4 ``values`` (in ``values_dtype``, the activations') and ``meta``; computed lazily."""
    out, n = weight.type.shape

    def pruned() -> torch.Tensor:
        w = weight.load()
        if global_mask is not None:
            return w.masked_fill(~global_mask(weight.name), 0)
        scores = w.float().abs() if norms is None else w.float().abs() * norms[None, :]
        return w.masked_fill(~keep_mask(scores, opts.sparsity, opts.pattern, per_row=norms is not None), 0)

    meta = {"method": opts.method, "pattern": opts.pattern, "source": weight.name}
    if opts.pattern != "2:4":
        return [derived_param(new_name, (out, n), weight.type.dtype, pruned, "plain", meta)]
    compressed = cached(lambda: compress_24(pruned()))
    to_values = TensorType((out, n // 2), values_dtype).torch_dtype
    return [derived_param(f"{stem(weight.name)}.values", (out, n // 2), values_dtype,
                          lambda: compressed()[0].to(to_values), "sparse24", meta),
            derived_param(f"{stem(weight.name)}.meta", (out, n // 8), "uint8",
                          lambda: compressed()[1], "sparse24", meta)]


def _zeroed(opts: PruneOptions, out: int, n: int, per_row: bool) -> int:
    """How many of an ``[out, n]`` weight's entries the masks set to zero (exact: see keep_mask)."""
    if opts.pattern == "2:4":
        return out * n // 2
    return out * round(opts.sparsity * n) if per_row else round(opts.sparsity * out * n)


@register_pass("prune", options=PruneOptions, requires=("canonical",), lossy=True)
def prune(graph: Graph, ctx: PassContext) -> PassResult:
    """Prune linear weights: magnitude or Wanda scores, unstructured or 2:4 semi-structured."""
    opts: PruneOptions = ctx.options
    if opts.method == "none":
        return PassResult(graph, changed=False, stats={"pruned": 0})
    nodes = select_linears(graph, opts.include, opts.exclude)
    params = graph.param_map
    if opts.pattern == "2:4":
        for node in nodes:
            n = graph.type_of(node.inputs[1]).shape[1]
            if n % 8:
                raise LlmcError(f"prune 2:4: {node.inputs[1][1:]} has {n} input features, not a multiple of 8 "
                                "(the compressed layout packs two groups of 4 per metadata byte); exclude it")
    calib = stats = None
    if opts.method == "wanda" and nodes:
        calib = calibration_set(graph, opts.calibration)
        stats = linear_input_stats(graph, calib, [n.ref for n in nodes], ("sqsum",))
    # Several selected linears may read one weight (tied); it is pruned once, with the first one's
    # activations. A weight some other node also reads (a tied embedding) is pruned under a new
    # name, so that node keeps the dense one.
    weights = list({node.inputs[1][1:]: params[node.inputs[1][1:]] for node in nodes}.values())
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for ref in {r[1:] for r in node.inputs if r.startswith("@")}:
            readers[ref] = readers.get(ref, 0) + 1
    pruned_readers = {p.name: sum(n.inputs[1] == "@" + p.name for n in nodes) for p in weights}
    global_mask = _global_masks(weights, opts.sparsity) if opts.scope == "global" else None

    types = graph.value_types()
    replacements: dict[str, list[Node]] = {}
    storage: dict[str, list[Param]] = {}     # source weight name -> its replacement params
    before = after = zeroed = total = 0
    for node in nodes:
        weight = params[node.inputs[1][1:]]
        if weight.name not in storage:
            norms = stats.by_node[node.ref].sqsum.float().sqrt() if stats is not None else None
            shared = readers[weight.name] > pruned_readers[weight.name]
            new_name = f"{stem(weight.name)}.pruned_weight" if shared else weight.name
            storage[weight.name] = _storage(weight, opts, norms, global_mask, types[node.inputs[0]].dtype, new_name)
            types.update({"@" + p.name: p.type for p in storage[weight.name]})
            before += weight.type.nbytes
            after += sum(p.type.nbytes for p in storage[weight.name])
            zeroed += _zeroed(opts, *weight.type.shape, per_row=norms is not None)
            total += math.prod(weight.type.shape)
        refs = ["@" + p.name for p in storage[weight.name]]
        if opts.pattern == "2:4":
            new = make_node(node.name, "linear_24", [node.inputs[0], *refs, *node.inputs[2:]], types, node.meta)
        else:
            new = make_node(node.name, "linear", [node.inputs[0], *refs, *node.inputs[2:]], types, node.meta,
                            **node.attr_dict)
        replacements[node.ref] = [new]
    if not replacements:
        return PassResult(graph, changed=False, stats={"pruned": 0})
    if global_mask is not None:  # one threshold: the count is exact over all weights, not per layer
        zeroed = round(opts.sparsity * total)
    result = replace_nodes(graph, replacements, [p for ps in storage.values() for p in ps])
    out_stats = {"pruned": len(replacements), "method": opts.method, "pattern": opts.pattern, "scope": opts.scope,
                 "sparsity": round(zeroed / total, 6), "bytes_before": before, "bytes_after": after}
    if calib is not None:
        out_stats["calibration"] = f"{calib.source}, {calib.tokens} tokens"
    return PassResult(result, changed=True, stats=out_stats)
