"""Greedy speculative decoding produces the engine's plain outputs, token for token.

32 mixed requests (short and long prompts, repetitive ones that n-gram lookup predicts, a shared
prefix, repetition/presence penalties, stop strings and ids, n = 2, max_tokens 1..48) run with a
draft model and with n-gram lookup, and are compared with the same engine configuration decoding
plainly: output ids, finish reasons and text. Models: the example model with a draft made of its
first 2 layers (bench/speculative.py's recipe), and tiny seeded models — a Llama drafting for
itself (every proposal accepted: the bonus-token path) and with its own first layer, a Mistral
(sliding window 8, so verification chunks cross the window) with a draft of another seed, and a
Gemma 2 (soft-capping, alternating windows) with n-gram lookup.

Why exact equality is an honest claim: verification scores the k + 1 tokens as one chunk over the
cached prefix (the chunked-prefill path), plain decoding scores one token at a time (the decode
path). The two sum in different orders, so their logits differ by float rounding: measured at most
7.6e-6 on the example model, 2.7e-7 on the tiny Llama. That can only flip an argmax whose top two
logits are closer than that, and the plain engine itself is exposed to the same rounding between
batch compositions (test_engine_batching.py). So the reference run records its top-2 gap at every
step, and a divergence is accepted only where that gap is below ``TIE`` (1e-4, ten times the
largest difference measured), at most once per comparison; over these workloads it does not occur
at all in practice, so the outputs are checked equal token for token.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.engine import EngineConfig, LLMEngine
from llmc.runtime.sampler import SamplingParams

pytestmark = pytest.mark.slow  # compiles models, runs thousands of requests

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "models" / "stdlib-llama-6m"
TIE = 1e-4


def bench_module():
    """bench/speculative.py: its ``truncated_checkpoint`` makes the drafts here as the bench does."""
    spec = importlib.util.spec_from_file_location("bench_speculative", REPO / "bench" / "speculative.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small steps: torch's thread pool only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative-greedy")
    truncate = bench_module().truncated_checkpoint
    out = {}
    compile_model(EXAMPLE, "cpu", root / "stdlib", draft=truncate(EXAMPLE, root / "stdlib-draft", 2))
    out["stdlib"] = root / "stdlib"
    llama = save_tiny_model("llama", root / "llama", max_position_embeddings=512)
    compile_model(llama, "cpu", root / "llama-self", draft=llama)
    out["llama-self"] = root / "llama-self"
    compile_model(llama, "cpu", root / "llama-1layer", draft=truncate(llama, root / "llama-draft", 1))
    out["llama-1layer"] = root / "llama-1layer"
    mistral = save_tiny_model("mistral", root / "mistral", max_position_embeddings=512)
    compile_model(mistral, "cpu", root / "mistral-pkg",
                  draft=save_tiny_model("mistral", root / "mistral-seed1", seed=1, max_position_embeddings=512))
    out["mistral"] = root / "mistral-pkg"
    gemma = save_tiny_model("gemma2", root / "gemma2", max_position_embeddings=512)
    compile_model(gemma, "cpu", root / "gemma2-pkg", speculative="ngram")
    out["gemma2"] = root / "gemma2-pkg"
    return out


CODE = [
    "def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(argv):\n", "class Point:\n    def __init__(self, x, y):\n",
    "    for key, value in sorted(items.items()):\n", "        self.assertEqual(result, expected)\n",
    "# Copyright 2001 Python Software Foundation\n", "def _check_arg(name, value):\n    if not isinstance(value, str):\n",
    "        self.alpha = alpha\n        self.beta = beta\n        self.gamma = gamma\n        self.",
]


def workload(encode, vocab: int, seed: int = 0):
    """32 (prompt, params) pairs of every kind the engine meets; ``encode`` turns text into ids."""
    rng = random.Random(seed)
    text = [CODE[i % len(CODE)] for i in range(12)]
    prompts = [encode(t) for t in text]
    prompts += [[rng.randrange(vocab) for _ in range(n)] for n in (1, 2, 300, 57, 123)]
    for _ in range(7):  # repetitive: a phrase said again and again (n-gram lookup's case)
        phrase = [rng.randrange(vocab) for _ in range(rng.randint(3, 12))]
        prompts.append((phrase * rng.randint(2, 6))[:200])
    shared = [rng.randrange(vocab) for _ in range(40)]  # a shared prefix: prefix caching meets speculation
    prompts += [shared + [rng.randrange(vocab) for _ in range(rng.randint(1, 8))] for _ in range(8)]
    params = []
    for i in range(len(prompts)):
        extra = {}
        if i % 7 == 3:
            extra["repetition_penalty"] = 1.3
        if i % 11 == 5:
            extra["presence_penalty"] = 0.5
        if i % 9 == 4:
            extra["stop"] = ["\n", "e"]
        if i % 10 == 6:
            extra["stop_token_ids"] = [rng.randrange(vocab) for _ in range(3)]
        params.append(SamplingParams(max_tokens=[1, 2, 5, 16, 48][i % 5] if i % 4 else 48, logprobs=2, **extra))
    return prompts, params


def run(engine: LLMEngine, prompts, params):
    """Everything submitted at once (one request with n = 2), stepped to the end; per request id
    (ids, finish reason, text, top-2 gaps)."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p, n=2 if i == 7 else 1)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            gaps = done.setdefault(out.request_id, [None, None, None, []])[3]
            gaps += [lp.top[0][1] - lp.top[1][1] for lp in out.logprobs or []]
            if out.finished:
                done[out.request_id][:3] = [out.output_token_ids, out.finish_reason, out.text]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "finished requests give back every page"
    return done


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    ties = 0
    for rid, (ids, reason, text, _) in want.items():
        g_ids, g_reason, g_text, _ = got[rid]
        if g_ids == ids:
            assert (g_reason, g_text) == (reason, text), f"{what} request {rid}"
            continue
        first = next(i for i, (a, b) in enumerate(zip(g_ids + [None], ids + [None])) if a != b)
        gaps = want[rid][3]
        gap = gaps[first] if first < len(gaps) else float("inf")  # one run stopped, the other went on
        assert gap < TIE, f"{what} request {rid}: token {first} is {g_ids[first:first + 1]}, plain decoding " \
                          f"gave {ids[first:first + 1]} (top-2 gap {gap:.2e})"
        ties += 1
    assert ties <= 1, f"{what}: {ties} near-tie divergences"


# (package, method, EngineConfig options). The draft cases propose a fixed k: at a batch of 8 the
# adaptive policy rightly finds these drafts (half the model's bytes, or all of it) not worth
# running, and the point here is to verify many proposals.
CASES = [
    ("stdlib", "draft", {"num_speculative_tokens": 4, "adaptive_speculation": False}),
    ("stdlib", "ngram", {}),
    ("llama-self", "draft", {"adaptive_speculation": False}),  # adaptive: a draft this big is never worth it
    ("llama-1layer", "draft", {"num_speculative_tokens": 5, "adaptive_speculation": False}),
    ("llama-1layer", "ngram", {"num_speculative_tokens": 6, "adaptive_speculation": False,
                               "max_num_batched_tokens": 24}),  # proposals cut to a tight budget
    ("mistral", "draft", {"num_speculative_tokens": 3, "adaptive_speculation": False}),
    ("gemma2", "ngram", {}),
]


@pytest.mark.parametrize("name, method, options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_32_mixed_requests_match_plain_decoding(packages, name, method, options):
    base = {k: v for k, v in options.items() if k in ("max_num_batched_tokens",)}
    plain_engine = LLMEngine.from_package(packages[name], config=EngineConfig(speculative="off", **base))
    tokenizer = plain_engine.tokenizer
    prompts, params = workload(lambda t: tokenizer.encode(t), plain_engine.vocab_size)
    plain = run(plain_engine, prompts, params)
    engine = LLMEngine.from_package(packages[name], config=EngineConfig(speculative=method, **options))
    assert_same(run(engine, prompts, params), plain, f"{name} {method}")
    metrics = engine.metrics()
    assert metrics["spec_accepted_tokens"] > 0 and metrics["spec_verifications"] > 0
    assert metrics["steps"] < plain_engine.metrics()["steps"], "speculation must save target steps"
    if name == "llama-self":  # the draft is the model: only float rounding can reject a proposal
        assert metrics["spec_acceptance_rate"] > 0.98


def test_preemption_under_kv_pressure_keeps_outputs(packages):
    """Few pages: sequences are preempted (their draft k/v freed with them) and proposals dropped
    for want of pages; the outputs stay those of plain decoding under the same pressure."""
    probe = LLMEngine.from_package(packages["llama-1layer"], config=EngineConfig(speculative="off"))
    prompts, params = workload(lambda t: probe.tokenizer.encode(t), probe.vocab_size, seed=1)
    per_block = probe.kv_cache_bytes // probe.blocks.num_blocks
    need = sum(probe.blocks.blocks_needed(len(p) + q.max_tokens) for p, q in zip(prompts, params))
    config = dict(kv_cache_bytes=per_block * (need // 6), max_num_seqs=32, max_num_batched_tokens=256)
    plain = run(LLMEngine.from_package(packages["llama-1layer"], config=EngineConfig(speculative="off", **config)),
                prompts, params)
    engine = LLMEngine.from_package(packages["llama-1layer"], config=EngineConfig(
        speculative="draft", num_speculative_tokens=4, adaptive_speculation=False, **config))
    assert_same(run(engine, prompts, params), plain, "under preemption")
    assert engine.scheduler.counters.preemptions > 0
    draft = engine.speculator.proposer.blocks
    assert draft.num_free_blocks == draft.num_blocks
