"""`llmc compile`: checkpoint -> IR -> the target's pipeline -> package directory, with progress events."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llmc.ir import Graph

# on_event(stage, detail): stage is "load", "pass", "quality", "warning", "codegen" or "done"; detail says what.
EventFn = Callable[[str, str], None]


@dataclass
class CompileResult:
    out_dir: Path
    graph: Graph
    target: object
    report: object                      # llmc.pipeline.PipelineReport
    cache_key: str
    compile_report: dict = field(default_factory=dict)  # report.json: sizes, quality (llmc/quality.py)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        return self.graph.param_bytes()

    @property
    def decode_floor_seconds(self) -> float:
        """Time per decode token if only weight reads counted: bytes / memory bandwidth (roofline)."""
        return self.weight_bytes / self.target.memory_bandwidth_bytes_per_s


def check_quality_bound(report: dict, target, source: str, steps: Sequence[tuple]) -> list[str]:
    """Compare the measured mean KL with ``target.quality.max_kl``: raise a PipelineError over the bound
    (``on_exceed: error``), else return the warnings to record in report.json."""
    from llmc.errors import PipelineError

    bound, lossy = target.quality, report["lossy_passes"]
    if bound.max_kl is None or not lossy:
        return []
    passes = ", ".join(f"{info.name}({_changed_options(options)})" for info, options in steps if info.name in lossy)
    quality = report["quality"]
    if quality is None:
        problem = (f"quality.max_kl={bound.max_kl:g} of target {target.name} ({source}) cannot be checked: "
                   f"--quality-tokens 0 skipped the measurement after lossy passes {passes}")
    elif not quality["kl"] <= bound.max_kl:  # written so that a NaN KL fails too
        problem = (f"mean KL(unoptimized || compiled) {quality['kl']:.6g} over {quality['tokens']} scored tokens "
                   f"exceeds quality.max_kl={bound.max_kl:g} of target {target.name} ({source}); "
                   f"lossy passes: {passes}")
    else:
        return []
    if bound.on_exceed == "error":
        raise PipelineError(f"{problem}. Relax the bound, choose gentler pass options, or set "
                            "quality.on_exceed=warn to compile anyway")
    return [problem]


def _changed_options(options) -> str:
    """A pass's options that differ from their defaults, e.g. ``scheme='int4', group_size=32``."""
    return ", ".join(f"{k}={v!r}" for k, v in options.model_dump(exclude_defaults=True).items())


def compile_model(model_dir: str | Path, target_name: str, out_dir: str | Path, *,
                  overrides: Sequence[str] = (), dump_ir: str | Path | None = None,
                  on_event: EventFn | None = None, quality_tokens: int | None = None) -> CompileResult:
    """Compile ``model_dir`` for ``target_name`` into ``out_dir``; every error is an LlmcError.

    After a lossy pass (quantize, prune, gqa_rewrite) the compiled graph is scored against the
    imported one on ``quality_tokens`` held-out tokens (default ``quality.DEFAULT_TOKENS``; 0 skips), and
    the mean KL is held to the target's ``quality.max_kl`` when set (``check_quality_bound``)."""
    from llmc.quality import DEFAULT_TOKENS, compile_report
    from llmc.codegen import emit_package
    from llmc.frontend.hf import load_hf
    from llmc.pipeline import cache_key, run_pipeline, validate_pipeline
    from llmc.target import load_target_with_source

    notify = on_event or (lambda stage, detail: None)
    seconds: dict[str, float] = {}
    target, source = load_target_with_source(target_name, overrides)
    steps = validate_pipeline(target, source)  # fail on a bad pipeline before the slow import

    notify("load", f"importing {model_dir} (torch.export + raising)")
    start = time.perf_counter()
    imported = load_hf(model_dir)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    report = run_pipeline(imported.graph, target, source=source, dump_dir=dump_ir,
                          on_event=lambda kind, name, record: notify("pass", name) if kind == "start" else None)
    seconds["passes"] = time.perf_counter() - start

    start = time.perf_counter()
    if any(r.lossy and r.changed for r in report.records) and quality_tokens != 0:
        notify("quality", f"scoring the compiled graph against the imported one "
                          f"({quality_tokens or DEFAULT_TOKENS} tokens)")
    sizes = compile_report(imported.graph, report.graph, report.records,
                           quality_tokens=DEFAULT_TOKENS if quality_tokens is None else quality_tokens)
    seconds["quality"] = time.perf_counter() - start
    warnings = check_quality_bound(sizes, target, source, steps)
    if warnings:
        sizes["warnings"] = warnings
        for warning in warnings:
            notify("warning", warning)

    notify("codegen", f"writing {out_dir} ({target.backend} backend)")
    start = time.perf_counter()
    key = cache_key(target, model_dir, steps)
    report_dict = {**report.as_dict(timings=False), "cache_key": key}
    out = emit_package(report.graph, target, out_dir, checkpoint_dir=model_dir, report=report_dict,
                       compile_report=sizes)
    seconds["codegen"] = time.perf_counter() - start
    notify("done", str(out))
    return CompileResult(out, report.graph, target, report, key, stage_seconds=seconds, compile_report=sizes)
