"""The reference interpreter: runs any Graph on CPU with torch; the oracle for passes and kernels.

It keeps one sequence's KV cache, so a prefill followed by decode steps reproduces what the model
computes over the whole sequence: contiguous per-layer tensors for ``attention``, and for graphs
lowered to ``paged_attention`` a small page pool whose pages are handed out in scrambled order (so
a wrong block-table lookup cannot go unnoticed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llmc.errors import IRError
from llmc.ir.graph import Graph
from llmc.ir.types import DTYPES, Param
from llmc.runtime.paged_attention import KVPool, sequence_step


class ContiguousKVCache:
    """Per-layer K/V of one sequence, in position order: ``[S, kv_heads, head_dim]``."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store this step's k/v; return everything cached for the layer (k, v, positions)."""
        if layer in self.layers:
            k0, v0, p0 = self.layers[layer]
            if len(p0) and len(positions) and positions.min() <= p0.max():
                # Rewriting earlier positions (re-prefill) drops the stale tail.
                keep = p0 < positions.min()
                k0, v0, p0 = k0[keep], v0[keep], p0[keep]
            k, v, positions = torch.cat((k0, k)), torch.cat((v0, v)), torch.cat((p0, positions))
        self.layers[layer] = (k, v, positions)
        return k, v, positions

    @property
    def length(self) -> int:
        return max((len(p) for _, _, p in self.layers.values()), default=0)


class PagedSequenceKV:
    """One sequence's paged KV cache, shaped like the runtime's per-step metadata (``PagedStep``).

    ``begin_step(positions)`` is called by the interpreter before each step: the step's positions
    must continue the sequence (or restart it at an earlier position, a re-prefill).
    """

    def __init__(self, block_size: int = 4, num_blocks: int = 128, dtype: torch.dtype = torch.float32) -> None:
        self.pool = KVPool(num_blocks, block_size, dtype)
        # Pages in a scrambled order (stride 7 is coprime with any power-of-two pool size).
        self.free = [(i * 7 + 3) % num_blocks for i in range(num_blocks)]
        self.blocks: list[int] = []
        self.length = 0

    def begin_step(self, positions: torch.Tensor) -> None:
        start, count = int(positions[0]), len(positions)
        if start > self.length or not torch.equal(positions, torch.arange(start, start + count)):
            raise IRError(f"paged KV: step positions {positions.tolist()} do not continue a sequence "
                          f"of {self.length} cached tokens")
        end = start + count
        bs = self.pool.block_size
        while len(self.blocks) * bs < end:
            if not self.free:
                raise IRError(f"paged KV: {end} tokens need more than {self.pool.num_blocks} pages")
            self.blocks.append(self.free.pop(0))
        # Take on the step's metadata fields (the paged ops read them from ctx.kv), keeping rows to
        # sample that a caller set before the run.
        step = sequence_step(self.pool, self.blocks, positions, getattr(self, "logits_indices", None))
        vars(self).update(vars(step))
        self.length = end


@dataclass
class ExecutionContext:
    kv: object = field(default_factory=ContiguousKVCache)

    @classmethod
    def for_graph(cls, graph: Graph) -> "ExecutionContext":
        """A fresh one-sequence context with the KV cache the graph's attention ops use."""
        paged = any(n.op.name == "paged_attention" for n in graph.nodes)
        if not paged:
            return cls(ContiguousKVCache())
        kv_dtype = graph.meta.get("kv_dtype")  # pages stored quantized, as the runtime keeps them
        return cls(PagedSequenceKV(dtype=DTYPES[kv_dtype] if kv_dtype else torch.float32))


class Interpreter:
    """Evaluates a Graph node by node with each op's torch reference."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor] | None = None,
                 load: Callable[[Param], torch.Tensor] | None = None) -> None:
        self.graph = graph
        self._weights = dict(weights or {})
        self._load = load or (lambda p: p.load())

    def weight(self, param: Param) -> torch.Tensor:
        if param.name not in self._weights:
            self._weights[param.name] = self._load(param)
        return self._weights[param.name]

    def run(self, inputs: dict[str, torch.Tensor], ctx: ExecutionContext | None = None,
            keep: bool = False) -> dict[str, torch.Tensor]:
        """Run one step; ``keep=True`` also returns every intermediate value by its reference."""
        ctx = ctx or ExecutionContext.for_graph(self.graph)
        env: dict[str, torch.Tensor] = {}
        bindings: dict[str, int] = {}
        for name, ttype in self.graph.inputs:
            if name not in inputs:
                raise IRError(f"missing graph input %{name} ({ttype})")
            value = inputs[name]
            if not ttype.matches(value, bindings):
                raise IRError(f"input %{name}: expected {ttype}, got {value.dtype}{list(value.shape)}")
            env["%" + name] = value
        for p in self.graph.params:
            env["@" + p.name] = self.weight(p)
        if hasattr(ctx.kv, "begin_step"):  # a paged cache lays out this step's slots first
            ctx.kv.begin_step(inputs["positions"])
        with torch.no_grad():
            for node in self.graph.nodes:
                args = [env[r] for r in node.inputs]
                try:
                    env[node.ref] = node.op.reference(ctx, args, node.attr_dict)
                except Exception as exc:  # name the node; the op's error alone is hard to place
                    where = node.meta.get("module", "")
                    raise IRError(f"node {node.ref} ({node.op.name}{' at ' + where if where else ''}) "
                                  f"failed: {exc}") from exc
        out = {name: env[ref] for name, ref in self.graph.outputs}
        if keep:
            out.update(env)
        return out


def generate_greedy(graph: Graph, prompt: list[int], max_new_tokens: int,
                    interpreter: Interpreter | None = None,
                    step_logits: list[torch.Tensor] | None = None) -> tuple[list[int], torch.Tensor]:
    """Prefill ``prompt`` then decode greedily one token per step through the KV cache.

    Returns the new tokens and the prefill logits ``[len(prompt), vocab]``; when ``step_logits`` is
    given, the logits each new token was picked from are appended to it.
    """
    interp = interpreter or Interpreter(graph)
    ctx = ExecutionContext.for_graph(graph)
    ids = torch.tensor(prompt, dtype=torch.int64)
    logits = interp.run({"input_ids": ids, "positions": torch.arange(len(prompt))}, ctx)["logits"]
    prefill_logits = logits
    tokens: list[int] = []
    for step in range(max_new_tokens):
        nxt = int(logits[-1].argmax())
        if step_logits is not None:
            step_logits.append(logits[-1])
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        pos = torch.tensor([len(prompt) + step])
        logits = interp.run({"input_ids": torch.tensor([nxt]), "positions": pos}, ctx)["logits"]
    return tokens, prefill_logits
