"""Lower attention to paged attention: k/v live in the runtime's page pool, read via block tables."""

from __future__ import annotations

import dataclasses

from llmc.errors import IRError
from llmc.ir import Graph, OPS
from llmc.pipeline import PassContext, PassResult, register_pass


def kv_layer_shapes(graph: Graph) -> dict[int, tuple[int, int, int]]:
    """layer -> (kv_heads, head_dim, v_head_dim) of every paged attention node: what the runtime
    allocates pages for (recorded in the package's plan)."""
    shapes: dict[int, tuple[int, int, int]] = {}
    for node in graph.nodes:
        if node.op.name != "paged_attention":
            continue
        kvh, hd = node.attr("num_kv_heads"), node.attr("head_dim")
        v_features = graph.type_of(node.inputs[2]).shape[1]
        shape = (kvh, hd, v_features // kvh)
        layer = node.attr("layer")
        if shapes.get(layer, shape) != shape:
            raise IRError(f"paged_attention {node.ref}: layer {layer} is used twice with different shapes "
                          f"{shapes[layer]} and {shape}")
        shapes[layer] = shape
    return shapes


@register_pass("attention_lowering", requires=("canonical",), provides=("paged_attention",))
def attention_lowering(graph: Graph, ctx: PassContext) -> PassResult:
    """Lower attention to paged attention: k/v live in the runtime's page pool, read via block tables.

    Each ``attention`` node becomes a ``paged_attention`` node with the same operands and attrs
    (``attention(q, k, v, positions) -> paged_attention(q, k, v, positions)``): the math is the same,
    only where keys and values are kept changes. The graph's meta records the page size from the
    target's runtime defaults and each layer's KV shape. Stats: ``lowered`` nodes.
    """
    paged = OPS["paged_attention"]
    nodes = tuple(dataclasses.replace(n, op=paged) if n.op.name == "attention" else n for n in graph.nodes)
    lowered = sum(n.op.name == "attention" for n in graph.nodes)
    result = Graph(graph.inputs, graph.params, nodes, graph.outputs, graph.meta)
    meta = {**graph.meta, "kv_page_size": ctx.target.runtime.kv_page_size,
            "kv_layers": {str(k): list(v) for k, v in sorted(kv_layer_shapes(result).items())}}
    return PassResult(Graph(graph.inputs, graph.params, nodes, graph.outputs, meta), changed=lowered > 0,
                      stats={"lowered": lowered})
