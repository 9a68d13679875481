"""The reference interpreter: runs any Graph on CPU with torch; the oracle for passes and kernels.

It keeps one sequence's KV cache as contiguous per-layer tensors, so a prefill followed by decode
steps reproduces what the model computes over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llmc.errors import IRError
from llmc.ir.graph import Graph
from llmc.ir.types import Param


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


@dataclass
class ExecutionContext:
    kv: ContiguousKVCache = field(default_factory=ContiguousKVCache)


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
        ctx = ctx or ExecutionContext()
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
    ctx = ExecutionContext()
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
