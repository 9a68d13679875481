"""Text <-> token ids with the model's HF ``tokenizers`` tokenizer, and chat templates via jinja2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


class TokenizerError(Exception):
    """A tokenizer file is unreadable or a chat template is missing or fails (one-line CLI error)."""


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class PackageTokenizer:
    """The package's ``tokenizer.json`` plus what ``tokenizer_config.json`` says about it."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str | Path) -> "PackageTokenizer | None":
        """The tokenizer in ``directory``, or None when it has no tokenizer.json."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot read tokenizer: {exc}") from None
        config = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{config_path}: not valid JSON ({exc})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        template_file = directory / "chat_template.jinja"  # where newer transformers save it
        if template is None and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        return cls(tokenizer, config, template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_token(self, key: str) -> str | None:
        """``bos_token`` / ``eos_token`` / ... as text, from tokenizer_config.json."""
        return _token_text(self.config.get(key))

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_token("eos_token")
        return None if eos is None else self.tokenizer.token_to_id(eos)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) the way transformers does.

        Same jinja2 setup as transformers' ``apply_chat_template``: a sandboxed environment (templates
        come with checkpoints, so they are untrusted), trim/lstrip blocks, ``raise_exception``.
        """
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template; give the prompt as plain text")

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        specials = {key: self.special_token(key) for key in
                    ("bos_token", "eos_token", "unk_token", "pad_token")}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in specials.items() if v is not None})
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from None
