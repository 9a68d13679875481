"""ONNX backend: the final IR (after a target's passes) -> an ONNX decoder graph with explicit KV.

The graph computes one step of one sequence, like ``llmc run``'s interpreter: ``input_ids`` and
``positions`` ``[T]`` in, ``logits`` out, and per attention layer ``past_key_values.{L}.key/value``
``[1, kv_heads, P, head_dim]`` in and ``present.{L}.key/value`` ``[1, kv_heads, P + T, head_dim]``
out (key ``j`` sits at position ``j``: a prefill passes ``P = 0`` and each decode feeds the presents
back). Ops are standard ONNX opset 23 where one exists (``Attention`` with GQA and past/present,
``RotaryEmbedding``, ``RMSNormalization``, ``LayerNormalization``, ``Gemm``, ``DequantizeLinear``)
and ``com.microsoft.MatMulNBits`` for int4, the form ONNX Runtime accepts for it. ``paged_attention``
exports like ``attention``: the page pool is the runtime's business, the math is the same.

Each IR op has one emitter in ``EMITTERS`` (``@emits``); an op without one is an error naming the
node. Weights are initializers named like the IR params; ``save_onnx`` moves those of at least
``external_data_threshold`` bytes to ``NAME.onnx.data`` beside the model. ``onnx`` is imported here,
inside the backend: it is an optional dependency of llmc and never of a package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import llmc
from llmc.errors import LlmcError
from llmc.ir import Graph, Node
from llmc.ir.types import DTYPE_NAMES, Param

OPSET = 23            # Attention, RotaryEmbedding and RMSNormalization are opset-23 standard ops
MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_THRESHOLD = 1 << 20  # tensors of 1 MiB and more go to the .data file by default
ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
               "bfloat16": 16, "float8_e4m3fn": 17}  # onnx.TensorProto enum values


def require_onnx():
    """The ``onnx`` module, or an error saying how to install it (it is not a runtime dependency)."""
    try:
        import onnx
    except ImportError:
        raise LlmcError("ONNX export/import needs the 'onnx' package: pip install onnx "
                        "(and onnxruntime to run the result), or pip install -e '.[dev]'") from None
    return onnx


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) names of attention layer ``layer``."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


class OnnxEmitter:
    """Collects the ONNX nodes, initializers and graph I/O of one exported IR graph."""

    def __init__(self, graph: Graph) -> None:
        self.onnx = require_onnx()
        self.graph = graph
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.names: dict[str, str] = {"%" + n: n for n, _ in graph.inputs}
        self.kv_layers: dict[int, tuple[int, int, int]] = {}  # layer -> (kv_heads, head_dim, v_head_dim)
        self._cache: dict[tuple, str] = {}                    # shared subgraphs (rope tables, masks)
        self._count = 0
        self.current: Node | None = None

    # ---- building blocks --------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}/{self._count}"

    def node(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
             **attrs: Any) -> Any:
        """Add one ONNX node; returns its output name (or names when ``outputs`` > 1 / a list)."""
        base = f"{self.current.op.name}_{self.current.name}" if self.current is not None else "graph"
        names = outputs if isinstance(outputs, list) else [self.fresh(f"{base}/{op_type}") for _ in range(outputs)]
        node = self.onnx.helper.make_node(op_type, inputs, names, name=self.fresh(base), domain=domain or None,
                                          **attrs)
        if self.current is not None and self.current.meta.get("module"):
            node.doc_string = str(self.current.meta["module"])  # the HF module, for the importer's errors
        self.nodes.append(node)
        return names[0] if len(names) == 1 and not isinstance(outputs, list) else names

    def const(self, value: Any, dtype: torch.dtype = torch.int64, name: str | None = None) -> str:
        """A small constant as an initializer (shapes, axes, scalars), shared by value."""
        tensor = torch.as_tensor(value, dtype=dtype)
        key = ("const", dtype, tuple(tensor.shape), tuple(tensor.flatten().tolist()))
        if key not in self._cache:
            self._cache[key] = name or self.fresh("const")
            self.initializers[self._cache[key]] = to_tensor_proto(self._cache[key], tensor)
        return self._cache[key]

    def param(self, ref: str) -> str:
        name = ref[1:]
        if name not in self.initializers:
            p: Param = self.graph.param_map[name]
            self.initializers[name] = to_tensor_proto(name, p.load())
        return name

    def value(self, ref: str) -> str:
        return self.param(ref) if ref.startswith("@") else self.names[ref]

    def initializer(self, name: str, tensor: torch.Tensor) -> str:
        self.initializers[name] = to_tensor_proto(name, tensor)
        return name

    def cached(self, key: tuple, build: Callable[[], str]) -> str:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ---- the walk -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            emit = EMITTERS.get(node.op.name)
            if emit is None:
                raise LlmcError(f"ONNX export: node {node.ref} ({node.op.name}"
                                f"{' at ' + node.meta['module'] if node.meta.get('module') else ''}) has no ONNX "
                                f"form; exportable ops: {', '.join(sorted(EMITTERS))}. Compile without the pass that "
                                f"made it, or add an emitter to codegen/onnx_export.py")
            self.current = node
            self.names[node.ref] = emit(self, node, [self.value(r) for r in node.inputs], node.attr_dict)
        self.current = None


def to_tensor_proto(name: str, tensor: torch.Tensor):
    """A torch tensor -> TensorProto, byte for byte (bfloat16 and float8 too, which numpy lacks)."""
    onnx = require_onnx()
    tensor = tensor.detach().cpu().contiguous()
    dtype = DTYPE_NAMES[tensor.dtype]
    if dtype not in ONNX_DTYPES:
        raise LlmcError(f"ONNX export: tensor {name!r} has dtype {dtype}, which has no ONNX type here")
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = ONNX_DTYPES[dtype]
    proto.dims.extend(tensor.shape)
    # Viewed as plain integers of the same width: numpy has no bfloat16 or float8, the bytes are the same.
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        tensor = tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.uint8)
    proto.raw_data = tensor.numpy().tobytes()
    return proto


def build_onnx_model(graph: Graph, metadata: Mapping[str, str] | None = None):
    """The ``onnx.ModelProto`` of ``graph``; ``metadata`` goes to ``metadata_props`` (config, meta)."""
    from llmc.codegen import onnx_ops  # noqa: F401  (registers the emitters)

    emitter = OnnxEmitter(graph)
    onnx = emitter.onnx
    emitter.run()
    helper = onnx.helper
    act_dtype = ONNX_DTYPES[graph.type_of(graph.outputs[0][1]).dtype]
    inputs = [helper.make_tensor_value_info(n, ONNX_DTYPES[t.dtype], [d if isinstance(d, int) else "T"
                                                                      for d in t.shape])
              for n, t in graph.inputs]
    outputs = []
    for name, ref in graph.outputs:
        t = graph.type_of(ref)
        outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], [
            d if isinstance(d, int) else "T" for d in t.shape]))
        if emitter.names[ref] != name:
            emitter.current = None
            emitter.node("Identity", [emitter.names[ref]], [name])
    for layer, (kvh, d, dv) in sorted(emitter.kv_layers.items()):
        pk, pv, nk, nv = kv_names(layer)
        inputs += [helper.make_tensor_value_info(pk, act_dtype, [1, kvh, "past", d]),
                   helper.make_tensor_value_info(pv, act_dtype, [1, kvh, "past", dv])]
        outputs += [helper.make_tensor_value_info(nk, act_dtype, [1, kvh, "total", d]),
                    helper.make_tensor_value_info(nv, act_dtype, [1, kvh, "total", dv])]
    body = helper.make_graph(emitter.nodes, f"llmc_{graph.meta.get('model_type', 'model')}", inputs, outputs,
                             initializer=list(emitter.initializers.values()))
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == MS_DOMAIN for n in emitter.nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(body, opset_imports=opsets, producer_name="llmc", producer_version=llmc.__version__)
    model.ir_version = 10  # opset 23 needs IR version 10; ORT 1.2x reads it
    helper.set_model_props(model, {str(k): str(v) for k, v in (metadata or {}).items()})
    return model


def save_onnx(model, path: str | Path, external_data_threshold: int | None = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``model`` to ``path`` and check it with ``onnx.checker``; initializers of at least
    ``external_data_threshold`` bytes go to ``PATH.data`` (None: everything inline, < 2 GiB only)."""
    onnx = require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # external data is appended to: a stale file would grow and leak old weights
    if external_data_threshold is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=external_data_threshold)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LlmcError(f"ONNX export: {path} fails onnx.checker: {exc}") from None
    return path


def export_onnx(graph: Graph, path: str | Path, *, metadata: Mapping[str, str] | None = None,
                external_data_threshold: int | None = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Export ``graph`` to ``path`` (checked); see the module docstring for the graph's I/O."""
    return save_onnx(build_onnx_model(graph, metadata), path, external_data_threshold)


# ---- emitters ------------------------------------------------------------------------------------
EmitFn = Callable[[OnnxEmitter, Node, list[str], dict[str, Any]], str]
EMITTERS: dict[str, EmitFn] = {}


def emits(*ops: str):
    """Register the emitter of IR ops ``ops`` (one function may serve several)."""

    def wrap(fn: EmitFn) -> EmitFn:
        for op in ops:
            if op in EMITTERS:
                raise LlmcError(f"ONNX emitter for {op!r} registered twice")
            EMITTERS[op] = fn
        return fn

    return wrap


# ---- from a checkpoint ---------------------------------------------------------------------------
# Copied beside the .onnx file: an ONNX graph holds no tokenizer, and the ONNX frontend reads these.
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja")


def export_checkpoint(model_dir: str | Path, out: str | Path, target_name: str = "cpu", *,
                      overrides: Sequence[str] = (),
                      external_data_threshold: int | None = EXTERNAL_DATA_THRESHOLD) -> tuple[Path, Graph]:
    """Import ``model_dir``, run ``target_name``'s pipeline and export the final IR to ``out``; the
    config and tokenizer files are copied beside it and the config is also kept in the model's
    ``llmc.config`` metadata. Returns the path and the exported graph."""
    from llmc.frontend.hf import load_hf
    from llmc.pipeline import run_pipeline, validate_pipeline
    from llmc.target import load_target_with_source

    require_onnx()  # before the slow import
    model_dir, out = Path(model_dir), Path(out)
    if (model_dir / "plan.json").is_file():
        raise LlmcError(f"{model_dir} is a compiled package: export it with export_package (its target's passes "
                        f"already ran), or give the checkpoint it was compiled from")
    target, source = load_target_with_source(target_name, overrides)
    validate_pipeline(target, source)
    graph = run_pipeline(load_hf(model_dir).graph, target, source=source).graph
    passes = [step.name for step in target.pipeline]
    return _export_with_side_files(graph, model_dir, out, target.name, passes, external_data_threshold), graph


def _export_with_side_files(graph: Graph, source_dir: Path, out: Path, target_name: str, passes: Sequence[str],
                            external_data_threshold: int | None) -> Path:
    """Export ``graph`` with the same metadata and side files whether it came from a checkpoint or a
    package, so both routes give the same model."""
    metadata = {"llmc.architecture": graph.meta.get("architecture", ""), "llmc.target": target_name,
                "llmc.passes": " -> ".join(passes)}
    if (source_dir / "config.json").is_file():
        metadata["llmc.config"] = (source_dir / "config.json").read_text(encoding="utf-8")
    path = export_onnx(graph, out, metadata=metadata, external_data_threshold=external_data_threshold)
    for name in SIDE_FILES:
        src, dst = source_dir / name, out.parent / name
        if src.is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    return path


# ---- from a compiled package ---------------------------------------------------------------------
IR_FILE = "ir.json"                    # codegen/package.py writes it (llmc/ir/serialize.py's form)
WEIGHTS_FILE = "weights/model.safetensors"


def load_package_graph(package_dir: str | Path) -> tuple[Graph, dict[str, Any]]:
    """The final IR of a compiled package (exact, params read lazily from its weights) and its plan."""
    from llmc.ir.serialize import load_ir_file

    package_dir = Path(package_dir)
    plan_path = package_dir / "plan.json"
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LlmcError(f"{plan_path}: cannot read the package plan ({exc})") from None
    if not (package_dir / IR_FILE).is_file():
        raise LlmcError(f"{package_dir} has no {IR_FILE}: it was compiled by an llmc that did not keep the IR "
                        f"in a readable form (llmc {plan.get('llmc_version', '?')}); recompile it with "
                        f"`llmc compile CHECKPOINT -o {package_dir}` and export again")
    if "parallel" in plan:
        raise LlmcError(f"{package_dir} is sharded (tp={plan['parallel'].get('tp')}, pp={plan['parallel'].get('pp')}): "
                        f"its weights are split per rank and ONNX holds one graph; export a package compiled "
                        f"without shard.tp/shard.pp")
    return load_ir_file(package_dir / IR_FILE, package_dir / WEIGHTS_FILE), plan


def export_package(package_dir: str | Path, out: str | Path, *,
                   external_data_threshold: int | None = EXTERNAL_DATA_THRESHOLD) -> tuple[Path, Graph]:
    """Export a compiled package's final IR (its ``ir.json`` and weights) to ``out``: the same model as
    ``export_checkpoint`` of its checkpoint with its target and options. Returns the path and graph."""
    require_onnx()
    package_dir = Path(package_dir)
    graph, plan = load_package_graph(package_dir)
    target = plan.get("target", {})
    passes = [step.get("pass", "?") for step in target.get("pipeline", [])]
    path = _export_with_side_files(graph, package_dir, Path(out), str(target.get("name", "?")), passes,
                                   external_data_threshold)
    return path, graph
