"""What `llmc bench` runs: a package, a checkpoint compiled on the fly, or a named bench model.

Bench models are random-weight checkpoints built from standard Llama shapes, seeded, saved with
``save_pretrained`` into a cache folder (built once, reused), plus the trained example model:

    llama-150m   hidden 768, 12 layers, 12 heads, SwiGLU 3072, vocab 32000 (162M params; GPT-2-small
                 width with Llama blocks, the size class of SmolLM-135M / GPT-2 124M)
    llama-1b     TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads / 4 KV heads, SwiGLU 5632
    example      examples/models/stdlib-llama-6m (trained; the quality checks' model)

Random weights time exactly like trained ones (same bytes, same FLOPs); they only make the outputs
meaningless, which the bench does not read except to check that engines agree. EOS is disabled so
every request generates exactly the tokens it asks for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import LlmcError

BENCH_MODELS: dict[str, dict] = {
    "llama-150m": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
EXAMPLE = "example"


def cache_root() -> Path:
    """Where bench models and compiled bench packages live: $LLMC_CACHE_DIR, else ~/.cache/llmc."""
    return Path(os.environ.get("LLMC_CACHE_DIR") or Path.home() / ".cache" / "llmc") / "bench"


def example_model_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "examples" / "models" / "stdlib-llama-6m"
    if not path.is_dir():
        raise LlmcError(f"the example model is not here ({path}): it ships in the llmc source tree, "
                        "not in the installed wheel; pass a checkpoint directory instead")
    return path


def build_bench_model(name: str, root: Path | None = None) -> Path:
    """The checkpoint of bench model ``name``, built (seed 0) on first use and cached."""
    if name == EXAMPLE:
        return example_model_dir()
    if name not in BENCH_MODELS:
        raise LlmcError(f"unknown bench model {name!r}: choose one of {', '.join([*BENCH_MODELS, EXAMPLE])}, "
                        "or give a checkpoint or package directory")
    out = (root or cache_root()) / "models" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        if not (out / "tokenizer.json").is_file():  # cached by an llmc without bench tokenizers
            write_placeholder_tokenizer(out, BENCH_MODELS[name]["vocab_size"])
        return out
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**BENCH_MODELS[name], tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    write_placeholder_tokenizer(tmp, config.vocab_size)
    tmp.replace(out) if not out.exists() else None
    return out


def placeholder_tokens(vocab_size: int) -> list[str]:
    """The bench models' vocabulary: ``<unk> <s> </s>``, then ``▁t3``, ``▁t4``, ... (one word each;
    the GGUF the llama.cpp peer reads lists the same tokens)."""
    return ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(3, vocab_size)]


def write_placeholder_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json over ``placeholder_tokens``: random weights give no meaningful
    text, but every generated token decodes to some, so the server streams a chunk per token as it
    would for a real model (the online workload times those chunks) and detokenization costs what
    it costs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(placeholder_tokens(vocab_size))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(Path(directory) / "tokenizer.json"))


def is_package(path: Path) -> bool:
    return (path / "plan.json").is_file() and (path / "model.py").is_file()


@dataclass(frozen=True)
class BenchSubject:
    """The package llmc runs and the HF checkpoint the peers run (``None``: peers cannot run)."""

    package: Path
    checkpoint: Path | None
    label: str


def resolve_subject(spec: str, *, model: Path | None, target: str, overrides: list[str],
                    on_event=None) -> BenchSubject:
    """``spec`` is a package dir (peers need ``model``), a checkpoint dir or a bench model name;
    the last two are compiled for ``target`` into the cache, keyed by the compile cache key."""
    path = Path(spec)
    if path.is_dir() and is_package(path):
        return BenchSubject(path, model, path.name)
    if path.is_dir():
        checkpoint, label = path, path.name
    elif spec in BENCH_MODELS or spec == EXAMPLE:
        checkpoint, label = build_bench_model(spec), spec
    else:
        raise LlmcError(f"{spec!r} is neither a directory nor a bench model name; give an llmc package, an HF "
                        f"checkpoint directory, or one of {', '.join([*BENCH_MODELS, EXAMPLE])}")
    if not (checkpoint / "config.json").is_file():
        raise LlmcError(f"{checkpoint}: no config.json and no plan.json, so it is neither an HF checkpoint nor an "
                        "llmc package")
    return BenchSubject(_compiled(checkpoint, target, overrides, on_event), checkpoint, label)


def _compiled(checkpoint: Path, target: str, overrides: list[str], on_event) -> Path:
    from llmc.compiler import compile_model
    from llmc.pipeline import cache_key, validate_pipeline
    from llmc.target import load_target_with_source

    spec, source = load_target_with_source(target, overrides)
    key = cache_key(spec, checkpoint, validate_pipeline(spec, source))
    out = cache_root() / "packages" / f"{checkpoint.name}-{spec.name}-{key[:12]}"
    if is_package(out) and json.loads((out / "plan.json").read_text())["report"].get("cache_key") == key:
        return out
    compile_model(checkpoint, target, out, overrides=overrides, on_event=on_event)
    return out
