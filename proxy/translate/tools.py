"""Tool-call helpers both bridges share: safe ids, argument JSON repair, upstream-safe names."""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import orjson

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")
MAX_NAME = 64  # what OpenAI-style servers (and vLLM's validators) accept for a function name


def sanitize_tool_id(value: Any) -> str:
    """An id Claude clients accept (``^[A-Za-z0-9_-]+$``): others become ``_``; empty gets a fresh id.

    Some backends send ids like ``functions.Bash:0``; the same mapping applied
    to the client's ``tool_result.tool_use_id`` on the next turn keeps the pair
    matched upstream.
    """
    if isinstance(value, str) and value:
        return _UNSAFE_ID.sub("_", value)
    return f"toolu_{os.urandom(12).hex()}"


def repair_json_object(text: str) -> dict:
    """Tool arguments as an object: parsed, else repaired (closing strings and brackets), else ``{}``.

    Local models cut arguments short or stream them broken; a client needs an
    object, never a JSON string, so a hopeless or non-object value becomes ``{}``.
    Repair closes what was left open; if that does not parse, the text is cut
    back a character at a time (a dangling key or a half-written number) for a
    bounded number of tries.
    """
    text = text.strip()
    if not text:
        return {}
    value = _loads(text)
    if value is None and text[0] == "{":
        for cut in range(len(text), max(1, len(text) - _REPAIR_TRIES), -1):
            closed = _close(text[:cut])
            if closed is not None:
                value = _loads(closed)
                if value is not None:
                    break
    return value if isinstance(value, dict) else {}


_REPAIR_TRIES = 64
_MISSING = None


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return _MISSING


def _close(text: str) -> str | None:
    """Close what a cut-off JSON text left open (a string, then brackets); drop a trailing comma or colon."""
    stack: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
    if escaped:
        return None
    out = text + '"' if in_string else text
    out = out.rstrip().rstrip(",:").rstrip()
    return out + "".join(reversed(stack))


class ToolNames:
    """Per request: function names an upstream accepts (<= 64 chars), and the way back to the client's names.

    A longer name becomes its first 55 characters + ``_`` + 8 hex digits of
    its sha256, so it stays recognisable and unique. Names are otherwise never
    changed (case-folding ``Bash`` to ``bash`` makes agents loop on "no such tool").
    """

    __slots__ = ("_back",)

    def __init__(self) -> None:
        self._back: dict[str, str] = {}

    def to_upstream(self, name: str) -> str:
        if len(name) <= MAX_NAME:
            return name
        short = f"{name[:55]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        self._back[short] = name
        return short

    def to_client(self, name: str) -> str:
        return self._back.get(name, name)


# What vLLM, llama.cpp, SGLang, Ollama, TGI and OpenAI say when the prompt does not fit the model's context.
_CONTEXT_OVERFLOW = re.compile(
    r"maximum context length|context[ _-]?(length|window|size)|context_length_exceeded|exceed_context_size"
    r"|prompt is too long|too many tokens|maximum input length|input is too long|longer than the model"
    r"|exceeds? the (model|maximum)", re.IGNORECASE)
# A floor for the context-length clamp (at most a quarter of the context): the
# prompt estimate is a heuristic, and an over-estimate must not starve the
# answer. If the prompt really fills the context, the upstream refuses and the
# client gets its protocol's "context too long" error: the right outcome.
MIN_CLAMPED_TOKENS = 1024


def is_context_overflow(message: str | bytes) -> bool:
    """Whether an upstream error message says the prompt did not fit the model's context."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return bool(_CONTEXT_OVERFLOW.search(message))


def clamp_max_tokens(requested: int, max_output: int, context_length: int, prompt_tokens: int) -> int:
    """``max_tokens`` within the model's ``max-output-tokens`` and ``context-length`` minus the prompt (0 = unset).

    Agents ask for 32,000 or more; a small local context refuses that outright.
    """
    value = requested
    if max_output > 0:
        value = min(value, max_output)
    if context_length > 0:
        room = context_length - prompt_tokens
        value = min(value, max(room, min(value, MIN_CLAMPED_TOKENS, context_length // 4)))
    return max(1, value)
