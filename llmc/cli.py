"""The `llmc` command line: compile, eval, bench, targets, passes, make-tiny, inspect, run.

Results go to stdout; progress (spinners) and errors go to stderr. An `LlmcError` is the user's to
fix, so it is printed as one red line and exits with code 2 (click's code for bad usage); any other
exception is a bug in llmc and keeps its traceback.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmc import __version__
from llmc.errors import LlmcError

HELP = """\
llmc compiles a Hugging Face causal language model (config.json + safetensors) into a
self-contained inference package for one hardware target: it imports the model into llmc's IR,
runs the target's pass pipeline and generates a package that runs without llmc.

Try it on the embedded tiny model:

    llmc make-tiny build/tiny && llmc compile build/tiny --target cpu -o build/tiny-cpu

    python build/tiny-cpu generate --prompt "def main" --max-tokens 16

`llmc inspect` and `llmc run` show the IR and run it with the reference interpreter.
"""

DEFAULT_TOKENS = "1,2,3,4,5,6,7,8"
MODEL_DIR_HELP = "Hugging Face checkpoint directory (config.json + *.safetensors)."
USER_ERROR_EXIT = 2

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode="markdown",
                  pretty_exceptions_show_locals=False)  # locals would dump whole weight tensors
out = Console()
err = Console(stderr=True)


def _reports_user_errors(command: Callable) -> Callable:
    """Turn an LlmcError into a red message and exit code 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LlmcError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"llmc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the llmc version and exit.")) -> None:
    pass


def human_bytes(n: int) -> str:
    """1023 -> '1023 B', 1258291 -> '1.2 MiB' (binary units, as memory is sized)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _load(model_dir: Path):
    from llmc.frontend.hf import load_hf

    with err.status(f"Importing {escape(str(model_dir))} (torch.export, then raising to llmc IR)..."):
        return load_hf(model_dir)


def _field(label: str, value: str) -> None:
    # soft_wrap: a long id list stays on one line, so scripts (and tests) can read it back.
    out.print(f"[bold]{label:<13}[/]{value}", soft_wrap=True)


@app.command()
@_reports_user_errors
def inspect(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help=MODEL_DIR_HELP),
    ir: bool = typer.Option(False, "--ir", help="Also print the whole IR as text."),
) -> None:
    """Import a model and summarize its llmc IR: architecture, op counts, parameters.

    Example: `llmc inspect build/tiny --ir`
    """
    imported = _load(model_dir)
    graph = imported.graph
    n_elements = sum(math.prod(p.type.shape) for p in graph.params)
    _field("model", escape(str(model_dir)))
    _field("architecture", escape(imported.architecture))
    _field("model_type", escape(str(graph.meta.get("model_type", "?"))))
    _field("layers", str(graph.meta.get("layers", "?")))
    _field("params", f"{len(graph.params)} tensors, {n_elements:,} elements, {human_bytes(graph.param_bytes())}")
    _field("nodes", str(len(graph.nodes)))
    table = Table(title="ops by kind", title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in graph.op_counts().items():  # in order of first use in the graph
        table.add_row(op, str(count))
    out.print(table)
    if ir:
        out.print()
        out.print(str(graph), markup=False, highlight=False, soft_wrap=True)


def _parse_tokens(text: str) -> list[int]:
    """Comma-separated ids, parsed by the package runtime's own parser (one syntax for both CLIs)."""
    from llmc.runtime.cli import parse_ids
    from llmc.runtime.package import PackageError

    try:
        return parse_ids(text)
    except PackageError as exc:
        raise LlmcError(str(exc)) from None


def _tokenizer(model_dir: Path):
    """The model's `tokenizers` tokenizer, or None when the directory has no tokenizer.json."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises a bare Exception on malformed files
        raise LlmcError(f"{path}: cannot read tokenizer: {exc}") from None


def _check_ids(ids: list[int], max_new_tokens: int, config, model_dir: Path) -> None:
    if not ids:
        raise LlmcError("the prompt is empty; give at least one token")
    vocab = int(config.vocab_size)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise LlmcError(f"token id {bad[0]} is outside the vocabulary of {model_dir} "
                        f"(vocab_size={vocab}, so ids are 0..{vocab - 1})")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos and len(ids) + max_new_tokens > max_pos:
        raise LlmcError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                        f"{max_pos} positions; shorten the prompt or lower --max-new-tokens")


def _timed_interpreter(graph):
    """An Interpreter that records how long each step (prefill, then each decode) takes."""
    from llmc.ir import Interpreter

    class TimedInterpreter(Interpreter):
        def __init__(self, graph) -> None:
            super().__init__(graph)
            self.step_seconds: list[float] = []

        def run(self, *args, **kwargs):
            start = time.perf_counter()
            result = super().run(*args, **kwargs)
            self.step_seconds.append(time.perf_counter() - start)
            return result

    return TimedInterpreter(graph)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@app.command()
@_reports_user_errors
def run(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help=MODEL_DIR_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="Prompt text; needs a tokenizer.json in MODEL_DIR."),
    tokens: Optional[str] = typer.Option(None, "--tokens", "-t",
                                         help=f"Prompt as token ids, comma-separated [default: {DEFAULT_TOKENS}]."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", "-n", min=1, help="How many tokens to generate."),
) -> None:
    """Import a model and generate greedily with the IR reference interpreter (CPU).

    Example: `llmc run build/tiny --tokens 1,2,3 --max-new-tokens 8`
    """
    from llmc.ir import generate_greedy

    if prompt is not None and tokens is not None:
        raise LlmcError("give either --prompt or --tokens, not both")
    # The prompt is read before the (slow) import, so a bad one fails at once.
    tokenizer = _tokenizer(model_dir)
    ids: list[int] = []
    if prompt is None:
        ids = _parse_tokens(tokens if tokens is not None else DEFAULT_TOKENS)
    elif tokenizer is not None:
        ids = tokenizer.encode(prompt).ids
    elif model_dir.is_dir():  # a missing directory is reported by the import, which names it
        raise LlmcError(f"{model_dir} has no tokenizer.json, so --prompt cannot be encoded; "
                        "give token ids instead, e.g. --tokens 1,2,3")

    imported = _load(model_dir)
    _check_ids(ids, max_new_tokens, imported.config, model_dir)

    interpreter = _timed_interpreter(imported.graph)
    start = time.perf_counter()
    for param in imported.graph.params:  # load weights now, so prefill time is compute only
        interpreter.weight(param)
    load_seconds = time.perf_counter() - start
    with err.status(f"Generating {max_new_tokens} tokens..."):
        new_ids, _ = generate_greedy(imported.graph, ids, max_new_tokens, interpreter=interpreter)

    _field("model", f"{escape(str(model_dir))} ({escape(imported.architecture)})")
    _field("prompt ids", f"{ids} ({len(ids)} tokens)")
    _field("generated", str(new_ids))
    if tokenizer is not None:
        _field("prompt text", escape(repr(tokenizer.decode(ids))))
        _field("output text", escape(repr(tokenizer.decode(new_ids))))
    prefill, *decode = interpreter.step_seconds
    _field("weights", f"loaded in {_ms(load_seconds)}")
    _field("prefill", f"{len(ids)} tokens in {_ms(prefill)}")
    if decode:
        # The first new token comes from the prefill logits; each later one costs one decode step.
        _field("decode", f"{len(decode)} steps, {_ms(sum(decode) / len(decode))}/step "
                         f"(min {_ms(min(decode))}, max {_ms(max(decode))})")


@app.command("make-tiny")
@_reports_user_errors
def make_tiny(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Directory to write the checkpoint to."),
    arch: str = typer.Option("llama", "--arch", help="llama, mistral, qwen2, qwen3, gemma2, phi3 or gpt2."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights."),
) -> None:
    """Write a tiny randomly initialized model (2 layers, vocab 128) to try llmc on.

    Example: `llmc make-tiny build/tiny --arch qwen3`
    """
    import transformers

    from llmc.examples_tiny import TINY_CONFIGS, save_tiny_model

    if arch not in TINY_CONFIGS:
        raise LlmcError(f"unknown --arch {arch!r}; choose one of {', '.join(TINY_CONFIGS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmcError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        # Overwriting an earlier checkpoint is fine; filling an unrelated directory is not.
        raise LlmcError(f"{out_dir} is not empty and holds no checkpoint; choose a new or empty directory")
    transformers.utils.logging.disable_progress_bar()
    with err.status(f"Building tiny {arch}..."):
        path = save_tiny_model(arch, out_dir, seed=seed)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    out.print(f"wrote tiny {arch} (seed {seed}) to {escape(str(path))} ({human_bytes(size)})", soft_wrap=True)
    out.print(f"next: llmc inspect {escape(str(path))} && llmc run {escape(str(path))}", soft_wrap=True)

@app.command("compile")
@_reports_user_errors
def compile_(
    model_dir: Path = typer.Argument(..., help=MODEL_DIR_HELP),
    target: str = typer.Option("cpu", "--target", "-t",
                               help="Built-in target name (`cpu`, `h100`, ...) or a target YAML path."),
    output: Path = typer.Option(..., "--output", "-o", help="Package directory to write (replaced whole)."),
    set_: Optional[list[str]] = typer.Option(None, "--set",
                                             help="Override a target field or pass option: `a.b=c` (repeatable)."),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="Write the IR after every pass into this folder."),
    report: bool = typer.Option(False, "--report",
                                help="Print report.json as a table: bytes per param group before/after, KV bytes "
                                     "per token, and after a lossy pass KL / top-1 agreement / perplexity."),
    quality_tokens: Optional[int] = typer.Option(
        None, "--quality-tokens", min=0,
        help="Held-out tokens scored after a lossy pass (quantize, prune, gqa_rewrite); 0 skips. Default 1024."),
    draft: Optional[Path] = typer.Option(
        None, "--draft", help="A smaller model with the same tokenizer, compiled into the package (draft/) for "
                              "speculative decoding, which it then uses by default."),
    speculative: Optional[str] = typer.Option(
        None, "--speculative", help="The package's default speculative decoding: off, ngram (prompt lookup, no "
                                    "extra model) or draft (needs --draft) [draft with --draft, else off]."),
    num_speculative_tokens: int = typer.Option(
        4, "--num-speculative-tokens", min=1, help="Most tokens proposed per sequence and step [4]."),
) -> None:
    """Compile MODEL_DIR for a target into a self-contained package.

    Example: `llmc compile build/tiny --target cpu -o build/tiny-cpu && python build/tiny-cpu generate --prompt "def "`

    Quantize the example model to int4 and see what it cost:
    `llmc compile examples/models/stdlib-llama-6m -o build/int4 --set quantize.scheme=int4 --report`

    With a draft model for speculative decoding: `llmc compile MODEL --draft DRAFT_MODEL -o build/spec`
    """
    from llmc.compiler import compile_model

    with err.status("compiling") as status:
        result = compile_model(model_dir, target, output, overrides=set_ or (), dump_ir=dump_ir,
                               on_event=lambda stage, detail: status.update(f"{stage}: {detail}"),
                               quality_tokens=quality_tokens, draft=draft, speculative=speculative,
                               num_speculative_tokens=num_speculative_tokens)
    table = Table(title=f"{model_dir} -> {result.out_dir} (target {result.target.name})")
    for column in ("pass", "changed", "nodes", "stats", "time"):
        table.add_column(column)
    for rec in result.report.records:
        stats = ", ".join(f"{k}={v}" for k, v in sorted(rec.stats.items()))
        table.add_row(rec.name, "yes" if rec.changed else "no", f"{rec.nodes_before} -> {rec.nodes_after}",
                      stats, _ms(rec.seconds))
    out.print(table)
    floor = result.decode_floor_seconds
    _field("import", _ms(result.stage_seconds["load"]))
    _field("codegen", _ms(result.stage_seconds["codegen"]))
    _field("weights", f"{human_bytes(result.weight_bytes)} in {len(result.graph.params)} tensors")
    _field("roofline", f"decode >= {floor * 1e3:.3g} ms/token (<= {1 / floor:,.0f} tokens/s) reading weights "
                       f"at {result.target.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s")
    if report:
        _print_compile_report(result.compile_report)
    _field("run it", f"python {result.out_dir} generate --prompt \"...\" --max-tokens 32")
    for warning in result.compile_report.get("warnings", []):  # e.g. quality.max_kl exceeded, on_exceed=warn
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


@app.command("export-onnx")
@_reports_user_errors
def export_onnx(
    model_dir: Path = typer.Argument(..., metavar="MODEL_OR_PACKAGE",
                                     help=MODEL_DIR_HELP + " Or a package from `llmc compile` (exported as compiled)."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="ONNX file to write; config.json and the tokenizer files are copied beside it."),
    target: Optional[str] = typer.Option(None, "--target", "-t", show_default="cpu",
                                         help="Target whose pass pipeline runs before the export (`cpu`, `h100`, ... "
                                              "or a YAML); checkpoints only."),
    set_: Optional[list[str]] = typer.Option(None, "--set",
                                             help="Override a target field or pass option: `a.b=c` (repeatable)."),
    external_data_threshold: int = typer.Option(
        1 << 20, "--external-data-threshold", min=0,
        help="Weights of at least this many bytes go to OUTPUT.data beside the model (ONNX's 2 GiB limit)."),
) -> None:
    """Export a checkpoint (after the target's passes) or a compiled package to ONNX (opset 23).

    The graph runs one step of one sequence: inputs `input_ids` and `positions` (int64 [T]) and,
    per layer L, `past_key_values.L.key/value` [1, kv_heads, P, head_dim]; outputs `logits` [T, vocab]
    and `present.L.key/value` [1, kv_heads, P + T, head_dim]. Prefill with P = 0, then feed each
    step's presents back as the next step's pasts. Attention, rotary and RMSNorm are the standard
    opset-23 ops; `--set quantize.scheme=int4` exports com.microsoft MatMulNBits.

    Example: `llmc export-onnx build/tiny -o build/tiny-onnx/model.onnx --set quantize.scheme=int4`

    `llmc compile build/tiny-onnx/model.onnx --target cpu -o build/pkg` imports it back, and
    `llmc export-onnx build/pkg -o pkg.onnx` exports that package as it was compiled (its ir.json).
    """
    from llmc.codegen.onnx_export import export_checkpoint, export_package

    if (model_dir / "plan.json").is_file():  # a compiled package: export its final IR as it is
        if target is not None or set_:
            raise LlmcError(f"{model_dir} is a compiled package, already compiled for its target; --target and "
                            f"--set apply only when exporting a checkpoint (recompile to change them)")
        with err.status(f"Exporting package {escape(str(model_dir))} to ONNX..."):
            path, graph = export_package(model_dir, output, external_data_threshold=external_data_threshold)
    else:
        target = target or "cpu"
        with err.status(f"Exporting {escape(str(model_dir))} to ONNX (import, {escape(target)} passes, export)..."):
            path, graph = export_checkpoint(model_dir, output, target, overrides=set_ or (),
                                            external_data_threshold=external_data_threshold)
    size = sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file())
    _field("wrote", f"{escape(str(path))} ({human_bytes(size)}, opset 23)")
    _field("nodes", f"{len(graph.nodes)} IR nodes, {len(graph.params)} weights")
    _field("run it", "onnxruntime.InferenceSession(path).run(None, {input_ids, positions, past_key_values.*})")


def _print_compile_report(report: dict) -> None:
    from llmc.quality import report_rows

    table = Table(title="report.json" + (f" (lossy: {', '.join(report['lossy_passes'])})"
                                         if report["lossy_passes"] else ""))
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="left" if not column else "right")
    for row in report_rows(report):
        table.add_row(*row)
    out.print(table)


def _eval_logits(path: Path):
    """(ids -> float32 logits of every position, max positions) of an llmc package or a HF checkpoint.

    A package (it has plan.json) runs through its own runtime; a checkpoint runs in HF transformers
    eager, float32, built by the frontend's safe loader (safetensors only, no remote code).
    """
    import torch

    if (path / "plan.json").is_file():
        from llmc.runtime.cli import package_logits

        return package_logits(path, None)
    from llmc.frontend.checkpoint import Checkpoint
    from llmc.frontend.hf import build_hf_model, load_config

    ckpt = Checkpoint.open(path)
    config = load_config(ckpt)
    model = build_hf_model(ckpt, config, torch.float32)

    @torch.inference_mode()
    def logits(ids) -> torch.Tensor:
        return model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0]

    return logits, getattr(config, "max_position_embeddings", None)


@app.command("eval")
@_reports_user_errors
def eval_(
    model: Path = typer.Argument(..., metavar="MODEL_OR_PACKAGE",
                                 help="HF checkpoint or llmc package directory holding split.json."),
    reference: Optional[Path] = typer.Option(None, "--reference", "-r", metavar="MODEL_OR_PACKAGE",
                                             help="Compare next-token distributions with this model (same tokenizer)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", "-n", min=1,
                                         help="Held-out tokens to score [default: 65536, about a minute on 2 cores]."),
    context: Optional[int] = typer.Option(None, "--context", min=2, help="Window length [the model's positions, max 512]."),
    stride: Optional[int] = typer.Option(None, "--stride", min=1, help="Window step [context / 2]."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir",
                                            help="Root of split.json's relative paths [this Python's stdlib]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Held-out perplexity vs a unigram baseline, and agreement with a reference model.

    Scores the held-out files named by the model's split.json with a sliding window.

    Example: `llmc eval build/stdlib-cpu --reference examples/models/stdlib-llama-6m --json eval.json`
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmc.runtime import evaluate
    from llmc.runtime.package import PackageError

    columns = (TextColumn("scoring held-out tokens"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("eval", total=tokens or evaluate.DEFAULT_TOKENS)
        try:
            result = evaluate.run(model, _eval_logits, reference_dir=reference,
                                  tokens=tokens or evaluate.DEFAULT_TOKENS, context=context, stride=stride,
                                  data_dir=data_dir, json_path=json_path,
                                  on_progress=lambda done, total: progress.update(task, completed=done, total=total))
        except (evaluate.EvalError, PackageError) as exc:
            raise LlmcError(str(exc)) from None
    title = f"{model} on held-out files" + (f", reference {reference}" if reference is not None else "")
    table = Table(title=escape(title), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in evaluate.report_rows(result):
        table.add_row(label, value)
    out.print(table)
    for note in evaluate.caveats(result):
        err.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
    if json_path is not None:
        _field("json", escape(str(json_path)))


@app.command()
@_reports_user_errors
def targets() -> None:
    """List the built-in targets."""
    from llmc.resources import available_targets
    from llmc.target import load_target

    table = Table()
    for column in ("name", "device", "backend", "bandwidth", "dtypes", "pipeline"):
        table.add_column(column)
    for name in available_targets():
        t = load_target(name)
        table.add_row(name, t.device, t.backend, f"{t.memory_bandwidth_bytes_per_s / 1e9:,.0f} GB/s",
                      ", ".join(t.dtypes), ", ".join(p.name for p in t.pipeline))
    out.print(table)


@app.command()
@_reports_user_errors
def passes() -> None:
    """List the registered passes (built-in and plugins) with their options."""
    from llmc.pipeline import PASSES

    table = Table()
    for column in ("pass", "options", "requires", "provides", "description"):
        table.add_column(column)
    for info in PASSES:
        opts = ", ".join(f"{n}: {f.annotation.__name__ if hasattr(f.annotation, '__name__') else f.annotation}"
                         f" = {f.default!r}" for n, f in info.options.model_fields.items())
        table.add_row(info.name, opts or "-", ", ".join(info.requires) or "-", ", ".join(info.provides) or "-",
                      info.doc)
    out.print(table)


@app.command("bench")
@_reports_user_errors
def bench(
    model: str = typer.Argument(..., help="An llmc package, an HF checkpoint directory (compiled for --target into "
                                          "~/.cache/llmc/bench), or a bench model: llama-150m, llama-1b, example."),
    baseline: list[str] = typer.Option(["all"], "--baseline", "-b",
                                       help="Peers to time beside llmc: hf, hf-compile, llama.cpp, all or none "
                                            "(repeatable)."),
    workload: list[str] = typer.Option(["decode", "offline"], "--workload", "-w",
                                       help="decode (batch 1, prompt 128 + 128 new), offline (a spread of request "
                                            "lengths at once), online (Poisson arrivals at the HTTP server), all."),
    checkpoint: Optional[Path] = typer.Option(None, "--model", help="The HF checkpoint the peers run, when MODEL "
                                                                    "is a package."),
    target: str = typer.Option("cpu", "--target", "-t", help="Target to compile a checkpoint for."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Compile override, e.g. quantize.scheme=int8."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per engine after one warm-up; the median counts."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for every engine [torch's default]."),
    requests: int = typer.Option(32, "--requests", min=1, help="Requests of the offline and online workloads."),
    batch: int = typer.Option(16, "--batch", min=1, help="llmc's max concurrent sequences and HF's static batch size."),
    rate: list[float] = typer.Option([1.0], "--rate", help="Online request rate(s) in requests/s (repeatable)."),
    decode_tokens: int = typer.Option(128, "--decode-tokens", min=2, help="New tokens of the decode workload."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="llama.cpp weights: f32, bf16, q8_0, q4_0 "
                                                                      "[the package's precision]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON here."),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Append the table as markdown (e.g. "
                                                                          "bench/RESULTS.md)."),
    plot_dir: Optional[Path] = typer.Option(None, "--plot-dir", help="Write PNG plots here (needs matplotlib)."),
) -> None:
    """Time llmc beside HF transformers (eager, torch.compile) and llama.cpp on one model, in one run.

    Prints tokens/s per workload and engine, llmc's speed ratio over each peer, latency, and the
    roofline fraction (decode bytes per token / time per token over this machine's measured copy
    bandwidth). Peers that cannot run here are listed as skipped with the reason.

    Example: `llmc bench llama-150m --set quantize.scheme=int8 --markdown bench/RESULTS.md`
    """
    import shlex
    import sys

    from llmc.bench import BASELINES, WORKLOADS, BenchOptions, resolve_subject, run_bench
    from llmc.bench.report import HEADER, markdown, rows, write_json, write_plots

    peers = _choices("--baseline", baseline, BASELINES, none_ok=True)
    workloads = _choices("--workload", workload, WORKLOADS)
    with err.status("preparing") as status:
        subject = resolve_subject(model, model=checkpoint, target=target, overrides=list(set_ or ()),
                                  on_event=lambda stage, detail: status.update(f"compiling: {stage}: {detail}"))
    options = BenchOptions(baselines=peers, workloads=workloads, repeats=repeats, threads=threads,
                           decode_tokens=decode_tokens, offline_requests=requests, online_requests=requests,
                           batch_size=batch, rates=tuple(rate), gguf_type=gguf_type,
                           command="llmc bench " + shlex.join(sys.argv[2:]))
    results = run_bench(subject, options, notify=lambda message: err.print(f"[dim]{escape(message)}[/]"))
    table = Table(title=f"llmc bench: {subject.label} on {results['machine']['cpu']} "
                        f"({results['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s copy)")
    for column in HEADER:
        table.add_column(column)
    for row in rows(results):
        table.add_row(*map(escape, row))
    out.print(table)
    for name, why in results["skipped"].items():
        err.print(f"[yellow]skipped {escape(name)}:[/] {escape(why)}")
    if json_path:
        write_json(results, json_path)
    if markdown_path:
        with markdown_path.open("a", encoding="utf-8") as f:
            f.write("\n" + markdown(results))
    if plot_dir:
        for path in write_plots(results, plot_dir):
            _field("plot", escape(str(path)))


def _choices(flag: str, given: list[str], allowed: tuple[str, ...], none_ok: bool = False) -> tuple[str, ...]:
    """Expand ``all``/``none`` and reject unknown names, naming the flag."""
    if "all" in given:
        return allowed
    if none_ok and "none" in given:
        return ()
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise LlmcError(f"{flag} {unknown[0]!r}: choose from {', '.join(allowed)}, all" + (", none" if none_ok else ""))
    return tuple(dict.fromkeys(given))


def main() -> None:
    app()
