"""The exact JSON form of the IR (llmc/ir/serialize.py): a graph after the cpu pipeline (fused) and
an int4-quantized one read back equal and compute the same logits;
tagged values, transforms, and the errors for an unknown op, a bad version and a malformed file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmc.errors import IRError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import GraphBuilder, Param, TensorType
from llmc.ir.interpreter import ExecutionContext, Interpreter
from llmc.ir.serialize import decode_value, dumps, encode_value, graph_from_json, graph_to_json, load_ir_file
from llmc.pipeline import run_pipeline
from llmc.target import load_target

VARIANTS = {
    "fused": (),
    "int4": ("quantize.scheme=int4", "quantize.group_size=32"),
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return load_hf(save_tiny_model("llama", tmp_path_factory.mktemp("ser") / "llama")).graph


def compiled(graph, overrides):
    return run_pipeline(graph, load_target("cpu", overrides)).graph


def round_trip(graph):
    """Through the text a package stores, with params served as the package's weights file holds them."""
    stored = {p.name: p.load() for p in graph.params}
    return graph_from_json(json.loads(dumps(graph)), stored.__getitem__, origin="test ir.json")


def logits(graph, ids=(5, 17, 42, 9)):
    return Interpreter(graph).run({"input_ids": torch.tensor(ids), "positions": torch.arange(len(ids))},
                                  ExecutionContext.for_graph(graph))["logits"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_graph_round_trips_exactly(variant, imported):
    graph = compiled(imported, VARIANTS[variant])
    ops = graph.op_counts()
    expected_op = {"fused": "add_rms_norm", "int4": "linear_int4"}[variant]
    assert ops[expected_op] > 0, ops
    back = round_trip(graph)
    assert back == graph
    assert dict(back.meta) == dict(graph.meta)
    assert [dict(n.meta) for n in back.nodes] == [dict(n.meta) for n in graph.nodes]
    assert [n.attrs for n in back.nodes] == [n.attrs for n in graph.nodes]  # exact floats, tuples kept
    assert torch.equal(logits(back), logits(graph))


def test_values_are_tagged_where_json_is_not_exact():
    value = {"t": (1, 0.1, (2.5e-7,)), "l": [1, None, True], "inf": -math.inf, "by_int": {16: 1, 32: 2},
             "$odd": "x", "third": 1 / 3}
    back = decode_value(json.loads(json.dumps(encode_value(value), allow_nan=False)))
    assert back == value and isinstance(back["t"][2], tuple) and back["by_int"] == {16: 1, 32: 2}
    assert math.isnan(decode_value(json.loads(json.dumps(encode_value(math.nan)))))


def test_transposed_params_load_the_same_tensor_again():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "float32"))
    stored_as = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # a Conv1D-style [in, out] checkpoint tensor
    w = b.param(Param("w", TensorType((3, 4), "float32"), transform=("transpose",), loader=lambda: stored_as))
    b.output("y", b.add("linear", [x, w]))
    graph = b.build({"model_type": "toy"})
    back = round_trip(graph)
    assert back == graph and back.params[0].transform == ("transpose",)
    assert torch.equal(back.params[0].load(), graph.params[0].load())


def test_unknown_op_bad_version_and_malformed_files_name_the_file(imported, tmp_path):
    data = graph_to_json(imported)
    data["nodes"][0]["op"] = "warp_drive"
    with pytest.raises(IRError, match=r"pkg/ir\.json: node %\S+: unknown op 'warp_drive'"):
        graph_from_json(data, lambda name: None, origin="pkg/ir.json")
    with pytest.raises(IRError, match=r"pkg/ir\.json: IR format version 99"):
        graph_from_json({**graph_to_json(imported), "version": 99}, lambda name: None, origin="pkg/ir.json")
    broken = graph_to_json(imported)
    del broken["nodes"][1]["type"]
    with pytest.raises(IRError, match=r"pkg/ir\.json: malformed IR JSON \(KeyError"):
        graph_from_json(broken, lambda name: None, origin="pkg/ir.json")
    (tmp_path / "ir.json").write_text(dumps(imported))
    graph = load_ir_file(tmp_path / "ir.json", tmp_path / "missing.safetensors")
    with pytest.raises(IRError, match=r"missing\.safetensors: weights file not found"):
        graph.params[0].load()
