"""Speculative decoding's parts: the adaptive-k policy, n-gram lookup, the verification rule,
rollback in the block manager and scheduler, compile-time checks, and the surfaces (CLI flags,
offline API stats, /metrics).

The end-to-end acceptance tests are beside this file: greedy outputs equal plain decoding's
(test_speculative_greedy.py), sampled outputs follow plain sampling's law
(test_speculative_sampling.py), no KV page leaks (test_speculative_pages.py).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.compiler import compile_model
from llmc.errors import CheckpointError, LlmcError
from llmc.examples_tiny import save_tiny_model
from llmc.runtime import speculative
from llmc.runtime.block_manager import BlockTable, KVBlockManager
from llmc.runtime.engine import EngineConfig, LLMEngine
from llmc.runtime.package import PackageError
from llmc.runtime.sampler import SamplingParams, SequenceSampler
from llmc.runtime.scheduler import RUNNING, Scheduler, Sequence
from llmc.runtime.speculative import NgramIndex, speculation_length, verify_proposals

# ---- the adaptive policy -------------------------------------------------------------------------


def test_speculation_length_grows_with_acceptance_and_shrinks_with_batch():
    k = lambda a, b, c=0.0: speculation_length(a, b, 8, saturation_tokens=16, draft_cost=c)  # noqa: E731
    assert k(0.0, 1) == 0  # nothing is ever accepted: plain decoding
    at_batch_1 = [k(a, 1) for a in (0.2, 0.4, 0.6, 0.8, 0.95)]
    assert at_batch_1 == sorted(at_batch_1) and at_batch_1[-1] > at_batch_1[0] > 0
    for a in (0.3, 0.6, 0.9):
        by_batch = [k(a, b) for b in (1, 2, 4, 8, 16, 64, 256)]
        assert by_batch == sorted(by_batch, reverse=True), (a, by_batch)
        assert by_batch[-1] == 0, "a large batch must not speculate on uncertain proposals"
    assert k(1.0, 1) == 8  # sure proposals: as many as allowed
    assert k(0.6, 1, c=0.5) < k(0.6, 1)  # an expensive draft proposes fewer


def test_fixed_k_when_not_adaptive():
    spec = speculative.Speculator(speculative.SpeculativeConfig("ngram", 5, adaptive=False), None)
    assert spec.length(0.0, 1000) == 5


# ---- n-gram lookup -------------------------------------------------------------------------------


def test_ngram_lookup_takes_the_latest_longest_match():
    index = NgramIndex(3)
    tokens = [1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    # longest suffix seen before: (1, 2, 3) at 0..2 -> followed by 9, 9, 2
    assert index.lookup(tokens, 3, 1) == [9, 9, 2]
    tokens += [5]  # (3, 5) and (5,) never occurred
    assert index.lookup(tokens, 3, 1) == []
    tokens += [6, 2, 3]  # (2, 3) last occurred at 10..11 (before the suffix itself) -> 5, 6
    assert index.lookup(tokens, 2, 2) == [5, 6]
    assert index.lookup([4], 3, 1) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 4), st.integers(1, 3))
def test_ngram_index_agrees_with_a_backward_scan(tokens, k, min_n):
    """The incremental index, grown token by token, gives what a scan from the end finds."""
    index = NgramIndex(3)
    for end in range(1, len(tokens) + 1):
        prefix = tokens[:end]
        want = []
        for n in range(min(3, len(prefix)), min_n - 1, -1):
            hits = [j for j in range(n - 1, len(prefix) - 1) if prefix[j - n + 1:j + 1] == prefix[-n:]]
            if hits:
                want = prefix[hits[-1] + 1:hits[-1] + 1 + k]
                break
        assert index.lookup(prefix, k, min_n) == want


# ---- verification --------------------------------------------------------------------------------


def test_greedy_verification_keeps_the_argmax_run():
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0], [2.0, 0.0, 0.0, 0.0]])
    sampler = SequenceSampler(SamplingParams(), [0])
    assert verify_proposals(logits[:3], sampler, [1, 3]) == [1, 3, 0]  # all accepted + bonus
    sampler = SequenceSampler(SamplingParams(), [0])
    assert verify_proposals(logits, sampler, [1, 2]) == [1, 3]  # 2 rejected: the argmax instead
    assert sampler.output_ids == [1, 3]
    sampler = SequenceSampler(SamplingParams(), [0])
    assert verify_proposals(logits[:1], sampler, []) == [1]  # no proposals: plain greedy


def test_greedy_verification_counts_accepted_tokens_in_penalties():
    """Row 1's argmax is token 1 again, but the repetition penalty of the accepted token 1 (row 0)
    pushes it below token 2: exactly what plain decoding would do, one token at a time."""
    logits = torch.tensor([[0.0, 4.0, 1.0], [0.0, 4.0, 3.0]])
    sampler = SequenceSampler(SamplingParams(repetition_penalty=2.0), [0])
    assert verify_proposals(logits, sampler, [1, 1]) == [1, 2]


def _first_token_law(p_logits, q, params, draws):
    """Frequencies of the first token verify_proposals keeps, proposals drawn from q."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(q))
    for i in range(draws):
        token = int(torch.multinomial(q, 1, generator=generator))
        sampler = SequenceSampler(SamplingParams(**params, seed=i), [0])
        counts[verify_proposals(p_logits, sampler, [token], q[None])[0]] += 1
    return counts


def _p_value(counts, law):
    expected = law * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(law) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_rule_reproduces_the_target_law(monkeypatch):
    """Model-free: the first kept token follows p, not q; the usual mistakes (keep every proposal,
    resample from p instead of the residual) are caught by the same test."""
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0] * 5])
    q = torch.tensor([0.05, 0.05, 0.5, 0.3, 0.1])
    params = dict(temperature=1.0)
    law = torch.softmax(p_logits[0], -1)
    assert _p_value(_first_token_law(p_logits, q, params, 4000), law) > 0.01
    monkeypatch.setattr(speculative, "residual", lambda p, q, token: p)
    assert _p_value(_first_token_law(p_logits, q, params, 4000), law) < 0.01
    monkeypatch.undo()
    monkeypatch.setattr(speculative, "acceptance_probability", lambda p, q: 1.0)
    assert _p_value(_first_token_law(p_logits, q, params, 4000), law) < 0.01


# ---- pages and scheduling ------------------------------------------------------------------------


def test_truncate_frees_the_pages_past_the_tokens():
    blocks = KVBlockManager(8, 4)
    table = BlockTable()
    blocks.allocate(table, 0, 13)  # 4 pages
    blocks.register_full_blocks(table, list(range(9)), 13)  # 9 known tokens: 2 full pages registered
    assert len(table.hashes) == 2
    blocks.truncate(table, 10)
    assert len(table.blocks) == 3 and blocks.num_free_blocks == 5
    blocks.truncate(table, 10)  # idempotent
    assert len(table.blocks) == 3
    blocks.free_table(table)
    assert blocks.num_free_blocks == 8


def _decoding(request_id, length, blocks):
    seq = Sequence(request_id, list(range(length)), status=RUNNING)
    blocks.allocate(seq.table, 0, length)
    seq.num_computed = length - 1
    return seq


def test_scheduler_trims_proposals_to_the_budget():
    blocks = KVBlockManager(16, 4)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=3)
    seq = _decoding("a", 6, blocks)
    scheduler.running.append(seq)
    seq.spec_token_ids = [7, 8, 9, 10]
    batch = scheduler.schedule()
    assert batch.num_new == [3] and seq.spec_token_ids == [7, 8]


def test_scheduler_drops_proposals_before_preempting_anyone():
    blocks = KVBlockManager(4, 4)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64, on_free=lambda s: freed.append(s))
    freed = []
    a, b = _decoding("a", 8, blocks), _decoding("b", 7, blocks)  # all 4 pages taken, b's 2nd has room
    scheduler.running += [a, b]
    b.spec_token_ids = [1, 2, 3]  # would need a 3rd page
    batch = scheduler.schedule()
    assert batch.num_new == [1, 1] and b.spec_token_ids == [] and not freed
    assert scheduler.counters.preemptions == 0


@pytest.mark.parametrize("window,softcap,quant", [(None, None, None), (4, 2.0, None), (None, None, "int8")])
def test_verification_chunks_share_one_attention_call(window, softcap, quant):
    """Short chunks (k + 1 tokens each) beside decodes and a long prompt chunk: the padded batched
    attention call gives what contiguous attention over each sequence gives."""
    from test_paged_attention import ATOL, KV_QUANT, run_case

    seqs = [(9, 1), (30, 1), (40, 3), (20, 5), (0, 30), (13, 2), (7, 16)]  # the 30-token chunk runs alone
    out, expected = run_case(4, 4, 2, 8, 4, seqs, sliding_window=window, softcap=softcap,
                             quant=dict(KV_QUANT, kv_dtype=quant) if quant else None)
    assert (out - expected).abs().max().item() < ATOL


# ---- compile-time checks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative-units")
    save_tiny_model("llama", root / "model")
    save_tiny_model("llama", root / "draft", seed=1)
    compile_model(root / "model", "cpu", root / "pkg", draft=root / "draft", num_speculative_tokens=3)
    compile_model(root / "model", "cpu", root / "plain")
    return root


def test_package_holds_the_draft_as_its_own_package(tiny):
    plan = json.loads((tiny / "pkg" / "plan.json").read_text())
    assert plan["speculative"] == {"method": "draft", "draft": "draft", "num_speculative_tokens": 3}
    draft_plan = json.loads((tiny / "pkg" / "draft" / "plan.json").read_text())
    assert draft_plan["target"]["name"] == plan["target"]["name"]
    assert (tiny / "pkg" / "draft" / "weights" / "model.safetensors").is_file()
    assert "speculative" not in json.loads((tiny / "plain" / "plan.json").read_text())


def test_draft_must_share_the_tokenizer(tiny, tmp_path):
    other = shutil.copytree(tiny / "draft", tmp_path / "other-tokenizer")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CheckpointError, match="must share the model's tokenizer") as info:
        compile_model(tiny / "model", "cpu", tmp_path / "out", draft=other)
    assert str(other / "tokenizer.json") in str(info.value) and str(tiny / "model" / "tokenizer.json") in str(info.value)
    (other / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="does not"):
        compile_model(tiny / "model", "cpu", tmp_path / "out", draft=other)
    bigger = tmp_path / "bigger"
    save_tiny_model("llama", bigger, vocab_size=256)
    with pytest.raises(CheckpointError, match="vocab_size 256"):
        compile_model(tiny / "model", "cpu", tmp_path / "out", draft=bigger)
    with pytest.raises(LlmcError, match="needs --draft"):
        compile_model(tiny / "model", "cpu", tmp_path / "out", speculative="draft")
    assert not (tmp_path / "out").exists()


def test_asking_for_a_draft_the_package_lacks_is_a_clear_error(tiny):
    with pytest.raises(PackageError, match="has no draft model"):
        LLMEngine.from_package(tiny / "plain", config=EngineConfig(speculative="draft"))
    with pytest.raises(PackageError, match="speculative method"):
        LLMEngine.from_package(tiny / "plain", config=EngineConfig(speculative="medusa"))


# ---- surfaces ------------------------------------------------------------------------------------


def test_offline_api_reports_speculation(tiny):
    from llmc.runtime.llm import LLM

    prompt = [5, 6, 7, 8] * 6
    plain = LLM(tiny / "pkg", speculative="off").generate(prompt, SamplingParams(max_tokens=24))[0]
    assert plain.speculation is None
    # The package's choice, its draft and k = 3, always proposing: the adaptive policy would not
    # use a draft as large as the model (it costs a target step per proposal).
    llm = LLM(tiny / "pkg", adaptive_speculation=False)
    out = llm.generate(prompt, SamplingParams(max_tokens=24))[0]
    assert out.output_token_ids == plain.output_token_ids
    stats = out.speculation
    assert stats.draft_tokens > 0 and 0 <= stats.accepted_tokens <= stats.draft_tokens
    assert stats.generated_tokens == 24 and stats.target_steps < 24 + 1
    assert stats.tokens_per_step == pytest.approx(24 / stats.target_steps)
    metrics = llm.metrics()
    assert metrics["spec_draft_tokens"] == stats.draft_tokens
    assert metrics["spec_acceptance_rate"] == pytest.approx(stats.acceptance_rate)
    assert metrics["spec_mean_accepted_tokens_per_step"] >= 1
    assert llm.engine.speculator.config.num_speculative_tokens == 3


def test_package_cli_takes_the_speculative_flags(tiny):
    def generate(*flags):
        command = [sys.executable, str(tiny / "pkg"), "generate", "--tokens", "5,6,7,8,5,6,7,8", "-n", "12", *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    plain = generate("--speculative", "off")
    assert plain.returncode == 0, plain.stderr
    for flags in (("--speculative", "ngram", "--num-speculative-tokens", "2"), ()):
        result = generate(*flags)
        assert result.returncode == 0 and result.stdout == plain.stdout, result.stderr
    bad = generate("--speculative", "medusa")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    info = subprocess.run([sys.executable, str(tiny / "pkg"), "info"], capture_output=True, text=True, timeout=120)
    assert "speculative draft, up to 3 tokens (draft model in draft/)" in info.stdout


def test_metrics_endpoint_reports_acceptance(tiny):
    from fastapi.testclient import TestClient

    from llmc.runtime.server import create_app

    engine = LLMEngine.from_package(tiny / "pkg", config=EngineConfig(speculative="ngram"))
    with TestClient(create_app(engine)) as client:
        # greedy (the default temperature 1 samples, and a random continuation gives lookup nothing to
        # find): the tiny model continues a repetitive prompt with a repeating run that it proposes
        reply = client.post("/v1/completions", json={"prompt": "abcdabcdabcdabcdabc", "max_tokens": 12,
                                                          "temperature": 0})
        assert reply.status_code == 200
        text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("llmc_spec_")}
    assert values["llmc_spec_draft_tokens_total"] > 0, (values, reply.json())
    assert math.isclose(values["llmc_spec_acceptance_rate"],
                        values["llmc_spec_accepted_tokens_total"] / values["llmc_spec_draft_tokens_total"])
    assert values["llmc_spec_mean_accepted_tokens_per_step"] >= 1
