"""The package runtime's sampler on its own (the paged KV cache has tests in tests/runtime/)."""

from __future__ import annotations

import pytest
import torch

from llmc.runtime.sampler import Sampler, SamplingError, SamplingParams, _top_p_filter


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
