"""The physical limit of decode: memory bandwidth, measured in the same run, and bytes per token.

At batch 1 a decode step reads every weight once (the LM head included; of an embedding table only
the one row it gathers) plus the KV cache of every earlier token. Bytes per token divided by time
per token, over the bandwidth a large copy reaches on this machine, is the roofline fraction: 100%
is the best any engine could do without reading fewer bytes.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch

COPY_BYTES = 256 << 20  # far beyond any CPU cache, small enough for a laptop
KV_DTYPE_BYTES = {None: 4, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8_e4m3fn": 1}
_EMBEDDING = re.compile(r"=\s*embedding\((.*)\)")
_PARAM = re.compile(r"@([\w.]+)")


def measure_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 7, device: str = "cpu") -> float:
    """Bytes/s of a large tensor copy (read + write counted, as STREAM's copy does), the median."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def decode_weight_bytes(package: Path, weights: dict[str, torch.Tensor]) -> int:
    """Bytes of weights one decode token reads: every loaded tensor (after the package's load-time
    preparation, so what the kernels really read), except embedding tables not used by another op."""
    lines = json.loads((Path(package) / "plan.json").read_text(encoding="utf-8"))["graph"]
    embedded, elsewhere = set(), set()
    for line in lines:
        if line.lstrip().startswith("@"):
            continue  # a param declaration, not a use
        names = set(_PARAM.findall(line))
        (embedded if _EMBEDDING.search(line) else elsewhere).update(names)
    gathered_only = embedded - elsewhere
    total = 0
    for name, tensor in weights.items():
        size = tensor.numel() * tensor.element_size()
        total += size // tensor.shape[0] if name in gathered_only and tensor.dim() == 2 else size
    return total


def kv_bytes_per_context_token(package: Path) -> int:
    """KV cache bytes one cached token costs across all layers (K and V)."""
    kv = json.loads((Path(package) / "plan.json").read_text(encoding="utf-8"))["kv_cache"]
    per = KV_DTYPE_BYTES.get(kv.get("dtype"), 4)
    return per * sum(kvh * (hd + vhd) for kvh, hd, vhd in kv["layers"].values())


def decode_bytes_per_token(weight_bytes: int, kv_per_token: int, prompt_tokens: int, new_tokens: int) -> float:
    """Mean bytes read per generated token: the weights, plus the KV of the mean context length."""
    mean_context = prompt_tokens + (new_tokens - 1) / 2
    return weight_bytes + kv_per_token * mean_context
