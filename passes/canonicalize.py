"""Canonicalize: drop identity casts and unit scales, fold scale chains, remove dead nodes."""

from __future__ import annotations

import dataclasses

from llmc.ir import Graph, Node
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass


class CanonicalizeOptions(PassOptions):
    fold_scales: bool = True   # scale(scale(x, a), b) -> scale(x, a*b)


def _is_identity(node: Node, input_dtype: str) -> bool:
    if node.op.name == "cast":
        return node.attr("dtype") == input_dtype                  # cast(x: d, d) -> x
    if node.op.name == "scale":
        return node.attr("factor") == 1.0                         # x * 1 -> x
    return False


def _live(graph: Graph) -> set[str]:
    """Refs some output depends on. Stateful ops (KV-cache writes) count as live: they have effects."""
    producer = {n.ref: n for n in graph.nodes}
    stack = [ref for _, ref in graph.outputs] + [n.ref for n in graph.nodes if n.op.stateful]
    live: set[str] = set()
    while stack:
        ref = stack.pop()
        if ref in live:
            continue
        live.add(ref)
        if ref in producer:
            stack.extend(producer[ref].inputs)
    return live


@register_pass("canonicalize", options=CanonicalizeOptions, provides=("canonical",))
def canonicalize(graph: Graph, ctx: PassContext) -> PassResult:
    """Drop identity casts and unit scales, fold scale chains, remove dead nodes.

    Rewrites in one forward walk, then drops what no output needs; node names stay as they were.
    Stats: ``identity`` nodes bypassed, ``folded`` scale pairs merged, ``dead`` nodes removed
    (including scales orphaned by folding), so ``nodes_before - nodes_after == identity + dead``.
    """
    fold = ctx.options.fold_scales
    forward: dict[str, str] = {}          # ref of a removed identity node -> the ref replacing it
    kept: dict[str, Node] = {}            # ref -> node as rewritten
    types = graph.value_types()
    identity = folded = 0
    for node in graph.nodes:
        inputs = tuple(forward.get(ref, ref) for ref in node.inputs)
        if inputs != node.inputs:
            node = dataclasses.replace(node, inputs=inputs)
        dtype = types[inputs[0]].dtype if inputs else ""
        inner = kept.get(inputs[0]) if inputs else None
        if fold and node.op.name == "scale" and inner is not None and inner.op.name == "scale" \
                and not _is_identity(node, dtype):
            factor = inner.attr("factor") * node.attr("factor")     # (x * a) * b -> x * (a*b)
            node = dataclasses.replace(node, inputs=inner.inputs,
                                       attrs=tuple(sorted({**node.attr_dict, "factor": factor}.items())))
            folded += 1
        if _is_identity(node, dtype):
            forward[node.ref] = node.inputs[0]
            identity += 1
            continue
        kept[node.ref] = node
    outputs = tuple((name, forward.get(ref, ref)) for name, ref in graph.outputs)
    rewritten = Graph(graph.inputs, graph.params, tuple(kept.values()), outputs, graph.meta)
    live = _live(rewritten)
    nodes = tuple(n for n in rewritten.nodes if n.ref in live)
    params = tuple(p for p in graph.params if "@" + p.name in live)
    dead = len(rewritten.nodes) - len(nodes)
    result = Graph(graph.inputs, params, nodes, outputs, graph.meta)
    return PassResult(result, changed=bool(identity or folded or dead) or params != graph.params,
                      stats={"dead": dead, "identity": identity, "folded": folded})
