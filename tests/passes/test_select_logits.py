"""select_logits, three ways on tiny models: numbers vs the reference interpreter (the selected
rows' logits equal those rows of the full logits), match counts, ops before/after.

Tolerance: the rows after the cut go through the same row-wise float32 ops, only with fewer rows in
each matmul; BLAS may block them differently, ~1e-7 here, so 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import ExecutionContext, Interpreter
from llmc.pipeline import PASSES, PassContext
from llmc.target import load_target

ATOL = 1e-5
IDS = torch.tensor([5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77])


def run_pass(name, graph):
    info = PASSES[name]
    return info.fn(graph, PassContext(target=load_target("cpu"), options=info.options()))


@pytest.fixture(scope="module", params=["llama", "gemma2", "phi3", "gpt2"])
def lowered(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return run_pass("attention_lowering", load_hf(path).graph).graph


def logits(graph, rows=None):
    ctx = ExecutionContext.for_graph(graph)
    ctx.kv.logits_indices = rows
    return Interpreter(graph).run({"input_ids": IDS, "positions": torch.arange(len(IDS))}, ctx)["logits"]


def test_selected_rows_equal_those_rows_of_the_full_logits(lowered):
    selected = run_pass("select_logits", lowered).graph
    full = logits(lowered)
    rows = torch.tensor([3, 10, 0])
    assert (logits(selected, rows) - full[rows]).abs().max().item() < ATOL
    assert torch.equal(logits(selected), full)  # no selection given: every row, the same numbers
    assert logits(selected, torch.tensor([], dtype=torch.int64)).shape == (0, full.shape[1])


def test_one_select_before_the_head_and_nothing_else_changes(lowered):
    result = run_pass("select_logits", lowered)
    assert result.changed and result.stats == {"selected": 1}
    before, after = lowered.op_counts(), result.graph.op_counts()
    assert after["select_rows"] == 1
    del after["select_rows"]
    assert +before == +after
    nodes = result.graph.nodes
    cut = next(i for i, n in enumerate(nodes) if n.op.name == "select_rows")
    assert all(not n.op.stateful for n in nodes[cut + 1:])                      # after every attention
    assert all("layers" not in (n.meta.get("module") or "") and ".h." not in (n.meta.get("module") or "")
               for n in nodes[cut:])                                            # after the last layer
    assert result.graph.type_of(dict(result.graph.outputs)["logits"]).shape[0] == "S"
    again = run_pass("select_logits", result.graph)
    assert not again.changed and again.stats == {"selected": 0}
