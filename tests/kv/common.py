"""Shared pieces of the KV-event tests: the served model's tokenizer and template, conversations."""

from __future__ import annotations

from pathlib import Path

from extproc.replicas.prompt_tokens import PromptTokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "extproc" / "classifier" / "model" / "tokenizer.json"
TEMPLATE = Path(__file__).resolve().parent / "chat_template.jinja"


def tokenizer() -> PromptTokenizer:
    return PromptTokenizer.from_files(TOKENIZER, TEMPLATE)


def conversation(topic: str, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"You are a guide to {topic}. Answer in detail. " * 6}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me about {topic}, part {turn}. " * 5})
        messages.append({"role": "assistant", "content": f"Here is part {turn} on {topic}. " * 8})
    messages.append({"role": "user", "content": f"And what else about {topic}?"})
    return messages
