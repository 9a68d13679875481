"""report.json: every compile records sizes; a compile whose lossy pass changed the graph also
scores the compiled graph against the imported one (tiny models score on random ids)."""

from __future__ import annotations

import json

import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.quality import format_report

pytestmark = pytest.mark.slow


def report_of(tmp_path, model, sets, name="pkg"):
    result = compile_model(model, "cpu", tmp_path / name, overrides=sets, quality_tokens=128)
    on_disk = json.loads((tmp_path / name / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(result.compile_report))
    return on_disk


def test_default_pipeline_is_lossless_and_says_so(tmp_path):
    report = report_of(tmp_path, save_tiny_model("llama", tmp_path / "m"), [])
    assert report["lossy_passes"] == [] and report["quality"] is None
    assert report["bytes"]["total"]["before"] == report["bytes"]["total"]["after"]  # fusion moves bytes only
    assert report["kv_bytes_per_token"]["before"] == report["kv_bytes_per_token"]["after"] > 0


def test_gqa_rewrite_report_shows_kv_bytes_and_quality(tmp_path):
    """An MHA Llama (4 KV heads) rewritten to 2 KV heads: KV bytes per token halve, the attention
    K/V projections shrink, and the quality cost is measured."""
    model = save_tiny_model("llama", tmp_path / "mha", num_key_value_heads=4)
    report = report_of(tmp_path, model, ["gqa_rewrite.kv_heads=2"])
    kv = report["kv_bytes_per_token"]
    assert report["lossy_passes"] == ["gqa_rewrite"]
    assert kv["before"] == 2 * kv["after"]
    assert report["bytes"]["attention"]["after"] < report["bytes"]["attention"]["before"]
    quality = report["quality"]
    assert quality["data"] == "random ids" and quality["tokens"] == 128
    assert 0 < quality["kl"] and 0 <= quality["top1_agreement"] <= 1
    text = format_report(report)
    assert "KV bytes / token" in text and "0.500x" in text and "mean KL" in text


def test_unstructured_magnitude_pruning_runs_and_is_reported(tmp_path):
    report = report_of(tmp_path, save_tiny_model("llama", tmp_path / "m"),
                       ["prune.method=magnitude", "prune.sparsity=0.5"])
    assert report["lossy_passes"] == ["prune"]
    assert report["quality"]["kl"] > 0
