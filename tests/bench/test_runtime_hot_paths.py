"""pytest-benchmark suite of the runtime's per-step CPU work, outside the model's forward.

Not part of the default test run (tests/conftest.py skips this folder unless ``--bench`` is given):

    python -m pytest tests/bench --bench                    # a table of timings
    python -m pytest tests/bench --bench --benchmark-autosave   # ... and save them under .benchmarks/
    python -m pytest tests/bench --bench --benchmark-compare    # ... compared with the last saved run

Each benchmark is a step a busy server repeats: the scheduler admitting and stepping 64 sequences,
the block manager allocating, prefix-matching and freeing pages, the sampler drawing for a batch.
At batch 1 on a small model these are a visible share of a decode step; a regression shows here
long before it shows in tokens/s.
"""

import torch

from llmc.runtime.block_manager import BlockTable, KVBlockManager
from llmc.runtime.sampler import SamplingParams, SequenceSampler, sample
from llmc.runtime.scheduler import Scheduler, Sequence

VOCAB = 32000
BLOCK = 16


def _decode_steps(num_seqs: int, prompt: int, steps: int) -> int:
    """Admit ``num_seqs`` sequences, run their prefills, then ``steps`` decode steps; tokens scheduled."""
    blocks = KVBlockManager(num_blocks=num_seqs * (prompt + steps) // BLOCK + num_seqs, block_size=BLOCK)
    scheduler = Scheduler(blocks, max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * prompt)
    for i in range(num_seqs):
        scheduler.add(Sequence(f"r{i}", [(i * 7 + j) % VOCAB for j in range(prompt)]))
    scheduled = 0
    for step in range(steps + 1):
        batch = scheduler.schedule()
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            seq.token_ids.append(step)
            scheduled += n
    for seq in list(scheduler.running):
        scheduler.finish(seq)
    assert blocks.num_free_blocks == blocks.num_blocks
    return scheduled


def test_scheduler_64_sequences_32_decode_steps(benchmark):
    assert benchmark(_decode_steps, 64, 128, 32) == 64 * (128 + 32)


def _allocate_match_free(blocks: KVBlockManager, prompts: list[list[int]]) -> int:
    tables, hits = [], 0
    for prompt in prompts:
        table = BlockTable()
        hits += blocks.match_prefix(table, prompt)
        blocks.allocate(table, 0, len(prompt))
        blocks.register_full_blocks(table, prompt, len(prompt))
        tables.append(table)
    for table in tables:
        blocks.free_table(table)
    return hits


def test_block_manager_prefix_cached_admissions(benchmark):
    shared = list(range(256))  # a system prompt every request starts with
    prompts = [shared + [1000 + i] * 256 for i in range(64)]
    blocks = KVBlockManager(num_blocks=64 * 512 // BLOCK + 64, block_size=BLOCK, enable_prefix_caching=True)
    hits = benchmark(_allocate_match_free, blocks, prompts)
    assert hits >= 63 * 256  # every request after the first finds the shared prefix cached
    assert blocks.num_free_blocks == blocks.num_blocks


def _sampler_batch(params: list[SamplingParams]) -> tuple[torch.Tensor, list[SequenceSampler]]:
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(0))
    return logits, [SequenceSampler(p, list(range(64))) for p in params]


def test_sampler_greedy_batch_32(benchmark):
    logits, samplers = _sampler_batch([SamplingParams(temperature=0.0)] * 32)
    results = benchmark(sample, logits, samplers)
    assert [r.token_id for r in results] == logits.argmax(-1).tolist()


def test_sampler_top_p_with_penalties_batch_32(benchmark):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=1)
    logits, samplers = _sampler_batch([params] * 32)
    results = benchmark(sample, logits, samplers)
    assert len(results) == 32 and all(0 <= r.token_id < VOCAB for r in results)
