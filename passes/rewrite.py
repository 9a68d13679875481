"""Shared helpers of the weight-rewriting passes (quantize, prune, fuse, gqa_rewrite); not a pass.

- ``select_linears``: the ``linear`` nodes whose weight name matches include/exclude globs;
- ``derived_param``: a new param computed lazily from others at package-writing time (weights are
  never materialized twice during compile; one computation can feed several params);
- ``replace_nodes``: a new graph with some nodes replaced by node lists, unused params dropped.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Any, Callable, Mapping, Sequence

import torch

from llmc.ir import OPS, Graph, Node, Param, TensorType

# Kept in full precision by default: the embedding table and LM head (tied or not) are the most
# quantization-sensitive tensors and the embedding is a gather, not a GEMM.
DEFAULT_EXCLUDE = ("lm_head.*", "*embed*", "*wte*", "*wpe*")


def stem(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj`` (new params' prefix)."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def weight_name(node: Node) -> str | None:
    """The param name of a linear node's weight, or None when the weight is computed."""
    ref = node.inputs[1]
    return ref[1:] if ref.startswith("@") else None


def matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in include) and not any(
        fnmatch.fnmatchcase(name, g) for g in exclude)


def select_linears(graph: Graph, include: Sequence[str] = ("*",),
                   exclude: Sequence[str] = DEFAULT_EXCLUDE, op: str = "linear") -> list[Node]:
    """The ``op`` nodes whose weight param matches ``include`` and no ``exclude`` glob."""
    out = []
    for node in graph.nodes:
        if node.op.name == op and (name := weight_name(node)) is not None and matches(name, include, exclude):
            out.append(node)
    return out


def cached(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` computed once: several derived params (qweight, scale) share one quantization."""
    return functools.cache(fn)


def derived_param(name: str, shape: Sequence[int], dtype: str, load: Callable[[], torch.Tensor],
                  layout: str = "plain", quant: Mapping[str, object] | None = None) -> Param:
    """A param computed from others when the package is written (``source="derived"``)."""
    return Param(name, TensorType(tuple(shape), dtype), layout=layout, quant=dict(quant) if quant else None,
                 source="derived", loader=load)


def make_node(name: str, op: str, inputs: Sequence[str], types: Mapping[str, TensorType],
              meta: Mapping[str, Any] | None = None, **attrs: Any) -> Node:
    """A node with its type inferred from ``types`` (value ref -> type)."""
    opdef = OPS[op]
    full = opdef.check_attrs(attrs)
    out = opdef.infer([types[r] for r in inputs], full)
    return Node(name, opdef, tuple(inputs), tuple(sorted(full.items())), out, dict(meta or {}))


def fresh_name(graph: Graph, base: str, taken: set[str] | None = None) -> str:
    """A node name not used in ``graph`` (nor in ``taken``, which it is added to)."""
    taken = taken if taken is not None else set()
    if not taken:
        taken.update(n.name for n in graph.nodes)
    name = base
    i = 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def replace_nodes(graph: Graph, replacements: Mapping[str, Sequence[Node]], new_params: Sequence[Param] = (),
                  forward: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None) -> Graph:
    """``graph`` with node ``ref`` replaced by ``replacements[ref]`` (in order, in its place);
    ``forward`` maps refs of removed values to the refs replacing them in later nodes' inputs and
    the outputs. Params no node reads any more are dropped; ``new_params`` are added. Types of
    nodes after a replacement are re-inferred (a rewrite may change a value's shape)."""
    forward = dict(forward or {})
    params = {p.name: p for p in graph.params}
    params.update({p.name: p for p in new_params})
    types: dict[str, TensorType] = {"%" + n: t for n, t in graph.inputs}
    types.update({"@" + name: p.type for name, p in params.items()})
    nodes: list[Node] = []
    for node in graph.nodes:
        for new in replacements.get(node.ref, (node,)):
            inputs = tuple(forward.get(r, r) for r in new.inputs)
            if inputs != new.inputs or new is node:
                attrs = new.op.check_attrs(new.attr_dict)
                new = dataclasses.replace(new, inputs=inputs, type=new.op.infer([types[r] for r in inputs], attrs))
            types[new.ref] = new.type
            nodes.append(new)
    used = {r[1:] for n in nodes for r in n.inputs if r.startswith("@")}
    outputs = tuple((k, forward.get(r, r)) for k, r in graph.outputs)
    kept = tuple(p for name, p in params.items() if name in used)
    return Graph(graph.inputs, kept, tuple(nodes), outputs, dict(meta if meta is not None else graph.meta))
