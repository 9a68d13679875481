"""Continuous batching: which sequences run in the next step, and how many tokens of each.

Every step (iteration-level scheduling, as in Orca and vLLM) the scheduler fills a token budget
(``max_num_batched_tokens``): first the running sequences in admission order — a decode costs one
token, an unfinished prompt continues with the next chunk that fits (chunked prefill) — then
waiting sequences in (priority, arrival) order while the budget, the sequence cap
(``max_num_seqs``) and the free KV pages allow. A newly admitted sequence first takes the cached
pages of its longest cached prefix, so only the rest of its prompt is computed.

A decoding sequence may carry speculative tokens (``spec_token_ids``, proposed by
``speculative.py``): it then runs its pending token and the proposals as one chunk, which the
target scores in one step. Speculation is best effort: the proposals are cut to the budget left,
and dropped before any other sequence would be preempted for their pages.

When a running sequence needs a page and none is free, the lowest-priority, newest running sequence
not yet scheduled in this step is preempted: its pages are freed and it goes back to the waiting
queue with its prompt and output so far, to be recomputed (its pages may still be in the prefix
cache when it returns). Nothing is ever dropped; a step that preempted admits nobody new.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from .block_manager import BlockTable, KVBlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. ``token_ids`` is the prompt followed by the output."""

    request_id: str
    prompt_ids: list[int]
    priority: int = 0
    arrival: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0            # tokens whose k/v are in the cache
    table: BlockTable = field(default_factory=BlockTable)
    status: str = WAITING
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens the prefix cache supplied at admission
    spec_token_ids: list[int] = field(default_factory=list)  # proposals to verify after the known tokens
    state: Any = None                # the engine's per-request state (sampler, detokenizer, ...)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def order(self) -> tuple[int, int]:
        """Smaller runs first: priority (lower value = more urgent), then arrival."""
        return (self.priority, self.arrival)


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` runs ``num_new[i]`` tokens; the first ``num_decodes`` run one."""

    seqs: list[Sequence]
    num_new: list[int]       # known tokens plus the speculative tokens scheduled with them
    num_decodes: int

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SchedulerCounters:
    steps: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0      # of which the cache supplied
    computed_tokens: int = 0        # tokens run through the model (prompt chunks, recomputes, decodes)


class Scheduler:
    """FCFS (with optional priority) continuous batching over a ``KVBlockManager``."""

    def __init__(self, blocks: KVBlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 on_free: Callable[[Sequence], None] | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.blocks = blocks
        self.on_free = on_free  # called when a sequence's pages are freed (finish, abort, preemption)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []   # sorted by Sequence.order
        self.running: list[Sequence] = []   # in admission order
        self.counters = SchedulerCounters()
        self._arrivals = itertools.count()

    # ---- requests --------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        seq.status = WAITING
        self._enqueue(seq)

    def adopt(self, seq: Sequence, after: Sequence) -> None:
        """Run ``seq`` (a fork of running ``after``, holding shared pages) right away."""
        seq.arrival = after.arrival  # a sample of the same request: preempted like its parent
        seq.status = RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; its pages are freed at once."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            known = seq.num_tokens - seq.num_computed
            n = min(known + len(seq.spec_token_ids), budget)
            del seq.spec_token_ids[max(0, n - known):]  # proposals past the budget wait for no one
            while not self.blocks.can_allocate(seq.table, seq.num_computed, seq.num_computed + n):
                if seq.spec_token_ids:  # speculation never costs another sequence its pages
                    seq.spec_token_ids.clear()
                    n = min(known, budget)
                    continue
                victim = max(self.running[i:], key=lambda s: s.order)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != RUNNING:
                continue  # preempted itself: running[i] is now the next sequence
            self._allocate(seq, n)
            scheduled.append((seq, n))
            budget -= n
            i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq.table, seq.token_ids)
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_allocate(seq.table, cached, cached + n):
                self.blocks.free_table(seq.table)  # give the prefix back; try again next step
                break
            self.waiting.pop(0)
            seq.status = RUNNING
            seq.num_computed = cached
            if not seq.num_preemptions:
                seq.num_cached_prompt_tokens = cached
                self.counters.prefix_cache_queries += len(seq.prompt_ids)
                self.counters.prefix_cache_hits += cached
            self.running.append(seq)
            self._allocate(seq, n)
            scheduled.append((seq, n))
            budget -= n
        # Decodes (one token) first: the attention op batches them; prefill chunks follow.
        scheduled.sort(key=lambda item: item[1] != 1)
        self.counters.steps += bool(scheduled)
        self.counters.computed_tokens += sum(n for _, n in scheduled)
        return ScheduledBatch([s for s, _ in scheduled], [n for _, n in scheduled],
                              sum(1 for _, n in scheduled if n == 1))

    # ---- internals -------------------------------------------------------------------------------

    def _allocate(self, seq: Sequence, n: int) -> None:
        self.blocks.allocate(seq.table, seq.num_computed, seq.num_computed + n)
        # token_ids holds no speculative tokens, so a block holding any is never registered (it may be rejected).
        self.blocks.register_full_blocks(seq.table, seq.token_ids, seq.num_computed + n)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.counters.preemptions += 1
        seq.status = WAITING
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        keys = [s.order for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.order), seq)

    def _release(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = FINISHED

    def _free(self, seq: Sequence) -> None:
        self.blocks.free_table(seq.table)
        seq.spec_token_ids.clear()
        if self.on_free is not None:
            self.on_free(seq)
