"""The compile report: what the passes did to size (bytes per param group, KV bytes per token) and,
after a lossy pass, to quality — the compiled graph scored against the unoptimized one.

Quality is measured with the same scorer as ``llmc eval`` (``llmc/runtime/evaluate.py``): sliding
windows over held-out text, each window one prefill through the reference interpreter of each
graph, reporting mean KL(unoptimized || compiled) of the next-token distributions, top-1
agreement, both perplexities and their difference. The text is the checkpoint's held-out files when
its ``split.json`` names them (the example model), else seeded random token ids (a tiny test model
has no data; KL and agreement still say how far the outputs moved, perplexity is then meaningless).
The budget is small on purpose (default 1,024 scored tokens): it runs at every lossy compile.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from llmc.calibration import vocab_size
from llmc.ir import ExecutionContext, Graph, Interpreter
from llmc.runtime import evaluate as ev

DEFAULT_TOKENS = 1024
DEFAULT_CONTEXT = 256

# Param groups by module role (first match wins), for "bytes per group" before and after.
GROUPS = (("embedding", ("embed", "wte", "wpe")), ("lm_head", ("lm_head",)),
          ("attention", ("attn", "attention")), ("mlp", ("mlp", "feed_forward", "ffn")),
          ("norm", ("norm", "ln_")))
ATTENTION_OPS = ("attention", "paged_attention")
KV_ELEMENT_BYTES = {"int8": 1, "float8_e4m3fn": 1}


def param_group(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "other"


def bytes_by_group(graph: Graph) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in graph.params:
        out[param_group(p.name)] = out.get(param_group(p.name), 0) + p.type.nbytes
    return dict(sorted(out.items()))


def kv_bytes_per_token(graph: Graph) -> int:
    """Bytes the KV cache keeps per token: K and V of every attention layer, in the stored dtype."""
    total = 0
    for node in graph.nodes:
        if node.op.name not in ATTENTION_OPS:
            continue
        attrs = node.attr_dict
        kvh, hd = attrs["num_kv_heads"], attrs["head_dim"]
        v_features = graph.type_of(node.inputs[2]).shape[1]
        element = KV_ELEMENT_BYTES.get(attrs.get("kv_dtype") or "", graph.type_of(node.inputs[0]).torch_dtype.itemsize)
        total += (kvh * hd + v_features) * element
    return total


def _logits_fn(graph: Graph):
    interp = Interpreter(graph)

    def run(ids: Sequence[int]) -> torch.Tensor:
        ctx = ExecutionContext.for_graph(graph)
        inputs = {"input_ids": torch.tensor(list(ids), dtype=torch.int64), "positions": torch.arange(len(ids))}
        return interp.run(inputs, ctx)["logits"]

    return run


def eval_ids(graph: Graph, tokens: int, data_dir: str | Path | None = None) -> tuple[list[int], str]:
    """``tokens + 1`` ids to score and where they came from (held-out text, else random ids)."""
    source = graph.meta.get("source")
    if source:
        model_dir = Path(str(source))
        try:
            split = ev.load_split(model_dir)
            tokenizer = ev.load_tokenizer(model_dir)
            bos, eos = ev.boundary_ids(model_dir, tokenizer)
            root = Path(data_dir) if data_dir else ev.default_data_root()
            held = ev.heldout_stream(tokenizer, split, root, tokens, bos, eos)
            if len(held.ids) > tokens:
                return held.ids, f"held-out files ({len(held.files)})"
        except ev.EvalError:
            pass
    vocab = vocab_size(graph)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (tokens + 1,), generator=gen).tolist(), "random ids"


def measure_quality(reference: Graph, compiled: Graph, *, tokens: int = DEFAULT_TOKENS,
                    context: int = DEFAULT_CONTEXT, data_dir: str | Path | None = None) -> dict[str, Any]:
    """KL, top-1 agreement and perplexities of ``compiled`` against ``reference`` (see module doc)."""
    ids, data = eval_ids(reference, tokens, data_dir)
    sums = ev.score(_logits_fn(compiled), ids, context, context // 2, reference=_logits_fn(reference))
    n = sums["targets"]
    ppl, ref_ppl = math.exp(sums["nll"] / n), math.exp(sums["reference_nll"] / n)
    return {"data": data, "tokens": n, "context": context, "kl": sums["kl"] / n,
            "top1_agreement": sums["top1_agree"] / n, "perplexity": ppl, "reference_perplexity": ref_ppl,
            "perplexity_delta": ppl - ref_ppl, "max_abs_logit_error": sums["max_abs_logit_error"]}


def compile_report(reference: Graph, compiled: Graph, records: Sequence[Any], *,
                   quality_tokens: int | None = DEFAULT_TOKENS, data_dir: str | Path | None = None) -> dict[str, Any]:
    """The package's report.json: sizes always; quality when a lossy pass changed the graph and
    ``quality_tokens`` is not None."""
    lossy = [r.name for r in records if getattr(r, "lossy", False) and r.changed]
    before, after = bytes_by_group(reference), bytes_by_group(compiled)
    report: dict[str, Any] = {
        "lossy_passes": lossy,
        "bytes": {g: {"before": before.get(g, 0), "after": after.get(g, 0)} for g in sorted({*before, *after})},
        "kv_bytes_per_token": {"before": kv_bytes_per_token(reference), "after": kv_bytes_per_token(compiled)},
        "quality": None,
    }
    report["bytes"]["total"] = {"before": sum(before.values()), "after": sum(after.values())}
    if lossy and quality_tokens:
        report["quality"] = measure_quality(reference, compiled, tokens=quality_tokens, data_dir=data_dir)
    return report


def report_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) rows for a table."""
    rows = []
    for group, b in report["bytes"].items():
        ratio = f"{b['after'] / b['before']:.3f}x" if b["before"] else "new"
        rows.append((f"bytes: {group}", f"{b['before']:,}", f"{b['after']:,}", ratio))
    kv = report["kv_bytes_per_token"]
    if kv["before"]:
        rows.append(("KV bytes / token", f"{kv['before']:,}", f"{kv['after']:,}", f"{kv['after'] / kv['before']:.3f}x"))
    q = report.get("quality")
    if q:
        rows.append(("perplexity", f"{q['reference_perplexity']:.3f}", f"{q['perplexity']:.3f}",
                     f"{q['perplexity_delta']:+.3f}"))
        rows.append(("mean KL (unoptimized || compiled)", "", f"{q['kl']:.5f}", ""))
        rows.append(("top-1 agreement", "", f"{q['top1_agreement']:.2%}", ""))
        rows.append(("scored tokens", "", f"{q['tokens']:,} ({q['data']})", ""))
    return rows


def format_report(report: dict[str, Any]) -> str:
    """Plain-text table (the CLI renders the same rows with rich)."""
    rows = [("", "before", "after", "change"), *report_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
