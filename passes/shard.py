"""Split the model over ranks: tensor parallelism (tp) of heads, MLP and vocab, or pipeline stages (pp).

Tensor parallelism (Megatron-LM's layout). Working backwards from what must be split, each
projection feeding attention's q/k/v (also the fused qkv and its slices) is column-parallel: rank r
holds its heads' rows (KV heads replicated when there are fewer than ranks, rank r taking KV head
``r * kv_heads // tp``). The MLP's gate/up (or fused gate_up) is column-parallel over the
intermediate size; o_proj and down_proj, whose input is then split, are row-parallel, followed by an
``all_reduce`` of the partial sums (a row-parallel bias is held by rank 0 only, zeros elsewhere, so
the sum adds it once). The embedding is vocab-parallel (``vocab_parallel_embedding`` + all_reduce)
and the LM head column-parallel over the vocab, its logits joined by ``all_gather``. Norms, residual
adds and rotary embeddings run replicated: they are cheap and keep the collectives to two per layer.

Pipeline parallelism: see ``pipeline_stages``. The pass returns rank 0's graph; ``meta["parallel"]``
holds every rank's graph, whose params load that rank's slice, for the package to write per-rank
weights (and per-stage model code) from.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field

from llmc.errors import PipelineError
from llmc.ir import OPS, Graph, Node, Param, TensorType
from llmc.passes.attention_lowering import kv_layer_shapes
from llmc.passes.shard_stages import pipeline_stages
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass

PASS_THROUGH = ("rope", "cast", "silu", "gelu", "gelu_tanh", "relu", "tanh", "scale", "select_rows")
SAME_LAYOUT = ("act_mul", "mul", "add")   # elementwise over two values: both split alike
GATED = ("act_mul", "act_mul_packed", "mul")  # what feeds a down projection


class ShardOptions(PassOptions):
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (ranks splitting every layer).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (stages of consecutive layers).")


def chunks(n: int, tp: int, what: str) -> list[list[int]]:
    if n % tp:
        raise PipelineError(f"shard: {what} ({n}) does not divide by tp={tp}; choose a tp that divides it")
    return [list(range(r * n // tp, (r + 1) * n // tp)) for r in range(tp)]


def _heads(node: Node, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(q heads, KV heads) of each rank for an attention node."""
    h, kvh = node.attr("num_heads"), node.attr("num_kv_heads")
    if kvh % tp and tp % kvh:
        raise PipelineError(f"shard: {kvh} KV heads at {node.meta.get('module', node.ref)} neither divide by nor "
                            f"divide tp={tp}")
    kv = chunks(kvh, tp, "num_kv_heads") if kvh >= tp else [[r * kvh // tp] for r in range(tp)]
    return chunks(h, tp, "num_heads"), kv


def _expand(heads: list[int], width: int) -> list[int]:
    return [h * width + i for h in heads for i in range(width)]


def requirements(graph: Graph, tp: int) -> dict[str, list[list[int]]]:
    """Column-parallel linear node -> each rank's output features, found backwards from attention,
    gated MLPs and the logits."""
    types = graph.value_types()
    producer = {n.ref: n for n in graph.nodes}
    need: dict[str, list[list[int]]] = {}
    parts: dict[str, list[tuple[int, list[list[int]]]]] = {}
    column: dict[str, list[list[int]]] = {}

    def require(ref: str, lists: list[list[int]], why: str) -> None:
        if ref not in producer:
            raise PipelineError(f"shard: {ref} must be split across ranks ({why}) but is a graph input or param")
        if need.get(ref, lists) != lists:
            raise PipelineError(f"shard: {ref} is split two different ways ({why})")
        need[ref] = lists

    for node in graph.nodes:
        if node.op.name == "paged_attention":
            q, kv = _heads(node, tp)
            d, kvh = node.attr("head_dim"), node.attr("num_kv_heads")
            dv = types[node.inputs[2]].shape[1] // kvh
            for ref, heads, width in ((node.inputs[0], q, d), (node.inputs[1], kv, d), (node.inputs[2], kv, dv)):
                require(ref, [_expand(hs, width) for hs in heads], f"heads of {node.ref}")
        elif node.op.name == "linear" and node.inputs[0] in producer and producer[node.inputs[0]].op.name in GATED:
            x = node.inputs[0]
            require(x, chunks(types[x].shape[1], tp, "intermediate_size"), f"input of down projection {node.ref}")
    for name, ref in graph.outputs:
        if name == "logits":
            require(ref, chunks(types[ref].shape[1], tp, "vocab_size"), "logits")
    for node in reversed(graph.nodes):
        if node.ref in parts:
            merged = [sum((lists[r] for _, lists in sorted(parts[node.ref], key=lambda p: p[0])), [])
                      for r in range(tp)]
            require(node.ref, merged, f"slices of {node.ref}")
        lists = need.get(node.ref)
        if lists is None:
            continue
        op, x = node.op.name, node.inputs[0]
        if op == "slice":
            start = node.attr("start")
            parts.setdefault(x, []).append((start, [[start + i for i in lst] for lst in lists]))
        elif op in PASS_THROUGH or (op == "rms_norm" and types[node.inputs[1]].shape[0] < types[x].shape[1]):
            require(x, lists, f"{op} {node.ref}")  # per-head norms (q/k norm) split with their heads
        elif op in ("act_mul", "mul"):
            for ref in node.inputs:
                require(ref, lists, f"{op} {node.ref}")
        elif op == "act_mul_packed":
            half = node.type.shape[1]
            require(x, [lst + [half + i for i in lst] for lst in lists], f"{op} {node.ref}")
        elif op == "linear":
            column[node.ref] = lists
        else:
            where = node.meta.get("module") or node.ref
            raise PipelineError(f"shard: cannot split {op} {node.ref} ({where}) across tp={tp} ranks")
    return column


def _sliced(p: Param, dim: int, index: list[int] | None, rank: int) -> Param:
    """``p`` as rank ``rank`` holds it: rows/columns ``index`` of ``dim``; ``index=None`` means the
    whole tensor on rank 0 and zeros elsewhere (a row-parallel bias, added once by the sum)."""
    shape = list(p.type.shape)
    if index is not None:
        shape[dim] = len(index)

    def load() -> torch.Tensor:
        full = p.load()
        if index is None:
            return full if rank == 0 else torch.zeros_like(full)
        return full.index_select(dim, torch.tensor(index)).contiguous()

    return dataclasses.replace(p, name=p.name, type=TensorType(tuple(shape), p.type.dtype), transform=(),
                               loader=load)


class _RankBuilder:
    """Rebuilds the graph as rank ``rank`` runs it, keeping node names (inserted collectives get
    ``<name>_all_reduce`` / ``_all_gather``)."""

    def __init__(self, graph: Graph, rank: int, tp: int, column: dict[str, list[list[int]]]) -> None:
        self.graph, self.rank, self.tp, self.column = graph, rank, tp, column
        self.types = {"%" + n: t for n, t in graph.inputs}
        self.params = {p.name: p for p in graph.params}
        self.new_params: dict[str, Param] = {}
        self.layout: dict[str, list[int]] = {}   # split value -> this rank's full-feature indices
        self.rename: dict[str, str] = {}
        self.nodes: list[Node] = []

    def param(self, ref: str, dim: int | None = None, index: list[int] | None = None, bias_once=False) -> str:
        p = self.params[ref[1:]]
        if dim is not None or bias_once:
            p = _sliced(p, dim or 0, index, self.rank)
        self.new_params[p.name] = p
        self.types[ref] = p.type
        return ref

    def emit(self, node: Node, inputs: list[str], attrs: dict, name: str | None = None) -> str:
        op = node.op if name is None else OPS[attrs.pop("_op")]
        full = op.check_attrs(attrs)
        out = op.infer([self.types[r] for r in inputs], full)
        new = Node(name or node.name, op, tuple(inputs), tuple(sorted(full.items())), out, node.meta)
        self.nodes.append(new)
        self.types[new.ref] = out
        return new.ref

    def collective(self, node: Node, ref: str, op: str, **attrs) -> str:
        return self.emit(node, [ref], {"_op": op, **attrs}, name=f"{node.name}_{op}")

    def build(self) -> Graph:
        for node in self.graph.nodes:
            self.visit(node)
        outputs = []
        for name, ref in self.graph.outputs:
            ref = self.rename.get(ref, ref)
            if ref in self.layout:
                if self.layout[ref] != chunks(self.types[ref].shape[1] * self.tp, self.tp, name)[self.rank]:
                    raise PipelineError(f"shard: output {name} is split unevenly across ranks")
                ref = self.collective(self.graph.nodes[-1], ref, "all_gather", parts=self.tp)
            outputs.append((name, ref))
        params = tuple(self.new_params[name] for name in self.params if name in self.new_params)
        g = Graph(self.graph.inputs, params, tuple(self.nodes), tuple(outputs), self.graph.meta)
        kv = {str(k): list(v) for k, v in sorted(kv_layer_shapes(g).items())}
        return Graph(g.inputs, g.params, g.nodes, g.outputs, {**self.graph.meta, "kv_layers": kv})

    def visit(self, node: Node) -> None:
        r, op = self.rank, node.op.name
        inputs = [self.rename.get(ref, ref) for ref in node.inputs]
        split = [ref for ref in inputs if ref in self.layout]
        attrs = node.attr_dict
        for ref in inputs:
            if ref.startswith("@") and ref[1:] not in self.new_params:
                self.param(ref)  # whole; a split use below replaces it with this rank's slice
        if op == "linear" and node.ref in self.column:
            rows = self.column[node.ref][r]
            inputs[1] = self.param(inputs[1], 0, rows)
            if len(inputs) > 2:
                inputs[2] = self.param(inputs[2], 0, rows)
            self.layout[self.emit(node, inputs, attrs)] = rows
        elif op == "linear" and split:
            inputs[1] = self.param(inputs[1], 1, self.layout[inputs[0]])
            if len(inputs) > 2:
                inputs[2] = self.param(inputs[2], bias_once=True)
            self.rename[node.ref] = self.collective(node, self.emit(node, inputs, attrs), "all_reduce")
        elif op == "embedding" and self.types[inputs[1]].shape[0] % self.tp == 0:
            rows = chunks(self.types[inputs[1]].shape[0], self.tp, "vocab_size")[r]
            inputs[1] = self.param(inputs[1], 0, rows)
            partial = self.emit(node, inputs, {"_op": "vocab_parallel_embedding"}, name=node.name)
            self.rename[node.ref] = self.collective(node, partial, "all_reduce")
        elif op == "slice" and split:
            have, lo, hi = self.layout[inputs[0]], attrs["start"], attrs["stop"]
            at = [p for p, i in enumerate(have) if lo <= i < hi]
            if not at or at != list(range(at[0], at[-1] + 1)):
                raise PipelineError(f"shard: slice {node.ref} takes a non-contiguous part on rank {r}")
            ref = self.emit(node, inputs, {"start": at[0], "stop": at[-1] + 1})
            self.layout[ref] = [have[p] - lo for p in at]
        elif op == "paged_attention":
            q, kv = (lists[r] for lists in _heads(node, self.tp))
            attrs.update(num_heads=len(q), num_kv_heads=len(kv))
            for key in ("k_scale", "v_scale"):
                if attrs.get(key) is not None:
                    attrs[key] = tuple(attrs[key][h] for h in kv)
            dv = self.graph.type_of(node.inputs[2]).shape[1] // node.attr("num_kv_heads")
            self.layout[self.emit(node, inputs, attrs)] = _expand(q, dv)
        elif op == "act_mul_packed" and split:
            half = node.type.shape[1]
            self.layout[self.emit(node, inputs, attrs)] = [i for i in self.layout[inputs[0]] if i < half]
        elif split and (op in PASS_THROUGH or op == "rms_norm" or op in SAME_LAYOUT):
            layouts = {tuple(self.layout.get(ref, ())) for ref in inputs if not ref.startswith("@")}
            if len(layouts) != 1:
                raise PipelineError(f"shard: {op} {node.ref} mixes values split differently across ranks")
            self.layout[self.emit(node, inputs, attrs)] = self.layout[split[0]]
        elif split:
            raise PipelineError(f"shard: op {op} {node.ref} has no tensor-parallel form")
        else:
            self.emit(node, inputs, attrs)


def tensor_parallel(graph: Graph, tp: int) -> list[Graph]:
    quantized = sorted({n.op.name for n in graph.nodes if n.op.name.startswith("linear_")})
    if quantized:
        raise PipelineError(f"shard: tp={tp} of quantized linears ({', '.join(quantized)}) is not supported; "
                            "leave quantize.scheme unset, or use shard.pp instead")
    column = requirements(graph, tp)
    return [_RankBuilder(graph, r, tp, column).build() for r in range(tp)]


@register_pass("shard", ShardOptions, requires=("paged_attention",))
def shard(graph: Graph, ctx: PassContext) -> PassResult:
    """Split the model over ranks: tensor parallelism (tp) of heads, MLP and vocab, or pipeline stages (pp).

    Stats: tp, pp, per-rank weight bytes, collectives per rank, and the layers of each stage."""
    tp, pp = ctx.options.tp, ctx.options.pp
    if tp == 1 and pp == 1:
        return PassResult(graph, changed=False, stats={"tp": 1, "pp": 1})
    if tp > 1 and pp > 1:
        raise PipelineError(f"shard: tp={tp} with pp={pp} at once is not supported; set one of them to 1")
    if tp > 1:
        ranks, stages = tensor_parallel(graph, tp), None
    else:
        ranks, stages = pipeline_stages(graph, pp)
    counts = ranks[0].op_counts()
    stats = {"tp": tp, "pp": pp, "rank_weight_bytes": [g.param_bytes() for g in ranks],
             "all_reduce": counts["all_reduce"], "all_gather": counts["all_gather"],
             "pp_send": counts["pp_send"], **({"stage_layers": stages} if stages else {})}
    first = ranks[0]
    meta = {**first.meta, "parallel": {"tp": tp, "pp": pp, "rank_graphs": tuple(ranks)}}
    return PassResult(Graph(first.inputs, first.params, first.nodes, first.outputs, meta), changed=True, stats=stats)
