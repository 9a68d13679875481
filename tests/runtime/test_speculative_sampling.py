"""Sampled speculative decoding draws from the same law as plain sampling.

A tiny Llama with a 16-token vocabulary is the target; its draft is the same architecture with
other weights (seed 1), so q and p differ a lot (acceptance about 0.3-0.6). For a fixed prompt the
exact law of the first three generated tokens is computed from the target's logits, processed by
the runtime's own sampler (``probabilities``: penalties over the tokens so far, temperature,
top-p): it is plain sampling's law by construction. 2,000 seeded requests (seeds 0..1999, so the
test is deterministic) then give a chi-square goodness-of-fit p-value against it, cells with
fewer than 5 expected draws pooled, for:

- plain sampling (calibrates the test),
- speculative sampling with the draft model and with n-gram lookup (k = 2, always proposing:
  the first token comes from the prompt's row, the next two from verification),
- deliberately wrong rules, which the same test must reject at p < 0.01: keeping every proposal,
  and resampling from p instead of the residual max(0, p - q) after a rejection.

The p-value comes from torch.special.gammaincc (the chi-square survival function), so no scipy
is needed.
"""

from __future__ import annotations

import pytest
import torch

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime import speculative
from llmc.runtime.engine import EngineConfig, LLMEngine
from llmc.runtime.sampler import SamplingParams, SequenceSampler, probabilities

pytestmark = pytest.mark.slow  # compiles models, runs thousands of requests

DRAWS = 2000
DEPTH = 3
ALPHA = 0.01
BIG = dict(max_num_seqs=256, max_num_batched_tokens=4096)  # all requests in flight at once
TEMPERATURE_ONLY = SamplingParams(0.1)
WITH_PENALTY = SamplingParams(0.25, top_p=0.9, repetition_penalty=1.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small steps: torch's thread pool only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative-sampling")
    model = save_tiny_model("llama", root / "model", vocab_size=16)
    draft = save_tiny_model("llama", root / "draft", seed=1, vocab_size=16)
    return compile_model(model, "cpu", root / "pkg", draft=draft).out_dir


def exact_law(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> dict[tuple, float]:
    """P(first DEPTH tokens) under plain sampling: the sampler's processed distribution after each prefix."""
    law = {(): 1.0}
    for _ in range(DEPTH):
        grown = {}
        for prefix, mass in law.items():
            sampler = SequenceSampler(params, prompt)
            for token in prefix:
                sampler.record(token)
            p = probabilities(engine.prefill(prompt + list(prefix))[-1:].float(), [sampler])[0]
            for token in torch.nonzero(p).flatten().tolist():
                grown[prefix + (token,)] = mass * float(p[token])
        law = grown
    return law


def draws(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[tuple]:
    for seed in range(DRAWS):
        engine.add_request(str(seed), prompt, SamplingParams(
            params.temperature, params.top_k, params.top_p, seed, max_tokens=DEPTH,
            repetition_penalty=params.repetition_penalty))
    out = {}
    while engine.has_unfinished_requests():
        for result in engine.step():
            if result.finished:
                out[result.request_id] = tuple(result.output_token_ids)
    return [out[str(seed)] for seed in range(DRAWS)]


def p_value(samples: list[tuple], law: dict[tuple, float]) -> float:
    """Chi-square goodness of fit; cells expecting fewer than 5 draws are pooled into one."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    cells = [c for c in law if law[c] * n >= 5]
    observed = [counts.get(c, 0) for c in cells]
    expected = [law[c] * n for c in cells]
    if n - sum(expected) > 1e-6:  # the pooled rest
        observed.append(n - sum(observed))
        expected.append(n - sum(expected))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def speculative_engine(package, method: str) -> LLMEngine:
    return LLMEngine.from_package(package, config=EngineConfig(
        speculative=method, num_speculative_tokens=2, adaptive_speculation=False, **BIG))


def keep_every_proposal(p: float, q: float) -> float:
    return 1.0


def resample_from_p(p, q, token):
    return p


def prompt_for(method: str, plain: LLMEngine) -> list[int]:
    """n-gram lookup needs proposals the model finds likely: the prompt, its greedy continuation
    and the prompt again. The draft model proposes whatever the prompt."""
    base = [1, 2, 3, 4, 5]
    return base + plain.generate(base, 6) + base if method == "ngram" else [1, 2, 3, 1, 2, 3, 1, 2]


CASES = [  # (method, params, broken rules that must be caught)
    ("draft", TEMPERATURE_ONLY, [("acceptance_probability", keep_every_proposal), ("residual", resample_from_p)]),
    ("draft", WITH_PENALTY, [("acceptance_probability", keep_every_proposal)]),
    ("ngram", TEMPERATURE_ONLY, [("acceptance_probability", keep_every_proposal), ("residual", resample_from_p)]),
    ("ngram", WITH_PENALTY, [("acceptance_probability", keep_every_proposal)]),
]


@pytest.mark.parametrize("method, params, broken", CASES,
                         ids=["draft-temperature", "draft-penalty-top_p", "ngram-temperature", "ngram-penalty-top_p"])
def test_speculative_sampling_is_indistinguishable_from_plain(package, monkeypatch, method, params, broken):
    plain = LLMEngine.from_package(package, config=EngineConfig(speculative="off", **BIG))
    prompt = prompt_for(method, plain)
    law = exact_law(plain, prompt, params)
    assert p_value(draws(plain, prompt, params), law) > ALPHA, "plain sampling must fit its own law"
    engine = speculative_engine(package, method)
    assert p_value(draws(engine, prompt, params), law) > ALPHA
    metrics = engine.metrics()
    assert metrics["spec_verifications"] >= DRAWS // 2 and 0.02 < metrics["spec_acceptance_rate"] < 0.98
    for name, wrong in broken:
        with monkeypatch.context() as patch:
            patch.setattr(speculative, name, wrong)
            assert p_value(draws(speculative_engine(package, method), prompt, params), law) < ALPHA, \
                f"the test cannot tell a broken {name} from the right one"
