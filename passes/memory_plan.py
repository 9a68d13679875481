"""Plan activation memory by liveness, size the KV cache from what is left, fail early if nothing fits.

For each token bucket of the target (``runtime.token_buckets``; symbolic ``T`` bound to the bucket,
``S`` — the sampled rows — to ``min(bucket, max_num_seqs)``) every activation value gets an offset
in one arena: values whose live ranges overlap never share bytes (greedy by size, the interval
colouring TFLite's arena planner uses). ``slice`` results are views and ``all_reduce`` / ``pp_send``
return their input, so they extend their source's lifetime instead of taking new bytes. On the
torch backend attention materializes float32 scores ``[heads, T, T]`` for the span of its node,
so they are planned too; the triton backend's attention kernels stream them (flash style). The arena's size is the step's peak
activation bytes; the sum of all value sizes is what no reuse would cost.

The KV cache gets what remains of the device: ``memory_bytes`` minus the weights (per rank after
the shard pass) minus the peak activations minus ``safety_margin`` of the memory. When that leaves
less than the KV of one full step (``max_num_batched_tokens`` tokens) the compile stops here, before
any weight is written, with the numbers and what would make it fit (tp/pp, quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import Field

from llmc.errors import PipelineError
from llmc.ir import Graph, TensorType
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass

ALIAS_OPS = ("slice", "all_reduce", "pp_send")  # results that are their input's storage (view / in place)
GIB = 2**30


class MemoryPlanOptions(PassOptions):
    safety_margin: float = Field(0.1, ge=0, lt=1, description="Fraction of device memory kept free "
                                                              "(allocator fragmentation, CUDA context).")
    check_fit: bool = Field(True, description="Fail the compile when the model cannot fit the target.")


@dataclass(frozen=True)
class Buffer:
    value: str
    size: int
    start: int   # index of the node defining it
    end: int     # index of its last use (len(nodes) for graph outputs)


def _bytes(t: TensorType, tokens: int, rows: int) -> int:
    numel = 1
    for dim in t.shape:
        numel *= tokens if dim == "T" else rows if dim == "S" else dim if isinstance(dim, int) else tokens
    return numel * t.torch_dtype.itemsize


def buffers(graph: Graph, tokens: int, rows: int, scores: bool = True) -> list[Buffer]:
    """Every activation the step allocates, with its live range, for ``tokens`` tokens."""
    root = {}  # alias value -> the value owning its storage
    end: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        if node.op.name in ALIAS_OPS and node.inputs[0].startswith("%") and node.inputs[0] in root:
            root[node.ref] = root[node.inputs[0]]
        else:
            root[node.ref] = node.ref
        for ref in node.inputs:
            if ref in root:
                end[root[ref]] = i
    for _, ref in graph.outputs:
        if ref in root:
            end[root[ref]] = len(graph.nodes)
    out = []
    for i, node in enumerate(graph.nodes):
        if root[node.ref] == node.ref:
            out.append(Buffer(node.ref, _bytes(node.type, tokens, rows), i, end.get(node.ref, i)))
        if scores and node.op.name == "paged_attention":  # float32 scores [heads, T, T] while the node runs
            out.append(Buffer(node.ref + ":scores", node.attr("num_heads") * tokens * tokens * 4, i, i))
    return out


def assign_offsets(items: list[Buffer]) -> tuple[dict[str, int], int]:
    """Greedy by size: each buffer goes at the lowest offset that overlaps no buffer live at the same
    time. Returns (value -> offset, arena bytes)."""
    placed: list[tuple[int, Buffer]] = []
    offsets: dict[str, int] = {}
    for buf in sorted(items, key=lambda b: (-b.size, b.start)):
        clashes = sorted(((off, other) for off, other in placed
                          if other.start <= buf.end and buf.start <= other.end), key=lambda c: c[0])
        offset = 0
        for off, other in clashes:
            if offset + buf.size <= off:
                break
            offset = max(offset, off + other.size)
        placed.append((offset, buf))
        offsets[buf.value] = offset
    return offsets, max((off + b.size for off, b in placed), default=0)


def kv_bytes_per_token(graph: Graph) -> int:
    """KV bytes one token costs on this rank, over all its paged attention layers."""
    total = 0
    for node in graph.nodes:
        if node.op.name == "paged_attention":
            kvh, d = node.attr("num_kv_heads"), node.attr("head_dim")
            v_features = graph.type_of(node.inputs[2]).shape[1]
            itemsize = 1 if node.attr("kv_dtype") else graph.type_of(node.inputs[1]).torch_dtype.itemsize
            total += (kvh * d + v_features) * itemsize
    return total


def plan_rank(graph: Graph, token_buckets: list[int], max_num_seqs: int, scores: bool) -> dict:
    peak, no_reuse, offsets = {}, {}, {}
    for tokens in token_buckets:
        items = buffers(graph, tokens, min(tokens, max_num_seqs), scores)
        offsets, peak[tokens] = assign_offsets(items)
        no_reuse[tokens] = sum(b.size for b in items)
    return {"peak_activation_bytes": peak, "no_reuse_activation_bytes": no_reuse,
            "weight_bytes": graph.param_bytes(), "kv_bytes_per_token": kv_bytes_per_token(graph),
            "offsets": offsets}  # of the largest bucket: what a static allocator would use


def _cannot_fit(ctx: PassContext, need: int, weights: int, peak: int, kv_step: int, usable: int,
                ranks: int) -> str:
    t = ctx.target
    per_device = usable - peak - kv_step
    tp = 2 ** math.ceil(math.log2(max(2, weights * ranks / per_device))) if per_device > 0 else None
    suggest = (f"--set shard.tp={tp} (or shard.pp={tp}) to split the weights over {tp} devices" if tp
               else "more devices (shard.tp / shard.pp)")
    return (f"the model cannot fit target {t.name!r}: it needs {need / GIB:.1f} GiB per device — weights "
            f"{weights / GIB:.1f} GiB + peak activations {peak / GIB:.2f} GiB (largest token bucket) + the KV "
            f"of one {t.runtime.max_num_batched_tokens}-token step {kv_step / GIB:.2f} GiB — but memory_bytes "
            f"{t.memory_bytes / GIB:.1f} GiB less the {ctx.options.safety_margin:.0%} safety margin leaves "
            f"{usable / GIB:.1f} GiB. Try {suggest}, or --set quantize.scheme=int4 (about a quarter of "
            f"bfloat16's weight bytes), or a target with more memory")


@register_pass("memory_plan", MemoryPlanOptions)
def memory_plan(graph: Graph, ctx: PassContext) -> PassResult:
    """Plan activation memory by liveness, size the KV cache from what is left, fail early if nothing fits.

    Stats: peak activation bytes with reuse and without, per token bucket (the worst rank's after
    sharding), weight bytes per device, and the KV cache bytes left."""
    rt = ctx.target.runtime
    parallel = graph.meta.get("parallel")
    graphs = list(parallel["rank_graphs"]) if parallel else [graph]
    scores = ctx.target.backend == "torch"
    ranks = [plan_rank(g, rt.token_buckets, rt.max_num_seqs, scores) for g in graphs]
    worst = max(ranks, key=lambda r: (r["weight_bytes"], max(r["peak_activation_bytes"].values())))
    peak = {b: max(r["peak_activation_bytes"][b] for r in ranks) for b in rt.token_buckets}
    no_reuse = {b: max(r["no_reuse_activation_bytes"][b] for r in ranks) for b in rt.token_buckets}
    weights, top = worst["weight_bytes"], peak[rt.token_buckets[-1]]
    usable = int(ctx.target.memory_bytes * (1 - ctx.options.safety_margin))
    kv_step = max(r["kv_bytes_per_token"] for r in ranks) * rt.max_num_batched_tokens
    kv_free = usable - weights - top
    if ctx.options.check_fit and kv_free < kv_step:
        raise PipelineError(_cannot_fit(ctx, weights + top + kv_step, weights, top, kv_step, usable, len(graphs)))
    plan = {"peak_activation_bytes": peak, "no_reuse_activation_bytes": no_reuse, "weight_bytes": weights,
            "kv_bytes_per_token": max(r["kv_bytes_per_token"] for r in ranks), "kv_cache_bytes_max": max(kv_free, 0),
            "safety_margin": ctx.options.safety_margin, "offsets": worst["offsets"]}
    stats = {"peak_activation_bytes": {str(b): v for b, v in peak.items()},
             "no_reuse_activation_bytes": {str(b): v for b, v in no_reuse.items()},
             "weight_bytes": weights, "kv_cache_bytes_max": max(kv_free, 0)}
    meta = {**graph.meta, "memory_plan": plan}
    return PassResult(Graph(graph.inputs, graph.params, graph.nodes, graph.outputs, meta), changed=False, stats=stats)
