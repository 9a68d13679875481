"""Convert attention to grouped-query attention: mean-pool K/V heads, drop exactly repeated ones.

Two rewrites of the K and V projections, both choosing for each new KV head a contiguous group of
old ones (query head ``h`` reads KV head ``h // (num_heads / num_kv_heads)``, so only contiguous
groups keep every query head reading what it read before):

- ``kv_heads: N`` (lossy): the K/V projection rows (and biases) of each group of
  ``num_kv_heads / N`` heads are averaged, as Ainslie et al. 2023 (GQA) convert multi-head
  checkpoints; mean-pooling the projection equals mean-pooling K itself, since rope and scales act
  alike on every head (a per-head q/k norm does not commute, so Qwen3-style models drift more);
- ``dedupe_repeated`` (exact, on by default): groups of KV heads whose projections are identical,
  as in an MHA checkpoint made from a GQA one by writing out HF's ``repeat_kv``, are kept once.
  Identical rows give identical K/V, so the logits do not change; only the KV cache shrinks.

Every node between a projection and attention is carried over: rope and per-head ``rms_norm`` are
re-typed, the slices of a fused qkv projection (GPT-2, Phi-3) get new offsets. Weights are pooled
lazily when the package is written (``derived_param``); dedupe compares the K/V rows at compile time.
Stats: ``layers_rewritten`` (= ``pooled_layers`` and/or ``deduped_layers``), the ``repeat_factor``
found (1: no exact repeats), ``kv_heads_before``/``_after`` and ``kv_bytes_per_token_before``/``_after``
(K and V of every layer, as the runtime's cache stores them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from pydantic import Field

from llmc.errors import LlmcError
from llmc.ir import Graph, Node, Param
from llmc.passes.rewrite import derived_param, replace_nodes
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass

ATTENTION_OPS = ("attention", "paged_attention")
# Ops allowed between a projection and attention: each acts alike on every head of its input.
PER_HEAD_OPS = ("rope", "rms_norm", "cast", "scale")


class GQARewriteOptions(PassOptions):
    kv_heads: int | None = Field(None, ge=1)  # KV heads per layer after pooling; null: keep the count
    dedupe_repeated: bool = True              # keep exactly repeated KV heads once (lossless)


class _Unsupported(LlmcError):
    """A layer whose K/V path this pass cannot rewrite."""


@dataclass(frozen=True)
class _Branch:
    """The K or V operand of one attention node: the rows ``[start, stop)`` of ``linear``'s output
    (the whole output, or one slice of a fused qkv), in heads of ``head_dim`` rows. The per-head
    nodes between them and attention need no edit: they are re-typed with everything after."""
    linear: Node
    start: int
    stop: int
    head_dim: int


@dataclass(frozen=True)
class _Layer:
    attention: Node
    k: _Branch
    v: _Branch

    kv_heads = property(lambda self: self.attention.attr("num_kv_heads"))
    where = property(lambda self: _where(self.attention))


def _where(attention: Node) -> str:
    return f"layer {attention.attr('layer')} ({attention.meta.get('module') or attention.ref})"


def _params_only(linear: Node) -> bool:
    return all(ref.startswith("@") for ref in linear.inputs[1:])


def _branch(graph: Graph, producers: dict[str, Node], users: dict[str, list[Node]], attn: Node,
            operand: int, head_dim: int) -> _Branch:
    name = "k" if operand == 1 else "v"
    ref = attn.inputs[operand]
    while True:
        node = producers.get(ref)
        if node is None:
            raise _Unsupported(f"{name} is {ref}, not computed by a linear projection")
        if len(users.get(ref, ())) != 1:
            raise _Unsupported(f"{name}'s value {ref} is also read by {[u.ref for u in users[ref] if u is not attn]}")
        if node.op.name == "linear" and _params_only(node):
            return _Branch(node, 0, node.type.shape[1], head_dim)
        if node.op.name == "slice":
            fused = producers.get(node.inputs[0])
            if fused is None or fused.op.name != "linear" or not _params_only(fused):
                raise _Unsupported(f"{name} is a slice of {node.inputs[0]}, not of a linear projection")
            if any(u.op.name != "slice" for u in users[fused.ref]):
                raise _Unsupported(f"the fused projection {fused.ref} is read by more than its slices")
            return _Branch(fused, node.attr("start"), node.attr("stop"), head_dim)
        if node.op.name.startswith("linear_"):
            raise _Unsupported(f"the {name} projection {node.ref} is already {node.op.name}: "
                               f"run gqa_rewrite before quantize")
        if node.op.name not in PER_HEAD_OPS:
            raise _Unsupported(f"{node.op.name} {node.ref} lies between the {name} projection and attention; "
                               f"only {', '.join(PER_HEAD_OPS)} can be carried")
        if node.op.name == "rope" and node.attr("head_dim") != head_dim:
            raise _Unsupported(f"rope {node.ref} has head_dim {node.attr('head_dim')}, attention {head_dim}")
        if node.op.name == "rms_norm" and graph.type_of(node.inputs[1]).shape[0] != head_dim:
            raise _Unsupported(f"rms_norm {node.ref} normalizes all {name} heads together, not each head")
        ref = node.inputs[0]


def _layers(graph: Graph) -> list[_Layer]:
    """Every attention node with its K and V paths; raises ``_Unsupported`` naming the layer."""
    producers = {n.ref: n for n in graph.nodes}
    users = graph.users()
    layers = []
    for node in graph.nodes:
        if node.op.name not in ATTENTION_OPS:
            continue
        v_head_dim = graph.type_of(node.inputs[2]).shape[1] // node.attr("num_kv_heads")
        try:
            layers.append(_Layer(node, _branch(graph, producers, users, node, 1, node.attr("head_dim")),
                                 _branch(graph, producers, users, node, 2, v_head_dim)))
        except _Unsupported as exc:
            raise _Unsupported(f"gqa_rewrite: {_where(node)}: {exc}") from None
    return layers


# ---- the row plan: which old heads each new head averages -----------------------------------------

Groups = tuple[tuple[int, ...], ...]  # new head j -> the old heads (within the branch) it averages


def _segments(linear: Node, plans: Sequence[tuple[_Branch, Groups]]) -> list[tuple[int, int, int, Groups | None]]:
    """``linear``'s output rows as ``(start, stop, head_dim, groups)``, in order, covering all of
    them: the K/V branches are pooled by their groups, every other row (q, gaps) copied (None)."""
    out, pos = [], 0
    for branch, groups in sorted(plans, key=lambda p: p[0].start):
        if branch.start < pos:
            raise LlmcError(f"gqa_rewrite: {linear.ref}: the K and V slices overlap")
        if branch.start > pos:
            out.append((pos, branch.start, 1, None))
        out.append((branch.start, branch.stop, branch.head_dim, groups))
        pos = branch.stop
    if pos < linear.type.shape[1]:
        out.append((pos, linear.type.shape[1], 1, None))
    return out


def _pool_rows(t: torch.Tensor, segments) -> torch.Tensor:
    """``t`` (weight ``[out, in]`` or bias ``[out]``) with each segment's heads averaged by group.
    In float32; a group of one head is copied exactly (dedupe must not change a single bit)."""
    parts = []
    for start, stop, head_dim, groups in segments:
        rows = t[start:stop]
        if groups is None:
            parts.append(rows)
            continue
        heads = rows.reshape(-1, head_dim, *rows.shape[1:])
        parts.extend(heads[list(g)].float().mean(0).to(t.dtype) for g in groups)
    return torch.cat(parts)


def _new_offset(segments, pos: int) -> int:
    """Where row boundary ``pos`` of the old output lies in the new one; a slice may start or end
    anywhere in copied rows, but only at the edges of pooled ones."""
    new = 0
    for start, stop, head_dim, groups in segments:
        size = len(groups) * head_dim if groups is not None else stop - start
        if start <= pos <= stop:
            if groups is None:
                return new + pos - start
            if pos in (start, stop):
                return new + (size if pos == stop else 0)
            raise LlmcError(f"gqa_rewrite: a slice starts or ends inside the pooled rows [{start}, {stop})")
        new += size
    return new


def _rows(segments) -> int:
    return _new_offset(segments, segments[-1][1])


def _block_factor(heads: list[torch.Tensor], limit: int) -> int:
    """The largest ``g`` dividing ``limit`` such that every contiguous block of ``g`` heads holds
    the very same numbers (``heads``: one tensor per head, K and V rows side by side)."""
    for g in sorted((d for d in range(1, limit + 1) if limit % d == 0), reverse=True):
        if all(torch.equal(heads[b], heads[b + i]) for b in range(0, len(heads), g) for i in range(1, g)):
            return g
    return 1


def _repeat_factor(layers: list[_Layer], pooled: dict[int, Groups], params: dict[str, Param]) -> int:
    """The repeat factor common to every layer's (pooled) K/V heads. Stops loading weights as soon
    as one layer shows none, so an ordinary checkpoint costs one layer's K/V rows."""
    factor = 0
    for i, layer in enumerate(layers):
        groups = pooled[i]
        limit = math.gcd(factor, len(groups)) if factor else len(groups)
        if limit == 1:
            return 1
        loaded: dict[str, torch.Tensor] = {}  # a fused qkv weight is read once for K and V

        def rows(branch: _Branch, position: int) -> list[torch.Tensor]:
            ref = branch.linear.inputs[position] if len(branch.linear.inputs) > position else None
            if ref is None:
                return []
            if ref not in loaded:
                loaded[ref] = params[ref[1:]].load()
            segment = [(branch.start, branch.stop, branch.head_dim, groups)]
            return list(_pool_rows(loaded[ref], segment).reshape(len(groups), -1))

        parts = [rows(b, pos) for b in (layer.k, layer.v) for pos in (1, 2)]
        heads = [torch.cat([p[j].float().flatten() for p in parts if p]) for j in range(len(groups))]
        factor = _block_factor(heads, limit)
        if factor == 1:
            return 1
    return max(factor, 1)


# ---- the pass ------------------------------------------------------------------------------------

def _kv_bytes(graph: Graph, layers: list[_Layer], heads: Sequence[int]) -> int:
    """K and V bytes one token takes in the cache: kv_heads * (head_dim + v_head_dim) per layer, in
    the dtype of the K the attention node stores."""
    total = 0
    for layer, n in zip(layers, heads):
        itemsize = graph.type_of(layer.attention.inputs[1]).torch_dtype.itemsize
        total += n * (layer.k.head_dim + layer.v.head_dim) * itemsize
    return total


def _uniform(values: list[int]) -> int | list[int]:
    return values[0] if values and all(v == values[0] for v in values) else values


def _pool_groups(layer: _Layer, kv_heads: int | None) -> Groups:
    old = layer.kv_heads
    if kv_heads is None or kv_heads == old:
        return tuple((h,) for h in range(old))
    heads = layer.attention.attr("num_heads")
    if heads % kv_heads:
        raise LlmcError(f"gqa_rewrite: {layer.where}: num_heads={heads} is not divisible by kv_heads={kv_heads}")
    if kv_heads > old or old % kv_heads:
        raise LlmcError(f"gqa_rewrite: {layer.where}: kv_heads={kv_heads} does not divide the layer's {old} KV "
                        f"heads evenly (heads can only be pooled in equal groups; choose a divisor of {old})")
    size = old // kv_heads
    return tuple(tuple(range(j * size, (j + 1) * size)) for j in range(kv_heads))


def _retype(graph: Graph, edits: dict[str, tuple[tuple[str, ...], dict[str, Any]]],
            new_params: Sequence[Param]) -> dict[str, list[Node]]:
    """Replacements for the edited nodes (new inputs/attrs) and every node whose type follows."""
    types = graph.value_types()
    types.update({"@" + p.name: p.type for p in new_params})
    replacements = {}
    for node in graph.nodes:
        inputs, attrs = edits.get(node.ref, (node.inputs, node.attr_dict))
        full = node.op.check_attrs(attrs)
        new = Node(node.name, node.op, tuple(inputs), tuple(sorted(full.items())),
                   node.op.infer([types[r] for r in inputs], full), node.meta)
        types[new.ref] = new.type
        if new != node:
            replacements[node.ref] = [new]
    return replacements


@register_pass("gqa_rewrite", options=GQARewriteOptions, lossy=True)
def gqa_rewrite(graph: Graph, ctx: PassContext) -> PassResult:
    """Convert attention to grouped-query attention: mean-pool K/V heads, drop exactly repeated ones."""
    opts: GQARewriteOptions = ctx.options
    if opts.kv_heads is None and not opts.dedupe_repeated:
        return PassResult(graph, changed=False, stats={"layers_rewritten": 0})
    try:
        layers = _layers(graph)
    except _Unsupported as exc:
        if opts.kv_heads is not None:
            raise
        # Only the exact dedupe was asked for, and it is on by default: a model it cannot read keeps its heads.
        return PassResult(graph, changed=False, stats={"layers_rewritten": 0, "dedupe_skipped": str(exc)})
    if not layers:
        return PassResult(graph, changed=False, stats={"layers_rewritten": 0})
    pooled = {i: _pool_groups(layer, opts.kv_heads) for i, layer in enumerate(layers)}
    factor = _repeat_factor(layers, pooled, graph.param_map) if opts.dedupe_repeated else 1
    # Identical heads in blocks of `factor`: keep the first of each block (copied, not averaged).
    final = {i: groups[::factor] for i, groups in pooled.items()}

    before = [layer.kv_heads for layer in layers]
    after = [len(final[i]) for i in range(len(layers))]
    stats: dict[str, Any] = {
        "layers_rewritten": sum(a != b for a, b in zip(after, before)),
        "pooled_layers": sum(len(g) != layer.kv_heads for layer, g in zip(layers, pooled.values())),
        "deduped_layers": len(layers) if factor > 1 else 0,
        "repeat_factor": factor,
        "kv_heads_before": _uniform(before), "kv_heads_after": _uniform(after),
        "kv_bytes_per_token_before": _kv_bytes(graph, layers, before),
        "kv_bytes_per_token_after": _kv_bytes(graph, layers, after),
    }
    if stats["layers_rewritten"] == 0:
        return PassResult(graph, changed=False, stats=stats)

    # One new weight (and bias) per projection: a fused qkv carries its K and V plans together.
    by_linear: dict[str, list[tuple[_Branch, Groups]]] = {}
    for i, layer in enumerate(layers):
        if len(final[i]) != layer.kv_heads:
            for branch in (layer.k, layer.v):
                by_linear.setdefault(branch.linear.ref, []).append((branch, final[i]))
    producers = {n.ref: n for n in graph.nodes}
    old_params = graph.param_map
    edits: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}
    new_params: list[Param] = []
    taken = set(old_params)
    for ref, plans in by_linear.items():
        linear = producers[ref]
        segments = _segments(linear, plans)
        inputs = [linear.inputs[0]]
        for old_ref in linear.inputs[1:]:
            old = old_params[old_ref[1:]]
            stem, dot, kind = old.name.rpartition(".")
            name = f"{stem}.gqa.{kind}" if dot else f"{old.name}.gqa"
            while name in taken:
                name = name.replace(".gqa", ".gqa.gqa", 1)
            taken.add(name)
            shape = (_rows(segments), *old.type.shape[1:])
            new_params.append(derived_param(name, shape, old.type.dtype,
                                            lambda old=old, segments=segments: _pool_rows(old.load(), segments)))
            inputs.append("@" + name)
        edits[ref] = (tuple(inputs), linear.attr_dict)
        # Every slice of a fused projection moves to its rows' new place.
        for node in graph.nodes:
            if node.op.name == "slice" and node.inputs[0] == ref:
                attrs = {**node.attr_dict, "start": _new_offset(segments, node.attr("start")),
                         "stop": _new_offset(segments, node.attr("stop"))}
                edits[node.ref] = (node.inputs, attrs)
    for i, layer in enumerate(layers):
        if len(final[i]) != layer.kv_heads:
            edits[layer.attention.ref] = (layer.attention.inputs,
                                          {**layer.attention.attr_dict, "num_kv_heads": len(final[i])})

    meta = dict(graph.meta)
    if "kv_layers" in meta:  # recorded by attention_lowering: the runtime sizes its pages from it
        meta["kv_layers"] = {**meta["kv_layers"], **{
            str(layer.attention.attr("layer")): [len(final[i]), layer.k.head_dim, layer.v.head_dim]
            for i, layer in enumerate(layers)}}
    result = replace_nodes(graph, _retype(graph, edits, new_params), new_params, meta=meta)
    return PassResult(result, changed=True, stats=stats)

