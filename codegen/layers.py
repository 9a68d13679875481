"""Find the repeated decoder layers of a graph, so codegen can emit one function per layer kind.

A layer is the contiguous run of nodes whose provenance module path has the same numbered prefix
(``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``). Two layers are of the same *kind* when
they are the same code up to the layer number: same ops and wiring, param names equal once the
layer number is taken out, attrs equal except an ``attention.layer`` equal to the layer number.
Gemma 2's alternating sliding/global layers are two kinds. Anything irregular (a layer split in
two runs, nodes without provenance) makes ``find_layer_kinds`` return None and codegen falls back
to one straight line per node, which is always correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llmc.ir import Graph, Node

LAYER_ATTR = "layer"  # the attr that carries the layer number (attention's KV cache slot)
# Attrs whose values are per-layer data rather than code (quantize_kv's per-head scales): layers
# differing only in them are one kind, and the function reads them from a table by layer number.
TABLE_ATTRS = ("k_scale", "v_scale")


class LayerNumber:
    """Marks "this layer's number" inside a signature or an attr (renders as the ``layer`` argument)."""

    def __repr__(self) -> str:
        return "layer"


LAYER = LayerNumber()


@dataclass(frozen=True)
class LayerTable:
    """Marks "this layer's value of ``attr``" (renders as ``LAYER_ATTRS[attr][layer]``)."""

    attr: str

    def __repr__(self) -> str:
        return f"table:{self.attr}"


@dataclass
class LayerRun:
    """One layer's nodes and the values crossing its boundary."""

    index: int
    prefix: str                      # module path of the layer, e.g. "model.layers.3"
    nodes: list[Node]
    graph_inputs: frozenset[str]     # refs of the graph's inputs (passed to a layer by name)
    inputs: list[str] = field(default_factory=list)   # refs used but defined before the run
    outputs: list[str] = field(default_factory=list)  # refs defined here and used after it

    @property
    def stem(self) -> str:            # "model.layers"
        return self.prefix.rsplit(".", 1)[0]

    def param_key(self, name: str) -> tuple[str, str]:
        """("layer", rest) for this layer's own params, ("shared", name) for others (rotary freqs)."""
        if name.startswith(self.prefix + "."):
            return ("layer", name[len(self.prefix) + 1:])
        return ("shared", name)

    def attr(self, key: str, value):
        if key == LAYER_ATTR and value == self.index:
            return LAYER
        if key in TABLE_ATTRS and value is not None and self.table_ok:
            return LayerTable(key)
        return value

    @property
    def table_ok(self) -> bool:
        """Whether table attrs can be looked up by layer number: at most one node per attr here."""
        seen = [k for n in self.nodes for k, v in n.attrs if k in TABLE_ATTRS and v is not None]
        return len(seen) == len(set(seen))

    def table_values(self) -> dict[str, object]:
        return {k: v for n in self.nodes for k, v in n.attrs if k in TABLE_ATTRS and v is not None} \
            if self.table_ok else {}

    def signature(self) -> str:
        local = {n.ref: i for i, n in enumerate(self.nodes)}
        nodes = []
        for n in self.nodes:
            ins = [("local", local[r]) if r in local else
                   self.param_key(r[1:]) if r.startswith("@") else ("in", self.inputs.index(r))
                   for r in n.inputs]
            nodes.append((n.op.name, ins, [(k, self.attr(k, v)) for k, v in n.attrs]))
        outs = [local[r] for r in self.outputs]
        # Graph inputs (positions) are passed by name, node values by place: keep that apart.
        ins = [r if r in self.graph_inputs else "value" for r in self.inputs]
        return repr((self.stem, nodes, outs, ins))


@dataclass
class LayerKind:
    name: str
    runs: list[LayerRun]

    @property
    def template(self) -> LayerRun:
        return self.runs[0]


def _layer_prefix(node: Node) -> tuple[str, int] | None:
    module = node.meta.get("module") or ""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), int(part)
    return None


def _snake(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", leaf).lower()
    snake = re.sub(r"\W+", "_", snake).strip("_")
    return snake if snake and not snake[0].isdigit() else f"layer_{snake}"


def _kind_base_name(run: LayerRun) -> str:
    for node in run.nodes:  # the class of the layer module itself, e.g. LlamaDecoderLayer
        if node.meta.get("module") == run.prefix and node.meta.get("module_class"):
            return _snake(node.meta["module_class"])
    return "layer"


def find_layer_runs(graph: Graph) -> list[LayerRun] | None:
    runs: list[LayerRun] = []
    graph_inputs = frozenset("%" + name for name, _ in graph.inputs)
    previous = None  # prefix of the node just before, to keep only contiguous runs together
    for node in graph.nodes:
        found = _layer_prefix(node)
        if found is not None and found[0] == previous:
            runs[-1].nodes.append(node)
        elif found is not None:
            runs.append(LayerRun(found[1], found[0], [node], graph_inputs))
        previous = found[0] if found else None
    if len(runs) < 2 or len({r.prefix for r in runs}) != len(runs):
        return None  # no repetition, or a layer split into several runs
    position = {n.ref: i for i, n in enumerate(graph.nodes)}
    used_after: dict[str, int] = {}  # ref -> position of its last use (graph outputs count as the end)
    for i, n in enumerate(graph.nodes):
        for r in n.inputs:
            used_after[r] = i
    for _, ref in graph.outputs:
        used_after[ref] = len(graph.nodes)
    for run in runs:
        defined = {n.ref for n in run.nodes}
        last = position[run.nodes[-1].ref]
        for n in run.nodes:
            for r in n.inputs:
                if r not in defined and not r.startswith("@") and r not in run.inputs:
                    run.inputs.append(r)
        run.outputs = [n.ref for n in run.nodes if used_after.get(n.ref, -1) > last]
        if not run.outputs:
            return None  # a layer whose results nobody reads: leave such graphs straight-line
    return runs


def find_layer_kinds(graph: Graph, reserved: set[str] = frozenset()) -> tuple[list[LayerRun], list[LayerKind]] | None:
    """The layer runs in graph order and their kinds (in order of first appearance), or None."""
    runs = find_layer_runs(graph)
    if runs is None:
        return None
    by_signature: dict[str, LayerKind] = {}
    for run in runs:
        kind = by_signature.setdefault(run.signature(), LayerKind("", []))
        kind.runs.append(run)
    kinds = list(by_signature.values())
    for i, kind in enumerate(kinds):
        base = _kind_base_name(kind.template)
        name = base if len(kinds) == 1 else f"{base}_{chr(ord('a') + i)}" if len(kinds) <= 26 else f"{base}_{i}"
        while name in reserved:
            name += "_"
        kind.name = name
    return runs, kinds
