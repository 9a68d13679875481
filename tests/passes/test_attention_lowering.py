"""attention_lowering, three ways on tiny models: numbers vs the reference interpreter (contiguous
cache before, scrambled pages after), match counts, ops before/after.

Tolerance: the paged op computes the same float32 math with keys gathered from pages and GQA done
by grouping instead of repeating heads, so only the summation order differs: ~1e-7 on these
logits; 1e-5 leaves margin while any wrong page, mask or offset would be off by ~1e-1.
"""

from __future__ import annotations

import pytest
import torch

from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import generate_greedy
from llmc.pipeline import PASSES, PassContext
from llmc.target import load_target

ATOL = 1e-5
PROMPT = [5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31, 9, 120, 45, 6, 23]  # crosses the window of 8


def lower(graph):
    info = PASSES["attention_lowering"]
    return info.fn(graph, PassContext(target=load_target("cpu"), options=info.options()))


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma2", "gpt2"])
def imported(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_hf(path).graph


def test_logits_match_the_unlowered_graph(imported):
    result = lower(imported)
    before_steps, after_steps = [], []
    tokens_before, prefill_before = generate_greedy(imported, PROMPT, 6, step_logits=before_steps)
    tokens_after, prefill_after = generate_greedy(result.graph, PROMPT, 6, step_logits=after_steps)
    assert (prefill_after - prefill_before).abs().max().item() < ATOL
    assert tokens_after == tokens_before
    for a, b in zip(after_steps, before_steps):
        assert (a - b).abs().max().item() < ATOL


def test_every_attention_is_lowered_and_counted(imported):
    result = lower(imported)
    layers = imported.op_counts()["attention"]
    assert layers == 2
    assert result.changed and result.stats == {"lowered": layers}
    before, after = imported.op_counts(), result.graph.op_counts()
    assert after["paged_attention"] == layers and after["attention"] == 0
    del before["attention"], after["paged_attention"]
    assert +before == +after  # nothing else changes
    assert result.graph.meta["kv_page_size"] == load_target("cpu").runtime.kv_page_size
    assert sorted(result.graph.meta["kv_layers"]) == ["0", "1"]


def test_lowering_twice_changes_nothing(imported):
    once = lower(imported).graph
    again = lower(once)
    assert not again.changed and again.stats == {"lowered": 0}
    assert again.graph.nodes == once.nodes


def test_the_interpreter_catches_a_broken_lowering(imported):
    """The numbers check can fail: the same lowering with a wrong scale is far off."""
    import dataclasses

    broken_nodes = tuple(dataclasses.replace(n, attrs=tuple((k, v * 2 if k == "scale" else v) for k, v in n.attrs))
                         if n.op.name == "paged_attention" else n for n in lower(imported).graph.nodes)
    broken = dataclasses.replace(lower(imported).graph, nodes=broken_nodes)
    _, good = generate_greedy(imported, PROMPT, 1)
    _, bad = generate_greedy(broken, PROMPT, 1)
    assert (bad - good).abs().max().item() > 1e-3
