"""Loading a package (runtime/package.py): the CPU allocator tuning and load-time weight layouts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.package import load_model

PROBE = """
from llmc.runtime.package import tune_cpu_allocator
first = tune_cpu_allocator()
print(first, tune_cpu_allocator())
"""


def run_probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_allocator_tuning_applies_once_and_can_be_turned_off():
    env = {k: v for k, v in os.environ.items() if k != "LLMC_CPU_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "True"]  # applied, then reported as applied
    assert run_probe(LLMC_CPU_MALLOC="default") == ["False", "False"]


@pytest.mark.parametrize("scheme, prepared", [("int4", ("int4pack", "scales_and_zeros")), ("fp8", ("dense",))])
def test_prepared_layouts_replace_their_source(tmp_path, scheme, prepared):
    """A quantized weight the CPU runs from a load-time layout is dropped once the layout exists:
    the loaded weights hold the layout, not both."""
    model = save_tiny_model("llama", tmp_path / "m")
    sets = [f"quantize.scheme={scheme}", "quantize.group_size=32", "quantize.calibration.sequences=2"]
    if scheme == "fp8":
        sets.append("dtypes=[float32, bfloat16, float16, float8_e4m3fn]")  # a target that lists fp8
    compile_model(model, "cpu", tmp_path / "pkg", overrides=sets, quality_tokens=0)
    _, weights = load_model(tmp_path / "pkg", torch.device("cpu"))
    derived = [name for name in weights if ":" in name]
    assert derived, "the package prepares no layouts"
    assert {name.split(":")[1] for name in derived} == set(prepared)
    sources = {name.split(":")[0] for name in derived}
    assert not sources & set(weights), f"sources kept beside their layouts: {sorted(sources & set(weights))[:3]}"


def test_cpu_weights_are_loaded_64_byte_aligned(tmp_path):
    """safetensors packs tensors back to back; a 3-byte tensor first leaves the next one misaligned
    in the file (ATen's AVX-512 int8 GEMM segfaults on such a weight), so the loader copies it."""
    from safetensors.torch import load_file, save_file

    from llmc.runtime.package import load_weights

    qweight = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    tensors = {"a.odd": torch.ones(3, dtype=torch.int8), "b.qweight": qweight, "c.float": torch.randn(5, 7)}
    save_file(tensors, tmp_path / "w.safetensors")
    raw = load_file(tmp_path / "w.safetensors")
    assert raw["b.qweight"].data_ptr() % 64 != 0  # the premise: the file leaves it misaligned
    loaded = load_weights(tmp_path / "w.safetensors", torch.device("cpu"))
    assert all(t.data_ptr() % 64 == 0 for t in loaded.values())
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    x = torch.randn(5, 64).to(torch.bfloat16)  # the kernel that crashed on the misaligned weight
    y = torch.ops.aten._weight_int8pack_mm(x, loaded["b.qweight"], torch.ones(48, dtype=torch.bfloat16))
    assert torch.allclose(y.float(), x.float() @ qweight.float().t(), rtol=1e-2, atol=0.5)
