"""The SSA graph: immutable nodes over named values, with params, inputs and outputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from llmc.errors import IRError
from llmc.ir.opdef import OPS, OpDef
from llmc.ir.types import Param, TensorType

# Value references: "%name" for graph inputs and node results, "@name" for params.


@dataclass(frozen=True)
class Node:
    """``name = op(inputs...) {attrs}``; ``meta`` records provenance (module path, class, ATen ops)."""

    name: str
    op: OpDef
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...]
    type: TensorType
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ref(self) -> str:
        return "%" + self.name

    def attr(self, key: str) -> Any:
        return dict(self.attrs)[key]

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)


@dataclass(frozen=True)
class Graph:
    """A whole model step: token ids and positions in, named outputs (logits) out."""

    inputs: tuple[tuple[str, TensorType], ...]
    params: tuple[Param, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[tuple[str, str], ...]   # (output name, value ref)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def param_map(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    def type_of(self, ref: str) -> TensorType:
        return self.value_types()[ref]

    def value_types(self) -> dict[str, TensorType]:
        types = {"%" + name: t for name, t in self.inputs}
        types.update({"@" + p.name: p.type for p in self.params})
        types.update({n.ref: n.type for n in self.nodes})
        return types

    def op_counts(self) -> Counter:
        return Counter(n.op.name for n in self.nodes)

    def users(self) -> dict[str, list[Node]]:
        uses: dict[str, list[Node]] = {}
        for node in self.nodes:
            for ref in node.inputs:
                uses.setdefault(ref, []).append(node)
        return uses

    def param_bytes(self) -> int:
        return sum(p.type.nbytes for p in self.params)

    def to_networkx(self):
        """A DiGraph over node names (plus inputs and params) with op, type and attrs on each node."""
        import networkx as nx

        g = nx.DiGraph()
        for name, t in self.inputs:
            g.add_node("%" + name, kind="input", type=t)
        for p in self.params:
            g.add_node("@" + p.name, kind="param", type=p.type, param=p)
        for n in self.nodes:
            g.add_node(n.ref, kind="op", op=n.op.name, type=n.type, attrs=n.attr_dict, meta=dict(n.meta))
            for i, ref in enumerate(n.inputs):
                g.add_edge(ref, n.ref, index=i)
        for out, ref in self.outputs:
            g.add_node("out:" + out, kind="output")
            g.add_edge(ref, "out:" + out, index=0)
        return g

    def __str__(self) -> str:
        from llmc.ir.printer import format_graph
        return format_graph(self)


class GraphBuilder:
    """Builds a Graph node by node, inferring each node's type from its OpDef."""

    def __init__(self, ops=OPS) -> None:
        self._ops = ops
        self._inputs: dict[str, TensorType] = {}
        self._params: dict[str, Param] = {}
        self._nodes: list[Node] = []
        self._types: dict[str, TensorType] = {}
        self._outputs: dict[str, str] = {}
        self._counter = 0

    def input(self, name: str, type: TensorType) -> str:
        self._inputs[name] = type
        self._types["%" + name] = type
        return "%" + name

    def param(self, param: Param) -> str:
        known = self._params.get(param.name)
        if known is not None and known.type != param.type:
            raise IRError(f"param {param.name!r} added twice with types {known.type} and {param.type}")
        self._params.setdefault(param.name, param)
        self._types["@" + param.name] = param.type
        return "@" + param.name

    def add(self, op: str | OpDef, inputs: Iterable[str], meta: Mapping[str, Any] | None = None,
            **attrs: Any) -> str:
        opdef = self._ops[op] if isinstance(op, str) else op
        inputs = tuple(inputs)
        for ref in inputs:
            if ref not in self._types:
                raise IRError(f"{opdef.name}: input {ref} is not defined")
        if not opdef.min_inputs <= len(inputs) <= len(opdef.inputs):
            raise IRError(f"{opdef.name} takes {opdef.min_inputs}..{len(opdef.inputs)} inputs, got {len(inputs)}")
        full = opdef.check_attrs(attrs)
        try:
            out_type = opdef.infer([self._types[r] for r in inputs], full)
        except IRError as exc:
            where = f" (at {meta['module']})" if meta and meta.get("module") else ""
            raise IRError(f"{exc}{where}") from None
        name = str(self._counter)
        self._counter += 1
        node = Node(name, opdef, inputs, tuple(sorted(full.items())), out_type, dict(meta or {}))
        self._nodes.append(node)
        self._types[node.ref] = out_type
        return node.ref

    def output(self, name: str, ref: str) -> None:
        self._outputs[name] = ref

    def type_of(self, ref: str) -> TensorType:
        return self._types[ref]

    def build(self, meta: Mapping[str, Any] | None = None) -> Graph:
        used = {r for n in self._nodes for r in n.inputs} | set(self._outputs.values())
        params = tuple(p for name, p in self._params.items() if "@" + name in used)
        return Graph(tuple(self._inputs.items()), params, tuple(self._nodes),
                     tuple(self._outputs.items()), dict(meta or {}))
