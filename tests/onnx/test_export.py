"""ONNX export: the graph after the cpu pipeline runs in onnxruntime and matches the reference
interpreter (float32 and int4 MatMulNBits), with explicit past/present KV; checker, opset, external
data and the error for an op without an ONNX form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from llmc.codegen.onnx_export import build_onnx_model, export_onnx, to_tensor_proto
from llmc.codegen.onnx_ops import matmulnbits_storage
from llmc.errors import LlmcError
from llmc.ir import GraphBuilder, Param, TensorType
from llmc.runtime import quant

from onnx_helpers import DECODE_STEPS, PROMPT, decode_side_by_side, max_diff, session

FP32_ATOL = 1e-4  # both sides compute in float32; only summation order differs
INT4_ATOL = 1e-3  # MatMulNBits dequantizes blocks itself; the same grid, another accumulation order


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_onnxruntime_matches_interpreter_prefill_and_decode(arch, exported):
    path, graph = exported(arch)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" in ops and ("RotaryEmbedding" in ops) == (arch != "gpt2")
    assert ("RMSNormalization" if arch != "gpt2" else "LayerNormalization") in ops
    layers = graph.meta["layers"]
    assert [i.name for i in model.graph.input][2:] == [f"past_key_values.{l}.{kv}" for l in range(layers)
                                                       for kv in ("key", "value")]
    pairs = decode_side_by_side(path, graph)
    assert len(pairs) == DECODE_STEPS + 1 and pairs[0][0].shape == (len(PROMPT), 128)
    assert max_diff(pairs) <= FP32_ATOL, f"{arch}: max abs logit diff {max_diff(pairs):.3g}"


def test_int4_export_uses_matmulnbits_and_matches_llmc_int4(exported):
    path, graph = exported("llama", "quantize.scheme=int4", "quantize.group_size=32")
    model = onnx.load(str(path))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == sum(n.op.name == "linear_int4" for n in graph.nodes) == 8  # 2 layers x (qkv, o, gate_up, down)
    assert all(n.domain == "com.microsoft" for n in nbits)
    pairs = decode_side_by_side(path, graph)
    assert max_diff(pairs) <= INT4_ATOL, f"max abs logit diff {max_diff(pairs):.3g}"


def test_bf16_export_matches_llmc_bf16(exported):
    """linear_bf16 exports as Casts around a float32 Gemm: the same roundings as the reference."""
    path, graph = exported("llama", "quantize.scheme=bf16")
    model = onnx.load(str(path))
    assert sum(n.op.name == "linear_bf16" for n in graph.nodes) == 8
    assert sum(n.op_type == "Gemm" for n in model.graph.node) >= 8
    pairs = decode_side_by_side(path, graph)
    assert max_diff(pairs) <= INT4_ATOL, f"max abs logit diff {max_diff(pairs):.3g}"


@pytest.mark.parametrize("out_features,in_features,group", [(5, 96, 32), (8, 64, 16), (3, 128, 128)])
def test_matmulnbits_repacking_matches_linear_int4(out_features, in_features, group, tmp_path):
    """Odd block counts pad the packed zero points; llmc's nibble order must survive repacking."""
    gen = torch.Generator().manual_seed(out_features)
    q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scales = torch.rand(out_features, in_features // group, generator=gen) + 0.01
    zeros = torch.randint(0, 16, scales.shape, generator=gen, dtype=torch.uint8)
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(7, in_features, generator=gen)
    b, s, z = matmulnbits_storage(quant.pack_int4(q), scales, zeros, group)
    h = onnx.helper
    node = h.make_node("MatMulNBits", ["x", "b", "s", "z", "", "bias"], ["y"], domain="com.microsoft",
                       K=in_features, N=out_features, bits=4, block_size=group)
    graph = h.make_graph([node], "nbits", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", in_features])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", out_features])],
                         initializer=[to_tensor_proto(n, t) for n, t in zip(("b", "s", "z", "bias"), (b, s, z, bias))])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    (path := tmp_path / "nbits.onnx").write_bytes(model.SerializeToString())
    got = session(path).run(None, {"x": x.numpy()})[0]
    want = quant.linear_int4(x, quant.pack_int4(q), scales, zeros, bias, group_size=group)
    assert np.abs(got - want.numpy()).max() <= 1e-4


def test_large_weights_go_to_external_data(exported, tmp_path):
    _, graph = exported("llama")
    path = export_onnx(graph, tmp_path / "ext.onnx", external_data_threshold=4096)
    data = tmp_path / "ext.onnx.data"
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert data.is_file() and "model.embed_tokens.weight" in external
    assert path.stat().st_size < data.stat().st_size
    pairs = decode_side_by_side(path, graph, steps=1)
    assert max_diff(pairs) <= FP32_ATOL


def test_op_without_onnx_form_names_the_node():
    b = GraphBuilder()
    ids = b.input("input_ids", TensorType(("T",), "int64"))
    emb = b.param(Param("embed", TensorType((16, 8), "float32"), loader=lambda: torch.randn(16, 8)))
    x = b.add("embedding", [ids, emb], meta={"module": "model.embed"})
    ref = b.add("linear_w8a8", [x, b.param(Param("q", TensorType((4, 8), "int8"), loader=lambda: torch.ones(4, 8,
                                                                                                         dtype=torch.int8))),
                                b.param(Param("s", TensorType((4,), "float32"), loader=lambda: torch.ones(4))),
                                b.param(Param("m", TensorType((8,), "float32"), loader=lambda: torch.ones(8)))],
                meta={"module": "model.layers.0.mlp.down_proj"})
    b.output("logits", ref)
    with pytest.raises(LlmcError, match=r"node %1 \(linear_w8a8 at model\.layers\.0\.mlp\.down_proj\) has no ONNX "
                                        r"form.*codegen/onnx_export\.py"):
        build_onnx_model(b.build())
