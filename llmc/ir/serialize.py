"""An exact, versioned JSON form of a Graph, so a compiled package can hand its final IR back.

The printed IR (``format_graph``, plan.json's ``graph``) rounds floats and drops attribute types;
this form keeps them. Values are JSON where JSON is exact (None, bool, int, str, finite floats: json
writes ``repr(float)``, which reads back to the same double) and tagged objects where it is not:

    {"$tuple": [...]}                     tuples (attrs such as k_scale, shapes in meta)
    {"$float": "inf" | "-inf" | "nan"}    non-finite floats (strict JSON has none)
    {"$items": [[key, value], ...]}       dicts whose keys are not all plain strings (int-keyed
                                          memory plans), or that use a "$" key themselves

Param tensors are not in this form: ``graph_from_json`` gives each param a loader over
``param_loader(name)``, which returns the tensor as ``Param.load()`` produced it when the weights
were written (transforms applied). The loader undoes the transforms, so ``load()`` gives the same
tensor again and the Param keeps its ``transform`` (and compares equal to the original).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from llmc.errors import IRError
from llmc.ir.graph import Graph, Node
from llmc.ir.opdef import OPS, OpRegistry
from llmc.ir.types import Param, TensorType

FORMAT = "llmc-ir"
VERSION = 1
# Each transform Param.load() knows, and what undoes it on a stored (already transformed) tensor.
INVERSE_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"transpose": lambda t: t.t()}


class Unencodable(TypeError):
    """A value with no exact JSON form here (a tensor, a Graph, a callable)."""


def encode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_value(v) for k, v in value.items()}
        return {"$items": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    raise Unencodable(f"{type(value).__name__} value {value!r:.80}")


def decode_value(data: Any) -> Any:
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "$tuple" in data:
        return tuple(decode_value(v) for v in data["$tuple"])
    if "$float" in data:
        return float(data["$float"])
    if "$items" in data:
        return {_hashable(decode_value(k)): decode_value(v) for k, v in data["$items"]}
    return {k: decode_value(v) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _type(t: TensorType) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": t.dtype}


def _json_part(meta: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """The encodable entries of a meta mapping (rank graphs, loaders and the like stay out)."""
    out, dropped = {}, set(drop)
    for key, value in meta.items():
        if key in dropped:
            continue
        try:
            out[str(key)] = encode_value(value)
        except Unencodable:
            continue
    return out


def graph_to_json(graph: Graph, *, drop_meta: Iterable[str] = ()) -> dict[str, Any]:
    """The exact JSON form of ``graph``; graph meta keys in ``drop_meta`` are left out (e.g. a
    checkpoint path that must not end up in a deterministic package)."""
    params = []
    for p in graph.params:
        if p.transform and any(step not in INVERSE_TRANSFORMS for step in p.transform):
            raise IRError(f"param @{p.name}: transform {p.transform} cannot be undone on load; known: "
                          f"{', '.join(INVERSE_TRANSFORMS)}")
        try:
            quant = encode_value(p.quant if p.quant is None else dict(p.quant))
        except Unencodable as exc:
            raise IRError(f"param @{p.name}: quant metadata has no JSON form: {exc}") from None
        params.append({"name": p.name, "type": _type(p.type), "layout": p.layout, "transform": list(p.transform),
                       "quant": quant, "source": p.source})
    nodes = []
    for n in graph.nodes:
        try:
            attrs = [[k, encode_value(v)] for k, v in n.attrs]
        except Unencodable as exc:
            raise IRError(f"node {n.ref} ({n.op.name}): an attribute has no JSON form: {exc}") from None
        nodes.append({"name": n.name, "op": n.op.name, "inputs": list(n.inputs), "attrs": attrs,
                      "type": _type(n.type), "meta": _json_part(n.meta)})
    return {"format": FORMAT, "version": VERSION,
            "inputs": [[name, _type(t)] for name, t in graph.inputs],
            "params": params, "nodes": nodes,
            "outputs": [[name, ref] for name, ref in graph.outputs],
            "meta": _json_part(graph.meta, drop_meta)}


def _stored_loader(name: str, transform: tuple[str, ...],
                   param_loader: Callable[[str], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        tensor = param_loader(name)
        for step in reversed(transform):
            tensor = INVERSE_TRANSFORMS[step](tensor)
        return tensor

    return load


def graph_from_json(data: Mapping[str, Any], param_loader: Callable[[str], torch.Tensor], *,
                    origin: str = "IR JSON", ops: OpRegistry = OPS) -> Graph:
    """The Graph of ``graph_to_json``'s output; ``origin`` (a file name) is named in every error."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise IRError(f"{origin}: not llmc IR (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise IRError(f"{origin}: IR format version {data.get('version')!r}, this llmc reads version {VERSION}; "
                      f"recompile the package with this llmc")
    try:
        def tensor_type(t: Mapping[str, Any]) -> TensorType:
            return TensorType(tuple(t["shape"]), t["dtype"])

        params = []
        for p in data["params"]:
            transform = tuple(p["transform"])
            unknown = [step for step in transform if step not in INVERSE_TRANSFORMS]
            if unknown:
                raise IRError(f"param @{p['name']}: unknown transform(s) {unknown}")
            params.append(Param(p["name"], tensor_type(p["type"]), p["layout"], transform, decode_value(p["quant"]),
                                p["source"], loader=_stored_loader(p["name"], transform, param_loader)))
        nodes = []
        for n in data["nodes"]:
            if n["op"] not in ops:
                raise IRError(f"node %{n['name']}: unknown op {n['op']!r} (made by a newer llmc or a plugin "
                              f"that is not loaded)")
            attrs = tuple((k, decode_value(v)) for k, v in n["attrs"])
            nodes.append(Node(n["name"], ops[n["op"]], tuple(n["inputs"]), attrs, tensor_type(n["type"]),
                              decode_value(n["meta"])))
        graph = Graph(tuple((name, tensor_type(t)) for name, t in data["inputs"]), tuple(params), tuple(nodes),
                      tuple((name, ref) for name, ref in data["outputs"]), decode_value(data["meta"]))
    except IRError as exc:
        raise IRError(f"{origin}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise IRError(f"{origin}: malformed IR JSON ({type(exc).__name__}: {exc})") from None
    return graph


def dumps(graph: Graph, *, drop_meta: Iterable[str] = ()) -> str:
    """Deterministic text of ``graph_to_json`` (sorted keys, one trailing newline)."""
    return json.dumps(graph_to_json(graph, drop_meta=drop_meta), indent=1, sort_keys=True, allow_nan=False) + "\n"


def load_ir_file(ir_path: str | Path, weights_path: str | Path) -> Graph:
    """The Graph in ``ir_path`` (``dumps`` text) with params read lazily from a safetensors file
    whose tensors are named by IR param name (a package's ``weights/model.safetensors``)."""
    from safetensors import safe_open

    ir_path, weights_path = Path(ir_path), Path(weights_path)
    try:
        data = json.loads(ir_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IRError(f"{ir_path}: not valid JSON ({exc})") from None

    def read(name: str) -> torch.Tensor:
        if not weights_path.is_file():
            raise IRError(f"{weights_path}: weights file not found (needed for param @{name} of {ir_path})")
        with safe_open(str(weights_path), framework="pt") as f:
            if name not in f.keys():
                raise IRError(f"{weights_path}: no tensor {name!r} (param @{name} of {ir_path})")
            return f.get_tensor(name)

    return graph_from_json(data, read, origin=str(ir_path))
