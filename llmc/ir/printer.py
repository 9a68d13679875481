"""Readable text form of a Graph (``llmc inspect --ir``)."""

from __future__ import annotations

from llmc.ir.graph import Graph


def _fmt_attr(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple) and value and all(isinstance(v, float) for v in value):  # k_scale, v_scale
        return "(" + ", ".join(f"{v:.6g}" for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def format_graph(graph: Graph, show_params: bool = True) -> str:
    lines = ["graph(" + ", ".join(f"%{n}: {t}" for n, t in graph.inputs) + ") {"]
    if show_params:
        for p in graph.params:
            extra = "".join(f" {k}={v}" for k, v in (("layout", p.layout), ("source", p.source))
                            if v not in ("plain", "checkpoint"))
            extra += f" transform={','.join(p.transform)}" if p.transform else ""
            lines.append(f"  @{p.name}: {p.type}{extra}")
    for n in graph.nodes:
        attrs = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in n.attrs if v is not None)
        attrs = f" {{{attrs}}}" if attrs else ""
        where = f"  # {n.meta['module']}" if n.meta.get("module") else ""
        lines.append(f"  {n.ref}: {n.type} = {n.op.name}({', '.join(n.inputs)}){attrs}{where}")
    lines.append("  return " + ", ".join(f"{name}={ref}" for name, ref in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
