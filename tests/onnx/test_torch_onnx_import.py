"""ONNX import of graphs ``torch.onnx.export`` (dynamo) writes of an HF model: the raised graph's
logits match HF eager, a package compiled from the .onnx generates what the checkpoint's package
generates, and a graph with an unknown idiom stops with the node, its op type, module and a hint."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch

from llmc.compiler import compile_model
from llmc.errors import UnsupportedModelError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.onnx_import import load_onnx
from llmc.ir.interpreter import ExecutionContext, Interpreter
from llmc.runtime.llm import LLM
from llmc.runtime.sampler import SamplingParams

pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it

import transformers  # noqa: E402

FP32_ATOL = 1e-4
PROMPTS = [[5, 17, 42, 9, 77, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]


class LogitsOnly(torch.nn.Module):
    """input_ids [1, T] -> logits [1, T, V], no KV cache: the graph layout the ONNX frontend reads."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def torch_export(checkpoint: Path, out_dir: Path) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out_dir.mkdir(parents=True)
    path = out_dir / "model.onnx"
    torch.onnx.export(LogitsOnly(model), (torch.tensor([PROMPTS[0]]),), str(path), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"], external_data=False,
                      dynamic_shapes={"input_ids": {1: torch.export.Dim("T", max=256)}})
    for f in checkpoint.iterdir():  # an ONNX file holds no config or tokenizer: they lie beside it
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, out_dir / f.name)
    return path


@pytest.fixture(scope="module")
def torch_exported(tmp_path_factory, llama_dir):
    made: dict[str, tuple[Path, Path]] = {}

    def export(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            root = tmp_path_factory.mktemp(f"torch-onnx-{arch}")
            checkpoint = llama_dir if arch == "llama" else save_tiny_model(arch, root / arch)
            made[arch] = torch_export(checkpoint, root / "onnx"), checkpoint
        return made[arch]

    return export


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_torch_exported_graph_matches_hf_and_compiles_like_the_checkpoint(arch, torch_exported, tmp_path,
                                                                          tiny_llama_cpu_package):
    path, checkpoint = torch_exported(arch)
    graph = load_onnx(path).graph
    ops = graph.op_counts()
    assert ops["attention"] == ops["rms_norm"] // 2 == 2 and ops["rope"] == 4, ops
    assert "model.layers.1.post_attention_layernorm.weight" in graph.param_map  # names from the module scopes
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0]
        got = Interpreter(graph).run({"input_ids": torch.tensor(prompt), "positions": torch.arange(len(prompt))},
                                     ExecutionContext.for_graph(graph))["logits"]
        assert (got - want).abs().max() <= FP32_ATOL, f"{arch}: max diff {float((got - want).abs().max()):.3g}"

    compile_model(path, "cpu", tmp_path / "from-onnx", quality_tokens=0)
    reference = tiny_llama_cpu_package if arch == "llama" else tmp_path / "from-checkpoint"
    if arch != "llama":
        compile_model(checkpoint, "cpu", reference, quality_tokens=0)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    got = [o.output_token_ids for o in LLM(tmp_path / "from-onnx").generate(PROMPTS, greedy)]
    want = [o.output_token_ids for o in LLM(reference).generate(PROMPTS, greedy)]
    assert got == want and all(len(w) == 12 for w in want)


def test_unknown_torch_idiom_names_the_onnx_node_and_hint(torch_exported, tmp_path):
    path, _ = torch_exported("llama")
    model = onnx.load(str(path))
    sqrt = next(n for n in model.graph.node if n.op_type == "Sqrt")
    sqrt.op_type = "Exp"  # 1 / exp(mean(x^2) + eps): no such norm in llmc IR
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    shutil.copyfile(path.parent / "config.json", tmp_path / "config.json")
    with pytest.raises(UnsupportedModelError) as err:
        load_onnx(tmp_path / "model.onnx")
    message = str(err.value)
    assert f"cannot raise ONNX node '{sqrt.name}' (from module 'model.layers.0.input_layernorm')" in message
    assert "no pattern matches Exp(" in message and "partial ms_eps" in message
    assert "llmc/frontend/onnx_patterns.py" in message


def test_graph_with_an_unknown_input_is_refused(torch_exported, tmp_path):
    path, _ = torch_exported("llama")
    model = onnx.load(str(path))
    model.graph.input[0].name = "attention_mask"
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    shutil.copyfile(path.parent / "config.json", tmp_path / "config.json")
    with pytest.raises(UnsupportedModelError, match=r"input 'attention_mask' is not one llmc knows.*position_ids"):
        load_onnx(tmp_path / "model.onnx")
