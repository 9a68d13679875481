"""ONNX frontend: an ONNX decoder graph -> llmc IR, with the same recognizer approach as raising.py.

The raiser walks the ONNX nodes once, in their (topological) order. Each ONNX value becomes an
``Act`` (an IR activation ``[T, F]``, or ``[1, T, F]`` with ``batched``), an ``Init`` (an
initializer: a param, or a constant the patterns read), a ``Static`` (computed from ``positions``
and KV shapes only: rotary tables, masks; its concrete value comes from one probe run of the static
part of the graph), a ``PastKV`` input or a ``Partial`` idiom. Ops over static values need no
pattern; every op that touches an activation must match one in ``onnx_patterns.PATTERNS`` or the
import stops with an error naming the ONNX node, its op type, its operands and the HF module it came
from (the exporter writes it into each node's doc_string).

The graph's inputs are ``input_ids`` and ``positions`` ``[T]`` and per layer
``past_key_values.{L}.key/value`` (the layout ``codegen/onnx_export.py`` writes), or, for a graph
``torch.onnx.export`` wrote (patterns in ``onnx_torch_patterns.py``), ``input_ids`` ``[1, T]`` and
optionally ``position_ids`` ``[1, T]``, no KV (positions 0..T-1 unless given); the model's config
comes from the ``llmc.config`` metadata entry or a ``config.json`` beside the file, and the
tokenizer files are read from beside it (see README, "ONNX").
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from llmc.errors import CheckpointError, UnsupportedModelError
from llmc.ir import Graph, GraphBuilder, Param, TensorType, verify
from llmc.ir.types import T, dtype_name
from llmc.frontend.values import Partial  # the same partly-recognized idiom state as the ATen frontend

HOW_TO_EXTEND = "add a raising pattern to llmc/frontend/onnx_patterns.py"
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PROBE_PAST, PROBE_TOKENS = 3, 24  # long enough to see the tiny models' 8-token sliding windows


@dataclass(frozen=True)
class Act:
    ref: str
    batched: bool = False   # [1, T, F] view of the IR's [T, F]
    group: int = 0          # [T, F / g, g] view (per-head norms); 0: not grouped


@dataclass(frozen=True)
class Init:
    name: str


@dataclass(frozen=True)
class Static:
    name: str


@dataclass(frozen=True)
class PastKV:
    layer: int
    kind: str


def require_onnx():
    from llmc.codegen.onnx_export import require_onnx as _require
    return _require()


def tensor_of(proto) -> torch.Tensor:
    """An initializer as a torch tensor (bfloat16 and float8 rebuilt from their raw bytes)."""
    onnx = require_onnx()
    special = {onnx.TensorProto.BFLOAT16: (torch.int16, torch.bfloat16),
               onnx.TensorProto.FLOAT8E4M3FN: (torch.uint8, torch.float8_e4m3fn)}
    if proto.data_type in special:
        raw, dtype = special[proto.data_type]
        return torch.frombuffer(bytearray(proto.raw_data), dtype=raw).view(dtype).reshape(tuple(proto.dims)).clone()
    # clone: torch-allocated (64-byte aligned) memory, so kernels take the same paths as for checkpoint weights
    return torch.from_numpy(onnx.numpy_helper.to_array(proto).copy()).clone()


class OnnxRaiser:
    """One raising run over one ONNX model."""

    def __init__(self, model, source: str) -> None:
        self.model = model
        self.source = source
        self.builder = GraphBuilder()
        self.inits = {i.name: i for i in model.graph.initializer}
        self.tensors: dict[str, torch.Tensor] = {}
        self.env: dict[str, Any] = {}
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.layers: set[int] = set()
        self.ir_nodes: dict[str, Any] = {}  # IR ref -> Node, for patterns that look back (add_rms_norm)
        self._static_values: dict[str, torch.Tensor] | None = None

    # ---- helpers patterns call ---------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            self.tensors[name] = tensor_of(self.inits[name])
        return self.tensors[name]

    def param(self, name: str, value: torch.Tensor | None = None, layout: str = "plain") -> str:
        """An initializer (or a tensor derived from one, under the same name) as an IR param."""
        value = self.tensor(name) if value is None else value
        return self.builder.param(Param(name, TensorType(tuple(value.shape), dtype_name(value.dtype)), layout,
                                        source="checkpoint" if layout == "plain" else "derived",
                                        loader=lambda v=value: v))

    def type_of(self, act: Act) -> TensorType:
        return self.builder.type_of(act.ref)

    def features(self, act: Act) -> int:
        return self.type_of(act).shape[1]

    def emit(self, node, op: str, inputs, **attrs) -> str:
        meta = {"module": module_of(node), "onnx_node": node.name, "onnx_op": node.op_type}
        ref = self.builder.add(op, inputs, meta=meta, **attrs)
        self.ir_nodes[ref] = self.builder.build().nodes[-1]
        return ref

    def ir_node(self, ref: str):
        return self.ir_nodes.get(ref)

    def attrs(self, node) -> dict[str, Any]:
        onnx = require_onnx()
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for a in node.attribute:  # float attributes are float32: back to the shortest decimal (1e-05, not 9.99e-06)
            if a.type == onnx.AttributeProto.FLOAT:
                values[a.name] = float(str(numpy.float32(values[a.name])))
        return values

    def ints(self, value: Any) -> list[int] | None:
        """The integer list held by an initializer operand, else None."""
        if isinstance(value, Init) and not self.tensor(value.name).is_floating_point():
            return [int(v) for v in self.tensor(value.name).reshape(-1)]
        return None

    def scalar(self, value: Any) -> float | None:
        if isinstance(value, Init) and self.tensor(value.name).numel() == 1:
            return float(str(numpy.float32(self.tensor(value.name).reshape(()).item())))  # shortest decimal
        return None

    def static_value(self, s: Static) -> torch.Tensor:
        if self._static_values is None:
            self._static_values = self._probe()
        return self._static_values[s.name]

    def ancestor_inits(self, name: str) -> list[str]:
        """Initializers the value ``name`` is computed from (rotary tables: their inv_freq)."""
        seen, stack, found = set(), [name], []
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in self.inits:
                found.append(v)
            elif v in self.producer:
                stack.extend(self.producer[v].input)
        return found

    # ---- probe -------------------------------------------------------------------------------
    def _probe(self) -> dict[str, torch.Tensor]:
        """Run the static part of the graph once on probe positions ``P .. P + n - 1`` after a past
        of ``P`` tokens (the reference evaluator: no onnxruntime needed) and keep every value."""
        from onnx.reference import ReferenceEvaluator

        onnx, static = require_onnx(), self._static_names()
        helper = onnx.helper
        nodes = [n for n in self.model.graph.node if n.output[0] in static]
        outputs = [o for n in nodes for o in n.output]
        past = PROBE_PAST if any(PAST.match(i.name) for i in self.model.graph.input) else 0  # torch graphs: no KV
        positions = torch.arange(past, past + PROBE_TOKENS)
        feeds: dict[str, Any] = {"positions": positions.numpy(), "position_ids": positions[None].numpy(),
                                 "input_ids": torch.zeros(1, PROBE_TOKENS, dtype=torch.int64).numpy()}
        used = {x for n in nodes for x in n.input}
        inputs = [i for i in self.model.graph.input if i.name in used]
        feeds = {i.name: feeds.get(i.name) for i in inputs}
        for i in (i for i in inputs if PAST.match(i.name)):
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = torch.zeros(dims[0], dims[1], PROBE_PAST, dims[3]).numpy()
        graph = helper.make_graph(nodes, "static", list(inputs), [helper.make_value_info(o, onnx.TypeProto())
                                                                  for o in outputs],
                                  initializer=[self.inits[x] for x in used if x in self.inits])
        probe = helper.make_model(graph, opset_imports=self.model.opset_import)
        values = ReferenceEvaluator(probe).run(outputs, feeds)
        result = {name: torch.from_numpy(v.copy()) for name, v in zip(outputs, values)}
        result["positions"] = positions
        return result

    # ---- the walk ----------------------------------------------------------------------------
    def run(self) -> Graph:
        from llmc.frontend import onnx_patterns, onnx_torch_patterns  # noqa: F401 (registers its patterns)

        for name in self.inits:
            self.env[name] = Init(name)
        for inp in self.model.graph.input:
            if inp.name in self.inits:
                continue
            if inp.name in ("input_ids", "positions"):
                self.builder.input(inp.name, TensorType((T,), "int64"))
                self.env[inp.name] = Static("positions") if inp.name == "positions" else Act("%input_ids")
                if inp.name == "input_ids" and len(inp.type.tensor_type.shape.dim) == 2:  # torch: [1, T], no KV
                    self.builder.input("positions", TensorType((T,), "int64"))
            elif inp.name == "position_ids":
                self.env[inp.name] = Static(inp.name)
            elif (m := PAST.match(inp.name)):
                self.env[inp.name] = PastKV(int(m.group(1)), m.group(2))
            else:
                raise UnsupportedModelError(
                    f"{self.source}: ONNX graph input {inp.name!r} is not one llmc knows; a decoder graph takes "
                    "input_ids [T], positions [T] and past_key_values.L.key/value (as `llmc export-onnx` writes), "
                    "or input_ids [1, T] and optionally position_ids [1, T] (torch.onnx.export without KV cache)")
        static = self._static_names()
        for node in self.model.graph.node:
            args = [self.env.get(x) if x else None for x in node.input]
            if node.output[0] in static:
                for out in node.output:
                    self.env[out] = Static(out)
                continue
            result = None
            for pat in onnx_patterns.PATTERNS:
                if node.op_type in pat.ops and (result := pat.fn(self, node, args, self.attrs(node))) is not None:
                    break
            if result is None:
                self._unsupported(node, args)
            for out, value in zip(node.output, result if isinstance(result, list) else [result]):
                self.env[out] = value
        for out in self.model.graph.output:
            value = self.env.get(out.name)
            logits = out.name == "logits" or len(self.model.graph.output) == 1
            if logits and isinstance(value, Act) and not value.batched:
                self.builder.output("logits", value.ref)
            elif not (out.name.startswith("present.") and isinstance(value, Partial) and value.kind == "present"):
                raise UnsupportedModelError(f"{self.source}: ONNX graph output {out.name!r} is neither logits [T, V] "
                                            "nor a present KV output of an Attention node")
        graph = self.builder.build(meta={"layers": len(self.layers)})
        return drop_dead(graph)

    def _static_names(self) -> set[str]:
        """Values computed from positions, KV shapes and constants only: they need no pattern, the
        probe evaluates them."""
        source = {"positions", "position_ids"} | {i.name for i in self.model.graph.input if PAST.match(i.name)}
        static: set[str] = set()
        for node in self.model.graph.node:
            inputs = [x for x in node.input if x]
            table_lookup = node.op_type == "Gather" and inputs[0] in self.inits  # learned positions: an embedding
            shape_of_ids = node.op_type == "Shape" and inputs == ["input_ids"]  # torch graphs: T from input_ids
            if node.op_type == "Constant" or shape_of_ids or (any(x in source or x in static for x in inputs) and not table_lookup and
                                              all(x in source or x in static or x in self.inits for x in inputs)):
                static.update(node.output)
        return static

    def _unsupported(self, node, args) -> None:
        name = module_of(node)
        ops = Counter(n.op_type for n in self.model.graph.node if module_of(n) == name)
        module = f" (from module '{name}')" if name else ""
        operands = ", ".join(f"{x or '<none>'}={describe(a)}" for x, a in zip(node.input, args))
        raise UnsupportedModelError(
            f"{self.source}: cannot raise ONNX node '{node.name}'{module} into llmc IR: no pattern matches "
            f"{node.op_type}({operands}).\nONNX ops {'in this module' if name else 'in the graph'}: "
            f"{', '.join(f'{k} x{v}' for k, v in sorted(ops.items()))}.\nTo support it, {HOW_TO_EXTEND}.")


def module_of(node) -> str:
    """The HF module of a node: llmc writes the doc_string, torch.onnx.export name scopes (wrapper dropped)."""
    props = {p.key: p.value for p in node.metadata_props}
    if node.doc_string or "pkg.torch.onnx.name_scopes" not in props:
        return node.doc_string
    scopes = ast.literal_eval(props["pkg.torch.onnx.name_scopes"])
    classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))
    root = next((s for s, c in zip(scopes, classes) if c.endswith(("ForCausalLM", "LMHeadModel"))), "")
    module = scopes[-2] if len(scopes) > 1 else ""
    return module[len(root) + 1:] if root and module.startswith(root + ".") else module


def describe(v: Any) -> str:
    if isinstance(v, Act):
        return "activation" + ("[1,T,F]" if v.batched else "[T,F]")
    if isinstance(v, Init):
        return f"initializer {v.name}"
    if isinstance(v, Static):
        return "position-derived tensor"
    if isinstance(v, PastKV):
        return f"past {v.kind} of layer {v.layer}"
    if isinstance(v, Partial):
        return f"partial {v.kind}"
    return "unknown value"


def drop_dead(graph: Graph) -> Graph:
    """Nodes whose results reach no output are left behind by idioms raised as one op (add_rms_norm)."""
    live = {ref for _, ref in graph.outputs}
    nodes = []
    for node in reversed(graph.nodes):
        if node.ref in live:
            nodes.append(node)
            live.update(node.inputs)
    params = tuple(p for p in graph.params if "@" + p.name in live)
    return Graph(graph.inputs, params, tuple(reversed(nodes)), graph.outputs, graph.meta)


@dataclass
class ImportedOnnx:
    """The raised graph, the model's config and the directory its tokenizer files are read from."""

    graph: Graph
    config: Any
    files_dir: Path

    @property
    def architecture(self) -> str:
        return self.graph.meta.get("architecture", "?")


def load_config(path: Path, model) -> Any:
    """The transformers config: ``config.json`` beside the file, else the ``llmc.config`` metadata."""
    import transformers

    props = {p.key: p.value for p in model.metadata_props}
    if (path.parent / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(str(path.parent), trust_remote_code=False)
    if "llmc.config" in props:
        data = json.loads(props["llmc.config"])
        return transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    raise CheckpointError(f"{path}: no config.json beside the ONNX file and no llmc.config metadata entry; "
                          "export with `llmc export-onnx` or put the model's config.json next to it")


def load_onnx(path: str | Path) -> ImportedOnnx:
    """Read an ONNX decoder graph (external data beside it) and raise it into a verified llmc Graph."""
    onnx = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf and external-data errors come in several types
        raise CheckpointError(f"{path}: cannot read ONNX model: {exc}") from None
    config = load_config(path, model)
    graph = OnnxRaiser(model, str(path)).run()
    props = {p.key: p.value for p in model.metadata_props}
    arch = (getattr(config, "architectures", None) or [props.get("llmc.architecture", "?")])[0]
    graph = Graph(graph.inputs, graph.params, graph.nodes, graph.outputs,
                  {**graph.meta, "architecture": arch, "model_type": config.model_type, "source": str(path)})
    verify(graph)
    return ImportedOnnx(graph, config, path.parent)


def rope_match(rx: OnnxRaiser, table: Static, kind: str, rotary_dim: int) -> tuple[str, float] | None:
    """(inv_freq initializer, scaling) when the probe value of ``table`` is ``scaling * cos/sin(pos *
    inv_freq)`` (halves layout, [1, T, rotary_dim / 2]) for an initializer it is computed from."""
    value = rx.static_value(table).double().reshape(-1, rotary_dim // 2)
    pos = rx.static_value(Static("positions")).double()
    if value.shape[0] != pos.shape[0]:
        return None
    for name in rx.ancestor_inits(table.name):
        inv_freq = rx.tensor(name)
        if inv_freq.dim() != 1 or inv_freq.numel() != rotary_dim // 2 or not inv_freq.is_floating_point():
            continue
        ref = (torch.cos if kind == "cos" else torch.sin)(pos[:, None] * inv_freq.double()[None, :])
        scaling = float(f"{float((value * ref).sum() / (ref * ref).sum()):.7g}")  # float32 table: ~7 digits
        if (value - scaling * ref).abs().max() <= 1e-5 * max(1.0, abs(scaling)):
            return name, scaling
    return None


def mask_kind(rx: OnnxRaiser, mask: Static | None) -> tuple[bool, int | None]:
    """(causal, sliding_window) read off the probe value of an attention mask (None: no mask)."""
    if mask is None:
        return False, None
    allowed = rx.static_value(mask)
    if allowed.dtype != torch.bool:
        allowed = allowed > torch.finfo(allowed.dtype).min / 2  # additive float mask
    pos = rx.static_value(Static("positions"))
    allowed = allowed.reshape(allowed.shape[-2], allowed.shape[-1])
    keys = torch.arange(allowed.shape[1])[None, :]
    causal = keys <= pos[:, None]
    width = int(allowed.sum(-1).max())
    window = width if width < int(causal.sum(-1).max()) else None
    expect = causal if window is None else causal & (pos[:, None] - keys < window)
    if not torch.equal(allowed, expect):
        raise UnsupportedModelError(f"{rx.source}: attention mask {mask.name!r} is neither causal nor causal with a "
                                    "sliding window over keys at positions 0..P+T-1")
    return True, window


def attention_scale(attrs: dict[str, Any], head_dim: int) -> float:
    return float(attrs.get("scale", 1.0 / math.sqrt(head_dim)))
