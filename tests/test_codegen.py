"""Codegen + package emitter: for every architecture, the compiled package computes what the IR
reference interpreter computes (same greedy tokens, prefill logits within 1e-5, the recorded golden
tokens), compiles byte-identically twice, and runs from the command line."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llmc.codegen import emit_package
from llmc.codegen.torch_backend import render_model
from llmc.errors import LlmcError
from llmc.examples_tiny import char_tokenizer, save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import GraphBuilder, OpRegistry, TensorType, generate_greedy, register_op
from llmc.ir.interpreter import PagedSequenceKV
from package_helpers import cpu_target, import_package, lowered, tree_hashes

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]
GOLDEN_DIR = Path(__file__).parent / "golden"
DECODE_STEPS = 24
# Same float32 ops in the same order as the interpreter; 1e-5 leaves room for BLAS threading.
LOGIT_ATOL = 1e-5


def run_package(package: Path, *args: str):
    """``python PACKAGE args...`` in a subprocess, without PYTHONPATH, from outside the repo."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(package), *args], capture_output=True, text=True,
                          cwd=package.parent, env=env)


@dataclass
class Compiled:
    arch: str
    imported: object      # llmc.frontend.hf.ImportedModel
    package: Path
    module: object        # the package imported as a Python package (its __init__.py)
    engine: object        # module.load(): the package's runtime Engine
    hashes: tuple[dict, dict]  # file hashes of two compiles of the same input


_COMPILED: dict[str, Compiled] = {}


def compile_arch(arch: str, tmp_path_factory) -> Compiled:
    """Save the tiny model, import it, compile it twice; once per architecture per session."""
    if arch not in _COMPILED:
        root = tmp_path_factory.mktemp(arch)
        ckpt = save_tiny_model(arch, root / f"tiny-{arch}")
        imported = load_hf(ckpt)
        report = {"passes": [{"name": "canonicalize", "changed": False, "stats": {"folded": 0}, "seconds": 0.25}]}
        graph = lowered(imported.graph)
        first = emit_package(graph, cpu_target(), root / "pkg", checkpoint_dir=ckpt, report=report)
        report["passes"][0]["seconds"] = 0.5  # timings differ run to run and must not reach the package
        second = emit_package(graph, cpu_target(), root / "again", checkpoint_dir=ckpt, report=report)
        hashes = (tree_hashes(first), tree_hashes(second))
        module = import_package(first, f"tiny_{arch}_pkg")
        _COMPILED[arch] = Compiled(arch, imported, first, module, module.load(), hashes)
    return _COMPILED[arch]


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request, tmp_path_factory) -> Compiled:
    return compile_arch(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Compiled:
    """For checks that need one architecture only."""
    return compile_arch("llama", tmp_path_factory)


def golden_prompts(arch: str) -> dict[str, dict]:
    return json.loads((GOLDEN_DIR / f"{arch}.json").read_text())["prompts"]


def test_greedy_tokens_match_the_interpreter_and_the_golden_files(compiled):
    arch = compiled.arch
    for name, rec in golden_prompts(arch).items():
        ours = compiled.engine.generate(rec["input_ids"], DECODE_STEPS)
        ref, _ = generate_greedy(compiled.imported.graph, rec["input_ids"], DECODE_STEPS)
        assert ours == ref, f"{arch}/{name}: package tokens differ from the interpreter"
        assert ours == rec["tokens"], f"{arch}/{name}: package tokens differ from tests/golden/{arch}.json"


def test_prefill_logits_match_the_interpreter(compiled):
    for name, rec in golden_prompts(compiled.arch).items():
        _, ref = generate_greedy(compiled.imported.graph, rec["input_ids"], 1)
        diff = (compiled.engine.prefill(rec["input_ids"]) - ref).abs().max().item()
        assert diff <= LOGIT_ATOL, f"{compiled.arch}/{name}: prefill logits differ by {diff:.3g}"


def test_compiling_twice_gives_byte_identical_packages(compiled):
    package, (first, second) = compiled.package, compiled.hashes
    assert first == second
    assert "weights/model.safetensors" in first and "runtime/engine.py" in first and "tokenizer.json" in first
    assert not any("__pycache__" in path for path in first)
    for path in first:  # no absolute paths (the tmp dir) in any text file
        if not path.endswith(".safetensors"):
            assert str(package.parent) not in (package / path).read_text(), path
    plan = json.loads((package / "plan.json").read_text())
    assert plan["passes"] == [{"name": "canonicalize", "changed": False, "stats": {"folded": 0}}]
    assert plan["target"]["name"] == "cpu" and plan["model"]["vocab_size"] == 128


def cli(module, capsys, *args: str) -> tuple[int, str, str]:
    """The package's CLI in-process (the subprocess tests below cover ``python PKG``)."""
    try:
        main = importlib.import_module(f"{module.__name__}.runtime.cli").main
        code = main(["generate", *args], package_dir=Path(module.__file__).parent)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generates_token_ids(compiled, capsys):
    code, out, err = cli(compiled.module, capsys, "--tokens", "1,2,3", "--max-tokens", "5")
    assert code == 0, err
    assert [int(x) for x in out.strip().split(",")] == compiled.engine.generate([1, 2, 3], 5)


def test_python_package_dir_runs_as_a_program(llama):
    package, engine = llama.package, llama.engine
    done = run_package(package, "generate", "--tokens", "1,2,3", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ",".join(map(str, engine.generate([1, 2, 3], 5))) + "\n"
    done = run_package(package, "generate", "--prompt", "Hello", "--max-tokens", "6", "--show-ids")
    assert done.returncode == 0, done.stderr
    ids = engine.generate([ord(c) for c in "Hello"], 6)  # the tiny tokenizer: id == ord(char)
    assert done.stdout == char_tokenizer().decode(ids) + "\nids: " + ",".join(map(str, ids)) + "\n"
    assert not list(package.rglob("__pycache__"))  # running leaves the package as compiled


def test_chat_prompt_uses_the_template(llama, capsys):
    runtime_tokenizer = importlib.import_module(f"{llama.module.__name__}.runtime.tokenizer")
    tokenizer = runtime_tokenizer.PackageTokenizer.from_dir(llama.package)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi\n<assistant>"
    code, out, err = cli(llama.module, capsys, "--prompt", "hi", "--chat", "-n", "3", "--show-ids")
    ids = llama.engine.generate([ord(c) for c in "<user>hi\n<assistant>"], 3)
    assert code == 0 and out.endswith("ids: " + ",".join(map(str, ids)) + "\n"), (out, err)


def test_seeded_sampling_is_reproducible_and_not_greedy(compiled):
    engine, prompt = compiled.engine, [5, 6, 7, 8]
    greedy = engine.generate(prompt, 12)
    runs = {seed: engine.generate(prompt, 12, temperature=1.0, seed=seed) for seed in range(4)}
    assert all(engine.generate(prompt, 12, temperature=1.0, seed=s) == toks for s, toks in runs.items())
    assert any(toks != greedy for toks in runs.values()), f"{compiled.arch}: sampling at temperature 1 equals greedy"
    assert engine.generate(prompt, 12, temperature=1.0, top_k=1, seed=0) == greedy  # top-1 is argmax
    assert engine.generate(prompt, 12, temperature=0.7, top_p=1e-6, seed=0) == greedy


def test_stop_token_ends_generation(compiled):
    engine = compiled.engine
    greedy = engine.generate([1, 2, 3], 8)
    assert engine.generate([1, 2, 3], 8, stop_token_ids=[greedy[2]]) == greedy[: greedy.index(greedy[2]) + 1]


def test_layers_become_one_function_per_kind(compiled):
    source = (compiled.package / "model.py").read_text()
    kinds = re.findall(r"^def (\w+)\(w, layer, kv", source, re.MULTILINE)
    # Gemma 2 alternates sliding-window and global layers: two kinds; the others have one.
    assert len(kinds) == (2 if compiled.arch == "gemma2" else 1), kinds
    assert source.count(f"= {kinds[0]}(w, ") >= 1
    assert "Interpreter" not in source and "llmc" not in source.split('"""', 2)[2]  # no IR at run time


def test_straight_line_code_matches_too(compiled):
    """The fallback without layer functions (one line per node) computes the same logits."""
    engine = compiled.engine
    source = render_model(lowered(compiled.imported.graph), target_name="cpu", device="cpu", backend="torch",
                          factor_layers=False)
    assert "def forward" in source and "(w, layer, kv" not in source
    namespace: dict = {}
    exec(compile(source, "model_straight.py", "exec"), namespace)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    kv = PagedSequenceKV()  # the interpreter's one-sequence paged cache has the runtime's step fields
    kv.begin_step(torch.arange(len(ids)))
    logits = namespace["forward"](engine.weights, torch.tensor(ids), torch.arange(len(ids)), kv)
    # The engine pads the prompt to its shape bucket, and CPU linears pick their GEMM form by row
    # count (functional.linear_cpu): the same products in another summation order.
    assert torch.allclose(logits["logits"], engine.prefill(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, fragment", [
    (["--tokens", "999"], "outside the vocabulary"),
    (["--tokens", "1,x"], "'x' is not an integer"),
    (["--tokens", "1", "--max-tokens", "300"], "context of 256 tokens"),
    (["--tokens", "1", "--top-p", "0"], "top_p"),
    (["--tokens", "1", "--temperature", "-1"], "temperature"),
    (["--tokens", "1", "--chat"], "--chat needs --prompt"),
    (["--tokens", "1", "--device", "tpu"], "unknown device"),
    ([], "--prompt"),
])
def test_cli_errors_are_one_line_with_exit_code_2(llama, capsys, args, fragment):
    code, out, err = cli(llama.module, capsys, *args)
    assert code == 2 and out == "", (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_package_without_cuda_says_so(llama, capsys):
    code, _, err = cli(llama.module, capsys, "--tokens", "1", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err and "--device cpu" in err


def test_unsupported_op_names_op_and_node(tmp_path):
    registry = OpRegistry()

    @register_op("mystery", ("x",), registry=registry)
    class Mystery:
        @staticmethod
        def infer(types, attrs):
            return TensorType((types[0].shape[0], 4), "float32")

        @staticmethod
        def reference(ctx, inputs, attrs):
            return torch.zeros(len(inputs[0]), 4)

    builder = GraphBuilder(registry)
    ids = builder.input("input_ids", TensorType(("T",), "int64"))
    builder.input("positions", TensorType(("T",), "int64"))
    builder.output("logits", builder.add("mystery", [ids], meta={"module": "model.oddity"}))
    with pytest.raises(LlmcError, match=r"op 'mystery' \(node %0 at model\.oddity\)"):
        emit_package(builder.build(), cpu_target(), tmp_path / "pkg", checkpoint_dir=None, report={})
    assert not (tmp_path / "pkg").exists()  # nothing half-written


def test_out_dir_rules(llama, tmp_path):
    graph = lowered(llama.imported.graph)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(LlmcError, match="not empty and holds no llmc package"):
        emit_package(graph, cpu_target(), foreign, checkpoint_dir=None, report={})
    assert (foreign / "notes.txt").read_text() == "keep"
    out = emit_package(graph, cpu_target(), tmp_path / "pkg", checkpoint_dir=None, report={})
    (out / "stale.txt").write_text("old")
    emit_package(graph, cpu_target(), out, checkpoint_dir=None, report={})  # replaces a package
    assert not (out / "stale.txt").exists() and not (out / "tokenizer.json").exists()
    with pytest.raises(LlmcError, match="not lowered to paged attention.*attention_lowering"):
        emit_package(llama.imported.graph, cpu_target(), tmp_path / "raw", checkpoint_dir=None, report={})
    with pytest.raises(LlmcError, match="triton backend generates CUDA kernels.*use backend: torch"):
        emit_package(graph, cpu_target(backend="triton"), tmp_path / "t", checkpoint_dir=None, report={})


def test_pipeline_output_compiles_to_the_same_tokens(llama, tmp_path):
    """The real flow: target pipeline, then emit with the pipeline's report (timings included)."""
    pipeline = pytest.importorskip("llmc.pipeline")
    target = cpu_target()
    if not hasattr(target, "pipeline"):
        pytest.skip("needs llmc.target")
    report = pipeline.run_pipeline(llama.imported.graph, target)
    out = emit_package(report.graph, target, tmp_path / "pkg", checkpoint_dir=None, report=report.as_dict())
    engine = import_package(out, "tiny_llama_pipeline_pkg").load()
    expected, _ = generate_greedy(llama.imported.graph, [1, 2, 3], 8)
    assert engine.generate([1, 2, 3], 8) == expected
    plan = json.loads((out / "plan.json").read_text())
    assert [p["name"] for p in plan["passes"]] == [p.name for p in target.pipeline]
    assert "seconds" not in json.dumps(plan)
