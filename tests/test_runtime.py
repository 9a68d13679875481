"""The package runtime's parts on their own: the KV cache against the interpreter's, the sampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.ir import ContiguousKVCache as ReferenceKVCache
from llmc.runtime.kv_cache import ContiguousKVCache
from llmc.runtime.sampler import Sampler, SamplingError, SamplingParams, _top_p_filter


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 9)), min_size=1, max_size=8))
def test_kv_cache_matches_the_interpreter_cache(steps):
    """Appends (with re-prefills that rewrite earlier positions) leave both caches equal."""
    ours, ref = ContiguousKVCache(initial_capacity=2), ReferenceKVCache()
    gen = torch.Generator().manual_seed(0)
    for start, count in steps:
        positions = torch.arange(start, start + count)
        k, v = torch.randn(count, 2, 4, generator=gen), torch.randn(count, 2, 3, generator=gen)
        for layer in (0, 1):
            got, want = ours.append(layer, k, v, positions), ref.append(layer, k, v, positions)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
    assert ours.length == ref.length


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def kept(top_p: float) -> list[bool]:
        return (_top_p_filter(logits, top_p) > -float("inf")).tolist()

    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1e-9) == [True, False, False, False]  # the most likely token always stays


def test_top_k_and_temperature_restrict_the_choices():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    picks = {Sampler(SamplingParams(temperature=5.0, top_k=2, seed=s))(logits) for s in range(50)}
    assert picks == {1, 2}
    assert Sampler(SamplingParams())(logits) == 1  # greedy by default


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_params_are_errors(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)
