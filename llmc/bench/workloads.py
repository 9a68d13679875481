"""The bench's requests: what is asked, how long, and when.

Three workloads (``llmc bench --workload``):

- **decode**: one request, prompt 128 tokens, 128 new tokens (batch 1): time to first token and
  time per output token, the latency a chat user feels.
- **offline**: N requests submitted at once with a spread of prompt and output lengths; tokens/s of
  the whole batch. Lengths are log-normal, the shape public serving traces show (ShareGPT as used
  by vLLM's serving benchmark; BurstGPT, Wang et al. 2024, arXiv 2401.17644: long right tails, most
  requests short, a few long). The parameters are ours, scaled to a 2-core CPU: prompts median 96
  tokens (sigma 0.6, clipped to 16..512), outputs median 48 (sigma 0.8, clipped to 4..256). What
  matters for the comparison is the spread: a static batch runs until its longest request is done.
- **online**: the same length distribution, arriving as a Poisson process at ``rate`` requests/s
  against the package's real HTTP server, streamed.

Token ids are drawn uniformly from the vocabulary (random-weight models have no "natural" text),
seeded, so every engine gets byte-identical requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DECODE_PROMPT = 128
DECODE_NEW = 128
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_RANGE = 96, 0.6, (16, 512)
OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_RANGE = 48, 0.8, (4, 256)


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the start (online workload)


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def decode_request(vocab_size: int, prompt_tokens: int = DECODE_PROMPT, new_tokens: int = DECODE_NEW,
                   seed: int = 0) -> Request:
    rng = np.random.default_rng(seed)
    return Request(rng.integers(0, vocab_size, prompt_tokens).tolist(), new_tokens)


def spread_requests(vocab_size: int, n: int, *, max_model_len: int, seed: int = 0,
                    scale: float = 1.0) -> list[Request]:
    """``n`` requests with log-normal prompt/output lengths (``scale`` multiplies both medians), each
    fitting ``max_model_len``."""
    rng = np.random.default_rng(seed)
    prompts = _lognormal(rng, n, PROMPT_MEDIAN * scale, PROMPT_SIGMA, *PROMPT_RANGE)
    outputs = _lognormal(rng, n, OUTPUT_MEDIAN * scale, OUTPUT_SIGMA, *OUTPUT_RANGE)
    requests = []
    for p, o in zip(prompts, outputs):
        p = int(min(p, max_model_len - 1 - OUTPUT_RANGE[0]))
        o = int(min(o, max_model_len - 1 - p))
        requests.append(Request(rng.integers(0, vocab_size, p).tolist(), o))
    return requests


def poisson_arrivals(requests: list[Request], rate: float, seed: int = 0) -> list[Request]:
    """The same requests, arriving as a Poisson process of ``rate`` per second (exponential gaps)."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, len(requests))
    return [Request(r.prompt, r.max_tokens, float(t)) for r, t in zip(requests, np.cumsum(gaps))]


def describe(requests: list[Request]) -> dict:
    """Length statistics of a workload, for the report."""
    p = np.array([len(r.prompt) for r in requests])
    o = np.array([r.max_tokens for r in requests])
    return {"requests": len(requests), "prompt_tokens": {"median": float(np.median(p)), "mean": float(p.mean()),
                                                          "min": int(p.min()), "max": int(p.max())},
            "output_tokens": {"median": float(np.median(o)), "mean": float(o.mean()),
                              "min": int(o.min()), "max": int(o.max())}}
