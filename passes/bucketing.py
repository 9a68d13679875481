"""Record the target's static step shapes (token and batch buckets) for the runtime to pad steps to."""

from __future__ import annotations

from pydantic import Field

from llmc.ir import Graph
from llmc.pipeline import PassContext, PassOptions, PassResult, register_pass


class BucketingOptions(PassOptions):
    enabled: bool = Field(False, description="Pad every step to a bucket at run time (static shapes for "
                                             "CUDA graphs and specialized kernels; on CPU it only adds padding).")


@register_pass("bucketing", BucketingOptions)
def bucketing(graph: Graph, ctx: PassContext) -> PassResult:
    """Record the target's static step shapes (token and batch buckets) for the runtime to pad steps to.

    The graph's ops are shape-polymorphic in ``T``, so nothing in the IR changes: the package's
    plan.json gets ``buckets`` = {enabled, token: runtime.token_buckets, batch: runtime.batch_buckets},
    and the runtime (``runtime/bucketing.py``) pads each decode-only step of B sequences to the
    smallest batch bucket >= B and any other step of T tokens to the smallest token bucket >= T. The
    target validates that the largest buckets cover max_num_seqs and max_num_batched_tokens, so
    every step the scheduler forms has a bucket. Stats: the bucket counts and whether it is on.
    """
    rt = ctx.target.runtime
    buckets = {"enabled": ctx.options.enabled, "token": list(rt.token_buckets), "batch": list(rt.batch_buckets)}
    meta = {**graph.meta, "buckets": buckets}
    return PassResult(Graph(graph.inputs, graph.params, graph.nodes, graph.outputs, meta),
                      changed=False, stats={"enabled": ctx.options.enabled, "token_buckets": len(rt.token_buckets),
                                            "batch_buckets": len(rt.batch_buckets)})
