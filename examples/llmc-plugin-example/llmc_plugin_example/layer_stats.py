"""layer_stats: count ops and parameter bytes per decoder layer; tag every node with its layer."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from llmc.ir import Graph
from llmc.pipeline import PassContext, PassOptions, PassResult


class LayerStatsOptions(PassOptions):
    # Finds the layer index in a module path or param name: model.layers.3.mlp, transformer.h.3.attn.
    layer_pattern: str = r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)"


def _layer(pattern: re.Pattern, name: str) -> int | None:
    match = pattern.search(name)
    return int(match.group(1)) if match else None


def layer_stats(graph: Graph, ctx: PassContext) -> PassResult:
    """Per-layer op counts and param bytes in the stats; ``meta["layer"]`` on every node.

    Nodes and params outside any layer (embedding, final norm, lm_head, shared rotary tables) are
    counted under ``"other"``. The IR computes the same thing afterwards (only metadata changes),
    so ``changed`` is False; the table also lands in ``graph.meta["layer_stats"]`` for codegen.
    """
    pattern = re.compile(ctx.options.layer_pattern)
    ops: dict[str, Counter] = {}
    nodes = []
    for node in graph.nodes:
        layer = node.attr_dict.get("layer") if node.op.name == "attention" else None
        layer = layer if layer is not None else _layer(pattern, node.meta.get("module", ""))
        ops.setdefault("other" if layer is None else str(layer), Counter())[node.op.name] += 1
        nodes.append(dataclasses.replace(node, meta={**node.meta, "layer": layer}))
    param_bytes: Counter = Counter()
    for param in graph.params:
        layer = _layer(pattern, param.name)
        numel = 1
        for dim in param.type.shape:
            numel *= dim
        param_bytes["other" if layer is None else str(layer)] += numel * param.type.torch_dtype.itemsize
    keys = sorted(set(ops) | set(param_bytes), key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    table = {k: {"ops": dict(sorted(ops.get(k, Counter()).items())), "param_bytes": param_bytes[k]} for k in keys}
    layers = sum(1 for k in keys if k != "other")
    annotated = Graph(graph.inputs, graph.params, tuple(nodes), graph.outputs,
                      {**graph.meta, "layer_stats": table})
    return PassResult(annotated, changed=False, stats={"layers": layers, "per_layer": table})
