"""Next-token sampling for a batch of sequences: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

``sample(logits, samplers)`` processes each row in this order (greedy rows stop after the penalties):

1. repetition penalty over prompt + output tokens (CTRL/HF: a positive logit is divided, a negative one
   multiplied);
2. presence and frequency penalties over output tokens (OpenAI: ``logit -= presence * (count > 0) +
   frequency * count``);
3. greedy rows (temperature 0): argmax, ties to the lowest id; the others go on;
4. temperature, then top-k (ties with the k-th stay), top-p and min-p on the row sorted high to low;
5. softmax, then one draw with the sequence's own generator (inverse CDF on one uniform number).

Every filter only ever drops the low end of the sorted row, and a switched-off filter leaves a row exactly
as it was, so a row's result never depends on the rows beside it: a seeded sequence gives the same tokens
alone and in any batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import KW_ONLY, dataclass
from typing import Sequence

import torch

MAX_LOGPROBS = 20  # the OpenAI API's limit on top logprobs


class SamplingError(ValueError):
    """Sampling parameters out of range (the CLI reports it as a one-line error)."""


def _require(ok: bool, field: str, valid: str, value) -> None:
    if not ok:
        raise SamplingError(f"{field} must be {valid}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A finite real number (NaN and infinities fail every range check through here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_tuple(value, field: str) -> tuple:
    if isinstance(value, str):  # the OpenAI API takes one stop string or a list of them
        return (value,)
    _require(isinstance(value, (list, tuple)), field, "a list or tuple", value)
    return tuple(value)


SAMPLING_EPS = 1e-5  # the smallest temperature / top_p / repetition_penalty the float32 math takes as given


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it ends.

    ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1``, ``min_p=0``, ``repetition_penalty=1`` and the
    other penalties at 0 switch those off. ``seed`` makes a sequence reproducible: the same seed, prompt
    and params give the same tokens whatever else is in the batch; without one each sequence draws fresh
    entropy. ``max_tokens`` (>= 1) is the most tokens the engine generates. ``stop`` strings end the text
    before them; ``stop_token_ids`` (and EOS unless ``ignore_eos``) end generation. ``logprobs=n`` asks for
    the sampled token's logprob and the ``n`` most likely tokens' (0 <= n <= 20), from the raw logits.

    The first four fields may be given by position (the first engine's call); the rest are keyword-only.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    _: KW_ONLY
    max_tokens: int = 16
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an int >= 1", self.max_tokens)
        _require(_is_finite(self.temperature) and self.temperature >= 0, "temperature",
                 "a finite number >= 0 (0 = greedy)", self.temperature)
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an int >= 0 (0 = off)", self.top_k)
        _require(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1] (1 = off)", self.top_p)
        _require(_is_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1] (0 = off)", self.min_p)
        _require(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                 "a finite number > 0 (1 = off)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_finite(value) and -2 <= value <= 2, name, "in [-2, 2] (0 = off)", value)
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
                 "None or an int in [0, 2**64)", self.seed)
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "ints >= 0",
                 self.stop_token_ids)
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)
        # Valid but tiny values (5e-324) overflow float32 scores to inf/NaN: below SAMPLING_EPS a
        # temperature is greedy and top_p / repetition_penalty act as SAMPLING_EPS (same tokens).
        if self.temperature < SAMPLING_EPS:
            object.__setattr__(self, "temperature", 0.0)
        for name in ("top_p", "repetition_penalty"):
            object.__setattr__(self, name, max(getattr(self, name), SAMPLING_EPS))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class SequenceSampler:
    """One sequence's sampling state: its params, its own generator, the tokens its penalties count.

    Nothing here depends on the KV cache, so the state survives the engine re-running the sequence's
    prefill (preemption by recompute). The generator is a CPU one whatever the device: each drawn token
    takes one uniform number from it, so draws never touch the global RNG or another sequence's stream.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device | str = "cpu"):
        self.params = params
        self.prompt_ids = tuple(int(i) for i in prompt_ids)
        self.output_ids: list[int] = []
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()  # fresh entropy: unseeded runs differ
        else:
            self.generator.manual_seed(params.seed)
        self.device = torch.device(device)  # where the penalty state lives; it follows the logits
        self._counts: torch.Tensor | None = None     # [vocab] float32: times each id is in output_ids
        self._in_prompt: torch.Tensor | None = None  # [vocab] bool: ids in the prompt

    def record(self, token_id: int) -> None:
        """Count ``token_id`` as generated (sample() does; call it for tokens chosen elsewhere)."""
        self.output_ids.append(int(token_id))
        if self._counts is not None and 0 <= token_id < self._counts.numel():
            self._counts[token_id] += 1

    def branch(self) -> "SequenceSampler":
        """A copy to try tokens on ahead of the sequence (a draft model's proposals): the same params,
        prompt and output so far, penalty counts of its own, and this sequence's generator, so the
        proposals' draws stay in the sequence's one random stream and a seed still reproduces them."""
        other = copy.copy(self)
        other.output_ids = list(self.output_ids)
        other._counts = None if self._counts is None else self._counts.clone()
        return other

    def uniform(self) -> float:
        """The next number in [0, 1) from this sequence's generator."""
        return float(torch.rand((), generator=self.generator))

    def penalty_state(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, in_prompt)`` over the vocabulary; built on first use, then kept up to date by record()."""
        if self._counts is None or self._counts.numel() != vocab or self._counts.device != device:
            self.device = device
            output = torch.tensor([i for i in self.output_ids if i < vocab], dtype=torch.long)
            self._counts = torch.bincount(output, minlength=vocab).to(device, torch.float32)
            prompt = torch.tensor([i for i in self.prompt_ids if 0 <= i < vocab], dtype=torch.long)
            self._in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._in_prompt[prompt.to(device)] = True
        return self._counts, self._in_prompt


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of token_id under log_softmax(raw logits); None unless params.logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # top-n (id, logprob) of the raw logits, highest first


def sample(logits: torch.Tensor, samplers: Sequence[SequenceSampler]) -> list[SampleResult]:
    """One token per row of ``logits`` [batch, vocab] (one row per sampler, in order); records each token.

    All greedy rows are argmax'ed in one call; the others are filtered and drawn in one batched pass.
    """
    _check_batch(logits, samplers)
    scores = _apply_penalties(logits, samplers)
    greedy, drawn = _split(samplers)
    tokens = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    if greedy:
        tokens[greedy] = _rows(scores, greedy).argmax(-1)
    if drawn:
        sorted_probs, order = _sorted_distribution(_rows(scores, drawn), [samplers[i].params for i in drawn])
        tokens[drawn] = _draw(sorted_probs, order, [samplers[i] for i in drawn])
    logprobs = _logprobs(logits, samplers, tokens)
    results = []
    for sampler, token_id, (logprob, top) in zip(samplers, tokens.tolist(), logprobs):
        sampler.record(token_id)
        results.append(SampleResult(token_id, logprob, top))
    return results


def probabilities(logits: torch.Tensor, samplers: Sequence[SequenceSampler]) -> torch.Tensor:
    """The distribution sample() would draw each row from, in vocab order [batch, vocab] float32.

    Greedy rows put all the mass on their argmax. Records nothing and draws nothing.
    """
    _check_batch(logits, samplers)
    scores = _apply_penalties(logits, samplers)
    greedy, drawn = _split(samplers)
    probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if greedy:
        probs[greedy] = probs[greedy].scatter(1, _rows(scores, greedy).argmax(-1, keepdim=True), 1.0)
    if drawn:
        sorted_probs, order = _sorted_distribution(_rows(scores, drawn), [samplers[i].params for i in drawn])
        probs[drawn] = torch.zeros_like(sorted_probs).scatter(1, order, sorted_probs)
    return probs


def draw(probs: torch.Tensor, samplers: Sequence[SequenceSampler]) -> torch.Tensor:
    """One token per row of ``probs`` [batch, vocab], a distribution in vocab order that need not sum to 1
    (a speculative residual), drawn like sample() draws: inverse CDF on one uniform from each row's sampler."""
    sorted_probs, order = torch.sort(probs.float(), dim=-1, descending=True, stable=True)
    return _draw(sorted_probs, order, list(samplers))


def results_for(logits: torch.Tensor, samplers: Sequence[SequenceSampler], tokens: Sequence[int]) -> list[SampleResult]:
    """``SampleResult`` of tokens chosen elsewhere (speculative verification), one per row of ``logits``,
    with logprobs from the raw rows as sample() reports them; records nothing."""
    chosen = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    return [SampleResult(t, lp, top) for t, (lp, top) in zip(chosen.tolist(), _logprobs(logits, samplers, chosen))]


def _check_batch(logits: torch.Tensor, samplers: Sequence[SequenceSampler]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be [batch, vocab] with one row per sampler; got {tuple(logits.shape)} "
                         f"for {len(samplers)} samplers")


def _split(samplers: Sequence[SequenceSampler]) -> tuple[list[int], list[int]]:
    """Row numbers of the greedy sequences and of those that draw."""
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    return greedy, [i for i, s in enumerate(samplers) if not s.params.greedy]


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return tensor if len(rows) == tensor.shape[0] else tensor[rows]


def _apply_penalties(logits: torch.Tensor, samplers: Sequence[SequenceSampler]) -> torch.Tensor:
    """Repetition penalty (prompt + output ids), then presence/frequency (output ids), on the rows asking."""
    rows = [i for i, s in enumerate(samplers) if s.params.has_penalties]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    states = [samplers[i].penalty_state(vocab, device) for i in rows]
    counts = torch.stack([c for c, _ in states])
    seen = torch.stack([p for _, p in states]) | (counts > 0)
    params = [samplers[i].params for i in rows]
    repetition, presence, frequency = torch.tensor(
        [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params], device=device).T[..., None]
    scores = logits.to(torch.float32, copy=True)
    x = scores[rows]
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    scores[rows] = x - frequency * counts - presence * (counts > 0)
    return scores


def _sorted_distribution(scores: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p, min-p, softmax; returns ``(probs sorted high to low, their vocab ids)``."""
    device = scores.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    sorted_scores, order = torch.sort(scores.float() / temperature, dim=-1, descending=True, stable=True)
    vocab = sorted_scores.shape[-1]
    if any(0 < p.top_k < vocab for p in params):
        k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        kth = sorted_scores.gather(1, (k - 1)[:, None])
        sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, -math.inf)  # ties with the k-th stay
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        # top_p == 1 rows are left alone: rounding can bring their cumulative mass to 1 before the end.
        sorted_scores = sorted_scores.masked_fill(_top_p_drop(sorted_scores, top_p) & (top_p < 1), -math.inf)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        # prob / max prob == exp(score - max score), however the kept tokens are renormalised.
        sorted_scores = sorted_scores.masked_fill(torch.exp(sorted_scores - sorted_scores[:, :1]) < min_p,
                                                  -math.inf)
    return torch.softmax(sorted_scores, -1), order


def _top_p_drop(sorted_scores: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """On rows sorted high to low: beyond the smallest set of most likely tokens whose mass reaches top_p."""
    probs = torch.softmax(sorted_scores, -1)
    mass_before = probs.cumsum(-1) - probs  # mass of the more likely tokens: 0 for the first, never dropped
    return mass_before >= top_p


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p on one row in vocab order: dropped tokens set to -inf."""
    sorted_scores, order = torch.sort(scores, descending=True)
    drop = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, _top_p_drop(sorted_scores, top_p))
    return scores.masked_fill(drop, -math.inf)


def _draw(sorted_probs: torch.Tensor, order: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """Inverse-CDF draw per row, with one uniform number from each sequence's own generator."""
    cdf = sorted_probs.cumsum(-1)
    uniform = torch.tensor([s.uniform() for s in samplers], device=cdf.device)[:, None]
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    # Rounding can put u * total at the very top; the last token with mass is then the pick.
    last = (sorted_probs > 0).sum(-1, keepdim=True) - 1
    return order.gather(1, torch.minimum(index, last)).squeeze(1)


def _logprobs(logits: torch.Tensor, samplers: Sequence[SequenceSampler],
              tokens: torch.Tensor) -> list[tuple[float | None, list[tuple[int, float]] | None]]:
    """``(logprob of the token, top-n)`` per row from log_softmax of the raw logits; ``(None, None)`` if off."""
    out: list = [(None, None)] * len(samplers)
    rows = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if not rows:
        return out
    raw = torch.log_softmax(_rows(logits, rows).float(), -1)
    chosen = raw.gather(1, _rows(tokens, rows)[:, None]).squeeze(1).tolist()
    top = raw.topk(min(max(samplers[i].params.logprobs for i in rows), raw.shape[-1]), dim=-1)
    top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(rows):
        n = samplers[i].params.logprobs
        out[i] = (chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])))
    return out


class Sampler:
    """One sequence's ``logits row -> token id`` (the first engine's interface, kept until it is replaced)."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.sequence = SequenceSampler(params, (), device)

    def __call__(self, logits: torch.Tensor) -> int:
        return sample(logits[None], [self.sequence])[0].token_id
