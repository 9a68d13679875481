"""A per-sequence KV cache: each layer's keys and values in contiguous, position-ordered buffers.

One sequence at a time; a later runtime replaces it with a paged cache (block manager, prefix
caching). The generated ``model.py`` only calls ``append``, so any object with that method works.
"""

from __future__ import annotations

import torch


class ContiguousKVCache:
    """Per-layer K/V of one sequence, ``[S, kv_heads, head_dim]``, in buffers that grow by doubling.

    Same contract as the IR interpreter's cache (the oracle): ``append`` stores this step's k/v at
    ``positions`` and returns everything cached for the layer. Writing a position at or before one
    already cached (a re-prefill) first drops that position and everything after it. Positions of a
    sequence only ever grow, so "everything before ``positions.min()``" is a prefix of the buffer.
    """

    def __init__(self, initial_capacity: int = 64) -> None:
        self.initial_capacity = initial_capacity
        # layer -> (k buffer, v buffer, positions buffer, number of valid rows)
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store ``k`` [T, kv_heads, Dk] / ``v`` [T, kv_heads, Dv] at ``positions`` [T]; return (k, v, positions) of the layer."""
        if layer not in self._layers:
            cap = max(self.initial_capacity, len(positions))
            self._layers[layer] = (k.new_empty((cap, *k.shape[1:])), v.new_empty((cap, *v.shape[1:])),
                                   positions.new_empty(cap), 0)
        k_buf, v_buf, p_buf, n = self._layers[layer]
        if n and len(positions):
            n = int((p_buf[:n] < positions.min()).sum())  # drop a stale tail on re-prefill
        need = n + len(positions)
        if need > len(p_buf):  # grow by doubling: amortized O(1) copy per token
            cap = max(need, 2 * len(p_buf))
            k_buf, v_buf, p_buf = (self._grown(buf, cap, n) for buf in (k_buf, v_buf, p_buf))
        k_buf[n:need], v_buf[n:need], p_buf[n:need] = k, v, positions
        self._layers[layer] = (k_buf, v_buf, p_buf, need)
        return k_buf[:need], v_buf[:need], p_buf[:need]

    @staticmethod
    def _grown(buf: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
        new = buf.new_empty((capacity, *buf.shape[1:]))
        new[:keep] = buf[:keep]
        return new

    @property
    def length(self) -> int:
        """Tokens cached (the longest layer; all layers agree after a full forward step)."""
        return max((n for *_, n in self._layers.values()), default=0)

    def reset(self) -> None:
        """Forget the sequence (buffers are freed; the next append allocates again)."""
        self._layers.clear()
