"""Fuse: qkv and gate_up projections, act(gate) * up, residual add + RMSNorm, rope into attention.

Each fusion is a rewrite with its algebra below, switched by the option of the same name, and
counted in the stats (matches; 0 when off). None changes what the graph computes: the concatenated
projections compute the same dot products (only BLAS blocking may differ, ~1e-7), the other fused
ops run the very same torch calls in one op.

    qkv:          linear(x,Wq) linear(x,Wk) linear(x,Wv) -> linear(x,[Wq;Wk;Wv]) + 3 slices
    gate_up:      act(linear(x,Wg)) * linear(x,Wu)      -> act(slice) * slice of linear(x,[Wg;Wu])
    silu_mul:     act(g) * u  (act: silu, gelu, gelu_tanh, relu)  -> act_mul(g, u)
                  act(s[:, :I]) * s[:, I:]                          -> act_mul_packed(s)
    add_rms_norm: rms_norm(add(x, r))                   -> add_rms_norm(x, r) = normed | sum, 2 slices
    rope:         attention(rope(q), rope(k), v, pos)   -> attention(q, k, v, pos, inv_freq) {rope_dim}

Choices, and why:
- qkv / gate_up fuse only when every projection has a bias or none has: no supported architecture
  mixes them, and a zero bias would be bytes read for nothing. Concatenated weights (and biases)
  are derived params computed once when the package is written, never during compile.
- silu_mul turns a gate_up pair (ours, or Phi-3's own fused gate_up_proj) into the packed
  ``act_mul_packed`` on ``[T, 2I]`` (vLLM's silu_and_mul), so the pair needs no slices at all.
- add_rms_norm fuses an add and a norm of the same decoder layer only (Llama's post-attention
  norm, Gemma 2's pre-feedforward norm). The add that ends layer i feeds layer i+1's input norm
  (and the last one the final norm): fusing those would move work across the layer boundary, so
  layer 0 (no add before its first norm) and the last layer would each become a kind of their own,
  and codegen could no longer emit one function for all the repeated layers of a small model.
  Per-head norms (Qwen 3's q/k norm) are not whole-row and are left alone.
- rope folds only when q and k get the same rotation (positions, inv_freq, attrs) and nothing else
  reads the rotated values; the attention op then rotates q and k itself before k is cached.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from llmc.ir import Graph, Node, Param
from llmc.ir.ops_fused import GATE_ACTIVATIONS
from llmc.passes.rewrite import derived_param, fresh_name, make_node, replace_nodes
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass

ATTENTION_OPS = ("attention", "paged_attention")
BETWEEN_PROJECTION_AND_ATTENTION = ("rope", "rms_norm")  # per-head q/k norms, rotary


class FuseOptions(PassOptions):
    qkv: bool = True           # q, k, v projections of one input -> one linear + slices
    gate_up: bool = True       # gate and up projections of act(gate) * up -> one linear + slices
    silu_mul: bool = True      # act(gate) * up -> act_mul / act_mul_packed (SiLU, GELU, GELU-tanh, ReLU)
    add_rms_norm: bool = True  # rms_norm(x + r) -> add_rms_norm (normed | sum) + slices
    rope: bool = True          # rope on q and k -> attention's own rope_dim / inv_freq


# ---- shared helpers ------------------------------------------------------------------------------

class _Rewrite:
    """Replacements collected over one walk of the graph, applied at once by ``apply``."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.producers = {n.ref: n for n in graph.nodes}
        self.order = {n.ref: i for i, n in enumerate(graph.nodes)}
        self.users = graph.users()
        self.types = graph.value_types()
        self.params = graph.param_map
        self.taken: set[str] = set()
        self.replacements: dict[str, list[Node]] = {}
        self.new_params: list[Param] = []
        self.claimed: set[str] = set()  # refs already part of a match
        self.matches = 0

    def node(self, name: str, op: str, inputs: Sequence[str], meta, **attrs) -> Node:
        node = make_node(name, op, inputs, self.types, meta, **attrs)
        self.types[node.ref] = node.type
        return node

    def fresh(self, base: str) -> str:
        return fresh_name(self.graph, base, self.taken)

    def param(self, base: str, shape: tuple[int, ...], dtype: str, load: Callable[[], torch.Tensor]) -> str:
        name, i = base, 1
        while name in self.params:
            name, i = f"{base}_{i}", i + 1
        param = derived_param(name, shape, dtype, load)
        self.params[name] = param
        self.new_params.append(param)
        self.types["@" + name] = param.type
        return "@" + name

    def apply(self) -> tuple[Graph, int]:
        if not self.matches:
            return self.graph, 0
        old = {r for r in self.replacements}
        result = replace_nodes(self.graph, self.replacements, self.new_params)
        # What the replaced nodes read may now be read by nobody (a rope, an activation, slices).
        candidates = {r for n in self.graph.nodes if n.ref in old for r in n.inputs}
        return _drop_dead(result, candidates), self.matches


def _drop_dead(graph: Graph, candidates: set[str]) -> Graph:
    """``graph`` without the nodes among ``candidates`` (and what only they read) nobody reads."""
    producers = {n.ref: n for n in graph.nodes}
    uses = Counter(r for n in graph.nodes for r in n.inputs) + Counter(r for _, r in graph.outputs)
    dead: set[str] = set()
    stack = list(candidates)
    while stack:
        ref = stack.pop()
        node = producers.get(ref)
        if node is None or ref in dead or node.op.stateful or uses[ref] > 0:
            continue
        dead.add(ref)
        for r in node.inputs:
            uses[r] -= 1
            stack.append(r)
    nodes = tuple(n for n in graph.nodes if n.ref not in dead)
    used = {r for n in nodes for r in n.inputs}
    params = tuple(p for p in graph.params if "@" + p.name in used)
    return Graph(graph.inputs, params, nodes, graph.outputs, graph.meta)


def _plain_linear(node: Node | None) -> bool:
    """A ``linear`` whose weight (and bias) are params, so they can be concatenated."""
    return node is not None and node.op.name == "linear" and all(r.startswith("@") for r in node.inputs[1:])


def _parent(paths: Sequence[str]) -> str:
    """The common parent module of dotted ``paths`` (``a.attn.q_proj``, ``a.attn.k_proj`` -> ``a.attn``)."""
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for level in zip(*(p[:-1] for p in parts)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _layer_of(node: Node) -> str | None:
    """The numbered decoder layer a node belongs to (``model.layers.3.mlp`` -> ``model.layers.3``)."""
    parts = (node.meta.get("module") or "").split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _concat_projections(rw: _Rewrite, linears: list[Node], stem: str) -> bool:
    """Replace ``linears`` (same input, output order as given) by one linear over their concatenated
    weights followed by one slice per projection, each slice keeping its projection's name."""
    if len({n.ref for n in linears}) != len(linears) or {n.ref for n in linears} & rw.claimed:
        return False
    if len({n.inputs[0] for n in linears}) != 1 or len({len(n.inputs) for n in linears}) != 1:
        return False  # different inputs, or a bias on some projections only
    slots = [tuple(rw.params[n.inputs[i][1:]] for n in linears) for i in range(1, len(linears[0].inputs))]
    if any(len({p.type.dtype for p in parts}) != 1 for parts in slots):
        return False
    prefix = _parent([p.name.rsplit(".", 1)[0] for p in slots[0]])  # a.q_proj.weight, a.k_proj.weight -> a
    base = f"{prefix}.{stem}" if prefix else stem
    inputs = [linears[0].inputs[0]]
    for parts, suffix in zip(slots, ("weight", "bias")):
        shape = (sum(p.type.shape[0] for p in parts), *parts[0].type.shape[1:])
        inputs.append(rw.param(f"{base}.{suffix}", shape, parts[0].type.dtype,
                               lambda parts=parts: torch.cat([p.load() for p in parts])))
    first = min(linears, key=lambda n: rw.order[n.ref])
    modules = [n.meta.get("module") or n.ref for n in linears]
    meta = {"module": _parent(modules), "fused": modules}
    fused = rw.node(rw.fresh(f"{stem.removesuffix('_proj')}{first.name}"), "linear", inputs, meta)
    start = 0
    for n in linears:
        width = n.type.shape[1]
        piece = rw.node(n.name, "slice", [fused.ref], n.meta, start=start, stop=start + width)
        rw.replacements[n.ref] = [fused, piece] if n is first else [piece]
        start += width
    rw.claimed.update(n.ref for n in linears)
    rw.matches += 1
    return True


# ---- the fusions ---------------------------------------------------------------------------------

def fuse_qkv(graph: Graph) -> tuple[Graph, int]:
    """The q, k, v projections of each attention, read through rope / rms_norm, on one input."""
    rw = _Rewrite(graph)
    for attn in graph.nodes:
        if attn.op.name not in ATTENTION_OPS:
            continue
        linears = []
        for ref in attn.inputs[:3]:
            node = rw.producers.get(ref)
            while node is not None and node.op.name in BETWEEN_PROJECTION_AND_ATTENTION:
                node = rw.producers.get(node.inputs[0])
            linears.append(node)
        if all(_plain_linear(n) for n in linears):
            _concat_projections(rw, linears, "qkv_proj")
    return rw.apply()


def _gated(rw: _Rewrite, mul: Node) -> tuple[Node, Node] | None:
    """For ``mul(act(g), u)`` (either order, act read only by the mul): the act node and ``u``'s ref."""
    for i in (0, 1):
        act = rw.producers.get(mul.inputs[i])
        if act is not None and act.op.name in GATE_ACTIVATIONS and len(rw.users.get(act.ref, ())) == 1:
            return act, mul.inputs[1 - i]
    return None


def fuse_gate_up(graph: Graph) -> tuple[Graph, int]:
    """The gate and up projections of ``act(gate) * up`` on one input."""
    rw = _Rewrite(graph)
    for mul in graph.nodes:
        if mul.op.name != "mul" or (gated := _gated(rw, mul)) is None:
            continue
        act, up_ref = gated
        gate, up = rw.producers.get(act.inputs[0]), rw.producers.get(up_ref)
        if _plain_linear(gate) and _plain_linear(up):
            _concat_projections(rw, [gate, up], "gate_up_proj")
    return rw.apply()


def _halves(rw: _Rewrite, gate: str, up: str) -> str | None:
    """The packed [T, 2I] value when ``gate`` and ``up`` are its first and second halves."""
    a, b = rw.producers.get(gate), rw.producers.get(up)
    if a is None or b is None or a.op.name != "slice" or b.op.name != "slice" or a.inputs != b.inputs:
        return None
    width = rw.types[a.inputs[0]].shape[1]
    half = width // 2
    if (a.attr("start"), a.attr("stop"), b.attr("start"), b.attr("stop")) == (0, half, half, width) and width % 2 == 0:
        return a.inputs[0]
    return None


def fuse_act_mul(graph: Graph) -> tuple[Graph, int]:
    """``act(gate) * up`` -> one op; packed when gate and up are the halves of one projection."""
    rw = _Rewrite(graph)
    for mul in graph.nodes:
        if mul.op.name != "mul" or (gated := _gated(rw, mul)) is None:
            continue
        act, up = gated
        gate = act.inputs[0]
        if rw.types[gate] != rw.types[up]:
            continue
        act_name = act.op.name
        packed = _halves(rw, gate, up)
        if packed is not None:
            node = rw.node(mul.name, "act_mul_packed", [packed], mul.meta, act=act_name)
        else:
            node = rw.node(mul.name, "act_mul", [gate, up], mul.meta, act=act_name)
        rw.replacements[mul.ref] = [node]
        rw.matches += 1
    return rw.apply()


def fuse_add_rms_norm(graph: Graph) -> tuple[Graph, int]:
    """A whole-row ``rms_norm`` of an ``add`` of the same layer -> add_rms_norm, sliced."""
    rw = _Rewrite(graph)
    outputs = {r for _, r in graph.outputs}
    for norm in graph.nodes:
        if norm.op.name != "rms_norm":
            continue
        add = rw.producers.get(norm.inputs[0])
        if add is None or add.op.name != "add" or add.ref in rw.claimed or _layer_of(add) != _layer_of(norm):
            continue
        x, r = add.inputs
        h = norm.type.shape[1]
        if rw.types[norm.inputs[1]].shape != (h,) or rw.types[x] != rw.types[r]:
            continue  # per-head norm, or operands of different dtypes (torch would promote)
        fused = rw.node(rw.fresh(f"add_rms_norm{norm.name}"), "add_rms_norm", [x, r, norm.inputs[1]],
                        {**norm.meta, "fused": [add.meta.get("module", add.ref), norm.meta.get("module", norm.ref)]},
                        eps=norm.attr("eps"), offset=norm.attr("offset"))
        others = [u for u in rw.users.get(add.ref, ()) if u is not norm]
        summed = [rw.node(add.name, "slice", [fused.ref], add.meta, start=h, stop=2 * h)] \
            if others or add.ref in outputs else []
        rw.replacements[add.ref] = [fused, *summed]
        rw.replacements[norm.ref] = [rw.node(norm.name, "slice", [fused.ref], norm.meta, start=0, stop=h)]
        rw.claimed.add(add.ref)
        rw.matches += 1
    return rw.apply()


def fuse_rope(graph: Graph) -> tuple[Graph, int]:
    """``rope`` on q and k right before attention -> the attention op's own rotary attrs."""
    rw = _Rewrite(graph)
    for attn in graph.nodes:
        if attn.op.name not in ATTENTION_OPS or len(attn.inputs) > 4:
            continue
        q, k, v, positions = attn.inputs
        rq, rk = rw.producers.get(q), rw.producers.get(k)
        if rq is None or rk is None or rq.op.name != "rope" or rk.op.name != "rope":
            continue
        if rq.inputs[1:] != rk.inputs[1:] or rq.inputs[1] != positions or rq.attrs != rk.attrs:
            continue  # rotated differently, or at other positions than attention's
        if rq.attr("head_dim") != attn.attr("head_dim") or any(len(rw.users[r.ref]) != 1 for r in (rq, rk)):
            continue
        attrs = {**attn.attr_dict, "rope_dim": rq.attr("rotary_dim"), "rope_interleaved": rq.attr("interleaved"),
                 "rope_scaling": rq.attr("scaling")}
        rw.replacements[attn.ref] = [rw.node(attn.name, attn.op.name, [rq.inputs[0], rk.inputs[0], v, positions,
                                                                       rq.inputs[2]], attn.meta, **attrs)]
        rw.matches += 1
    return rw.apply()


# In this order: gate_up before silu_mul so that the pair becomes act_mul_packed.
FUSIONS: tuple[tuple[str, Callable[[Graph], tuple[Graph, int]]], ...] = (
    ("qkv", fuse_qkv), ("gate_up", fuse_gate_up), ("silu_mul", fuse_act_mul),
    ("add_rms_norm", fuse_add_rms_norm), ("rope", fuse_rope))


@register_pass("fuse", options=FuseOptions, requires=("canonical",), provides=("fused",))
def fuse(graph: Graph, ctx: PassContext) -> PassResult:
    """Fuse qkv and gate_up projections, act(gate) * up, residual add + RMSNorm, rope into attention.

    Runs after canonicalize and before or after attention_lowering (attention and paged_attention
    alike). Stats: matches per fusion (``qkv``, ``gate_up``, ``silu_mul``, ``add_rms_norm``,
    ``rope``), 0 for a fusion switched off. A graph with nothing to fuse comes back unchanged.
    """
    stats = {}
    for name, fusion in FUSIONS:
        stats[name] = 0
        if getattr(ctx.options, name):
            graph, stats[name] = fusion(graph)
    return PassResult(graph, changed=any(stats.values()), stats=stats)
