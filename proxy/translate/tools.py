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
