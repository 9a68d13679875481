"""Compute the final norm and LM head only on the rows the sampler reads (one per sequence)."""

from __future__ import annotations

import dataclasses

from llmc.ir import OPS, Graph, Node
from llmc.pipeline import PassContext, PassResult, register_pass


def _in_layer(node: Node) -> bool:
    """Whether the node belongs to a numbered decoder layer (``model.layers.3.mlp`` -> yes)."""
    return any(part.isdigit() for part in (node.meta.get("module") or "").split("."))


def find_cut(graph: Graph) -> tuple[int, str] | None:
    """The first node after the last decoder layer where exactly one activation (the residual
    stream) crosses from before to after, and that activation; None when there is no such place."""
    nodes = graph.nodes
    start = max((i for i, n in enumerate(nodes) if n.op.stateful), default=-1) + 1
    outputs = {ref for _, ref in graph.outputs}
    inputs = {"%" + name for name, _ in graph.inputs}
    for i in range(start, len(nodes)):
        if _in_layer(nodes[i]):
            continue
        used = {r for n in nodes[i:] for r in n.inputs} | outputs
        if used & inputs:
            continue  # a later node reads token ids or positions, which are not selected
        crossing = used & {n.ref for n in nodes[:i]}
        if len(crossing) == 1:
            return i, crossing.pop()
    return None


@register_pass("select_logits", requires=("paged_attention",))
def select_logits(graph: Graph, ctx: PassContext) -> PassResult:
    """Compute the final norm and LM head only on the rows the sampler reads (one per sequence).

    ``h -> norm -> lm_head`` becomes ``h -> select_rows(h) -> norm -> lm_head``: the nodes after
    the last decoder layer are row-wise, so running them on the selected rows gives those rows'
    logits exactly; a 512-token prefill chunk then costs one row of LM head instead of 512.
    Stats: ``selected`` (0 or 1 select_rows inserted).
    """
    if any(n.op.name == "select_rows" for n in graph.nodes):
        return PassResult(graph, changed=False, stats={"selected": 0})
    cut = find_cut(graph)
    if cut is None:
        return PassResult(graph, changed=False, stats={"selected": 0})
    index, value = cut
    taken = {n.name for n in graph.nodes}
    name = "select_rows"
    while name in taken:
        name += "_"
    x = graph.type_of(value)
    select = Node(name, OPS["select_rows"], (value,), (), OPS["select_rows"].infer([x], {}),
                  {"module": "", "note": "rows to sample"})
    types = {**graph.value_types(), select.ref: select.type}
    after = []
    for n in graph.nodes[index:]:  # read the selection instead of h; types change from T rows to S rows
        n = dataclasses.replace(n, inputs=tuple(select.ref if r == value else r for r in n.inputs))
        n = dataclasses.replace(n, type=n.op.infer([types[r] for r in n.inputs], n.attr_dict))
        types[n.ref] = n.type
        after.append(n)
    outputs = tuple((k, select.ref if r == value else r) for k, r in graph.outputs)
    final = (*graph.nodes[:index], select, *after)
    return PassResult(Graph(graph.inputs, graph.params, tuple(final), outputs, graph.meta), changed=True,
                      stats={"selected": 1})
