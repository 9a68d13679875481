"""memory_plan: liveness-based activation reuse on a 4-layer tiny Llama (peak with reuse against the
no-reuse sum, and the arena never overlaps two live values), and the "cannot fit" error of a
70B-shaped bfloat16 graph (params only as shapes: nothing is allocated) against l4.yaml."""

from __future__ import annotations

import pytest

from llmc.errors import PipelineError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import GraphBuilder, Param, T, TensorType
from llmc.pipeline import PASSES, PassContext, run_pipeline
from llmc.target import load_target
from package_helpers import target_with  # noqa: F401  (shared helpers; keeps conftest's path setup)

from llmc.passes.memory_plan import assign_offsets, buffers


@pytest.fixture(scope="module")
def four_layer_graph(tmp_path_factory):
    model = save_tiny_model("llama", tmp_path_factory.mktemp("llama4"), num_hidden_layers=4)
    return run_pipeline(load_hf(model).graph, load_target("cpu", ["memory_plan.check_fit=true"])).graph


def test_reuse_halves_peak_activation_bytes(four_layer_graph):
    plan = four_layer_graph.meta["memory_plan"]
    for bucket, peak in plan["peak_activation_bytes"].items():
        no_reuse = plan["no_reuse_activation_bytes"][bucket]
        print(f"tokens {bucket}: peak with reuse {peak} B, without {no_reuse} B ({peak / no_reuse:.1%})")
        assert peak < 0.5 * no_reuse
    assert plan["kv_cache_bytes_max"] > 0 and plan["weight_bytes"] == four_layer_graph.param_bytes()


def test_live_values_never_share_bytes(four_layer_graph):
    items = buffers(four_layer_graph, 64, 8)
    offsets, arena = assign_offsets(items)
    assert arena == max(offsets[b.value] + b.size for b in items)
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if a.start <= b.end and b.start <= a.end:  # live at the same time
                assert (offsets[a.value] + a.size <= offsets[b.value]
                        or offsets[b.value] + b.size <= offsets[a.value]), (a, b)
    # the largest value live at any node is a lower bound no arena can beat
    assert arena >= max(sum(b.size for b in items if b.start <= i <= b.end)
                        for i in range(len(four_layer_graph.nodes)))


def llama_shaped_graph(layers, vocab, hidden, inter, heads, kv_heads, dtype="bfloat16"):
    """A Llama decoder as IR with params that are only shapes (no loaders: nothing is allocated)."""
    d = hidden // heads
    b = GraphBuilder()
    p = lambda name, *shape: b.param(Param(name, TensorType(shape, dtype)))  # noqa: E731
    ids, pos = b.input("input_ids", TensorType((T,), "int64")), b.input("positions", TensorType((T,), "int64"))
    inv_freq = b.param(Param("inv_freq", TensorType((d // 2,), "float32")))
    x = b.add("embedding", [ids, p("embed", vocab, hidden)])
    for i in range(layers):
        h = b.add("rms_norm", [x, p(f"l{i}.ln1", hidden)])
        qkv = b.add("linear", [h, p(f"l{i}.qkv", (heads + 2 * kv_heads) * d, hidden)])
        q = b.add("slice", [qkv], start=0, stop=heads * d)
        k = b.add("slice", [qkv], start=heads * d, stop=(heads + kv_heads) * d)
        v = b.add("slice", [qkv], start=(heads + kv_heads) * d, stop=(heads + 2 * kv_heads) * d)
        a = b.add("paged_attention", [q, k, v, pos, inv_freq], layer=i, num_heads=heads, num_kv_heads=kv_heads,
                  head_dim=d, scale=d ** -0.5, rope_dim=d)
        x = b.add("add", [x, b.add("linear", [a, p(f"l{i}.o", hidden, heads * d)])])
        h = b.add("rms_norm", [x, p(f"l{i}.ln2", hidden)])
        gu = b.add("act_mul_packed", [b.add("linear", [h, p(f"l{i}.gate_up", 2 * inter, hidden)])])
        x = b.add("add", [x, b.add("linear", [gu, p(f"l{i}.down", hidden, inter)])])
    rows = b.add("select_rows", [b.add("rms_norm", [x, p("norm", hidden)])])
    b.output("logits", b.add("linear", [rows, p("lm_head", vocab, hidden)]))
    return b.build()


def run_memory_plan(graph, target):
    info = PASSES["memory_plan"]
    return info.fn(graph, PassContext(target, info.options()))


def test_70b_bfloat16_cannot_fit_one_l4():
    graph = llama_shaped_graph(80, 128256, 8192, 28672, 64, 8)
    assert graph.param_bytes() > 130 * 2**30
    with pytest.raises(PipelineError) as err:
        run_memory_plan(graph, load_target("l4"))
    message = str(err.value)
    print(message)
    assert "cannot fit target 'l4'" in message and "shard.tp=8" in message and "quantize.scheme=int4" in message


def test_small_model_fits_l4_and_reports_kv_room():
    graph = llama_shaped_graph(2, 1000, 256, 512, 4, 2)
    plan = run_memory_plan(graph, load_target("l4")).graph.meta["memory_plan"]
    target = load_target("l4")
    expected = int(target.memory_bytes * 0.9) - graph.param_bytes() - plan["peak_activation_bytes"][8192]
    assert plan["kv_cache_bytes_max"] == expected


def test_the_runtime_kv_cache_fits_the_planned_room(tmp_path):
    """The engine sizes its KV pages from the target's budget capped by the memory plan's room
    (device memory - weights - peak activations - margin); an explicit kv_cache_bytes wins."""
    import json

    from llmc.compiler import compile_model
    from llmc.examples_tiny import save_tiny_model
    from llmc.runtime.llm import LLM

    model = save_tiny_model("llama", tmp_path / "model")
    # 64 MiB of "device memory": far below the cpu target's KV budget, far above the tiny model.
    out = compile_model(model, "cpu", tmp_path / "pkg", overrides=["memory_bytes=67108864"], quality_tokens=0).out_dir
    plan = json.loads((out / "plan.json").read_text())
    room = plan["memory_plan"]["kv_cache_bytes_max"]
    target_budget = plan["target"]["runtime"]["kv_cache_bytes"]
    assert 0 < room < target_budget
    assert room - LLM(out).engine.kv_cache_bytes < LLM(out).engine.blocks.block_size * 4096  # < one page
    assert LLM(out, kv_cache_bytes=1 << 20).engine.kv_cache_bytes <= 1 << 20
