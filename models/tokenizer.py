"""Tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`) of a checkpoint."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile(source: str) -> Template:
    """The template in a sandbox with the globals and filters transformers gives it."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc


def _read_template(directory: Path, config: dict) -> str | None:
    """As transformers: `chat_template.jinja` wins over tokenizer_config.json's entry."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # NOTE: named templates; "default" is the chat one
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


@dataclass
class TextTokenizer:
    """Encode/decode text and render chat messages, as transformers' fast tokenizer would."""

    tokenizer: Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_dir(cls, directory: str | Path) -> TextTokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # NOTE: later wins
            if (directory / name).exists():
                config |= json.loads((directory / name).read_text())
        return cls(
            Tokenizer.from_file(str(path)),
            _read_template(directory, config),
            *(_token_text(config.get(k)) for k in ("bos_token", "eos_token")),
        )

    @functools.cached_property
    def _template(self) -> Template:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        return _compile(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Messages (and tools: OpenAI's function tool objects) through the chat template
        (sandboxed jinja2, as transformers' apply_chat_template renders it)."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Rendered chat as token ids; the template itself places any special tokens."""
        return self.encode(
            self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False
        )
