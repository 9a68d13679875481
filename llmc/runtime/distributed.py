"""torch.distributed helpers the generated model.py calls for the shard pass's ops.

Each is pasted into model.py (like the attention helpers) so the model stays straight-line code.
In a process without an initialized process group (one rank) they compute what a group of one
rank would: that is also the reference of the IR ops in ``llmc/ir/ops_dist.py``. Tensor-parallel
packages use the default group for their collectives; pipeline stages are the ranks themselves.
"""

import torch


def _world():
    """(rank, world size) of the default process group; (0, 1) when none is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def tp_all_reduce(x):
    """Sum ``x`` over the ranks, in place (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather(x, parts):
    """Every rank's ``x`` [rows, F] side by side in rank order: [rows, parts * F]."""
    import torch.distributed as dist

    world = _world()[1]
    if world != parts:
        raise RuntimeError(f"all_gather over {parts} ranks, but the process group has {world}: "
                           f"launch this package with --tp {parts}")
    if parts == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(parts)]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces, dim=-1)


def vocab_parallel_embedding(ids, weight):
    """Embedding rows of this rank's slice of the table (rank r holds ids r*V/tp .. (r+1)*V/tp);
    other ids give zeros, which the following all_reduce fills in from the rank that holds them."""
    rows = weight.shape[0]
    local = ids - _world()[0] * rows
    outside = (local < 0) | (local >= rows)
    out = torch.nn.functional.embedding(local.clamp(0, rows - 1), weight)
    return out.masked_fill(outside[:, None], 0)


def pp_send(x, dst, tag):
    """Send ``x`` to pipeline rank ``dst``; returns ``x`` so the graph keeps a value to depend on."""
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.send(x.contiguous(), dst, tag=tag)
    return x


def pp_recv(like, src, tag, features, dtype):
    """A [len(like), features] tensor sent by pipeline rank ``src`` with ``tag``."""
    import torch.distributed as dist

    if _world()[1] == 1:
        raise RuntimeError("pp_recv outside a pipeline-parallel run: launch this package with --pp")
    out = torch.empty(like.shape[0], features, dtype=getattr(torch, dtype), device=like.device)
    dist.recv(out, src, tag=tag)
    return out
