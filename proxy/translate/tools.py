"""Tool-call helpers both bridges share: safe ids, argument JSON repair, upstream-safe names."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, NamedTuple

import orjson

from ..errors import StreamError
from ..fold.base import slow_json

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
    back to before an unfinished escape or the end of a half-written number,
    then to the end of the last complete value (a dangling key goes). At most
    four tries, each linear in the text: a megabyte of broken arguments costs
    a few passes over it, not one per character cut.
    """
    text = text.strip()
    if not text:
        return {}
    value = _loads(text)
    if value is None and text[0] == "{":
        scan = _scan(text)
        for cut in dict.fromkeys((len(text), scan.escape_at, scan.number, scan.complete)):  # in order, once each
            closed = _close(text[:cut], scan if cut == len(text) else None) if cut > 0 else None
            if closed is not None:
                value = _loads(closed)
                if value is not None:
                    break
    return value if isinstance(value, dict) else {}


_MISSING = None
# Outside strings, what a cut-off JSON text's structure depends on; a string's body is skipped in one
# regex match (escapes included), so only brackets, commas and colons cost a step of Python each.
_STRUCTURE = re.compile(r'["{}\[\],:]')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
MAX_REPAIR_DEPTH = 1024  # deeper than orjson (or json without a RecursionError) reads: not repairable


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:  # the one slow path and its guards: a number past 64 bits is a float, as orjson reads it
        return slow_json(text)
    except StreamError:
        return _MISSING


class _Scan(NamedTuple):
    closers: str | None  # what closes the text (a quote, then brackets); None when nothing can
    complete: int        # the length of the longest prefix ending after a complete value or an opening bracket
    escape_at: int       # where an escape begins within the text's last 6 characters inside a string, else -1
    number: int          # without the end of a half-written number ("-2." -> "-2"), else -1


def _scan(text: str) -> _Scan:
    """One pass over a cut-off JSON text: how to close it, and where it could be cut back to."""
    closers: list[str] = []
    keyed: list[bool] = []  # per open container: an object whose next string is a key
    complete = 0
    search, body, end = _STRUCTURE.search, _STRING_BODY.match, len(text)
    found = search(text)
    while found is not None:
        token, at = found.group(), found.start()
        if token == '"':
            after = body(text, at + 1).end()
            if after == end or text[after] != '"':
                return _open_string(text, closers, complete, at + 1, after)
            if not (keyed and keyed[-1]):
                complete = after + 1
            found = search(text, after + 1)
            continue
        if token == "{" or token == "[":
            if len(closers) >= MAX_REPAIR_DEPTH:
                return _Scan(None, 0, -1, -1)
            closers.append("}" if token == "{" else "]")
            keyed.append(token == "{")
            complete = at + 1
        elif token == "}" or token == "]":
            if not closers or closers.pop() != token:
                return _Scan(None, 0, -1, -1)
            keyed.pop()
            complete = at + 1
        elif token == ",":
            complete = at
            if keyed:
                keyed[-1] = closers[-1] == "}"
        elif keyed:  # ":"
            keyed[-1] = False
        found = search(text, at + 1)
    number = len(text.rstrip("-+.eE"))
    if number == end or not number or not text[number - 1].isdigit():
        number = -1
    return _Scan("".join(reversed(closers)), complete, -1, number)


def _open_string(text: str, closers: list[str], complete: int, start: int, stop: int) -> _Scan:
    """``_scan``'s answer for a text that ends inside the string whose body began at ``start``.

    ``stop`` is where the body's match ended: the end of the text, or a
    backslash with nothing after it (then nothing can close the text as it is).
    """
    escape_at = text.rfind("\\", max(start, len(text) - 6))
    if escape_at >= 0:
        run = escape_at + 1 - start - len(text[start:escape_at + 1].rstrip("\\"))  # backslashes ending there
        if run % 2 == 0:  # the last one is escaped by the one before it: that pair is the escape
            escape_at -= 1
    closing = None if stop != len(text) else '"' + "".join(reversed(closers))
    return _Scan(closing, complete, escape_at, -1)


def _close(text: str, scan: _Scan | None = None) -> str | None:
    """Close what a cut-off JSON text left open (a string, then brackets); drop a trailing comma or colon.
    ``scan``: the text's ``_scan``, when it was made already."""
    closers = (scan or _scan(text)).closers
    if closers is None:
        return None
    if closers[:1] == '"':
        text, closers = text + '"', closers[1:]
    return text.rstrip().rstrip(",:").rstrip() + closers


# JSON Schema keywords holding subschemas: maps of them, lists of them, one of them.
_NESTED_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_NESTED_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_NESTED_ONE = ("items", "additionalProperties", "not")
_MAX_SCHEMA_DEPTH = 32  # real schemas are a few levels deep; deeper ones are copied as they are
# Gemini's OpenAPI-subset schemas (``Schema``): upper-case type names, ``nullable``, and keys with no JSON Schema
# meaning a chat server may refuse.
_OPENAPI_TYPES = {"STRING": "string", "NUMBER": "number", "INTEGER": "integer", "BOOLEAN": "boolean",
                  "ARRAY": "array", "OBJECT": "object", "NULL": "null"}
_OPENAPI_ONLY = ("nullable", "propertyOrdering", "example")


def chat_schema(schema: dict, openapi: bool = False, depth: int = 0) -> dict:
    """A copy of a tool's parameter schema that chat servers accept: every ``type: object`` schema has
    ``properties`` (vLLM and others reject it missing). ``openapi``: the schema is Gemini's OpenAPI subset
    (``type: "STRING"``, ``nullable: true``), written as the JSON Schema it means (``"string"``,
    ``["string", "null"]``); ``TYPE_UNSPECIFIED`` says nothing and is left out."""
    out = dict(schema)
    if openapi:
        _from_openapi(out)
    if depth >= _MAX_SCHEMA_DEPTH:
        return out
    depth += 1
    for key in _NESTED_MAPS:
        value = out.get(key)
        if isinstance(value, dict):
            out[key] = {k: chat_schema(v, openapi, depth) if isinstance(v, dict) else v for k, v in value.items()}
    for key in _NESTED_LISTS:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [chat_schema(v, openapi, depth) if isinstance(v, dict) else v for v in value]
    for key in _NESTED_ONE:
        if isinstance(out.get(key), dict):
            out[key] = chat_schema(out[key], openapi, depth)
    if out.get("type") == "object" and not isinstance(out.get("properties"), dict):
        out["properties"] = {}
    return out


def _from_openapi(out: dict) -> None:
    kind = out.get("type")
    if isinstance(kind, str):
        kind = _OPENAPI_TYPES.get(kind.upper(), kind.lower())
        if kind == "type_unspecified":
            del out["type"]
        else:
            out["type"] = kind
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    for key in _OPENAPI_ONLY:
        out.pop(key, None)


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
