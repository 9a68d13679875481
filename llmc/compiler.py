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


SPECULATIVE_METHODS = ("off", "ngram", "draft")


def check_draft_tokenizer(model_dir: str | Path, draft_dir: str | Path) -> None:
    """A draft proposes token ids the model scores, so both must mean the same thing by every id:
    equal vocab sizes and the same tokenizer.json vocabulary (its ``model``: vocab and merges) and
    added tokens, else a CheckpointError naming both files. Unlike ``llmc eval --reference``, which
    compares the files byte for byte, settings that never change an id's meaning (formatting,
    truncation, padding, normalizer) may differ: the draft only ever sees the model's ids."""
    import json

    from llmc.errors import CheckpointError
    from llmc.frontend.checkpoint import Checkpoint

    def vocab_size(directory: Path):
        config = Checkpoint.open(directory).config  # the checkpoint's own checks and errors first
        return config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))

    model_dir, draft_dir = Path(model_dir), Path(draft_dir)
    sizes = vocab_size(model_dir), vocab_size(draft_dir)
    if sizes[0] != sizes[1]:
        raise CheckpointError(f"the draft model's vocab_size {sizes[1]} ({draft_dir / 'config.json'}) differs from the "
                              f"model's {sizes[0]} ({model_dir / 'config.json'}); a draft must share the tokenizer")
    files = [d / "tokenizer.json" for d in (model_dir, draft_dir)]
    present = [f.is_file() for f in files]
    if present == [False, False]:
        return  # token ids only, on both sides
    if not all(present):
        have, lack = (files[0], files[1]) if present[0] else (files[1], files[0])
        raise CheckpointError(f"the draft model must share the model's tokenizer, but {have} exists and {lack} "
                              "does not")
    model_tok, draft_tok = (json.loads(f.read_text(encoding="utf-8")) for f in files)
    parts = ("model", "added_tokens")
    differ = [k for k in parts if model_tok.get(k) != draft_tok.get(k)]
    if differ:
        raise CheckpointError(f"the draft model must share the model's tokenizer, but {files[1]} differs from "
                              f"{files[0]} ({', '.join(differ)})")


def compile_model(model_dir: str | Path, target_name: str, out_dir: str | Path, *,
                  overrides: Sequence[str] = (), dump_ir: str | Path | None = None,
                  on_event: EventFn | None = None, quality_tokens: int | None = None,
                  draft: str | Path | None = None, speculative: str | None = None,
                  num_speculative_tokens: int = 4) -> CompileResult:
    """Compile ``model_dir`` for ``target_name`` into ``out_dir``; every error is an LlmcError.

    After a lossy pass (quantize, prune, gqa_rewrite) the compiled graph is scored against the
    imported one on ``quality_tokens`` held-out tokens (default ``quality.DEFAULT_TOKENS``; 0 skips), and
    the mean KL is held to the target's ``quality.max_kl`` when set (``check_quality_bound``).

    ``draft`` (a checkpoint sharing the tokenizer) is compiled for the same target into the package's
    ``draft/``, and speculative decoding with it becomes the package's default; ``speculative``
    ("off", "ngram", "draft") sets that default otherwise, ``num_speculative_tokens`` its most
    proposals per step (plan.json's ``speculative``; the runtime's flags override it)."""
    from llmc.quality import DEFAULT_TOKENS, compile_report
    from llmc.codegen import emit_package
    from llmc.frontend.hf import load_hf
    from llmc.pipeline import cache_key, run_pipeline, validate_pipeline
    from llmc.target import load_target_with_source

    notify = on_event or (lambda stage, detail: None)
    seconds: dict[str, float] = {}
    target, source = load_target_with_source(target_name, overrides)
    steps = validate_pipeline(target, source)  # fail on a bad pipeline before the slow import
    spec = _speculative_plan(model_dir, draft, speculative, num_speculative_tokens)

    notify("load", f"importing {model_dir} (torch.export + raising)")
    start = time.perf_counter()
    if Path(model_dir).suffix == ".onnx":  # an ONNX decoder graph: config and tokenizer files lie beside it
        from llmc.frontend.onnx_import import load_onnx
        imported = load_onnx(model_dir)
        model_dir = imported.files_dir
    else:
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
    draft_package = None
    if draft is not None:
        notify("load", f"importing the draft model {draft} (torch.export + raising)")
        draft_report = run_pipeline(load_hf(draft).graph, target, source=source,
                                    on_event=lambda kind, name, record: notify("pass", f"draft: {name}")
                                    if kind == "start" else None)
        draft_package = (draft_report.graph, Path(draft), draft_report.as_dict(timings=False))
    key = cache_key(target, model_dir, steps, extra=_speculative_identity(spec, draft))
    report_dict = {**report.as_dict(timings=False), "cache_key": key}
    out = emit_package(report.graph, target, out_dir, checkpoint_dir=model_dir, report=report_dict,
                       compile_report=sizes, draft=draft_package, speculative=spec)
    seconds["codegen"] = time.perf_counter() - start
    notify("done", str(out))
    return CompileResult(out, report.graph, target, report, key, stage_seconds=seconds, compile_report=sizes)


def _speculative_plan(model_dir, draft, method: str | None, k: int) -> dict | None:
    """plan.json's ``speculative`` entry (None: not asked for), checked before the slow import."""
    from llmc.errors import LlmcError

    method = method or ("draft" if draft is not None else None)
    if method is None:
        return None
    if method not in SPECULATIVE_METHODS:
        raise LlmcError(f"--speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}")
    if (method == "draft") != (draft is not None):
        raise LlmcError("--speculative draft needs --draft DRAFT_MODEL" if draft is None else
                        f"--draft {draft} was given but --speculative is {method!r}; leave it out or say draft")
    if not isinstance(k, int) or k < 1:
        raise LlmcError(f"--num-speculative-tokens must be at least 1, got {k!r}")
    if draft is not None:
        check_draft_tokenizer(model_dir, draft)
    entry = {"method": method, "num_speculative_tokens": k}
    return {**entry, "draft": "draft"} if draft is not None else entry


def _speculative_identity(spec: dict | None, draft) -> dict | None:
    """What the speculative options add to the compile cache key (nothing when none were given)."""
    if spec is None:
        return None
    from llmc.cache import checkpoint_fingerprint

    return {"speculative": spec, **({"draft": checkpoint_fingerprint(draft)} if draft is not None else {})}
