"""The batched sampler: each filter and penalty on hand-worked rows, seeds, greedy, logprobs, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.runtime.sampler import SamplingError, SamplingParams, SequenceSampler, probabilities, sample

# A row whose probabilities are exact binary fractions, so hand-worked renormalisations are easy to read.
QUARTERS = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))


def dist(logits: torch.Tensor, prompt_ids=(), output_ids=(), **params) -> list[float]:
    """The distribution one sequence would draw from, as a list."""
    sampler = SequenceSampler(SamplingParams(**params), prompt_ids)
    for token in output_ids:
        sampler.record(token)
    return probabilities(logits, [sampler])[0].tolist()


def softmax(values: list[float]) -> list[float]:
    return torch.softmax(torch.tensor(values), -1).tolist()


@pytest.mark.parametrize("top_k, kept", [(1, [1]), (2, [1, 2, 3]), (4, [0, 1, 2, 3]), (0, [0, 1, 2, 3, 4])])
def test_top_k_keeps_the_k_highest_and_their_ties(top_k, kept):
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    want = [0.0] * 5
    for i, p in zip(kept, softmax([logits[0, i].item() for i in kept])):
        want[i] = p
    assert dist(logits, temperature=1.0, top_k=top_k) == pytest.approx(want)


@pytest.mark.parametrize("top_p, want", [
    (0.499, [1, 0, 0, 0]),              # the first token alone reaches the mass
    (0.7, [2 / 3, 1 / 3, 0, 0]),        # 0.5 < 0.7 <= 0.75
    (0.76, [4 / 7, 2 / 7, 1 / 7, 0]),   # 0.75 < 0.76 <= 0.875
    (1.0, [0.5, 0.25, 0.125, 0.125]),   # off
])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, want):
    assert dist(QUARTERS, temperature=1.0, top_p=top_p) == pytest.approx(want)


SQRT_HALF = math.sqrt(0.5)


@pytest.mark.parametrize("min_p, temperature, want", [
    (0.2, 1.0, [0.5, 0.25, 0.125, 0.125]),  # cut-off 0.1: all stay
    (0.3, 1.0, [2 / 3, 1 / 3, 0, 0]),       # cut-off 0.15
    (0.6, 1.0, [1, 0, 0, 0]),               # cut-off 0.3
    # At temperature 2 the ratios to the top are square roots, 1, .71, .5, .5: min-p follows temperature.
    (0.6, 2.0, [1 / (1 + SQRT_HALF), SQRT_HALF / (1 + SQRT_HALF), 0, 0]),
])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, temperature, want):
    assert dist(QUARTERS, temperature=temperature, min_p=min_p) == pytest.approx(want)


def test_top_k_comes_before_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # After top-3 the mass is 4/9, 3/9, 2/9: reaching 0.75 takes two tokens. On the whole row, three.
    assert dist(logits, temperature=1.0, top_k=3, top_p=0.75) == pytest.approx([4 / 7, 3 / 7, 0, 0])
    assert dist(logits, temperature=1.0, top_p=0.75) == pytest.approx([4 / 9, 3 / 9, 2 / 9, 0])


def test_temperature_scales_the_logits():
    logits = torch.tensor([[1.0, 2.0, -0.5]])
    assert dist(logits, temperature=0.5) == pytest.approx(softmax([2.0, 4.0, -1.0]))


def test_repetition_penalty_covers_prompt_and_output_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]])
    # Prompt ids 0, 1 and output id 3 are penalised: positive logits halved, negative ones doubled.
    got = dist(logits, prompt_ids=[0, 1], output_ids=[3], temperature=1.0, repetition_penalty=2.0)
    assert got == pytest.approx(softmax([1.0, -2.0, 0.5, 0.5, 3.0]))


def test_repetition_penalty_changes_the_greedy_pick():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    assert sample(logits, [SequenceSampler(SamplingParams(), [0])])[0].token_id == 0
    penalised = SequenceSampler(SamplingParams(repetition_penalty=2.0), [0])  # 2.0 -> 1.0 < 1.5
    assert sample(logits, [penalised])[0].token_id == 1


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    got = dist(logits, prompt_ids=[1], output_ids=[2, 2, 3], temperature=1.0,
               presence_penalty=0.5, frequency_penalty=0.25)
    assert got == pytest.approx(softmax([0.0, 0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25)]))
    # Negative penalties make repeats more likely.
    got = dist(logits, output_ids=[3], temperature=1.0, presence_penalty=-1.0)
    assert got == pytest.approx(softmax([0.0, 0.0, 0.0, 1.0]))


def test_sample_records_its_tokens_for_the_penalties():
    # Greedy on a fixed row with frequency 0.5: each pick lowers that token's logit by 0.5.
    sampler = SequenceSampler(SamplingParams(frequency_penalty=0.5), prompt_ids=[])
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    picks = [sample(logits, [sampler])[0].token_id for _ in range(6)]
    assert picks == [0, 1, 0, 1, 0, 2]  # at step 5 ids 0 and 2 tie at 0.0: the lower id wins
    assert sampler.output_ids == picks


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(-3, 3), min_size=6, max_size=6), min_size=1, max_size=5),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_greedy_is_the_argmax_with_ties_to_the_lowest_id(rows, dtype):
    samplers = [SequenceSampler(SamplingParams(), []) for _ in rows]
    got = [r.token_id for r in sample(torch.tensor(rows, dtype=dtype), samplers)]
    assert got == [row.index(max(row)) for row in rows]


SEEDED_PARAMS = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    top_k=st.sampled_from([0, 1, 5]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    min_p=st.sampled_from([0.0, 0.05]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    presence_penalty=st.sampled_from([0.0, 0.5]),
    frequency_penalty=st.sampled_from([0.0, -0.5]),
    logprobs=st.sampled_from([None, 0, 3]),
    seed=st.integers(0, 2**64 - 1),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(SEEDED_PARAMS, min_size=1, max_size=4), st.lists(st.booleans(), min_size=1, max_size=3),
       st.integers(0, 2**31))
def test_a_seeded_sequence_gives_the_same_tokens_alone_and_in_a_batch(params, unseeded_rows, data_seed):
    # Unseeded rows ride along in the batch; they must not shift the seeded rows' draws.
    batch_params = params + [dataclasses.replace(params[0], seed=None, temperature=1.0) for _ in unseeded_rows]
    prompt = [1, 2, 3]
    batch = [SequenceSampler(p, prompt) for p in batch_params]
    alone = [SequenceSampler(p, prompt) for p in params]
    logits = torch.randn(5, len(batch), 30, generator=torch.Generator().manual_seed(data_seed))
    for step in logits:
        together = sample(step, batch)
        for i, sampler in enumerate(alone):
            assert sample(step[i:i + 1], [sampler])[0] == together[i]


def test_different_seeds_give_different_tokens_and_no_seed_is_fresh_entropy():
    def tokens(seed):
        sampler = SequenceSampler(SamplingParams(temperature=1.0, seed=seed), [])
        return [sample(torch.zeros(1, 1000), [sampler])[0].token_id for _ in range(8)]

    assert tokens(0) == tokens(0)
    assert tokens(0) != tokens(1)
    assert tokens(None) != tokens(None)


def test_sampling_never_touches_the_global_rng():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    samplers = [SequenceSampler(SamplingParams(temperature=1.0, seed=s), []) for s in (None, 7)]
    sample(torch.randn(2, 10, generator=torch.Generator().manual_seed(0)), samplers)
    assert torch.equal(torch.rand(3), want)


def test_draws_follow_the_distribution():
    # 4000 seeded sequences in one batch; counts within 5 standard deviations of 2000/1000/500/500.
    n = 4000
    samplers = [SequenceSampler(SamplingParams(temperature=1.0, seed=s), []) for s in range(n)]
    tokens = [r.token_id for r in sample(QUARTERS.expand(n, 4), samplers)]
    for token, p in enumerate([0.5, 0.25, 0.125, 0.125]):
        assert abs(tokens.count(token) - n * p) < 5 * math.sqrt(n * p * (1 - p)), token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_of_the_raw_logits(dtype):
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    processed = dict(temperature=0.7, top_k=3, repetition_penalty=1.5, frequency_penalty=1.0, seed=5)
    samplers = [SequenceSampler(SamplingParams(**processed, logprobs=4), [0, 1]),
                SequenceSampler(SamplingParams(logprobs=0), []),
                SequenceSampler(SamplingParams(temperature=1.0), [])]
    results = sample(logits, samplers)
    raw = torch.log_softmax(logits.float(), -1)
    for row, result in zip(raw, results[:2]):
        assert result.logprob == pytest.approx(row[result.token_id].item())
    top = raw[0].topk(4)
    assert results[0].top_logprobs == [(i, pytest.approx(v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    assert [v for _, v in results[0].top_logprobs] == sorted((v for _, v in results[0].top_logprobs), reverse=True)
    assert results[1].top_logprobs == []
    assert results[2].logprob is None and results[2].top_logprobs is None


def test_lists_become_tuples_and_one_stop_string_is_a_list_of_one():
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])
    assert params.stop == ("a", "b") and params.stop_token_ids == (1, 2)
    assert SamplingParams(stop="###").stop == ("###",)
    hash(params)  # frozen and hashable
    assert SamplingParams(0.5, 3, 0.9, 7) == SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=7)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.0),
    ("temperature", -0.1), ("temperature", NAN), ("temperature", INF),
    ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", NAN),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", NAN),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", NAN),
    ("presence_penalty", 2.5), ("presence_penalty", NAN),
    ("frequency_penalty", -2.5), ("frequency_penalty", NAN),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0),
    ("stop", [""]), ("stop", 5), ("stop", [3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]),
    ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_tiny_sampling_values_do_not_overflow_float32():
    """5e-324 is a valid temperature / top_p / penalty, but dividing float32 scores by it gives inf
    and NaN; such values act as greedy / SAMPLING_EPS, and sampling still returns a real token."""
    from llmc.runtime.sampler import SAMPLING_EPS

    params = SamplingParams(temperature=5e-324, top_p=5e-324, repetition_penalty=5e-324)
    assert params.greedy and params.top_p == SAMPLING_EPS and params.repetition_penalty == SAMPLING_EPS
    tiny_but_sampled = SamplingParams(temperature=2e-5, top_p=5e-324, seed=0)
    logits = torch.randn(2, 50)
    results = sample(logits, [SequenceSampler(params, [1, 2]), SequenceSampler(tiny_but_sampled, [3])])
    assert all(0 <= r.token_id < 50 for r in results)
