"""Triton backend end to end: a tiny Llama compiled for h100 runs its Triton kernels on CPU under
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported) and
reproduces the recorded golden tokens; its int4 package matches the torch backend's int4 package.

The packages are compiled with ``runtime.default_dtype=float32``: the interpreter's bfloat16
arithmetic is wrong (its loads, stores and casts are right), and the golden tokens are float32's.
The kernels upcast after every load anyway, so float32 exercises the same code as bfloat16 pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc.codegen.triton_backend import kernels_used, render_model
from llmc.compiler import compile_model
from llmc.errors import LlmcError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.runtime.package import load_model_module
from llmc.runtime.llm import LLM
from llmc.runtime.sampler import SamplingParams
from package_helpers import lowered

GOLDEN = json.loads((Path(__file__).parent / "golden" / "llama.json").read_text())["prompts"]
FLOAT32 = ["runtime.default_dtype=float32", "runtime.kv_cache_bytes=4194304"]  # 4 MiB of pages, not 40 GiB
KV_BYTES = 4 << 20


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


def test_model_py_loads_the_kernels_instead_of_torch_helpers(tiny_llama):
    graph = lowered(load_hf(tiny_llama).graph)
    source = render_model(graph, target_name="h100", device="cuda", backend="triton")
    # Unfused graph (no fuse pass): rope is its own op, the MLP is silu and mul in torch.
    assert kernels_used(graph) == {"embedding": ("embedding",), "kv_cache_write": ("write_kv",),
                                   "paged_decode_attention": ("paged_decode_attention",),
                                   "paged_prefill_attention": ("paged_prefill_attention_varlen",),
                                   "rms_norm": ("rms_norm",), "rope": ("rope",)}
    for name in ("rms_norm", "paged_decode_attention", "kv_cache_write"):
        assert f'load_kernels("{name}")' in source
    assert "def rms_norm(" not in source and "def attend(" not in source  # no torch helper pasted
    assert "embedding(input_ids, " in source and "F.embedding" not in source
    compile(source, "model.py", "exec")  # valid Python


def test_triton_backend_refuses_a_cpu_device(tiny_llama):
    graph = lowered(load_hf(tiny_llama).graph)
    with pytest.raises(LlmcError, match="generates CUDA kernels.*backend: torch"):
        render_model(graph, target_name="cpu", device="cpu", backend="triton")


@pytest.fixture(scope="module")
def h100_package(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("h100") / "tiny-h100"
    compile_model(tiny_llama, "h100", out, overrides=FLOAT32)
    return out


@pytest.mark.slow
def test_package_ships_kernels_and_refuses_cpu_tensors_outside_the_interpreter(h100_package, monkeypatch):
    assert sorted(p.name for p in (h100_package / "kernels").iterdir()) == sorted(
        f"{m}.py" for m in ("act_mul", "add_rms_norm", "embedding", "kv_cache_write", "paged_decode_attention",
                            "paged_prefill_attention", "rms_norm", "rope"))
    module = load_model_module(h100_package / "model.py")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="LLMC_TRITON_INTERPRET=1"):
        module.prepare_weights({"x": torch.ones(1)})


@pytest.mark.slow
def test_h100_package_reproduces_golden_tokens_under_the_interpreter(h100_package):
    """Both golden prompts in one batch: steps mix a decode with a prefill, so the decode and the
    varlen prefill kernels run in the same step, through the real engine and KV pages."""
    llm = LLM(h100_package, device="cpu", kv_cache_bytes=KV_BYTES)
    names = ["random17", "short5"]
    outs = llm.generate([GOLDEN[n]["input_ids"] for n in names],
                        SamplingParams(max_tokens=len(GOLDEN["short5"]["tokens"]), ignore_eos=True))
    for name, out in zip(names, outs):
        assert out.output_token_ids == GOLDEN[name]["tokens"], f"{name}: tokens differ from tests/golden/llama.json"


@pytest.mark.slow
def test_cli_interpret_flag_runs_the_package_on_cpu(h100_package):
    """``LLMC_TRITON_INTERPRET=1 python PKG generate --device cpu`` in a fresh process (no
    TRITON_INTERPRET inherited): model.py switches the interpreter on before triton loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    ids = GOLDEN["short5"]["input_ids"]
    args = [sys.executable, str(h100_package), "generate", "--tokens", ",".join(map(str, ids)), "--max-tokens", "4",
            "--ignore-eos", "--device", "cpu"]
    done = subprocess.run(args, capture_output=True, text=True, env={**env, "LLMC_TRITON_INTERPRET": "1"},
                          cwd=h100_package.parent, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == ",".join(map(str, GOLDEN["short5"]["tokens"][:4]))
    without = subprocess.run(args, capture_output=True, text=True, env=env, cwd=h100_package.parent, timeout=600)
    assert without.returncode != 0 and "LLMC_TRITON_INTERPRET=1" in without.stderr


@pytest.mark.slow
def test_int4_package_matches_the_torch_backend(tiny_llama, tmp_path):
    """W4A16: the Triton package (linear_int4 kernels) against the torch backend's int4 package of
    the same target, whose linears dequantize and call F.linear. Group 32: the tiny model has 64
    input features. One short prompt: the interpreter runs every GEMM tile as its own program."""
    int4 = [*FLOAT32, "quantize.scheme=int4", "quantize.group_size=32"]
    triton_pkg, torch_pkg = tmp_path / "triton", tmp_path / "torch"
    compile_model(tiny_llama, "h100", triton_pkg, overrides=int4)
    compile_model(tiny_llama, "h100", torch_pkg, overrides=[*int4, "backend=torch"])
    assert (tmp_path / "triton" / "kernels" / "linear_int4.py").is_file()
    assert "linear_int4 = load_kernels(" in (tmp_path / "triton" / "model.py").read_text()
    tokens = []
    for package in (triton_pkg, torch_pkg):
        llm = LLM(package, device="cpu", kv_cache_bytes=KV_BYTES)
        out = llm.generate(GOLDEN["short5"]["input_ids"], SamplingParams(max_tokens=10, ignore_eos=True))
        tokens.append(out[0].output_token_ids)
    assert tokens[0] == tokens[1]


@pytest.mark.slow
def test_gemma2_package_reproduces_golden_tokens(tmp_path):
    """Gemma 2 exercises what Llama does not: alternating sliding-window layers (window 8 < the
    17-token prompt), attention logit soft-capping, ``1 + w`` norms, GELU-tanh gating."""
    golden = json.loads((Path(__file__).parent / "golden" / "gemma2.json").read_text())["prompts"]["random17"]
    compile_model(save_tiny_model("gemma2", tmp_path / "tiny-gemma2"), "h100", tmp_path / "pkg", overrides=FLOAT32)
    out = LLM(tmp_path / "pkg", device="cpu", kv_cache_bytes=KV_BYTES).generate(
        golden["input_ids"], SamplingParams(max_tokens=len(golden["tokens"]), ignore_eos=True))
    assert out[0].output_token_ids == golden["tokens"]
