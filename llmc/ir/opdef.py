"""Op kinds: registered ``OpDef`` objects with shape/dtype inference and a torch reference."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from llmc.errors import IRError
from llmc.ir.types import TensorType

# infer(input_types, attrs) -> output type; raises IRError on inconsistent inputs.
InferFn = Callable[[list[TensorType], dict[str, Any]], TensorType]
# reference(ctx, inputs, attrs) -> tensor; ctx carries per-run state (KV cache) for stateful ops.
ReferenceFn = Callable[[Any, list[Any], dict[str, Any]], Any]


@dataclass(frozen=True)
class OpDef:
    """One op kind. ``inputs`` names the operands (a trailing ``?`` marks an optional one)."""

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # name -> default
    infer: InferFn = field(default=None, hash=False, compare=False)  # type: ignore[assignment]
    reference: ReferenceFn = field(default=None, hash=False, compare=False)  # type: ignore[assignment]
    doc: str = ""
    stateful: bool = False  # reads/writes the KV cache

    @property
    def min_inputs(self) -> int:
        return sum(1 for name in self.inputs if not name.endswith("?"))

    def check_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"op {self.name!r}: unknown attribute(s) {sorted(unknown)}; known: {sorted(self.attrs)}")
        return {**self.attrs, **attrs}

    def __repr__(self) -> str:
        return f"OpDef({self.name})"


class OpRegistry:
    """An explicit registry of op kinds; registering a name twice is an error."""

    def __init__(self) -> None:
        self._ops: dict[str, OpDef] = {}

    def register(self, op: OpDef) -> OpDef:
        if op.name in self._ops:
            raise IRError(f"op {op.name!r} is already registered")
        self._ops[op.name] = op
        return op

    def __getitem__(self, name: str) -> OpDef:
        try:
            return self._ops[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._ops, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise IRError(f"unknown op {name!r}{hint}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def __iter__(self):
        return iter(self._ops.values())

    def names(self) -> list[str]:
        return sorted(self._ops)


OPS = OpRegistry()


def register_op(name: str, inputs: tuple[str, ...], attrs: dict[str, Any] | None = None, *,
                stateful: bool = False, registry: OpRegistry = OPS):
    """Decorator form: the decorated class supplies ``infer`` and ``reference`` staticmethods."""

    def wrap(cls: type) -> OpDef:
        op = OpDef(name=name, inputs=inputs, attrs=dict(attrs or {}), infer=cls.infer,
                   reference=cls.reference, doc=(cls.__doc__ or "").strip(), stateful=stateful)
        return registry.register(op)

    return wrap
