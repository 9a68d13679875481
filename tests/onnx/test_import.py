"""ONNX import: llmc's own export raises back to a graph whose outputs equal the original's, an
exported .onnx compiles into a package that generates what the checkpoint's package generates, and
an unknown pattern stops the import with the node, its op type, its module and a hint."""

from __future__ import annotations

import shutil
from collections import Counter

import onnx
import pytest
import torch
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler import compile_model
from llmc.errors import UnsupportedModelError
from llmc.frontend.onnx_import import load_onnx
from llmc.ir.interpreter import ExecutionContext, Interpreter
from llmc.runtime.engine import LLMEngine
from package_helpers import lowered

from onnx_helpers import PROMPT


def _aligned(param):
    # Weights read from safetensors can sit at any offset of the mmap; a copy puts both graphs'
    # weights in freshly allocated memory, so their kernels take the same (vectorized) paths.
    return param.load().clone()


@pytest.mark.parametrize("arch,overrides", [("llama", ()), ("qwen2", ()), ("gpt2", ()),
                                            ("llama", ("quantize.scheme=int4", "quantize.group_size=32"))])
def test_round_trip_outputs_equal_the_original(arch, overrides, exported):
    path, original = exported(arch, *overrides)
    imported = load_onnx(path)
    assert imported.config.model_type == original.meta["model_type"]
    # The ONNX form has explicit KV; lowering it again gives the paged form the original has.
    graph = lowered(imported.graph)
    # Op for op the same graph (fused ops and rope folded into attention recognized), but for select_rows:
    # one sequence per ONNX run samples every row, so it exports as Identity and compiling adds it back.
    assert graph.op_counts() + Counter(select_rows=1) == original.op_counts()
    originals = {p.name: p for p in original.params}
    for p in graph.params:  # same names, same bytes (int4 storage unpacked from MatMulNBits' layout)
        assert p.type == originals[p.name].type and torch.equal(p.load(), originals[p.name].load()), p.name
    runs = [(Interpreter(g, load=_aligned), ExecutionContext.for_graph(g)) for g in (original, graph)]
    ids, start = list(PROMPT), 0
    for _ in range(5):
        feed = {"input_ids": torch.tensor(ids), "positions": torch.arange(start, start + len(ids))}
        want, got = (interp.run(dict(feed), ctx)["logits"] for interp, ctx in runs)
        assert torch.equal(got, want), f"{arch}{overrides}: max diff {float((got - want).abs().max()):.3g}"
        start, ids = start + len(ids), [int(want[-1].argmax())]


def test_compiled_onnx_generates_what_the_checkpoint_package_generates(tmp_path, llama_dir, tiny_llama_cpu_package):
    runner = CliRunner()
    onnx_path = tmp_path / "onnx" / "model.onnx"
    result = runner.invoke(app, ["export-onnx", str(llama_dir), "-o", str(onnx_path), "--target", "cpu"])
    assert result.exit_code == 0, result.output
    assert {"config.json", "tokenizer.json"} <= {f.name for f in onnx_path.parent.iterdir()}
    compile_model(onnx_path, "cpu", tmp_path / "pkg", quality_tokens=0)
    assert (tmp_path / "pkg" / "tokenizer.json").is_file()  # read from beside the .onnx file
    prompts = [PROMPT, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    from_onnx, from_checkpoint = LLMEngine.from_package(tmp_path / "pkg"), LLMEngine.from_package(tiny_llama_cpu_package)
    for prompt in prompts:
        want = from_checkpoint.generate(prompt, max_tokens=12, temperature=0)
        assert from_onnx.generate(prompt, max_tokens=12, temperature=0) == want and len(want) == 12


def test_config_comes_from_metadata_without_config_json(exported, tmp_path):
    path, original = exported("gpt2")
    shutil.copyfile(path, tmp_path / "alone.onnx")
    imported = load_onnx(tmp_path / "alone.onnx")
    assert imported.config.model_type == "gpt2" and imported.architecture == "GPT2LMHeadModel"
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save_model(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(Exception, match=r"bare\.onnx: no config\.json beside the ONNX file and no llmc\.config"):
        load_onnx(tmp_path / "bare.onnx")


def test_unknown_pattern_names_the_onnx_node_module_and_hint(exported, tmp_path):
    path, _ = exported("llama")
    model = onnx.load(str(path))
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    sigmoid.op_type = "Softplus"  # silu -> x * softplus(x): no such idiom in llmc IR
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    shutil.copyfile(path.parent / "config.json", tmp_path / "config.json")
    with pytest.raises(UnsupportedModelError) as err:
        load_onnx(tmp_path / "model.onnx")
    message = str(err.value)
    assert f"cannot raise ONNX node '{sigmoid.name}' (from module 'model.layers.0.mlp')" in message
    assert "no pattern matches Softplus(" in message and "=activation[T,F])" in message
    assert "Softplus x1" in message and "llmc/frontend/onnx_patterns.py" in message
