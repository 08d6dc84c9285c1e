"""The served model's token ids for a request, as its server computes them before prefill.

For KV-event prefix matching the router must see the same tokens the model server caches: the
served model's tokenizer (``tokenizer.json``, read with PyPI ``tokenizers`` from a mounted file,
never downloaded) over the prompt the server builds. A chat request is rendered with the model's
chat template as vLLM's chat endpoint does (transformers' Jinja settings: sandboxed,
``trim_blocks``, ``lstrip_blocks``, ``add_generation_prompt=True``, ``bos_token``/``eos_token``
from ``tokenizer_config.json``), then tokenized without adding special tokens (the template
writes them); a completion prompt is tokenized with them.

Where the rendering differs from the server's (a template using features this renderer lacks,
tools, images), the token ids diverge from the point of difference on, and so only the blocks
before it match: the replica then looks as if it held less, never more.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


class TemplateError(ValueError):
    """The chat template cannot be loaded or rendered."""


class PromptTokenizer:
    def __init__(
        self, tokenizer: Tokenizer, chat_template: str | None, bos_token: str = "", eos_token: str = ""
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(chat_template) if chat_template else None

    @classmethod
    def from_files(cls, tokenizer_file: str | Path, chat_template: str | Path | None = None) -> PromptTokenizer:
        """tokenizer.json, and the chat template as a .jinja file or a tokenizer_config.json
        holding ``chat_template`` (and the bos/eos tokens). Without one, tokenizer_config.json
        beside tokenizer.json is used if it is there."""
        tokenizer_path = Path(tokenizer_file)
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise TemplateError(f"cannot load the tokenizer {tokenizer_path}: {exc}") from None
        template_path = Path(chat_template) if chat_template else tokenizer_path.with_name("tokenizer_config.json")
        if not template_path.exists():
            if chat_template:
                raise TemplateError(f"chat template {template_path} does not exist")
            return cls(tokenizer, None)
        text = template_path.read_text(encoding="utf-8")
        if template_path.suffix != ".json":
            return cls(tokenizer, text)
        config = json.loads(text)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tokenizer, template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> str:
        if self._template is None:
            raise TemplateError("no chat template configured")
        try:
            return self._template.render(
                messages=[_server_message(m) for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except Exception as exc:
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None

    def chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    def completion(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids


def _token_text(token: Any) -> str:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return str(token.get("content", ""))
    return token or ""


def _server_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as vLLM hands it to a template whose content format is "string": text parts
    joined by newlines, other parts left out."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return {**message, "content": "\n".join(texts)}
    return message


def _compile(source: str):
    try:
        from jinja2 import TemplateError as JinjaError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - a dependency
        raise TemplateError("jinja2 is needed to apply chat templates") from exc

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except JinjaError as exc:
        raise TemplateError(f"the chat template does not compile: {exc}") from None
