"""Quantization quality and size on the committed example model (examples/models/stdlib-llama-6m).

Thresholds are the project's acceptance bar, scored like every lossy compile's report.json: mean
KL(float32 || quantized) and top-1 agreement over 1,024 held-out tokens (windows of 256), the
package's weight file measured for bytes. The numbers are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from llmc.frontend.hf import load_hf
from llmc.pipeline import PASSES, PassContext
from llmc.quality import measure_quality
from llmc.target import load_target

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "models" / "stdlib-llama-6m"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example():
    return load_hf(EXAMPLE).graph


@pytest.fixture(scope="module")
def results(example):
    """scheme label -> (quantized graph, pass stats, quality)."""
    runs = {"int8": dict(scheme="int8"), "int4-g128-rtn": dict(scheme="int4", group_size=128),
            "int4-g128-gptq": dict(scheme="int4", group_size=128, method="gptq")}
    info = PASSES["quantize"]
    out = {}
    for label, options in runs.items():
        result = info.fn(example, PassContext(load_target("cpu"), info.options.model_validate(options)))
        out[label] = (result.graph, result.stats, measure_quality(example, result.graph))
        q = out[label][2]
        print(f"{label}: KL {q['kl']:.5f}, top-1 {q['top1_agreement']:.2%}, ppl {q['reference_perplexity']:.2f} -> "
              f"{q['perplexity']:.2f}, {result.stats['bytes_after']:,} bytes ({result.stats['ratio_to_bf16']}x bf16)")
    return out


def test_int8_weight_only_is_nearly_lossless(results):
    q = results["int8"][2]
    assert q["data"].startswith("held-out files") and q["tokens"] == 1024
    assert q["kl"] <= 0.005 and q["top1_agreement"] >= 0.98


def test_int4_g128_round_to_nearest_within_budget_and_gptq_beats_it(results):
    rtn, gptq = results["int4-g128-rtn"][2], results["int4-g128-gptq"][2]
    assert rtn["kl"] <= 0.05
    assert gptq["kl"] < rtn["kl"]
    assert math.isfinite(gptq["perplexity"])


@pytest.mark.parametrize("label, bound", [("int8", 0.55), ("int4-g128-rtn", 0.32)])
def test_weight_bytes_in_the_package_file(results, tmp_path, label, bound):
    """Bytes of the quantized layers' tensors as written to the package file, over what the same
    weights take in bfloat16."""
    from llmc.codegen.package import write_weights

    graph, stats, _ = results[label]
    path = tmp_path / "model.safetensors"
    write_weights(graph, path)
    sources = {p.name: p.quant["source"] for p in graph.params if p.quant}
    stored = 0
    with safe_open(str(path), "pt") as f:
        for name in sources:
            t = f.get_tensor(name)
            stored += t.numel() * t.element_size()
    bf16 = stats["bf16_bytes"]
    print(f"{label}: {stored:,} bytes stored for {len(set(sources.values()))} weights = {stored / bf16:.3f}x bf16")
    assert stored == stats["bytes_after"] and stored <= bound * bf16


def test_compile_report_from_the_cli(tmp_path):
    """`llmc compile --set quantize.scheme=int4 --report` writes report.json and prints the table."""
    from typer.testing import CliRunner

    from llmc.cli import app

    out = tmp_path / "pkg"
    run = CliRunner().invoke(app, ["compile", str(EXAMPLE), "-o", str(out), "--set", "quantize.scheme=int4",
                                   "--report", "--quality-tokens", "256"])
    assert run.exit_code == 0, run.output
    report = json.loads((out / "report.json").read_text())
    assert report["lossy_passes"] == ["quantize"]
    assert report["quality"]["tokens"] == 256 and report["quality"]["kl"] > 0
    mlp = report["bytes"]["mlp"]
    assert mlp["after"] < 0.3 * mlp["before"]  # float32 -> int4 g128
    for fragment in ("report.json (lossy: quantize)", "bytes: mlp", "mean KL", "top-1 agreement", "perplexity"):
        assert fragment in run.output
