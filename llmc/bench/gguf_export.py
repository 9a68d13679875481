"""Write a GGUF file (llama.cpp's format) from an HF Llama checkpoint, with the ``gguf`` package.

This is what llama.cpp's own ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``, reduced to
what the bench needs: tensor names from gguf's name map, the q/k rows permuted from HF's
half-split rotary layout to llama.cpp's interleaved one, hyperparameters as GGUF keys, and weights
as F32, BF16 or quantized by gguf's reference quantizers (Q8_0: blocks of 32 int8 with one fp16 scale;
Q4_0: blocks of 32 4-bit values with one scale) — the llama.cpp counterparts of llmc's float32,
int8 and int4 packages. The vocabulary is synthetic (the bench feeds token ids, never text): an
SPM list of ``vocab_size`` placeholder tokens with ``<unk> <s> </s>`` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmc.errors import LlmcError

WEIGHT_TYPES = ("f32", "bf16", "q8_0", "q4_0")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows [first halves of every head, then second halves] -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(checkpoint: Path, out: Path, weight_type: str = "f32") -> Path:
    """``checkpoint`` (config.json + *.safetensors, Llama) -> ``out``; reused when it already exists."""
    import gguf
    from safetensors.torch import load_file

    if weight_type not in WEIGHT_TYPES:
        raise LlmcError(f"GGUF weight type {weight_type!r}: choose one of {', '.join(WEIGHT_TYPES)}")
    if out.is_file():
        return out
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise LlmcError(f"{checkpoint}: GGUF export for the bench handles model_type 'llama', not "
                        f"{config.get('model_type')!r}")
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or {}
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[weight_type]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[weight_type]

    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        # Through torch: numpy has no bfloat16. Tied embeddings have no lm_head tensor, and
        # llama.cpp then uses token_embd as the output matrix, as HF does.
        tensors.update({k: v.float().numpy() for k, v in load_file(shard).items()})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(checkpoint.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(ftype)
    _add_vocab(writer, vocab, gguf)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, w in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LlmcError(f"{checkpoint}: tensor {hf_name!r} has no GGUF name for architecture llama")
        if hf_name.endswith("q_proj.weight"):
            w = _permute(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = _permute(w, n_kv)
        # 2-D matrices are quantized (llama.cpp keeps norms in F32 whatever the file type).
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and w.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _add_vocab(writer, vocab: int, gguf) -> None:
    from .models import placeholder_tokens

    tokens = placeholder_tokens(vocab)
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
