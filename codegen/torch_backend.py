"""Torch backend: the final IR -> ``model.py``, straight-line Python calling torch (CPU and CUDA).

Each IR node becomes one assignment whose right-hand side comes from ``EMITTERS``, a table from op
name to a function of (argument expressions, attrs) -> Python expression. Ops whose reference is
more than a torch call (rms_norm, rope, attention) call helpers whose source is copied from
``llmc/runtime/functional.py``, the same functions the ops' references in llmc/ir/ops.py call.
Repeated decoder layers become one function per layer kind (see ``layers.py``); nothing interprets
the IR at run time.
"""

from __future__ import annotations

import inspect
import json
import keyword
import math
from dataclasses import dataclass
from typing import Any, Callable

from jinja2 import Environment, PackageLoader, StrictUndefined

import llmc
from llmc.errors import LlmcError
from llmc.ir import Graph, Node
from llmc.runtime import distributed, functional, paged_attention, quant

from .layers import LayerKind, LayerNumber, LayerRun, LayerTable, find_layer_kinds

# (argument expressions, attrs) -> Python expression. ``attrs`` values are already Python literals.
Emitter = Callable[[list[str], dict[str, str]], str]


def _call(fn: str, *attr_names: str) -> Emitter:
    """``fn(args..., name=attr, ...)``: a helper or torch function taking the attrs by keyword."""
    return lambda a, k: f"{fn}({', '.join([*a, *(f'{n}={k[n]}' for n in attr_names)])})"


ATTENTION_ATTRS = ("layer", "num_heads", "num_kv_heads", "head_dim", "scale", "causal", "sliding_window", "softcap",
                   "kv_dtype", "k_scale", "v_scale", "rope_dim", "rope_interleaved", "rope_scaling")


def _attention_args(a: list[str]) -> list[str]:
    """q, k, v, positions, then ``kv``; the optional inv_freq (rope folded in) by keyword."""
    return [*a[:4], "kv", *(f"inv_freq={x}" for x in a[4:])]


# op name -> emitter; the comment says which reference in llmc/ir/ops.py it reproduces.
EMITTERS: dict[str, Emitter] = {
    "embedding": lambda a, k: f"F.embedding({a[0]}, {a[1]})",                       # F.embedding
    "linear": lambda a, k: f"F.linear({', '.join(a)})",                              # F.linear(x, w[, b])
    "rms_norm": _call("rms_norm", "eps", "offset"),                                  # helper, same math
    "layer_norm": lambda a, k: f"F.layer_norm({a[0]}, {a[0]}.shape[-1:], {a[1]}, {a[2]}, {k['eps']})",
    "rope": _call("rope", "head_dim", "rotary_dim", "interleaved", "scaling"),       # helper, same math
    "attention": lambda a, k: _call("attention", *ATTENTION_ATTRS)(_attention_args(a), k),  # helper, same math
    "paged_attention": lambda a, k: _call("paged_attention", *ATTENTION_ATTRS)(_attention_args(a), k),  # same
    "add_rms_norm": _call("add_rms_norm", "eps", "offset"),                          # helper, same math
    "act_mul": _call("act_mul", "act"),                                              # helper, same math
    "act_mul_packed": _call("act_mul_packed", "act"),                                # helper, same math
    "select_rows": lambda a, k: f"select_rows({a[0]}, kv)",                           # helper, same
    "add": lambda a, k: f"{a[0]} + {a[1]}",                                           # torch.add
    "mul": lambda a, k: f"{a[0]} * {a[1]}",                                           # torch.mul
    "silu": lambda a, k: f"F.silu({a[0]})",
    "gelu": lambda a, k: f"F.gelu({a[0]})",
    "gelu_tanh": lambda a, k: f'F.gelu({a[0]}, approximate="tanh")',
    "relu": lambda a, k: f"F.relu({a[0]})",
    "tanh": lambda a, k: f"torch.tanh({a[0]})",
    "scale": lambda a, k: f"{a[0]} * {k['factor']}",                                  # x * factor
    "slice": lambda a, k: f"{a[0]}[:, {k['start']}:{k['stop']}]",
    "cast": lambda a, k: f"{a[0]}.to(torch.{k['dtype'][1:-1]})",                      # dtype name literal
    # Quantized / sparse linears: the reference math (dequantize, then F.linear). On device cpu
    # CPU_EMITTERS below replace them with what measured fastest (bench/RESULTS.md).
    "linear_bf16": lambda a, k: f"linear_bf16({', '.join(a)})",
    "linear_int8": lambda a, k: f"linear_int8({', '.join(a)})",
    "linear_int4": lambda a, k: f"linear_int4({', '.join(a[:4])}, {a[4] if len(a) > 4 else None}, "
                                f"group_size={k['group_size']})",
    "linear_fp8": lambda a, k: f"linear_fp8({', '.join(a)})",
    "linear_w8a8": lambda a, k: f"linear_w8a8({', '.join(a)})",
    "linear_24": lambda a, k: f"linear_24({', '.join(a)})",
    # Collectives of the shard pass: helpers from llmc/runtime/distributed.py (torch.distributed).
    "all_reduce": _call("tp_all_reduce"),
    "all_gather": _call("tp_all_gather", "parts"),
    "vocab_parallel_embedding": _call("vocab_parallel_embedding"),
    "pp_send": _call("pp_send", "dst", "tag"),
    "pp_recv": _call("pp_recv", "src", "tag", "features", "dtype"),
}


def prepared(expr: str, suffix: str) -> str:
    """The weight expression of a tensor ``prepare_weights`` derived from a param at load time:
    ``w["a.qweight"]`` -> ``w["a.qweight:cpu"]`` (also inside a layer function's f-string key)."""
    if not expr.endswith('"]'):
        raise LlmcError(f"torch backend: {expr} is not a weight (prepared layouts need the param itself)")
    return f'{expr[:-2]}:{suffix}"]'


# device cpu: int8, int4 and w8a8 run ATen's weight-only kernels (bfloat16 activations inside; 3-5x
# the float32 GEMV speed at batch 1 on the dev machine); bf16 runs MKL's bf16 GEMM where the CPU has
# bf16 dot products and float32 elsewhere (``prepare_bf16_cpu``); fp8 and 2:4 have no CPU kernel, so
# their weights are expanded to float32 once at load (``prepare_weights``) and run as plain linears.
CPU_EMITTERS: dict[str, Emitter] = {
    "linear": lambda a, k: f"linear_cpu({', '.join(a)})",
    "linear_bf16": lambda a, k: f"linear_bf16_cpu({', '.join([a[0], prepared(a[1], 'cpu'), *a[2:]])})",
    "linear_int8": lambda a, k: f"linear_int8_cpu({', '.join(a)})",
    "linear_w8a8": lambda a, k: f"linear_w8a8_cpu({', '.join(a)})",
    "linear_int4": lambda a, k: f"linear_int4_cpu({a[0]}, {prepared(a[1], 'int4pack')}, "
                                f"{prepared(a[1], 'scales_and_zeros')}, {a[4] if len(a) > 4 else None}, "
                                f"group_size={k['group_size']})",
    "linear_fp8": lambda a, k: f"F.linear({', '.join([a[0], prepared(a[1], 'dense'), *a[3:]])})",
    "linear_24": lambda a, k: f"F.linear({', '.join([a[0], prepared(a[1], 'dense'), *a[3:]])})",
}
# op -> (derived tensors, the load-time expression computing them from the op's param names).
CPU_PREPARE: dict[str, Callable[[list[str], dict[str, Any]], tuple[list[str], str]]] = {
    "linear_bf16": lambda p, k: (["cpu"], f"prepare_bf16_cpu({p[1]})"),
    "linear_int4": lambda p, k: (["int4pack", "scales_and_zeros"],
                                 f"prepare_int4_cpu({p[1]}, {p[2]}, {p[3]}, {k['group_size']})"),
    "linear_fp8": lambda p, k: (["dense"], f"dequantize_fp8({p[1]}, {p[2]})"),
    "linear_24": lambda p, k: (["dense"], f"decompress_24({p[1]}, {p[2]})"),
}
# Ops whose emitted code calls helpers the template defines (emitted only when used): op -> the
# runtime functions whose source is copied into model.py, callees before callers.
TEMPLATE_HELPERS = {
    "linear": (functional.linear_cpu,),
    "rms_norm": (functional.rms_norm,),
    "rope": (functional.rope_tables, functional.rope),
    "attention": (functional.rope_tables, functional.rope, functional.quantize_kv, functional.dequantize_kv,
                  functional.attention),
    "paged_attention": (functional.rope_tables, functional.rope, functional.quantize_kv, functional.dequantize_kv,
                        paged_attention.head_major_storage, paged_attention.write_kv,
                        paged_attention.attention_probs, paged_attention.attend, paged_attention.memoized,
                        paged_attention.weighted_value_rows, paged_attention.gather_pages,
                        paged_attention.decode_groups, paged_attention.paged_decode_attention,
                        paged_attention.paged_prefill_attention,
                        paged_attention.paged_attention),
    "select_rows": (paged_attention.select_rows,),
    "add_rms_norm": (functional.rms_norm, functional.add_rms_norm),
    "act_mul": (functional.act_mul,),
    "act_mul_packed": (functional.act_mul, functional.act_mul_packed),
    "linear_bf16": (functional.linear_cpu, quant.linear_bf16, quant.has_bf16_dot, quant.prepare_bf16_cpu,
                    quant.linear_bf16_cpu),
    "linear_int8": (quant.dequantize_int8, quant.linear_int8, quant.linear_int8_cpu),
    "linear_int4": (quant.unpack_int4, quant.dequantize_int4, quant.linear_int4, quant.prepare_int4_cpu,
                    quant.linear_int4_cpu),
    "linear_fp8": (quant.dequantize_fp8, quant.linear_fp8),
    "linear_w8a8": (quant.quantize_per_token_int8, quant.linear_w8a8, quant.linear_w8a8_cpu),
    "linear_24": (quant.decompress_24, quant.linear_24),
    "all_reduce": (distributed._world, distributed.tp_all_reduce),
    "all_gather": (distributed._world, distributed.tp_all_gather),
    "vocab_parallel_embedding": (distributed._world, distributed.vocab_parallel_embedding),
    "pp_send": (distributed._world, distributed.pp_send),
    "pp_recv": (distributed._world, distributed.pp_recv),
}
# Helper source for ops registered by plugins: op name -> a Python function definition.
PLUGIN_HELPERS: dict[str, str] = {}
RESERVED = {"forward", "prepare_weights", "w", "kv", "layer", "math", "torch", "F", "LAYER_ATTRS"} | {
    fn.__name__ for fns in TEMPLATE_HELPERS.values() for fn in fns}


def register_emitter(op: str, emitter: Emitter, helper_source: str | None = None) -> None:
    """Teach the torch backend a (plugin) op: ``emitter`` builds the expression; ``helper_source``,
    if given, is a function definition pasted into model.py for the expression to call."""
    if op in EMITTERS:
        raise LlmcError(f"torch backend: op {op!r} already has an emitter")
    EMITTERS[op] = emitter
    if helper_source:
        PLUGIN_HELPERS[op] = helper_source


def literal(value: Any) -> str:
    """A Python expression for an attr value that reads back as the same value."""
    if isinstance(value, LayerNumber):
        return "layer"
    if isinstance(value, LayerTable):
        return f"LAYER_ATTRS[{value.attr!r}][layer]"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [literal(v) for v in value]
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})" if isinstance(value, tuple) else f"[{', '.join(items)}]"
    raise LlmcError(f"torch backend: cannot write attr value {value!r} ({type(value).__name__}) as Python")


def value_name(ref: str) -> str:
    """``%12`` -> ``v12``; graph inputs keep their (identifier) names: ``%positions`` -> ``positions``."""
    name = ref[1:]
    if name.isdigit():
        return f"v{name}"
    ident = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    if not ident.isidentifier() or keyword.iskeyword(ident) or ident in RESERVED:
        ident = f"v_{ident}"
    return ident


def _param_expr(name: str) -> str:
    return f"w[{json.dumps(name)}]"


def _braced(text: str) -> str:
    """``text`` as literal f-string content (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass
class LayerFunction:
    name: str
    doc: str
    args: list[str]
    body: list[str]
    returns: list[str]


def emitters_for(device: str) -> dict[str, Emitter]:
    return {**EMITTERS, **(CPU_EMITTERS if device == "cpu" else {})}


def emit_line(node: Node, args: list[str], attrs: dict[str, Any], comment: str,
              emitters: dict[str, Emitter] = EMITTERS) -> str:
    emitter = emitters.get(node.op.name)
    if emitter is None:
        where = f" at {node.meta['module']}" if node.meta.get("module") else ""
        raise LlmcError(f"torch backend: no code generator for op {node.op.name!r} (node {node.ref}{where}); "
                        f"supported ops: {', '.join(sorted(EMITTERS))}. A plugin op needs "
                        "llmc.codegen.torch_backend.register_emitter")
    expr = emitter(args, {k: literal(v) for k, v in attrs.items()})
    return f"{value_name(node.ref)} = {expr}" + (f"  # {comment}" if comment else "")


class _Scope:
    """Maps IR refs to Python expressions for one function body."""

    def __init__(self, names: dict[str, str], param: Callable[[str], str] = _param_expr) -> None:
        self.names = names
        self.param = param

    def expr(self, ref: str) -> str:
        if ref.startswith("@"):
            return self.param(ref[1:])
        return self.names.get(ref) or value_name(ref)


def prepare_lines(graph: Graph, device: str) -> list[str]:
    """The body of model.py's ``prepare_weights(w)``: layouts derived from params once, at load.
    A param that only prepared ops read is dropped once its layout exists (its memory comes back)."""
    if device != "cpu":
        return []
    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for ref in node.inputs:
            if ref.startswith("@"):
                readers.setdefault(ref, set()).add(node.op.name)
    lines: list[str] = []
    done: set[str] = set()
    for node in graph.nodes:
        make = CPU_PREPARE.get(node.op.name)
        if make is None or node.inputs[1] in done:
            continue
        done.add(node.inputs[1])
        params = [_param_expr(r[1:]) if r.startswith("@") else r for r in node.inputs]
        suffixes, expr = make(params, {k: literal(v) for k, v in node.attrs})
        lines.append(f"{', '.join(prepared(params[1], s) for s in suffixes)} = {expr}")
        if readers.get(node.inputs[1], set()) <= set(CPU_PREPARE):
            lines.append(f"del {params[1]}")
    return lines


def _layer_function(kind: LayerKind, emitters: dict[str, Emitter]) -> LayerFunction:
    run = kind.template
    value_inputs = [r for r in run.inputs if r not in run.graph_inputs]
    arg_names = {r: ("x" if len(value_inputs) == 1 else f"x{i}") for i, r in enumerate(value_inputs)}
    arg_names.update({r: value_name(r) for r in run.inputs if r in run.graph_inputs})
    stem = run.stem

    def param(name: str) -> str:
        where, rest = run.param_key(name)
        if where == "shared":
            return _param_expr(name)
        return f"w[f{json.dumps(_braced(stem) + '.{layer}.' + _braced(rest))}]"

    scope = _Scope(arg_names, param)
    body = []
    for node in run.nodes:
        attrs = {k: run.attr(k, v) for k, v in node.attrs}
        module = node.meta.get("module") or ""
        comment = module[len(run.prefix) + 1:] if module.startswith(run.prefix + ".") else ""
        body.append(emit_line(node, [scope.expr(r) for r in node.inputs], attrs, comment, emitters))
    layers = ", ".join(str(r.index) for r in kind.runs)
    doc = (f"Layer ``{stem}.{{layer}}``, for layers {layers}; values are named after layer {run.index}'s IR nodes.")
    return LayerFunction(kind.name, doc, ["w", "layer", "kv", *(arg_names[r] for r in run.inputs)],
                         body, [value_name(r) for r in run.outputs])


def _layer_tables(kinds: list[LayerKind]) -> list[tuple[str, str]]:
    """(attr, ``{layer: value, ...}`` literal) of the per-layer attr tables layer functions read."""
    tables: dict[str, dict[int, Any]] = {}
    for kind in kinds:
        for run in kind.runs:
            for key, value in run.table_values().items():
                tables.setdefault(key, {})[run.index] = value
    return [(key, "{" + ", ".join(f"{i}: {literal(v)}" for i, v in sorted(t.items())) + "}")
            for key, t in sorted(tables.items())]


def _layer_call(kind: LayerKind, run: LayerRun) -> str:
    args = ["w", str(run.index), "kv", *(value_name(r) for r in run.inputs)]
    targets = ", ".join(value_name(r) for r in run.outputs)
    return f"{targets} = {kind.name}({', '.join(args)})  # {run.prefix}"


def _check_inputs(graph: Graph) -> list[str]:
    names = [name for name, _ in graph.inputs]
    if names != ["input_ids", "positions"]:
        raise LlmcError(f"torch backend: the runtime calls forward(w, input_ids, positions, kv), but the graph's "
                        f"inputs are {', '.join('%' + n for n in names)}")
    return names


def helper_source(helper: Callable | str) -> str:
    """A helper's definition as model.py holds it: a runtime function's source, or source text."""
    return helper if isinstance(helper, str) else inspect.getsource(helper).rstrip()


def render_model(graph: Graph, *, target_name: str, device: str, backend: str,
                 factor_layers: bool = True, emitters: dict[str, Emitter] | None = None,
                 helpers: dict[str, tuple] | None = None, preamble: str = "",
                 prepare_body: list[str] | None = None, reserved: frozenset[str] = frozenset()) -> str:
    """The source of model.py for ``graph`` (deterministic: same graph -> same text).

    Another backend reuses this with its own ``emitters`` (op -> expression), ``helpers`` (op ->
    functions or source texts pasted into model.py), ``preamble`` (code after the imports, e.g.
    loading kernel modules), ``prepare_body`` and the extra names it defines (``reserved``)."""
    input_names = _check_inputs(graph)
    emitters = emitters_for(device) if emitters is None else emitters
    helpers = TEMPLATE_HELPERS if helpers is None else helpers
    for node in graph.nodes:  # fail before rendering anything, naming the first unsupported node
        if node.op.name not in emitters:
            emit_line(node, [], {}, "", emitters)
    found = find_layer_kinds(graph, RESERVED | reserved | set(emitters)) if factor_layers else None
    runs, kinds = found if found else ([], [])
    kind_of = {id(run): kind for kind in kinds for run in kind.runs}
    start_of = {run.nodes[0].ref: run for run in runs}
    in_run = {n.ref for run in runs for n in run.nodes}
    scope = _Scope({})
    forward_body = []
    for node in graph.nodes:
        if node.ref in start_of:
            run = start_of[node.ref]
            forward_body.append(_layer_call(kind_of[id(run)], run))
        elif node.ref not in in_run:
            forward_body.append(emit_line(node, [scope.expr(r) for r in node.inputs], node.attr_dict,
                                          node.meta.get("module") or "", emitters))
    used = {n.op.name for n in graph.nodes}
    env = Environment(loader=PackageLoader("llmc.codegen", "templates"), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    arch = graph.meta.get("architecture", "model")
    return env.get_template("model.py.jinja").render(
        title=f"{arch}: the forward step of the compiled model.",
        llmc_version=llmc.__version__, target_name=target_name, device=device, backend=backend,
        input_names=input_names, preamble=preamble,
        helpers=list(dict.fromkeys(helper_source(fn) for op in sorted(used & set(helpers))
                                   for fn in helpers[op])),  # once each: ops share helpers
        extra_helpers=[PLUGIN_HELPERS[op] for op in sorted(used & set(PLUGIN_HELPERS))],
        layer_functions=[_layer_function(k, emitters) for k in kinds], forward_body=forward_body,
        layer_tables=_layer_tables(kinds),
        prepare_body=prepare_lines(graph, device) if prepare_body is None else prepare_body,
        outputs=[(name, scope.expr(ref)) for name, ref in graph.outputs])
