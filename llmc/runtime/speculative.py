"""Speculative decoding: propose k tokens cheaply, score them all in one target step, keep exactly
what the target would have produced.

Every step, before scheduling, ``Speculator.propose`` gives each decoding sequence up to k proposals
from one of two proposers:

- ``NgramProposer`` (prompt lookup, Saxena 2023): the tokens that followed the latest earlier
  occurrence of the sequence's last n tokens (n from ``ngram_max`` down to ``ngram_min``) in its
  prompt or output. No model; it shines on text that repeats its context (code edits, quoting).
- ``DraftProposer``: a small draft model compiled into the package (``draft/``, same tokenizer),
  with a paged KV pool and block tables of its own, run k times over the batch.

The scheduler runs the sequence's pending token and its proposals as one chunk over the cached
prefix (the chunked-prefill path), so one target step yields k + 1 rows of logits.
``verify_proposals`` walks them (Leviathan et al. 2023; Chen et al. 2023): with p the target's and
q the proposer's distribution, both *processed* as the sampler would process them (penalties over
the tokens so far, temperature, top-k/p, min-p), proposal x is accepted with probability
min(1, p(x) / q(x)); at the first rejection a token is drawn from norm(max(0, p - q)) and the rest
are dropped; when all k are accepted a bonus token is sampled from the last row. The tokens that
come out are distributed exactly as plain sampling's. Greedy rows reduce to "accept while the
proposal is the argmax, then take the argmax"; an n-gram proposal is deterministic (q is one-hot),
so it is accepted with probability p(x) and the residual is p without x.

The engine then rolls back what was rejected: the sequence's computed length goes back to the
accepted prefix, its pages past its tokens are freed (``KVBlockManager.truncate``; blocks holding
proposals are never registered in the prefix cache), and the draft's KV length is cut the same way.

How many to propose is ``speculation_length``: a small goodput model over the sequence's running
acceptance rate and the batch size, after SmartSpec (Liu et al. 2024): speculate more while
proposals are accepted and extra tokens are nearly free, less or not at all in a large batch.

Randomness: the draft's draws, the acceptance tests and the residual draws all take uniforms from
the sequence's own generator, so a seeded request is reproducible; its tokens differ from plain
sampling's with the same seed (same distribution, other draws), and since k adapts to the batch
they may differ between batches too. Greedy output is token for token that of plain decoding.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .block_manager import BlockTable, KVBlockManager
from .package import DRAFT_DIR, DTYPE_BYTES, KVLayout, PackageError, load_model, read_plan
from .paged_attention import batch_step
from .sampler import SampleResult, SequenceSampler, draw, probabilities, results_for, sample

METHODS = ("off", "ngram", "draft")

# Running acceptance rate: decayed counts of accepted proposals and of acceptance trials (a
# rejection ends a run, so a run of a accepted out of k is a + (a < k) trials), started from a prior.
PRIOR_ACCEPTANCE = 0.6
PRIOR_TRIALS = 2.0
DECAY = 0.9  # per verification, and per step a decoding sequence does not speculate (so it retries)


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method``: "off", "ngram" or "draft". At most ``num_speculative_tokens`` proposals per
    sequence and step; ``adaptive`` picks fewer with ``speculation_length`` (off: always the most).
    ``saturation_tokens`` and ``draft_cost`` parametrize that policy (see there)."""

    method: str = "off"
    num_speculative_tokens: int = 4
    adaptive: bool = True
    ngram_max: int = 3
    ngram_min: int = 1
    saturation_tokens: float = 64.0
    draft_cost: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {self.num_speculative_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if not self.saturation_tokens > 0:
            raise ValueError(f"the speculative saturation must be > 0 tokens, got {self.saturation_tokens!r}")


def speculation_length(acceptance: float, batch_size: int, max_k: int, *, saturation_tokens: float,
                       draft_cost: float = 0.0) -> int:
    """The k in 0..max_k with the most expected tokens per unit of step time (0 = plain decoding).

    With per-token acceptance rate a, k proposals yield (1 - a^(k+1)) / (1 - a) tokens on average
    (the accepted run plus the corrected or bonus token). A step's time is modelled as linear in its
    tokens: ``1 + B (k + 1) / S`` for B sequences of k + 1 tokens, where S (``saturation_tokens``)
    is how many batched tokens cost as much as the step's fixed part (reading the weights once, and
    overheads). By default it is the target's roofline ridge point, peak FLOP/s x bytes per weight /
    (2 x bandwidth): right for a model large enough to run near the roofline; for a small model
    whose steps are mostly framework overhead it is smaller, and ``bench/speculative.py`` measures
    it (the runtime's ``--speculative-saturation-tokens`` takes the figure). The draft adds k
    forwards of ``draft_cost`` (its weight bytes over the target's) each, scaled alike. At small B extra tokens are nearly free and k grows with a; at large B a
    proposal costs about what a plain decode does, so anything short of sure acceptance loses and
    k falls to 0. Ties go to the smaller k.
    """
    fixed = 1 + batch_size / saturation_tokens

    def goodput(k: int) -> float:
        tokens = k + 1 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
        return tokens / (1 + batch_size * (k + 1) / saturation_tokens + draft_cost * k * fixed)

    best = 0
    for k in range(1, max_k + 1):
        if goodput(k) > goodput(best) * (1 + 1e-9):
            best = k
    return best


@dataclass
class SpeculationStats:
    """One request's speculation: proposals scored, accepted, and target steps it took."""

    draft_tokens: int
    accepted_tokens: int
    target_steps: int
    generated_tokens: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generated_tokens / self.target_steps if self.target_steps else 0.0


class NgramIndex:
    """Where each n-gram (n <= max_n) of a sequence last ended, among those with a token after them."""

    def __init__(self, max_n: int) -> None:
        self.latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n)]
        self.indexed = 0  # n-grams ending before this position are in ``latest``

    def lookup(self, tokens: Sequence[int], k: int, min_n: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
        (``max_n`` down to ``min_n`` tokens) of ``tokens`` that occurred before."""
        for end in range(self.indexed, len(tokens) - 1):  # the last token has no follower yet
            for n in range(1, min(len(self.latest), end + 1) + 1):
                self.latest[n - 1][tuple(tokens[end - n + 1:end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(len(self.latest), len(tokens)), min_n - 1, -1):
            end = self.latest[n - 1].get(tuple(tokens[-n:]))
            if end is not None:
                return list(tokens[end + 1:end + 1 + k])
        return []


@dataclass
class SpecState:
    """One sequence's speculation state (kept across preemption; the draft's KV is not)."""

    draft_tokens: int = 0      # proposals the target scored
    accepted_tokens: int = 0
    target_steps: int = 0      # steps that gave the sequence tokens
    hits: float = 0.0          # decayed accepted proposals
    trials: float = 0.0        # decayed acceptance trials
    draft_probs: torch.Tensor | None = None  # q of the pending proposals [k, vocab]; None: one-hot
    draft_table: BlockTable = field(default_factory=BlockTable)
    draft_computed: int = 0    # tokens whose k/v are in the draft's pages
    ngrams: NgramIndex | None = None

    @property
    def acceptance(self) -> float:
        return (self.hits + PRIOR_ACCEPTANCE * PRIOR_TRIALS) / (self.trials + PRIOR_TRIALS)

    def observe(self, proposed: int, accepted: int) -> None:
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.hits = DECAY * self.hits + accepted
        self.trials = DECAY * self.trials + accepted + (accepted < proposed)

    def forget(self) -> None:
        """A step without speculation: the evidence ages, so the sequence tries again later."""
        self.hits *= DECAY
        self.trials *= DECAY

    def stats(self, generated: int) -> SpeculationStats:
        return SpeculationStats(self.draft_tokens, self.accepted_tokens, self.target_steps, generated)


# ---- verification --------------------------------------------------------------------------------

def acceptance_probability(p: float, q: float) -> float:
    """Keep a proposal drawn from q with probability min(1, p/q) (q > 0: it was drawn)."""
    return min(1.0, p / q)


def residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """What to draw from after rejecting ``token``: max(0, p - q), unnormalized (``draw`` normalizes).
    A one-hot q (``None``, an n-gram proposal) leaves p without the token."""
    if q is None:
        rest = p.clone()
        rest[token] = 0
    else:
        rest = (p - q).clamp_min(0)
    # p == q up to rounding: rejection had probability ~0, and then p itself is the right law.
    return rest if float(rest.sum()) > 0 else p


def verify_proposals(logits: torch.Tensor, sampler: SequenceSampler, proposal: Sequence[int],
                     draft_probs: torch.Tensor | None = None) -> list[int]:
    """The tokens the target keeps: the accepted prefix of ``proposal``, then the token drawn at the
    first rejection or, when all are accepted, the bonus token from the last row. Each is recorded
    in ``sampler`` as it is decided, so the next row's penalties count it as plain decoding would.

    ``logits`` [len(proposal) + 1, vocab] are the target's rows after the pending token and after each
    proposal; ``draft_probs[i]`` is the processed distribution proposal i was drawn from (None: the
    proposals are deterministic, q one-hot)."""
    params = sampler.params
    rows = len(proposal)
    # Without penalties a row's distribution does not depend on the tokens before it: one batched call.
    batched = probabilities(logits[:rows], [sampler] * rows) if rows and not params.has_penalties else None
    kept: list[int] = []
    for i, token in enumerate(proposal):
        p = batched[i] if batched is not None else probabilities(logits[i:i + 1], [sampler])[0]
        q = None if draft_probs is None else draft_probs[i]
        if params.greedy:  # p is one-hot on the argmax (ties to the lowest id, as sample() breaks them)
            accept = bool(p[token] > 0)
        else:
            accept = sampler.uniform() < acceptance_probability(float(p[token]), 1.0 if q is None else float(q[token]))
        if not accept:
            chosen = int(p.argmax()) if params.greedy else int(draw(residual(p, q, token)[None], [sampler])[0])
            sampler.record(chosen)
            return kept + [chosen]
        sampler.record(token)
        kept.append(token)
    return kept + [sample(logits[rows:rows + 1], [sampler])[0].token_id]  # records it


# ---- proposers -----------------------------------------------------------------------------------

Proposal = tuple[list[int], "torch.Tensor | None"]  # tokens, and the [k, vocab] q they were drawn from


class NgramProposer:
    """Prompt lookup: the continuation of the latest earlier match of the sequence's last n tokens."""

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, wanted: list[tuple[object, int]]) -> list[Proposal]:
        out = []
        for seq, k in wanted:
            spec = seq.state.spec
            if spec.ngrams is None:
                spec.ngrams = NgramIndex(self.max_n)
            out.append((spec.ngrams.lookup(seq.token_ids, k, self.min_n), None))
        return out

    def rollback(self, seq) -> None:
        """Nothing to undo: the index covers known tokens only."""

    def release(self, seq) -> None:
        """No pages to free."""


class DraftProposer:
    """A draft model's proposals: ``forward``/``weights`` of its own package, a KV pool of its own,
    and per sequence a block table over it (``SpecState.draft_table``), caught up lazily.

    Each call runs at most k forwards over the sequences that asked: the first computes what the
    draft has not seen yet (the whole prompt the first time, then the one or two tokens the last
    verification added) and proposes from its last row; each further one feeds the previous proposal.
    A sequence whose pages do not fit in the draft's pool, or that is longer than the draft's context
    (``max_len``), gets no proposals this step.
    """

    def __init__(self, forward: Callable, weights: dict, pool, max_len: int) -> None:
        self.forward = forward
        self.weights = weights
        self.pool = pool
        self.max_len = max_len
        self.blocks = KVBlockManager(pool.num_blocks, pool.block_size, enable_prefix_caching=False)
        self.forwards = 0  # draft model steps run (for the bench)

    def propose(self, wanted: list[tuple[object, int]]) -> list[Proposal]:
        out: list[Proposal] = [([], None)] * len(wanted)
        live = []
        for i, (seq, k) in enumerate(wanted):
            spec = seq.state.spec
            hold = seq.num_tokens + k - 1  # known tokens and all proposals but the last get draft k/v
            if hold > self.max_len or not self.blocks.can_allocate(spec.draft_table, spec.draft_computed, hold):
                continue
            self.blocks.allocate(spec.draft_table, spec.draft_computed, hold)
            live.append(_Drafting(i, seq, k, seq.state.sampler.branch()))
        while live:
            live.sort(key=lambda d: d.num_pending != 1)  # decodes first
            chunks = [d.chunk() for d in live]
            ends = list(itertools.accumulate(len(tokens) for tokens, _, _ in chunks))
            ids, positions, step = batch_step(self.pool, chunks, [end - 1 for end in ends])
            logits = self.forward(self.weights, ids, positions, step)["logits"]
            if len(logits) != len(live):  # a graph without select_rows returns every row
                logits = logits[[end - 1 for end in ends]]
            self.forwards += 1
            q = probabilities(logits.float(), [d.sampler for d in live])
            for d, row in zip(live, q):
                d.seq.state.spec.draft_computed += d.num_pending
                token = int(row.argmax()) if d.sampler.params.greedy else int(draw(row[None], [d.sampler])[0])
                d.sampler.record(token)
                d.tokens.append(token)
                d.rows.append(row)
                if len(d.tokens) == d.k:
                    out[d.index] = (d.tokens, None if d.sampler.params.greedy else torch.stack(d.rows))
            live = [d for d in live if len(d.tokens) < d.k]
        return out

    def rollback(self, seq) -> None:
        """Keep the draft's k/v of the target's computed prefix only (the accepted tokens)."""
        spec = seq.state.spec
        spec.draft_computed = min(spec.draft_computed, seq.num_computed)
        self.blocks.truncate(spec.draft_table, spec.draft_computed)

    def release(self, seq) -> None:
        spec = seq.state.spec
        self.blocks.free_table(spec.draft_table)
        spec.draft_computed = 0


@dataclass
class _Drafting:
    """One sequence's proposals in the making: ``tokens`` drawn so far, each from its ``rows`` (q)."""

    index: int
    seq: object
    k: int
    sampler: SequenceSampler  # a branch of the sequence's sampler: its penalties count the proposals
    tokens: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_pending(self) -> int:
        """Tokens the draft has not computed: the whole sequence at first, then the last proposal."""
        return self.seq.num_tokens + len(self.tokens) - self.seq.state.spec.draft_computed

    def chunk(self) -> tuple[list[int], int, list[int]]:
        start = self.seq.state.spec.draft_computed
        pending = self.seq.token_ids[start:] + self.tokens[max(0, start - self.seq.num_tokens):]
        return pending, start, self.seq.state.spec.draft_table.blocks


@dataclass
class SpeculationCounters:
    draft_tokens: int = 0    # proposals the target scored
    accepted_tokens: int = 0
    verifications: int = 0   # (sequence, step) pairs that scored proposals


class Speculator:
    """Ties a proposer to the engine: who speculates how far, verification, rollback, counters."""

    def __init__(self, config: SpeculativeConfig, proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.counters = SpeculationCounters()

    def length(self, acceptance: float, batch_size: int) -> int:
        c = self.config
        if not c.adaptive:
            return c.num_speculative_tokens
        return speculation_length(acceptance, batch_size, c.num_speculative_tokens,
                                   saturation_tokens=c.saturation_tokens, draft_cost=c.draft_cost)

    def propose(self, running: list, max_model_len: int) -> None:
        """Give the running sequences that decode (their output started, one token pending) their
        proposals, in ``seq.spec_token_ids``; those still holding unscheduled ones keep them."""
        wanted = []
        for seq in running:
            if seq.spec_token_ids or seq.num_computed != seq.num_tokens - 1 or not seq.output_ids:
                continue
            spec = seq.state.spec
            room = min(seq.state.params.max_tokens - len(seq.output_ids) - 1, max_model_len - seq.num_tokens)
            k = min(self.length(spec.acceptance, len(running)), room)
            if k > 0:
                wanted.append((seq, k))
            else:
                spec.forget()
        for (seq, _), (tokens, probs) in zip(wanted, self.proposer.propose(wanted) if wanted else []):
            seq.spec_token_ids = tokens
            seq.state.spec.draft_probs = probs

    def verify(self, seq, logits: torch.Tensor) -> list[SampleResult]:
        """The tokens ``seq`` keeps from its k + 1 rows (``logits``); updates its acceptance rate."""
        proposal, spec, sampler = list(seq.spec_token_ids), seq.state.spec, seq.state.sampler
        q = None if spec.draft_probs is None else spec.draft_probs[:len(proposal)]
        tokens = verify_proposals(logits, sampler, proposal, q)
        seq.spec_token_ids = []
        spec.draft_probs = None
        spec.observe(len(proposal), len(tokens) - 1)
        self.counters.draft_tokens += len(proposal)
        self.counters.accepted_tokens += len(tokens) - 1
        self.counters.verifications += 1
        return results_for(logits[:len(tokens)], [sampler] * len(tokens), tokens)

    def rollback(self, seq) -> None:
        self.proposer.rollback(seq)

    def release(self, seq) -> None:
        """The sequence's pages are gone (finished, aborted, preempted): proposals and draft k/v too."""
        if seq.state is not None and seq.state.spec is not None:
            seq.state.spec.draft_probs = None
            self.proposer.release(seq)

    def metrics(self) -> dict[str, float]:
        c = self.counters
        return {"spec_draft_tokens": c.draft_tokens, "spec_accepted_tokens": c.accepted_tokens,
                "spec_verifications": c.verifications,
                "spec_acceptance_rate": c.accepted_tokens / c.draft_tokens if c.draft_tokens else 0.0,
                # tokens one verifying step gives a sequence: the accepted run plus the corrected/bonus token
                "spec_mean_accepted_tokens_per_step":
                    (c.accepted_tokens + c.verifications) / c.verifications if c.verifications else 0.0}

    def describe(self) -> str:
        c = self.config
        policy = f"adaptive (saturation {c.saturation_tokens:.0f} tokens, draft cost {c.draft_cost:.2f})" \
            if c.adaptive else "fixed"
        return f"speculative decoding: {c.method}, up to {c.num_speculative_tokens} tokens per step, {policy}"


# ---- building one from a package ----------------------------------------------------------------

def speculative_method(plan: dict, requested: str | None) -> str:
    """The method asked for (engine config / server flag), else the package's choice, else off."""
    return requested or plan.get("speculative", {}).get("method") or "off"


def saturation_tokens(plan: dict, dtype: torch.dtype) -> float:
    """Batched tokens at which a step's compute time equals the time to read its weights once: the
    target's roofline ridge point, peak FLOP/s x bytes per weight / (2 FLOP per weight x bandwidth).
    64 when plan.json's target does not say (``speculation_length`` uses it)."""
    target = plan.get("target", {})
    flops = target.get("peak_flops", {}).get(str(dtype).replace("torch.", ""))
    bandwidth = target.get("memory_bandwidth_bytes_per_s")
    if not flops or not bandwidth:
        return 64.0
    return max(1.0, flops * DTYPE_BYTES.get(dtype, 4) / (2 * bandwidth))


def load_draft(package_dir: Path, plan: dict, device: torch.device) -> tuple[Callable, dict, dict]:
    """The draft model compiled into a package (``llmc compile --draft``): ``(forward, weights, plan)``."""
    draft_dir = package_dir / plan.get("speculative", {}).get("draft", DRAFT_DIR)
    if not (draft_dir / "plan.json").is_file():
        raise PackageError(f"speculative decoding with a draft model: {package_dir} has no draft model "
                           f"({draft_dir} is missing); compile it with llmc compile MODEL --draft "
                           "DRAFT_MODEL, or use --speculative ngram")
    return (*load_model(draft_dir, device), read_plan(draft_dir))


def build_speculator(plan: dict, method: str | None, num_tokens: int | None, adaptive: bool,
                     saturation: float | None, draft: tuple[Callable, dict, dict] | None, *,
                     vocab_size: int | None, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                     device: torch.device, kv_tokens: int, max_num_seqs: int, max_model_len: int,
                     ) -> Speculator | None:
    """The speculative decoding asked for (else plan.json's ``speculative``); None when off.

    ``draft`` is ``load_draft``'s result when the method is "draft"; its KV pool holds
    ``kv_tokens`` (the target pool's size) plus k proposals and a partial page per sequence.
    """
    method = speculative_method(plan, method)
    if method == "off":
        return None
    k = num_tokens or plan.get("speculative", {}).get("num_speculative_tokens") or 4
    try:
        options = SpeculativeConfig(method, k, adaptive,
                                    saturation_tokens=saturation or saturation_tokens(plan, dtype))
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    if method == "ngram":
        return Speculator(options, NgramProposer(options.ngram_max, options.ngram_min))
    if draft is None:
        raise PackageError("speculative decoding with a draft model needs the draft's (forward, weights, plan)")
    draft_forward, draft_weights, draft_plan = draft
    if draft_plan.get("model", {}).get("vocab_size") != vocab_size:
        raise PackageError(f"the draft model's vocabulary ({draft_plan.get('model', {}).get('vocab_size')}) "
                           f"differs from the model's ({vocab_size}); compile it again with a draft "
                           "that shares the tokenizer")
    layout = KVLayout.of(draft_plan, draft_weights)
    tokens = kv_tokens + max_num_seqs * (k + layout.block_size)
    pool = layout.pool(-(-tokens // layout.block_size), device)
    size = lambda w: sum(t.numel() * t.element_size() for t in w.values())  # noqa: E731
    options = dataclasses.replace(options, draft_cost=size(draft_weights) / size(weights))
    draft_len = draft_plan.get("model", {}).get("max_positions") or max_model_len
    return Speculator(options, DraftProposer(draft_forward, draft_weights, pool, draft_len))
