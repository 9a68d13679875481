"""The offline API: ``LLM(package_dir).generate(prompts, SamplingParams(...))``.

All prompts are queued at once and run to completion with continuous batching, exactly as the
server would run them; results come back in prompt order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .engine import EngineConfig, LLMEngine, RequestOutput
from .sampler import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """A compiled package loaded for batch generation. ``config`` fields: kv_cache_bytes,
    max_num_seqs, max_num_batched_tokens, enable_prefix_caching, max_model_len, and speculative
    decoding's speculative ("off", "ngram", "draft"), num_speculative_tokens, adaptive_speculation.

    With speculation on, each result's ``speculation`` holds the request's proposals scored and
    accepted and the target steps it took; ``metrics()`` has the engine's totals (``spec_*``)."""

    def __init__(self, package_dir: str | Path, device: str | None = None, tp: int | None = None,
                 pp: int | None = None, **config) -> None:
        from .parallel import load_engine  # tp/pp packages start their worker ranks here

        self.engine = load_engine(package_dir, device=device, config=EngineConfig(**config), tp=tp, pp=pp)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("this package has no tokenizer.json; give prompts as lists of token ids")
            return self.engine.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priorities: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); one params for all or one each."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(batch)} prompts")
        ids = [f"llm-{i}" for i in range(len(batch))]
        for i, (prompt, p) in enumerate(zip(batch, per_prompt)):
            self.engine.add_request(ids[i], self.encode(prompt), p, priorities[i] if priorities else 0)
        done: dict[str, RequestOutput] = {}
        logprobs: dict[str, list] = {i: [] for i in ids}
        while len(done) < len(batch):
            for out in self.engine.step():
                logprobs[out.request_id] += out.logprobs or []
                if out.finished:
                    done[out.request_id] = out
        for i, p in zip(ids, per_prompt):  # the final output carries every token's logprobs
            done[i].logprobs = logprobs[i] if p.logprobs is not None else None
        return [done[i] for i in ids]

    def chat(self, conversations: Sequence[Sequence[dict]] | Sequence[dict],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate a reply to each conversation ([{"role": ..., "content": ...}, ...])."""
        if self.engine.tokenizer is None:
            raise ValueError("this package has no tokenizer.json, so it has no chat template")
        single = len(conversations) > 0 and isinstance(conversations[0], dict)
        batch = [conversations] if single else list(conversations)
        tok = self.engine.tokenizer
        prompts = [tok.encode(tok.apply_chat_template(list(messages)), add_special_tokens=False)
                   for messages in batch]
        return self.generate(prompts, sampling_params)

    def metrics(self) -> dict[str, float]:
        return self.engine.metrics()
