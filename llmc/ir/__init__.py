"""llmc IR: typed SSA graphs of LLM-level ops, each with a torch reference implementation."""

from llmc.ir import ops as _ops  # noqa: F401  (registers the built-in ops)
from llmc.ir import ops_quant as _ops_quant  # noqa: F401  (quantized and sparse linear ops)
from llmc.ir import ops_fused as _ops_fused  # noqa: F401  (ops made by the fuse pass)
from llmc.ir import ops_dist as _ops_dist  # noqa: F401  (collectives made by the shard pass)
from llmc.ir.graph import Graph, GraphBuilder, Node
from llmc.ir.interpreter import ContiguousKVCache, ExecutionContext, Interpreter, generate_greedy
from llmc.ir.opdef import OPS, OpDef, OpRegistry, register_op
from llmc.ir.printer import format_graph
from llmc.ir.serialize import graph_from_json, graph_to_json
from llmc.ir.types import T, Param, TensorType
from llmc.ir.verifier import verify

__all__ = ["Graph", "GraphBuilder", "Node", "ContiguousKVCache", "ExecutionContext", "Interpreter",
           "generate_greedy", "OPS", "OpDef", "OpRegistry", "register_op", "format_graph", "graph_from_json",
           "graph_to_json", "T", "Param", "TensorType", "verify"]
