"""The ``clamp`` op (``min``/``max`` attrs, None = unbounded) and the pattern raising ATen clamp to it."""

from __future__ import annotations

from llmc.frontend.values import Act


class Clamp:
    """Clamp every element into ``[min, max]``; a bound of None leaves that side open."""

    @staticmethod
    def infer(types, attrs):
        return types[0]                                                 # elementwise: same type

    @staticmethod
    def reference(ctx, inputs, attrs):
        return inputs[0].clamp(attrs["min"], attrs["max"])


def _bound(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def raise_clamp(rx, node, args):
    """clamp(x, lo, hi), clamp_min(x, lo), clamp_max(x, hi) with constant bounds -> clamp."""
    x, lo, hi = args["self"], args.get("min"), args.get("max")
    if not isinstance(x, Act) or any(b is not None and _bound(b) is None for b in (lo, hi)):
        return None                                                     # tensor bounds: not ours
    ref = rx.emit(node, "clamp", [x.ref], min=_bound(lo), max=_bound(hi))
    return Act(ref, x.axes, x.rep)
