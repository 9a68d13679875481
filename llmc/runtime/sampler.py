"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded by a torch.Generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Sampling parameters out of range (the CLI reports it as a one-line error)."""


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy (argmax); ``top_k=0`` and ``top_p=1`` switch those filters off.

    ``seed`` makes sampling reproducible: the same seed, prompt and params give the same tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks one token id from a logits row ``[vocab]``; holds the generator of one sequence."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh entropy: unseeded runs differ
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        scores = logits.float() / p.temperature
        if 0 < p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if p.top_p < 1:
            scores = _top_p_filter(scores, p.top_p)
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``."""
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = torch.softmax(sorted_scores, -1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p      # never drops the first (most likely) token
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, -float("inf"))
