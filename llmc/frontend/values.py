"""What the raiser knows about each ATen value while it walks an exported graph.

``Act`` is an activation that lives in the IR as a token-flattened ``[T, features]`` value; its
``axes`` say how the HF tensor's dims map onto it. ``Static`` values depend only on positions and
shapes (masks, rotary tables): the raiser reads their concrete values from a probe run.
``Partial`` is a half-recognized idiom (the first ops of an RMSNorm, a rotary embedding, eager
attention) that later ops complete or that ends in an error naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx


@dataclass(frozen=True)
class Axis:
    kind: str   # "1" (unit batch axis), "T" (tokens), "F" (stored feature axis), "R" (broadcast repeat)
    size: int | None = None


@dataclass(frozen=True)
class Act:
    ref: str                  # IR value
    axes: tuple[Axis, ...]    # HF dims, in HF order
    rep: int = 1              # kv heads were broadcast this many times (GQA) without a copy

    @property
    def features(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes if a.kind == "F")

    @property
    def token_major(self) -> bool:
        """T comes before every stored feature axis, so the HF memory order is the IR's."""
        kinds = [a.kind for a in self.axes if a.kind != "1"]
        return bool(kinds) and kinds[0] == "T" and "R" not in kinds

    @property
    def head_dim(self) -> int:
        return self.features[-1]

    def with_axes(self, axes) -> "Act":
        return replace(self, axes=tuple(axes))


@dataclass(frozen=True)
class ParamRef:
    key: str                  # checkpoint key (state_dict name) of the parameter
    plus: float = 0.0         # ``w + c`` (Gemma's (1 + w) norm weight)


@dataclass(frozen=True)
class Static:
    node: torch.fx.Node
    is_positions: bool = False


@dataclass(frozen=True)
class Ids:
    """The token-id input (possibly viewed)."""


@dataclass(frozen=True)
class Partial:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict, hash=False)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["fields"][key]
        except KeyError:
            raise AttributeError(key) from None

    def but(self, kind: str | None = None, **changes: Any) -> "Partial":
        return Partial(kind or self.kind, {**self.fields, **changes})


def token_major_axes(shape) -> tuple[Axis, ...]:
    """Axes of an HF tensor shape assumed token-major: symbolic dim is T, 1s are unit axes."""
    axes = []
    for size in shape:
        if not isinstance(size, int):
            axes.append(Axis("T"))
        elif size == 1 and not axes_have_t(axes):
            axes.append(Axis("1", 1))
        else:
            axes.append(Axis("F", int(size)))
    return tuple(axes)


def axes_have_t(axes) -> bool:
    return any(a.kind == "T" for a in axes)
