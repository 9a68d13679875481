"""Pipeline stages for the shard pass (not a pass itself): layers partitioned by a cost model, the
graph cut at the stage boundaries with ``pp_send`` / ``pp_recv``.

Cost of a layer = its params' bytes (the decode-time read) + 2 FLOPs per weight element and token
(the prefill-time compute), both read off the IR's networkx view; stages are contiguous runs of
layers minimizing the most expensive stage (the pipeline's step time), the embedding counted on the
first stage and the final norm and LM head on the last. Every value a later stage needs is sent
straight to it (tagged in definition order); the last stage sends the logits back to rank 0, which
runs the scheduler and samples.
"""

from __future__ import annotations

import re
from functools import lru_cache

from llmc.errors import PipelineError
from llmc.ir import OPS, Graph, Node, TensorType
from llmc.passes.attention_lowering import kv_layer_shapes

LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def node_layer(node: Node) -> int | None:
    found = LAYER.search(node.meta.get("module") or "")
    return int(found.group(1)) if found else None


def layer_costs(graph: Graph) -> dict[int, float]:
    nx_graph = graph.to_networkx()
    costs: dict[int, float] = {}
    for node in graph.nodes:
        layer = node_layer(node)
        if layer is None:
            continue
        for ref in node.inputs:
            data = nx_graph.nodes[ref]
            if data["kind"] == "param":
                t: TensorType = data["type"]
                numel = t.nbytes // t.torch_dtype.itemsize
                costs[layer] = costs.get(layer, 0.0) + t.nbytes + 2 * numel
    return costs


def partition(costs: list[float], pp: int) -> list[int]:
    """First layer index of each stage: contiguous runs minimizing the largest run's cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(start: int, stages: int) -> tuple[float, tuple[int, ...]]:
        if stages == 1:
            return prefix[n] - prefix[start], (start,)
        options = []
        for cut in range(start + 1, n - stages + 2):
            rest, starts = best(cut, stages - 1)
            options.append((max(prefix[cut] - prefix[start], rest), (start, *starts)))
        return min(options)

    return list(best(0, pp)[1])


def pipeline_stages(graph: Graph, pp: int) -> tuple[list[Graph], list[list[int]]]:
    """Each stage's graph (rank s runs stage s) and the layers of each stage."""
    costs = layer_costs(graph)
    layers = sorted(costs)
    if len(layers) < pp:
        raise PipelineError(f"shard: pp={pp} stages need at least {pp} layers, the model has {len(layers)}")
    starts = partition([costs[i] for i in layers], pp)
    stage_of_layer = {layer: sum(i >= s for s in starts) - 1 for i, layer in enumerate(layers)}
    stage: dict[str, int] = {}
    seen_layer = False
    for node in graph.nodes:
        layer = node_layer(node)
        seen_layer = seen_layer or layer is not None
        own = stage_of_layer[layer] if layer is not None else (pp - 1 if seen_layer else 0)
        stage[node.ref] = max([own, *(stage[r] for r in node.inputs if r in stage)])
    graphs = [_stage_graph(graph, s, pp, stage) for s in range(pp)]
    return graphs, [[layers[i] for i in range(len(layers)) if stage_of_layer[layers[i]] == s] for s in range(pp)]


def _node(name: str, op: str, inputs: list[str], types: dict[str, TensorType], meta=None, **attrs) -> Node:
    opdef = OPS[op]
    full = opdef.check_attrs(attrs)
    return Node(name, opdef, tuple(inputs), tuple(sorted(full.items())),
                opdef.infer([types[r] for r in inputs], full), dict(meta or {}))


def _stage_graph(graph: Graph, s: int, pp: int, stage: dict[str, int]) -> Graph:
    types = graph.value_types()
    tags = {n.ref: i for i, n in enumerate(graph.nodes)}
    mine = [n for n in graph.nodes if stage[n.ref] == s]
    nodes: list[Node] = []
    needed = sorted({r for n in mine for r in n.inputs if r in stage and stage[r] < s}, key=tags.get)
    for ref in needed:  # values computed by earlier stages arrive first, in definition order
        t = types[ref]
        nodes.append(_node(ref[1:], "pp_recv", ["%input_ids"], types, src=stage[ref], tag=tags[ref],
                           features=t.shape[1], dtype=t.dtype))
    nodes.extend(mine)
    local = {n.ref: n.type for n in nodes}
    later = sorted({r for n in graph.nodes if stage[n.ref] > s for r in n.inputs if stage.get(r) == s}, key=tags.get)
    for ref in later:
        dst = min(stage[n.ref] for n in graph.nodes if ref in n.inputs and stage[n.ref] > s)
        if any(ref in n.inputs and stage[n.ref] not in (s, dst) for n in graph.nodes):
            raise PipelineError(f"shard: {ref} is used by more than one later stage")
        nodes.append(_node(f"send_{ref[1:]}", "pp_send", [ref], {**types, **local}, dst=dst, tag=tags[ref]))
    (name, logits), = graph.outputs
    if s == pp - 1:
        out = _node("send_logits", "pp_send", [logits], {**types, **local}, dst=0, tag=len(graph.nodes))
        nodes.append(out)
    elif s == 0:
        rows_type = types[logits]
        like = "%input_ids"
        if rows_type.shape[0] != "T":  # sampled rows only: the same select_rows on a value rank 0 holds
            sent = nodes[-1]
            nodes.append(_node("logits_rows", "select_rows", [sent.ref], {**types, sent.ref: sent.type}))
            like = nodes[-1].ref
        out = _node("recv_logits", "pp_recv", [like], {**types, **{n.ref: n.type for n in nodes}},
                    src=pp - 1, tag=len(graph.nodes), features=rows_type.shape[1], dtype=rows_type.dtype)
        nodes.append(out)
    else:
        out = nodes[-1]
    used = {r[1:] for n in nodes for r in n.inputs if r.startswith("@")}
    params = tuple(p for p in graph.params if p.name in used)
    g = Graph(graph.inputs, params, tuple(nodes), ((name, out.ref),), graph.meta)
    kv = {str(k): list(v) for k, v in sorted(kv_layer_shapes(g).items())}
    return Graph(g.inputs, g.params, g.nodes, g.outputs, {**graph.meta, "kv_layers": kv})
