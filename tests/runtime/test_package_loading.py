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
