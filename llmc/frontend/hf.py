"""Hugging Face frontend: checkpoint dir -> HF module -> torch.export -> raised llmc IR."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmc.errors import CheckpointError, UnsupportedModelError
from llmc.frontend.checkpoint import Checkpoint
from llmc.ir import Graph, Param, TensorType, verify
from llmc.ir.types import dtype_name

MIN_PROBE_TOKENS = 16


@dataclass
class ImportedModel:
    """The raised graph plus what it came from."""

    graph: Graph
    config: Any               # transformers PretrainedConfig
    checkpoint: Checkpoint

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None) or [type(self.config).__name__]
        return archs[0]


def load_config(ckpt: Checkpoint):
    import transformers

    if "auto_map" in ckpt.config:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: 'auto_map' asks for custom model code; llmc never "
                              "runs code from a checkpoint (trust_remote_code stays off)")
    try:
        return transformers.AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: transformers cannot read this config: {exc}") from None


def _tied_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """state_dict name -> every name that shares its storage (tied embeddings)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def build_hf_model(ckpt: Checkpoint, config, dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate the HF module and fill it from the checkpoint, checking every tensor's shape, kind
    of dtype (float or integer) and, once loaded, that it holds no NaN or Inf."""
    import transformers

    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: no causal-LM class for this config: {exc}") from None
    expected = {k: (tuple(v.shape), None) for k, v in skeleton.state_dict().items()}
    groups = _tied_groups(skeleton)
    result = ckpt.check_shapes(expected)
    missing = [k for k in result.missing if not any(alias in ckpt for alias in groups.get(k, []))]
    if missing:
        raise CheckpointError(f"{ckpt.path}: checkpoint lacks {len(missing)} tensor(s) the config implies, "
                              f"e.g. {', '.join(missing[:5])}")
    model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    skeleton_state = skeleton.state_dict()
    state = {}
    for name in expected:
        source = name if name in ckpt else next(a for a in groups[name] if a in ckpt)
        _check_dtype_kind(ckpt, source, skeleton_state[name])
        state[name] = ckpt.load(source).to(dtype)
        _check_finite(ckpt, source, state[name])
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_dtype_kind(ckpt: Checkpoint, key: str, like: torch.Tensor) -> None:
    """A float parameter stored as integers (or the reverse) would be cast silently into garbage."""
    info = ckpt.info(key)
    if info.dtype.is_floating_point != like.is_floating_point():
        kind = "floating-point" if like.is_floating_point() else "integer"
        raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {info.dtype}, but the model built from "
                              f"config.json expects a {kind} tensor there; the checkpoint does not match its config")


def _check_finite(ckpt: Checkpoint, key: str, value: torch.Tensor) -> None:
    """NaN or Inf in a weight poisons every logit (and every quantization scale), so refuse it at import."""
    if not value.is_floating_point():
        return
    bad = ~torch.isfinite(value)
    if bad.any():
        nan = int(value.isnan().sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{ckpt.info(key).file}: tensor {key!r} holds {nan} NaN and {int(bad.sum()) - nan} "
                              f"infinite value(s) as {value.dtype} (first at index {first}); llmc refuses "
                              "non-finite weights")


def probe_length(config) -> int:
    window = getattr(config, "sliding_window", None)
    n = MIN_PROBE_TOKENS if not window else max(MIN_PROBE_TOKENS, int(window) + 8)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and n > max_pos:
        n = max_pos
    return n


def export_model(model: torch.nn.Module, config, n: int):
    from torch.export import Dim, export

    max_pos = getattr(config, "max_position_embeddings", None) or 4096
    seq = Dim("seq", min=2, max=max(max_pos, n))
    ids = torch.zeros(1, n, dtype=torch.int64)
    pos = torch.arange(n)[None]
    try:
        return export(model, (ids,), kwargs={"position_ids": pos, "use_cache": False},
                      dynamic_shapes={"input_ids": {1: seq}, "position_ids": {1: seq}, "use_cache": None})
    except Exception as exc:  # torch.export's own messages are long; keep the cause, name the model
        raise UnsupportedModelError(f"torch.export failed on {type(model).__name__}: {exc}") from exc


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> ImportedModel:
    """Read a HF checkpoint directory and raise it into a verified llmc Graph."""
    from llmc.frontend.raising import Raiser

    ckpt = Checkpoint.open(path)
    config = load_config(ckpt)
    model = build_hf_model(ckpt, config, dtype)
    n = probe_length(config)
    ep = export_model(model, config, n)
    groups = _tied_groups(model)

    def param_source(key: str) -> Param:
        name = key if key in ckpt else next((a for a in groups.get(key, []) if a in ckpt), None)
        if name is None:
            raise CheckpointError(f"{ckpt.path}: no tensor for parameter {key!r}")
        info = ckpt.info(name)
        return Param(name, TensorType(tuple(info.shape), dtype_name(dtype)),
                     loader=lambda: ckpt.load(name))

    rng = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size"))
    offset = 3 if n + 3 <= (getattr(config, "max_position_embeddings", None) or n + 3) else 0
    probe = {"input_ids": torch.randint(0, vocab, (1, n), generator=rng),
             "position_ids": (torch.arange(n) + offset)[None]}
    graph = Raiser(ep, probe, param_source).run()
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    graph = Graph(graph.inputs, graph.params, graph.nodes, graph.outputs,
                  {**graph.meta, "architecture": arch, "model_type": config.model_type, "source": str(ckpt.path)})
    verify(graph)
    return ImportedModel(graph, config, ckpt)
