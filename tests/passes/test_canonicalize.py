"""canonicalize: exact rewrites on hand-built graphs, then three ways on the tiny Gemma 2 (the one
architecture with `scale` nodes): logits vs the reference interpreter, match counts, ops before/after.

Tolerance: the redundant nodes added to Gemma 2 multiply by powers of two and cast to the same
dtype, so every graph computes bit-identical float32 logits; 1e-6 leaves room for nothing else.
"""

from __future__ import annotations

import pytest
import torch

from llmc.errors import TargetError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import Graph, GraphBuilder, Interpreter, Param, T, TensorType, format_graph
from llmc.pipeline import PASSES, PassContext, run_pipeline, validate_pipeline
from llmc.target import load_target
from package_helpers import target_with

ATOL = 1e-6




def canonicalize(graph: Graph, **options):
    info = PASSES["canonicalize"]
    return info.fn(graph, PassContext(target=None, options=info.options(**options)))


def param(name: str, shape=(4, 4)) -> Param:
    return Param(name, TensorType(shape, "float32"), loader=lambda: torch.randn(shape))


# ---- exact rewrites on hand-built graphs -------------------------------------------------------

def junk_graph() -> Graph:
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 4), "float32"))
    h = b.add("linear", [x, b.param(param("w"))])                   # %0
    b.add("relu", [b.add("linear", [h, b.param(param("dead_w"))])])  # %1, %2: nothing reads them
    s = b.add("scale", [b.add("scale", [h], factor=2.0)], factor=0.25)  # %3, %4
    c = b.add("cast", [s], dtype="float32")                          # %5: to its own dtype
    one = b.add("scale", [c], factor=1.0)                            # %6: times one
    b.output("logits", b.add("add", [one, h]))                       # %7
    return b.build()


def test_folds_scales_drops_identities_and_dead_nodes_keeping_names():
    result = canonicalize(junk_graph())
    assert result.changed
    assert result.stats == {"dead": 3, "identity": 2, "folded": 1}   # dead: %1, %2 and the folded-away %3
    assert format_graph(result.graph).splitlines() == [
        "graph(%x: float32[T, 4]) {",
        "  @w: float32[4, 4]",
        "  %0: float32[T, 4] = linear(%x, @w)",
        "  %4: float32[T, 4] = scale(%0) {factor=0.5}",
        "  %7: float32[T, 4] = add(%4, %0)",
        "  return logits=%7",
        "}",
    ]


def test_fold_scales_false_leaves_scale_chains_alone():
    result = canonicalize(junk_graph(), fold_scales=False)
    assert result.stats == {"dead": 2, "identity": 2, "folded": 0}
    assert [(n.name, n.op.name) for n in result.graph.nodes] == [
        ("0", "linear"), ("3", "scale"), ("4", "scale"), ("7", "add")]


def test_a_chain_that_folds_to_one_disappears_and_a_shared_scale_stays():
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 4), "float32"))
    twice = b.add("scale", [x], factor=2.0)
    b.output("halved", b.add("scale", [twice], factor=0.5))   # x * 2 * 0.5 -> x
    b.output("doubled", twice)                                # keeps the inner scale alive
    result = canonicalize(b.build())
    assert result.stats == {"dead": 0, "identity": 1, "folded": 1}
    assert result.graph.outputs == (("halved", "%x"), ("doubled", "%0"))
    assert [n.ref for n in result.graph.nodes] == ["%0"]


def test_kv_cache_writes_are_kept_even_when_their_output_is_unused():
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 32), "float32"))
    pos = b.input("positions", TensorType((T,), "int64"))
    b.add("attention", [x, x, x, pos], num_heads=2, num_kv_heads=2, head_dim=16, scale=0.25)
    b.output("logits", b.add("relu", [x]))
    result = canonicalize(b.build())
    assert result.graph.op_counts() == {"attention": 1, "relu": 1} and not result.changed


def test_an_already_canonical_graph_comes_back_unchanged():
    graph = canonicalize(junk_graph()).graph
    again = canonicalize(graph)
    assert not again.changed and again.stats == {"dead": 0, "identity": 0, "folded": 0}
    assert again.graph == graph


def test_options_are_validated(tmp_path):
    target, source = target_with(tmp_path, [{"pass": "canonicalize", "options": {"fold_scales": 1}}])
    with pytest.raises(TargetError, match=r"pipeline\[0\]\.options\.fold_scales"):
        validate_pipeline(target, source)


# ---- three ways on the tiny Gemma 2 ------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return load_hf(save_tiny_model("gemma2", tmp_path_factory.mktemp("gemma2"))).graph


def with_redundancy(graph: Graph) -> Graph:
    """``graph`` plus what canonicalize must remove: every scale followed by x0.5 then x2, a cast to
    the same dtype after every rms_norm, and a dead relu on every linear."""
    b = GraphBuilder()
    refs = {"%" + name: b.input(name, t) for name, t in graph.inputs}
    refs.update({"@" + p.name: b.param(p) for p in graph.params})
    for node in graph.nodes:
        ref = b.add(node.op, [refs[r] for r in node.inputs], meta=node.meta, **node.attr_dict)
        if node.op.name == "scale":
            ref = b.add("scale", [b.add("scale", [ref], factor=0.5)], factor=2.0)
        elif node.op.name == "rms_norm":
            ref = b.add("cast", [ref], dtype=node.type.dtype)
        elif node.op.name == "linear":
            b.add("relu", [ref])
        refs[node.ref] = ref
    for name, ref in graph.outputs:
        b.output(name, refs[ref])
    return b.build(graph.meta)


def prefill_logits(graph: Graph, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = torch.tensor([5, 17, 3, 99, 42, 8, 8, 61, 0, 127, 33, 2])   # longer than the sliding window (8)
    return Interpreter(graph, weights).run({"input_ids": ids, "positions": torch.arange(len(ids))})["logits"]


def test_gemma2_three_ways(gemma2, tmp_path):
    target, source = target_with(tmp_path, [{"pass": "canonicalize"}])
    noisy = with_redundancy(gemma2)
    report = run_pipeline(noisy, target, source=source)
    clean = report.graph
    scales, norms, linears = (gemma2.op_counts()[op] for op in ("scale", "rms_norm", "linear"))
    assert (scales, norms, linears) == (3, 9, 15)

    # match counts: two folds and two orphans per scale, one identity cast per norm, one dead relu per linear
    [record] = report.records
    assert record.stats == {"folded": 2 * scales, "identity": norms, "dead": 2 * scales + linears}
    assert record.nodes_before - record.nodes_after == record.stats["identity"] + record.stats["dead"]

    # ops before/after: the noise is gone, and exactly the frontend's graph is left
    assert noisy.op_counts() - gemma2.op_counts() == {"scale": 2 * scales, "cast": norms, "relu": linears}
    assert clean.op_counts() == gemma2.op_counts()
    assert [(n.op.name, n.attrs) for n in clean.nodes] == [(n.op.name, n.attrs) for n in gemma2.nodes]
    assert {n.name for n in clean.nodes} <= {n.name for n in noisy.nodes}   # names kept, not renumbered

    # numbers: the reference interpreter gives the same logits before and after
    weights = {p.name: p.load() for p in gemma2.params}
    expected = prefill_logits(gemma2, weights)
    torch.testing.assert_close(prefill_logits(noisy, weights), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(prefill_logits(clean, weights), expected, atol=ATOL, rtol=0)


def test_the_frontend_output_is_already_canonical(gemma2):
    result = canonicalize(gemma2)
    assert not result.changed and result.graph == gemma2
