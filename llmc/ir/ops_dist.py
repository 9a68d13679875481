"""Collective and point-to-point ops made by the shard pass (tensor and pipeline parallelism).

Each op's torch reference is what it computes in a one-process world (a tp or pp group of one
rank): ``all_reduce`` and ``all_gather`` are the identity, ``vocab_parallel_embedding`` is a plain
gather, and ``pp_send`` passes its value on. With more ranks the generated model calls the helpers
in ``llmc/runtime/distributed.py``, which run the real torch.distributed collectives; those are
checked against the unsharded model by tests that start real worker processes.
"""

from __future__ import annotations

from llmc.errors import IRError
from llmc.ir.opdef import register_op
from llmc.ir.types import TensorType
from llmc.runtime import distributed


def _rows_features(t: TensorType, op: str) -> int:
    if len(t.shape) != 2 or not isinstance(t.shape[1], int):
        raise IRError(f"{op}: expected a [rows, features] tensor, got {t}")
    return t.shape[1]


@register_op("all_reduce", ("x",))
class AllReduce:
    """Sum of ``x`` over the tensor-parallel group (after a row-parallel linear: partial sums)."""

    @staticmethod
    def infer(types, attrs):
        _rows_features(types[0], "all_reduce")
        return types[0]

    @staticmethod
    def reference(ctx, inputs, attrs):
        return distributed.tp_all_reduce(inputs[0])


@register_op("all_gather", ("x",), {"parts": 1})
class AllGather:
    """Each rank's ``x`` [rows, F] concatenated in rank order -> [rows, parts * F] (vocab-parallel
    logits: rank r computed vocab rows ``r * F .. (r + 1) * F``)."""

    @staticmethod
    def infer(types, attrs):
        x = types[0]
        if attrs["parts"] < 1:
            raise IRError(f"all_gather: parts must be at least 1, got {attrs['parts']}")
        return TensorType((x.shape[0], _rows_features(x, "all_gather") * attrs["parts"]), x.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return distributed.tp_all_gather(inputs[0], attrs["parts"])


@register_op("vocab_parallel_embedding", ("ids", "weight"))
class VocabParallelEmbedding:
    """Rows of this rank's slice ``weight`` [V / tp, H] of the embedding table: ids outside the
    slice give zero rows, so the all_reduce that follows yields the full embedding."""

    @staticmethod
    def infer(types, attrs):
        return TensorType((types[0].shape[0], types[1].shape[1]), types[1].dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return distributed.vocab_parallel_embedding(*inputs)


@register_op("pp_send", ("x",), {"dst": 0, "tag": 0})
class PPSend:
    """Send ``x`` to pipeline stage ``dst`` (point to point, matched by ``tag``); returns ``x``."""

    @staticmethod
    def infer(types, attrs):
        _rows_features(types[0], "pp_send")
        return types[0]

    @staticmethod
    def reference(ctx, inputs, attrs):
        return distributed.pp_send(inputs[0], attrs["dst"], attrs["tag"])


@register_op("pp_recv", ("like",), {"src": 0, "tag": 0, "features": 1, "dtype": "float32"})
class PPRecv:
    """Receive a [rows, features] value from stage ``src``; ``rows`` is ``like``'s first dim (the
    step's token count), which every stage knows from the broadcast step inputs."""

    @staticmethod
    def infer(types, attrs):
        if attrs["features"] < 1:
            raise IRError(f"pp_recv: features must be positive, got {attrs['features']}")
        return TensorType((types[0].shape[0], attrs["features"]), attrs["dtype"])

    @staticmethod
    def reference(ctx, inputs, attrs):
        return distributed.pp_recv(inputs[0], attrs["src"], attrs["tag"], attrs["features"], attrs["dtype"])
