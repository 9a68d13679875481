"""Raise an exported ATen graph (torch.export) into llmc IR with the pattern list.

The raiser walks the FX graph once. Each value becomes an ``Act`` (an IR value), a ``ParamRef``, a
``Static`` (depends only on positions/shapes; its concrete value comes from one probe run of the
exported program) or a ``Partial`` idiom. Ops over static values need no pattern; every op that
touches an activation must match one in ``patterns.PATTERNS`` or the raiser stops with an error
naming the module, its class and its ATen ops. Parameter-free elementwise modules (activation
functions written out by hand, e.g. GPT-2's gelu_new) are recognized by evaluating them.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from llmc.errors import UnsupportedModelError
from llmc.frontend import patterns as _patterns
from llmc.frontend.values import Act, Ids, ParamRef, Partial, Static, token_major_axes
from llmc.ir import Graph, GraphBuilder, Param, TensorType
from llmc.ir.types import T, dtype_name

HOW_TO_EXTEND = ("add a raising pattern to llmc/frontend/patterns.py (or register one from a plugin "
                 "through the llmc.plugins entry point)")

# Param-free elementwise modules are compared numerically against these (IR op -> reference).
KNOWN_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_ELEMENTWISE = {"mul", "add", "sub", "div", "pow", "tanh", "sigmoid", "erf", "neg", "exp", "relu",
                "alias", "to", "_to_copy", "_assert_tensor_metadata"}
_IGNORED = {"_assert_tensor_metadata", "sym_constrain_range_for_size", "_assert_scalar"}


@dataclass(frozen=True)
class RopeTable:
    kind: str          # "cos" or "sin"
    inv_freq: str      # buffer name (state_dict key) the angles come from
    scaling: float
    rotary_dim: int
    interleaved: bool


def op_name(node: torch.fx.Node) -> str:
    target = node.target
    if hasattr(target, "overloadpacket"):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def module_of(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return path, (cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls)))


def bind_args(node: torch.fx.Node) -> dict[str, Any]:
    """Arguments by schema name (defaults filled in), so patterns read ``a["dim"]``."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {"self": node.args[0], "index": node.args[1]} if op_name(node) == "getitem" else {}
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    if "self" not in out and "input" in out:  # dropout/layer_norm call their operand "input"
        out["self"] = out["input"]
    return out


class Raiser:
    """One raising run over one exported program."""

    def __init__(self, ep: ExportedProgram, probe_inputs: dict[str, torch.Tensor],
                 param_source: Callable[[str], Param]) -> None:
        self.ep = ep
        self.param_source = param_source
        self.builder = GraphBuilder()
        self.env: dict[torch.fx.Node, Any] = {}
        self.layers = 0
        self.probe_positions = probe_inputs["position_ids"].reshape(-1)
        self.values = self._probe(probe_inputs)
        self.builder.input("input_ids", TensorType((T,), "int64"))
        self.builder.input("positions", TensorType((T,), "int64"))
        self._rope_cache: dict[tuple, RopeTable | None] = {}
        self._buffers = {s.arg.name: s.target for s in ep.graph_signature.input_specs
                         if s.kind == InputKind.BUFFER}

    # ---- probe -----------------------------------------------------------------------------
    def _probe(self, user_inputs: dict[str, torch.Tensor]) -> dict[torch.fx.Node, Any]:
        """Run the exported graph once on concrete inputs and keep every node's value."""
        sig, state = self.ep.graph_signature, self.ep.state_dict
        args = []
        for spec in sig.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                args.append(state[spec.target] if spec.target in state else self.ep.constants[spec.target])
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                args.append(self.ep.constants[spec.target])
            else:
                args.append(user_inputs.get(spec.arg.name, False) if spec.arg.name != "use_cache" else False)
        values: dict[torch.fx.Node, Any] = {}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                values[n] = result = super().run_node(n)
                return result

        with torch.no_grad():
            Recorder(self.ep.graph_module).run(*args)
        return values

    def static_value(self, s: Static) -> Any:
        return self.values[s.node]

    # ---- helpers patterns call ---------------------------------------------------------------
    def shape_of(self, node: torch.fx.Node, multi: bool = False):
        val = node.meta["val"]
        if multi:
            return [tuple(v.shape) for v in val]
        return tuple(val.shape)

    def dtype_of(self, node: torch.fx.Node) -> str:
        return dtype_name(node.meta["val"].dtype)

    op_name = staticmethod(op_name)

    def meta(self, node: torch.fx.Node) -> dict[str, str]:
        path, cls = module_of(node)
        return {"module": path, "module_class": cls, "aten": str(node.target)}

    def emit(self, node: torch.fx.Node, op: str, inputs, **attrs) -> str:
        return self.builder.add(op, inputs, meta=self.meta(node), **attrs)

    def param(self, ref: ParamRef, transpose: bool = False) -> str:
        p = self.param_source(ref.key)
        if transpose:
            p = Param(p.name, TensorType((p.type.shape[1], p.type.shape[0]), p.type.dtype), p.layout,
                      ("transpose",), p.quant, p.source, p.loader)
        return self.builder.param(p)

    def emit_rms_norm(self, node, normed: Partial, w: ParamRef) -> Act:
        x = normed.x
        wsize = self.builder.type_of(self.param(w)).shape[0]
        if wsize != x.axes[-1].size:
            return None
        ref = self.emit(node, "rms_norm", [x.ref, self.param(w)], eps=normed.eps, offset=w.plus)
        return Act(ref, x.axes, x.rep)

    def rope_table(self, s: Static, rotary_dim: int) -> RopeTable | None:
        """Identify a rotary cos/sin table numerically from its probe value and its inv_freq buffer."""
        key = (s.node, rotary_dim)
        if key not in self._rope_cache:
            self._rope_cache[key] = self._find_rope_table(s.node, rotary_dim)
        return self._rope_cache[key]

    def _find_rope_table(self, node: torch.fx.Node, rd: int) -> RopeTable | None:
        value = self.values.get(node)
        if not isinstance(value, torch.Tensor) or value.shape[-1] != rd:
            return None
        table = value.reshape(-1, rd).double()
        pos = self.probe_positions.double()
        if table.shape[0] != pos.shape[0]:
            return None
        for buf_node in self._ancestor_buffers(node):
            inv_freq = self.values[buf_node]
            if inv_freq.dim() != 1 or inv_freq.numel() != rd // 2:
                continue
            freqs = pos[:, None] * inv_freq.double()[None, :]
            for interleaved in (False, True):
                angles = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
                for kind, fn in (("cos", torch.cos), ("sin", torch.sin)):
                    ref = fn(angles)
                    # least-squares fit, rounded: the table is float32, so digits past ~7 are noise
                    scaling = float(f"{float((table * ref).sum() / (ref * ref).sum()):.7g}")
                    if (table - scaling * ref).abs().max() <= 1e-5 * max(1.0, abs(scaling)):
                        return RopeTable(kind, self._buffers[buf_node.name], scaling, rd, interleaved)
        return None

    def _ancestor_buffers(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        seen, stack, found = set(), [node], []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder" and n.name in self._buffers:
                found.append(n)
            stack.extend(n.all_input_nodes)
        # "original_inv_freq" is the unscaled copy some rope types keep; prefer the live one.
        return sorted(found, key=lambda n: "original" in n.name)

    def finish_rope(self, node, roped: Partial) -> Act:
        base, table = roped.base, roped.table
        if roped.sin_table.scaling != table.scaling or roped.sin_table.interleaved != table.interleaved:
            return None
        inv_freq = self.builder.param(self._buffer_param(table.inv_freq))
        ref = self.emit(node, "rope", [base.ref, "%positions", inv_freq], head_dim=base.head_dim,
                        rotary_dim=roped.stop - roped.start, interleaved=table.interleaved,
                        scaling=table.scaling)
        return Act(ref, base.axes, base.rep)

    def _buffer_param(self, target: str) -> Param:
        value = self.ep.state_dict.get(target)
        if value is None:
            value = self.ep.constants[target]
        value = value.detach().clone()
        return Param(target, TensorType(tuple(value.shape), dtype_name(value.dtype)), source="computed",
                     loader=lambda v=value: v)

    def mask_kind(self, mask: Any, is_causal: bool) -> tuple[bool, int | None]:
        """(causal, sliding_window) read off the probe value of an attention mask."""
        if mask is None:
            if not is_causal:
                raise UnsupportedModelError("attention without a causal mask: llmc compiles decoders only")
            return True, None
        if not isinstance(mask, Static):
            raise UnsupportedModelError("attention mask depends on activations; only position masks are supported")
        value = self.values[mask.node]
        value = value.reshape(value.shape[-2], value.shape[-1])
        allowed = value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2
        n = allowed.shape[0]
        i = torch.arange(n)[:, None]
        j = torch.arange(allowed.shape[1])[None, :]
        counts = allowed.sum(-1)
        window = int(counts.max()) if int(counts.max()) < n else None
        expect = j <= i
        if window is not None:
            expect &= (i - j) < window
        if not torch.equal(allowed, expect):
            raise UnsupportedModelError("attention mask is neither causal nor causal with a sliding window")
        return True, window

    def emit_attention(self, node, q: Act, k: Act, v: Act, mask, is_causal: bool, scale: float,
                       softcap: float | None) -> Act:
        head_major = ["1", "F", "T", "F"]
        if any([ax.kind for ax in t.axes] != head_major for t in (q, k, v)):
            return None
        heads, head_dim = q.features
        kv_heads = k.features[0] // k.rep
        if v.features[0] // v.rep != kv_heads or k.features[1] != head_dim:
            return None
        causal, window = self.mask_kind(mask, is_causal)
        ref = self.emit(node, "attention", [q.ref, k.ref, v.ref, "%positions"], layer=self.layers,
                        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=float(scale),
                        causal=causal, sliding_window=window, softcap=softcap)
        self.layers += 1
        return Act(ref, q.axes[:3] + (v.axes[3],))

    # ---- the walk ----------------------------------------------------------------------------
    def _activation_regions(self) -> tuple[dict[torch.fx.Node, tuple[str, torch.fx.Node]], set]:
        """Param-free elementwise leaf modules with one input and one output, matched numerically."""
        regions: dict[str, list[torch.fx.Node]] = defaultdict(list)
        for n in self.ep.graph.nodes:
            if n.op == "call_function" and module_of(n)[0]:
                regions[module_of(n)[0]].append(n)
        found, skip = {}, set()
        for nodes in regions.values():
            members = set(nodes)
            if any(op_name(n) not in _ELEMENTWISE for n in nodes):
                continue
            inputs = {i for n in nodes for i in n.all_input_nodes if i not in members}
            outputs = [n for n in nodes if any(u not in members for u in n.users)]
            if len(inputs) != 1 or len(outputs) != 1 or next(iter(inputs)).op == "placeholder":
                continue
            (src,), out = inputs, outputs[0]
            op = self._classify_elementwise(nodes, src, out)
            if op:
                found[out] = (op, src)
                skip |= members - {out}
        return found, skip

    def _classify_elementwise(self, nodes, src, out) -> str | None:
        g = torch.fx.Graph()
        env = {src: g.placeholder("x")}
        for n in nodes:
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(env[out])
        fn = torch.fx.GraphModule(torch.nn.Module(), g)
        x = torch.linspace(-8, 8, 513)
        try:
            y = fn(x)
        except Exception:
            return None
        for name, ref in KNOWN_ACTIVATIONS.items():
            if torch.allclose(y, ref(x), atol=1e-5, rtol=1e-5):
                return name
        return None

    def _lookup(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return [self._lookup(x) for x in a]
        return a

    def run(self) -> Graph:
        activations, skip = self._activation_regions()
        sig = self.ep.graph_signature
        params = {s.arg.name: s.target for s in sig.input_specs if s.kind == InputKind.PARAMETER}
        for node in self.ep.graph.nodes:
            if node in skip:
                continue
            if node.op == "placeholder":
                if node.name in params:
                    self.env[node] = ParamRef(params[node.name])
                elif node.name == "input_ids":
                    self.env[node] = Ids()
                else:
                    self.env[node] = Static(node, is_positions=node.name == "position_ids")
                continue
            if node.op == "output":
                outs = self._lookup(node.args[0])
                if len(outs) != 1 or not isinstance(outs[0], Act):
                    raise UnsupportedModelError(f"model output is not a logits activation: {outs}")
                self.builder.output("logits", outs[0].ref)
                continue
            if node.op == "get_attr":
                self.env[node] = Static(node)
                continue
            if node in activations:
                op, src = activations[node]
                x = self.env[src]
                self.env[node] = Act(self.emit(node, op, [x.ref]), x.axes, x.rep)
                continue
            self.env[node] = self._raise_node(node)
        return self.builder.build(meta={"layers": self.layers})

    def _raise_node(self, node: torch.fx.Node) -> Any:
        name = op_name(node)
        if name in _IGNORED:
            return None
        if name.startswith("sym_"):  # sizes of activations: only shapes, read from the probe
            return Static(node)
        bound = bind_args(node)
        args = {k: self._lookup(v) for k, v in bound.items()}
        flat = [v for v in args.values() for v in (v if isinstance(v, list) else [v])]
        touches = [v for v in flat if isinstance(v, (Act, Partial, ParamRef, Ids))]
        if not touches:
            if name in ("view", "reshape", "_unsafe_view", "unsqueeze") and isinstance(args.get("self"), Static):
                return Static(node, is_positions=args["self"].is_positions)
            return Static(node)
        for pat in _patterns.PATTERNS:
            if name in pat.ops:
                result = pat.fn(self, node, args)
                if result is not None:
                    return result
        self._unsupported(node, args)

    def _unsupported(self, node: torch.fx.Node, args: dict[str, Any]) -> None:
        path, cls = module_of(node)
        ops = Counter(str(n.target) for n in self.ep.graph.nodes
                      if n.op == "call_function" and module_of(n)[0] == path and op_name(n) not in _IGNORED)
        kinds = ", ".join(f"{k}={_describe(v)}" for k, v in args.items())
        raise UnsupportedModelError(
            f"cannot raise module '{path or '<top level>'}' ({cls or 'no module'}) into llmc IR: "
            f"no pattern matches {node.target}({kinds}).\n"
            f"ATen ops in this module: {', '.join(f'{k} x{v}' for k, v in sorted(ops.items()))}.\n"
            f"To support it, {HOW_TO_EXTEND}.")


def _describe(v: Any) -> str:
    if isinstance(v, Act):
        return "activation[" + ",".join(a.kind if a.kind != "F" else str(a.size) for a in v.axes) + "]"
    if isinstance(v, Partial):
        return f"partial {v.kind}"
    if isinstance(v, ParamRef):
        return f"param {v.key}"
    if isinstance(v, Static):
        return "position-derived tensor"
    if isinstance(v, list):
        return "[" + ", ".join(_describe(x) for x in v) + "]"
    return repr(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
