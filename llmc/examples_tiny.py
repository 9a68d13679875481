"""Tiny seeded Hugging Face models, one per supported architecture: the embedded default model
(`llmc make-tiny`) and the fixtures of the golden tests.

Every config has the same shape so the architectures differ only where they really differ:
vocab 128, hidden 64, intermediate 128, 2 layers, 4 heads (2 KV heads where the architecture has
grouped-query attention), 256 positions. The sliding windows (mistral, gemma2) are 8 tokens, short
enough that a 16-token prompt crosses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from llmc.errors import LlmcError

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 256
SLIDING_WINDOW = 8

# The fields named alike by every config class except GPT-2's.
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
               num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               max_position_embeddings=MAX_POSITIONS)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**_COMMON)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**_COMMON, sliding_window=SLIDING_WINDOW)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**_COMMON)


def _qwen3():
    from transformers import Qwen3Config
    # Qwen3 declares head_dim separately from hidden/heads; set it so the two agree.
    return Qwen3Config(**_COMMON, head_dim=HIDDEN // HEADS)


def _gemma2():
    from transformers import Gemma2Config
    return Gemma2Config(**_COMMON, head_dim=16, sliding_window=SLIDING_WINDOW)


def _phi3():
    from transformers import Phi3Config
    # The default pad/eos ids (32000) lie outside the tiny vocab; eos=2 is the Llama family's.
    return Phi3Config(**_COMMON, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=2)


def _gpt2():
    from transformers import GPT2Config
    # GPT-2 names its fields differently and has no grouped-query attention; its default
    # bos/eos (50256) lie outside the tiny vocab.
    return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS,
                      n_head=HEADS, n_positions=MAX_POSITIONS, bos_token_id=0, eos_token_id=0)


# Architecture name -> a function returning a fresh tiny transformers config. Layer count is set at
# construction: transformers 5 derives `layer_types` from it, so changing it afterwards breaks.
TINY_CONFIGS: dict[str, Callable[[], object]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt2": _gpt2,
}


# A plain-text chat format for the tiny models, so chat templates can be exercised end to end.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer():
    """A character-level HF tokenizer over the 128 ASCII code points: id == ord(char), others -> '?'.

    Vocab 128 is exactly the tiny models' vocab, so any text has a valid encoding.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({chr(i): i for i in range(VOCAB)}, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    tokenizer.decoder = decoders.Fuse()  # join the characters back without spaces
    return tokenizer


def save_char_tokenizer(out_dir: str | Path) -> None:
    """Write ``char_tokenizer()`` as tokenizer.json plus a tokenizer_config.json with a chat template."""
    out = Path(out_dir)
    char_tokenizer().save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "?", "model_max_length": MAX_POSITIONS,
              "clean_up_tokenization_spaces": False, "chat_template": TINY_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, **config_fields) -> Path:
    """Build the tiny ``arch`` model with random weights from ``seed`` and save it (safetensors) to
    ``out_dir``, with a character-level tokenizer (``char_tokenizer``). ``config_fields`` override
    config fields set at construction, e.g. ``max_position_embeddings=512``."""
    import torch
    import transformers

    if arch not in TINY_CONFIGS:
        raise LlmcError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_CONFIGS)}")
    config = TINY_CONFIGS[arch]()
    for key, value in config_fields.items():
        if not hasattr(config, key):
            raise LlmcError(f"{arch} config has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # No EOS: greedy runs over the random weights then always produce the requested token count.
    model.generation_config.eos_token_id = None
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    save_char_tokenizer(out)
    return out
