"""Tensor types with symbolic dims, and parameters that point lazily at checkpoint tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

# Symbolic dim for "tokens of all sequences in this step" (the token-flattened layout of DESIGN.md).
T = "T"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Dim = int | str


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        return dtype
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorType:
    """Shape (ints, or symbol names such as ``T``) and dtype name of an IR value."""

    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        dtype_name(self.dtype)  # validates

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        """Bytes of a value of this type (static shapes only: a param's, not an activation's)."""
        numel = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise ValueError(f"{self} has a symbolic dim: its size is known only at run time")
            numel *= d
        return numel * self.torch_dtype.itemsize

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def matches(self, tensor: torch.Tensor, bindings: dict[str, int]) -> bool:
        """Whether a concrete tensor fits this type; binds symbols on first sight."""
        if tensor.dtype != self.torch_dtype or tensor.dim() != len(self.shape):
            return False
        for dim, size in zip(self.shape, tensor.shape):
            if isinstance(dim, str):
                if bindings.setdefault(dim, size) != size:
                    return False
            elif dim != size:
                return False
        return True


@dataclass(frozen=True)
class Param:
    """A weight: its checkpoint name, type, layout and quantization metadata, loaded lazily.

    ``transform`` lists what is done to the stored tensor on load to reach ``type`` (e.g. GPT-2's
    Conv1D stores ``[in, out]`` and is transposed to the canonical linear layout ``[out, in]``).
    ``source`` is ``checkpoint`` for tensors read from the model files, ``computed`` for buffers the
    model derives at init (rotary inverse frequencies), which the frontend captures by value.
    """

    name: str
    type: TensorType
    layout: str = "plain"
    transform: tuple[str, ...] = ()
    quant: Mapping[str, object] | None = None
    source: str = "checkpoint"
    loader: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def load(self) -> torch.Tensor:
        if self.loader is None:
            raise ValueError(f"param {self.name!r} has no loader")
        tensor = self.loader()
        for step in self.transform:
            if step == "transpose":
                tensor = tensor.t()
            else:
                raise ValueError(f"param {self.name!r}: unknown transform {step!r}")
        return tensor.to(self.type.torch_dtype).contiguous()
