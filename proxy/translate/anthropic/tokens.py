"""Estimate the input tokens of an Anthropic Messages body (``count_tokens`` and the max_tokens clamp).

Pure and cheap: the character rule of ``translate/tokens.py`` over
everything the model will read, system + messages + tools (counting only
messages is the 93 % undercount CLIProxyAPI#679 reports), plus the fixed
costs a chat template adds per message, per tool and per image.
"""
from __future__ import annotations

from typing import Any

import orjson

from ..tokens import BASE, PER_IMAGE, text_tokens

PER_MESSAGE = 4      # role markers and separators of a chat template
PER_TOOL = 8         # the template's wrapper around each tool definition


def estimate(body: dict) -> int:
    """Input tokens for a (validated) Anthropic body: system, messages and tools."""
    texts: list[str] = []
    fixed = BASE
    system = body.get("system")
    if system:
        fixed += PER_MESSAGE
        fixed += _content(system, texts)
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            fixed += PER_MESSAGE + _content(message.get("content"), texts)
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            fixed += PER_TOOL
            texts.append(orjson.dumps({k: tool[k] for k in ("name", "description", "input_schema")
                                       if k in tool}).decode())
    return fixed + text_tokens("".join(texts))


def _content(content: Any, texts: list[str]) -> int:
    """Collect the text of a content (string or blocks) into ``texts``; return its fixed token cost."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    if not isinstance(content, list):
        return 0
    fixed = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str) and not text.startswith("x-anthropic-billing-header:"):
                texts.append(text)
        elif kind == "image":
            fixed += PER_IMAGE
        elif kind == "tool_use":
            texts.append(str(block.get("name") or ""))
            texts.append(orjson.dumps(block.get("input") or {}).decode())
            fixed += PER_MESSAGE
        elif kind == "tool_result":
            fixed += PER_MESSAGE + _content(block.get("content"), texts)
        # thinking from earlier turns is not counted: it is not sent upstream (unless
        # reasoning-replay), and Anthropic drops it from the context too
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and isinstance(source.get("data"), str) and source.get("type") == "text":
                texts.append(source["data"])
            else:
                fixed += PER_IMAGE
    return fixed
