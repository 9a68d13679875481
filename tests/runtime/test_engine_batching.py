"""The engine under load: continuous batching, chunked prefill, preemption, prefix caching, abort.

Greedy outputs must equal each request run alone and HF ``generate``. Batched GEMMs sum in another
order than single-sequence ones, so where the top two logits of a step are within ``TIE`` the other
token is acceptable — and ``assert_same_tokens`` checks that a tie is exactly why two runs part
(the gap is read from the reference run's top-2 logprobs, which differ by the logit gap).
"""

from __future__ import annotations

import random

import pytest
import torch

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.engine import EngineConfig, LLMEngine, RequestError
from llmc.runtime.sampler import SamplingParams

TIE = 1e-5
POSITIONS = 512


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    save_tiny_model("llama", root / "model", max_position_embeddings=POSITIONS)
    compile_model(root / "model", "cpu", root / "pkg")
    return root


def engine(model, **config) -> LLMEngine:
    return LLMEngine.from_package(model / "pkg", config=EngineConfig(**config))


def workload(n=32, seed=0):
    """``n`` prompts of 1-300 tokens (the extremes included) and 1-24 new tokens each."""
    rng = random.Random(seed)
    lengths = [1, 300] + [rng.randint(1, 300) for _ in range(n - 2)]
    prompts = [[rng.randrange(128) for _ in range(length)] for length in lengths]
    return prompts, [rng.randint(1, 24) for _ in range(n)]


def run(eng: LLMEngine, prompts, max_tokens, logprobs=2, **sampling):
    """Submit everything at once, step to the end; per request (tokens, top-2 gaps)."""
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=m, logprobs=logprobs, **sampling))
    done = {}
    gaps = {str(i): [] for i in range(len(prompts))}
    while eng.has_unfinished_requests():
        for out in eng.step():
            for lp in out.logprobs or []:
                gaps[out.request_id].append(lp.top[0][1] - lp.top[1][1])
            if out.finished:
                done[out.request_id] = out.output_token_ids
    assert eng.blocks.usage == 0, "finished requests must give back every page"
    return [(done[str(i)], gaps[str(i)]) for i in range(len(prompts))]


def assert_same_tokens(got: list[int], want: list[int], want_gaps: list[float], what: str) -> int:
    """Equal, or equal up to a step where the reference's top two logits tie; returns 1 on a tie."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert want_gaps[i] < TIE, f"{what}: token {i} is {a}, expected {b} (top-2 gap {want_gaps[i]:.2e})"
            return 1
    assert len(got) == len(want), f"{what}: {len(got)} tokens, expected {len(want)}"
    return 0




@pytest.fixture(scope="module")
def reference(model):
    """Each request alone (prefix caching off, so nothing is shared) and HF generate."""
    prompts, max_tokens = workload()
    alone_engine = engine(model, enable_prefix_caching=False)
    alone = [run(alone_engine, [p], [m])[0] for p, m in zip(prompts, max_tokens)]
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model / "model", dtype=torch.float32)
    hf_runs = []
    for p, m in zip(prompts, max_tokens):
        out = hf.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        top2 = [t[0].topk(2).values for t in out.logits]
        hf_runs.append((out.sequences[0, len(p):].tolist(), [float(v[0] - v[1]) for v in top2]))
    return prompts, max_tokens, alone, hf_runs


def test_32_mixed_requests_match_alone_and_hf(model, reference):
    prompts, max_tokens, alone, hf_runs = reference
    eng = engine(model)  # the cpu target: 8 sequences, 512-token steps -> chunked prefill of long prompts
    batched = run(eng, prompts, max_tokens)
    ties = 0
    for i, ((got, _), (want, gaps), (hf_tokens, hf_gaps)) in enumerate(zip(batched, alone, hf_runs)):
        ties += assert_same_tokens(got, want, gaps, f"request {i} batched vs alone")
        ties += assert_same_tokens(want, hf_tokens, hf_gaps, f"request {i} alone vs HF generate")
    assert ties <= 2, f"{ties} tie-breaks among 32 requests: too many to be chance"
    assert eng.scheduler.counters.steps < sum(max_tokens), "requests must share steps"


def test_preemption_under_kv_pressure_keeps_outputs(model, reference):
    prompts, max_tokens, alone, _ = reference
    probe = engine(model)
    need = sum(probe.blocks.blocks_needed(len(p) + m) for p, m in zip(prompts, max_tokens))
    per_block = probe.kv_cache_bytes // probe.blocks.num_blocks
    eng = engine(model, kv_cache_bytes=per_block * (need // 8), max_num_seqs=32, max_num_batched_tokens=256)
    assert eng.blocks.num_blocks < need / 4
    batched = run(eng, prompts, max_tokens)
    assert eng.scheduler.counters.preemptions > 0
    for i, ((got, _), (want, gaps)) in enumerate(zip(batched, alone)):
        assert_same_tokens(got, want, gaps, f"request {i} under preemption")


def test_shared_system_prompt_is_computed_once(model):
    rng = random.Random(1)
    system = [rng.randrange(128) for _ in range(200)]
    prompts = [system + [rng.randrange(128) for _ in range(rng.randint(5, 30))] for _ in range(16)]
    max_tokens = [8] * 16
    cached = engine(model)
    with_cache = run(cached, prompts, max_tokens)
    uncached = engine(model, enable_prefix_caching=False)
    without = run(uncached, prompts, max_tokens)
    for i, ((got, _), (want, gaps)) in enumerate(zip(with_cache, without)):
        assert_same_tokens(got, want, gaps, f"request {i} with prefix caching")
    shared = (len(system) // cached.block_size) * cached.block_size   # the full pages of the prefix
    counters = cached.scheduler.counters
    assert counters.prefix_cache_hits == 15 * shared
    total_prompt = sum(map(len, prompts))
    assert cached.prompt_tokens == total_prompt - 15 * shared
    assert uncached.prompt_tokens == total_prompt and uncached.scheduler.counters.prefix_cache_hits == 0


def test_abort_frees_pages_at_once(model):
    eng = engine(model)
    for i in range(3):
        eng.add_request(f"r{i}", list(range(1, 60)), SamplingParams(max_tokens=50))
    for _ in range(3):
        eng.step()
    held = eng.blocks.num_blocks - eng.blocks.num_free_blocks
    assert held > 0
    out = eng.abort_request("r1")
    assert out.finished and out.finish_reason == "abort"
    assert eng.blocks.num_blocks - eng.blocks.num_free_blocks < held
    eng.abort_request("r0"), eng.abort_request("r2"), eng.abort_request("unknown")
    assert eng.blocks.usage == 0 and not eng.has_unfinished_requests()


def test_priority_orders_the_waiting_queue(model):
    eng = engine(model, max_num_seqs=1)
    for name, priority in (("low", 5), ("high", 0), ("mid", 1)):
        eng.add_request(name, [1, 2, 3], SamplingParams(max_tokens=2), priority=priority)
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["high", "mid", "low"]


def test_seeded_sampling_is_the_same_alone_and_batched(model):
    prompts, _ = workload(6, seed=3)
    params = dict(temperature=0.9, top_p=0.95)
    batched = run(engine(model), prompts, [10] * 6, logprobs=None, seed=7, **params)
    for p, (tokens, _) in zip(prompts, batched):
        alone = run(engine(model), [p], [10], logprobs=None, seed=7, **params)[0][0]
        assert tokens == alone


def test_bad_requests_are_refused_with_the_field_named(model):
    eng = engine(model)
    with pytest.raises(RequestError, match="empty") as err:
        eng.add_request("a", [], SamplingParams())
    assert err.value.param == "prompt"
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("b", [1, 500], SamplingParams())
    with pytest.raises(RequestError, match="context") as err:
        eng.add_request("c", [1] * POSITIONS, SamplingParams())
    assert err.value.param == "prompt"
    with pytest.raises(RequestError, match="lower max_tokens") as err:
        eng.add_request("d", [1] * 500, SamplingParams(max_tokens=20))
    assert err.value.param == "max_tokens"
    eng.add_request("e", [1], SamplingParams())
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("e", [1], SamplingParams())
    small = engine(model, kv_cache_bytes=eng.kv_cache_bytes // eng.blocks.num_blocks * 4)  # 4 pages
    with pytest.raises(RequestError, match="KV pages"):
        small.add_request("f", [1] * 70, SamplingParams(max_tokens=1))


def test_n_samples_share_the_prompt_and_copy_on_write(model):
    prompt = list(range(40, 61))  # 21 tokens: one full page and a shared, partly filled one
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    eng = engine(model)
    ids = eng.add_request("r", prompt, params, n=3)
    assert ids == ["r", "r#1", "r#2"]
    outputs = {}
    while eng.has_unfinished_requests():
        outputs.update({o.request_id: o.output_token_ids for o in eng.step() if o.finished})
    assert eng.blocks.usage == 0
    assert eng.prompt_tokens == len(prompt)            # the prompt ran once for all three samples
    assert eng.blocks.num_copies == 2                  # two samples copied the shared page; the last owns it
    for i, rid in enumerate(ids):                      # each sample is what its seed gives alone
        want = run(engine(model), [prompt], [6], logprobs=None, temperature=1.0, seed=11 + i)[0][0]
        assert outputs[rid] == want, rid
    assert len({tuple(v) for v in outputs.values()}) > 1
