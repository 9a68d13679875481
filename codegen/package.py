"""The package emitter: final IR + target -> a self-contained, runnable package directory.

    model.py                    generated forward step (torch or triton backend)
    kernels/*.py                triton backend: the rendered Triton kernel modules model.py loads
    weights/model.safetensors   every graph param by IR name
    plan.json                   IR text, target, passes; model facts the runtime needs
    ir.json                     the final IR, exact (llmc/ir/serialize.py): `llmc export-onnx PKG` reads it
    report.json                 bytes per param group before/after passes, KV bytes per token,
                                and after lossy passes the quality cost (llmc/quality.py)
    runtime/                    copy of llmc/runtime (imports no llmc)
    __main__.py, __init__.py    `python PKG generate ...`; `pip install PKG` works too
    pyproject.toml, README.md
    tokenizer.json ...          copied from the checkpoint when present
    draft/                      with a draft model (speculative decoding): its own package, same target

Deterministic: the same graph, target, checkpoint and report give byte-identical files (sorted
keys, no timestamps, no absolute paths, no __pycache__). Timings in the report are dropped for
that reason.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

import llmc
from llmc.errors import LlmcError
from llmc.ir import Graph, format_graph, verify
from llmc.ir.serialize import dumps as ir_dumps

from . import triton_backend
from .torch_backend import render_model

WEIGHTS_FILE = "weights/model.safetensors"
IR_FILE = "ir.json"
DRAFT_DIR = "draft"  # the draft model's package inside the package (runtime/package.py reads the same name)
# Copied byte for byte from the checkpoint when present: what the runtime tokenizer and stop
# tokens read (chat_template.jinja is where transformers >= 4.43 saves a chat template), and the
# train/held-out file list `python PKG eval` scores (split.json, see runtime/evaluate.py).
# config.json travels too: `llmc export-onnx PKG` keeps it beside the .onnx and in its metadata.
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "chat_template.jinja", "split.json")
# Report keys that hold wall-clock times: they differ run to run, so they stay out of the package.
TIMING_KEYS = re.compile(r"^(seconds|time|timestamp|elapsed|duration)$|_(seconds|time|ms)$")
BACKENDS = {"torch": render_model, "triton": triton_backend.render_model}
# Files a backend writes beside model.py: backend -> (graph, target) -> {relative path: text}.
BACKEND_FILES = {"triton": triton_backend.kernel_files}


def emit_package(graph: Graph, target: Any, out_dir: str | Path, *, checkpoint_dir: str | Path | None,
                 report: Mapping[str, Any] | None, compile_report: Mapping[str, Any] | None = None,
                 draft: tuple[Graph, Path, Mapping[str, Any]] | None = None,
                 speculative: Mapping[str, Any] | None = None) -> Path:
    """Write the package for ``graph`` compiled for ``target`` to ``out_dir``; return ``out_dir``.

    ``out_dir`` must be new, empty or an earlier package (it is replaced whole, so no stale file
    survives). Files are written to a temporary sibling first, so a failure leaves no half package.
    ``draft`` = (graph, checkpoint, report) of a draft model compiled for the same target: it is
    written as a package of its own in ``draft/``; ``speculative`` goes into plan.json as is.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if draft is not None:
        verify(draft[0])
    if target.backend not in BACKENDS:
        raise LlmcError(f"target {target.name!r}: backend {target.backend!r} has no code generator yet "
                        f"(available: {', '.join(BACKENDS)}); try --set backend=torch")
    verify(graph)
    unlowered = [n.ref for n in graph.nodes if n.op.name == "attention"]
    if unlowered:
        raise LlmcError(f"target {target.name!r}: attention {', '.join(unlowered[:3])} is not lowered to paged "
                        "attention, which the package's runtime (paged KV cache) needs; add "
                        "'- pass: attention_lowering' after canonicalize in the target's pipeline")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_package(staging, graph, target, ckpt, dict(report or {}), compile_report, speculative)
        if draft is not None:
            draft_graph, draft_ckpt, draft_report = draft
            _write_package(staging / DRAFT_DIR, draft_graph, target, Path(draft_ckpt), dict(draft_report))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmcError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "plan.json").is_file():
        # Replacing an earlier package is fine; wiping an unrelated directory is not.
        raise LlmcError(f"{out_dir} is not empty and holds no llmc package; choose a new or empty directory")


def _activation_dtype(graph: Graph) -> str | None:
    """The dtype the model computes in: its embedding's output (bf16 or quantized linears keep it)."""
    for node in graph.nodes:
        if node.op.name in ("embedding", "vocab_parallel_embedding"):
            return node.type.dtype
    return None


def _write_package(root: Path, graph: Graph, target: Any, ckpt: Path | None, report: dict,
                   compile_report: Mapping[str, Any] | None = None,
                   speculative: Mapping[str, Any] | None = None) -> None:
    name = import_name(ckpt.resolve().name if ckpt else str(graph.meta.get("model_type", "model")), target.name)
    passes = pass_summaries(report)
    model_facts = _model_facts(graph, ckpt)
    _write(root / "model.py", BACKENDS[target.backend](
        graph, target_name=target.name, device=target.device, backend=target.backend))
    if target.backend in BACKEND_FILES:
        for relative, text in BACKEND_FILES[target.backend](graph, target).items():
            _write(root / relative, text)
    parallel = graph.meta.get("parallel")  # the shard pass: per-rank weights (and stage code)
    n_bytes, ranks = write_ranks(root, parallel, target) if parallel else (write_weights(graph, root / WEIGHTS_FILE), None)
    plan = {
        "format_version": 1,
        "llmc_version": llmc.__version__,
        "package": name,
        "model": model_facts,
        "target": target.model_dump(mode="json", by_alias=True),
        "passes": passes,
        "report": without_timings(report),
        "weights": {"file": WEIGHTS_FILE, "tensors": len(graph.params), "bytes": n_bytes},
        "kv_cache": {"page_size": graph.meta.get("kv_page_size", target.runtime.kv_page_size),
                     "layers": graph.meta.get("kv_layers", {}),
                     "dtype": graph.meta.get("kv_dtype"),  # stored dtype of quantized pages; null: activations
                     "activation_dtype": _activation_dtype(graph)},
        "graph": format_graph(graph).splitlines(),
    }
    if ranks is not None:
        plan["parallel"] = ranks
        plan["weights"]["file"] = [rank["weights"] for rank in ranks["ranks"]]
    for key in ("buckets", "memory_plan"):  # from the bucketing and memory_plan passes
        if key in graph.meta:
            plan[key] = graph.meta[key]
    if speculative is not None:
        plan["speculative"] = dict(speculative)
    # "source" is the checkpoint's absolute path: it would make the package depend on where it was built.
    _write(root / IR_FILE, ir_dumps(graph, drop_meta=("source",)))
    _write(root / "plan.json", json.dumps(plan, indent=1, sort_keys=True, default=_json_default) + "\n")
    if compile_report is not None:
        _write(root / "report.json", json.dumps(without_timings(compile_report), indent=1, sort_keys=True,
                                                default=_json_default) + "\n")
    copied = []
    for file in CHECKPOINT_FILES:
        if ckpt is not None and (ckpt / file).is_file():
            shutil.copyfile(ckpt / file, root / file)
            copied.append(file)
    runtime = root / "runtime"
    runtime.mkdir()
    for source in sorted(files("llmc.runtime").iterdir(), key=lambda f: f.name):
        if source.name.endswith(".py"):
            (runtime / source.name).write_bytes(source.read_bytes())
    _write(root / "__main__.py", MAIN_PY)
    _write(root / "__init__.py", INIT_PY.format(arch=model_facts["architecture"], target=target.name))
    _write(root / "pyproject.toml", PYPROJECT.format(name=name, dist=name.replace("_", "-"),
                                                     version=llmc.__version__, target=target.name))
    _write(root / "README.md", readme(name, target, model_facts, passes, copied, n_bytes))
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))  # bytes: no platform newline translation


def import_name(model: str, target: str) -> str:
    """A Python package name for ``pip install``: ``tiny-llama`` + ``cpu`` -> ``tiny_llama_cpu``."""
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", f"{model}_{target}").strip("_").lower() or "model"
    return slug if slug[0].isalpha() else f"m_{slug}"


def write_weights(graph: Graph, path: Path) -> int:
    """Save every param (``param.load()``: transforms and dtype applied) under its IR name."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for param in sorted(graph.params, key=lambda p: p.name):
        tensor = param.load()
        if tuple(tensor.shape) != tuple(param.type.shape) or tensor.dtype != param.type.torch_dtype:
            raise LlmcError(f"param @{param.name}: loaded {tensor.dtype}{list(tensor.shape)}, "
                            f"but the graph says {param.type}")
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # safetensors refuses tensors sharing memory (views of one tensor)
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[param.name] = tensor.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes metadata from a hash map, so with two or more keys
    # their order (and the file's bytes) changes from run to run. Provenance is in plan.json.
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_ranks(root: Path, parallel: Mapping[str, Any], target: Any) -> tuple[int, dict[str, Any]]:
    """Each rank's weights (``weights/rank<r>.safetensors``) and, for pipeline stages after the first,
    its model code (``model_rank<r>.py``; tensor-parallel ranks all run model.py). Returns the bytes
    written and plan.json's ``parallel`` entry, which the runtime's launcher reads."""
    total, ranks = 0, []
    for rank, rank_graph in enumerate(parallel["rank_graphs"]):
        model = "model.py"
        if parallel["pp"] > 1 and rank > 0:
            model = f"model_rank{rank}.py"
            _write(root / model, BACKENDS[target.backend](rank_graph, target_name=target.name, device=target.device,
                                                          backend=target.backend))
        weights = f"weights/rank{rank}.safetensors"
        total += write_weights(rank_graph, root / weights)
        ranks.append({"model": model, "weights": weights, "kv_layers": rank_graph.meta.get("kv_layers", {})})
    return total, {"tp": parallel["tp"], "pp": parallel["pp"], "ranks": ranks}


def _model_facts(graph: Graph, ckpt: Path | None) -> dict[str, Any]:
    """What the runtime checks requests against: vocab size and maximum positions."""
    config: dict[str, Any] = {}
    if ckpt is not None and (ckpt / "config.json").is_file():
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    logits = dict(graph.outputs).get("logits")
    vocab = config.get("vocab_size") or (graph.type_of(logits).shape[-1] if logits else None)
    max_positions = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx")
                          if isinstance(config.get(k), int)), None)
    return {"architecture": str(graph.meta.get("architecture", "?")),
            "model_type": str(graph.meta.get("model_type", "?")),
            "layers": graph.meta.get("layers"), "vocab_size": vocab, "max_positions": max_positions}


def pass_summaries(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The passes that ran, in order, from ``report["passes"]`` (or ``"records"``), without timings."""
    entries = report.get("passes", report.get("records", [])) or []
    out = []
    for entry in entries:
        entry = _as_dict(entry)
        summary = {"name": entry.get("name", entry.get("pass", "?"))}
        summary.update({k: entry[k] for k in ("changed", "stats", "nodes_before", "nodes_after") if k in entry})
        out.append(without_timings(summary))
    return out


def without_timings(value: Any) -> Any:
    if isinstance(value, Mapping) or hasattr(value, "__dataclass_fields__"):
        return {str(k): without_timings(v) for k, v in _as_dict(value).items() if not TIMING_KEYS.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [without_timings(v) for v in value]
    return value


def _as_dict(value: Any) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "model_dump"):  # pydantic options
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    raise LlmcError(f"report entry {value!r} is not a mapping")


def _json_default(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def readme(name: str, target: Any, model: dict, passes: list[dict], copied: list[str], n_bytes: int) -> str:
    applied = "\n".join(
        f"{i}. `{p['name']}`" + ("" if p.get("changed", True) else " (no change)")
        + (f": {', '.join(f'{k}={v}' for k, v in sorted(p['stats'].items()))}" if p.get("stats") else "")
        for i, p in enumerate(passes, 1)) or "None: the imported IR is emitted as is."
    prompt_note = ("" if "tokenizer.json" in copied else
                   "\nThis package has no tokenizer.json, so prompts are token ids (`--tokens`).\n")
    return README.format(name=name, arch=model["architecture"], version=llmc.__version__, target=target.name,
                         device=target.device, backend=target.backend, applied=applied,
                         mib=n_bytes / 2**20, prompt_note=prompt_note)


README = """\
# {name}

`{arch}` compiled by llmc {version} for target `{target}` ({device}, {backend} backend). This directory
runs as is: it needs Python with torch, safetensors, tokenizers and jinja2, not llmc.

## Run

From this directory (or give its path instead of `.`):

```sh
python . generate --prompt "Once upon a time" --max-tokens 32
python . generate --tokens 1,2,3 --max-tokens 8 --temperature 0.8 --top-p 0.95 --seed 0
python . info
```
{prompt_note}
`--prompt` prints the generated text (`--show-ids` adds the ids); `--tokens` prints the new ids,
comma-separated. Errors are one line on stderr with exit code 2. `pip install .` installs it as the
Python package `{name}` (`{name}.load().generate([1, 2, 3], 8)`) with a `{name}` command.

## Contents

- `model.py`: the generated forward step, one line per IR node (llmc's IR text is in `plan.json`)
- `weights/model.safetensors`: the weights ({mib:.1f} MiB), named by IR param name
- `plan.json`: target, passes, model facts and the IR
- `report.json`: bytes per param group before/after the passes, KV bytes per token, and the measured
  quality cost of lossy passes (quantize, prune, gqa_rewrite)
- `runtime/`: engine, KV cache, sampler, tokenizer, CLI

## Passes applied

{applied}
"""

MAIN_PY = '''\
"""Run this package: ``python <this directory> generate --prompt "..."`` (see ``--help``)."""

import sys

# Keep the package directory exactly as llmc wrote it (and usable when read-only).
sys.dont_write_bytecode = True

if __package__:  # installed: python -m <package>
    from .runtime.cli import main
else:  # python <directory>: the directory is sys.path[0]
    from runtime.cli import main

sys.exit(main())
'''

INIT_PY = '''\
"""{arch} compiled by llmc for target {target}.

``LLM().generate(prompts, SamplingParams(...))`` runs batches offline; ``load()`` returns the
engine (``add_request`` / ``step``) for finer control.
"""

from pathlib import Path

from .runtime.engine import EngineConfig, LLMEngine
from .runtime.llm import LLM as _LLM
from .runtime.sampler import SamplingParams

PACKAGE_DIR = Path(__file__).resolve().parent

__all__ = ["LLM", "SamplingParams", "EngineConfig", "load"]


def LLM(package_dir=PACKAGE_DIR, **kwargs):
    """The offline API over this package (or another package directory)."""
    return _LLM(package_dir, **kwargs)


def load(device=None, config=None) -> LLMEngine:
    return LLMEngine.from_package(PACKAGE_DIR, device=device, config=config)
'''

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "A model compiled by llmc {version} for target {target}."
requires-python = ">=3.10"
dependencies = ["torch>=2.1", "safetensors", "tokenizers", "jinja2", "fastapi", "uvicorn", "pydantic>=2",
                "prometheus-client"]

[project.scripts]
{name} = "{name}.runtime.cli:main"

[tool.setuptools]
packages = ["{name}", "{name}.runtime"]

[tool.setuptools.package-dir]
"{name}" = "."

[tool.setuptools.package-data]
"{name}" = ["*.json", "*.jinja", "*.md", "weights/*.safetensors", "model_rank*.py", "kernels/*.py", "draft/*.py", "draft/*.json", "draft/*.jinja",
            "draft/weights/*.safetensors", "draft/runtime/*.py"]
'''
