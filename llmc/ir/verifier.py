"""Checks a Graph's invariants; run between pipeline phases and after the frontend."""

from __future__ import annotations

from llmc.errors import IRError
from llmc.ir.graph import Graph


def verify(graph: Graph) -> None:
    """Raise IRError naming the node at fault if the graph breaks SSA, typing or op rules."""
    defined = {"%" + name: t for name, t in graph.inputs}
    for p in graph.params:
        if "@" + p.name in defined:
            raise IRError(f"param @{p.name} defined twice")
        defined["@" + p.name] = p.type
    for node in graph.nodes:
        where = f"node {node.ref} ({node.op.name}" + (f" at {node.meta['module']})" if node.meta.get("module") else ")")
        if node.ref in defined:
            raise IRError(f"{where}: value defined twice (graph is not SSA)")
        for ref in node.inputs:
            if ref not in defined:
                raise IRError(f"{where}: input {ref} is used before it is defined")
        if not node.op.min_inputs <= len(node.inputs) <= len(node.op.inputs):
            raise IRError(f"{where}: takes {node.op.min_inputs}..{len(node.op.inputs)} inputs, got {len(node.inputs)}")
        try:
            attrs = node.op.check_attrs(node.attr_dict)
            inferred = node.op.infer([defined[r] for r in node.inputs], attrs)
        except IRError as exc:
            raise IRError(f"{where}: {exc}") from None
        if inferred != node.type:
            raise IRError(f"{where}: recorded type {node.type} but inputs give {inferred}")
        defined[node.ref] = node.type
    if not graph.outputs:
        raise IRError("graph has no outputs")
    for name, ref in graph.outputs:
        if ref not in defined:
            raise IRError(f"output {name!r} refers to undefined value {ref}")
