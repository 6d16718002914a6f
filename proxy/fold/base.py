"""What every fold shares: the default budget, the slow JSON path, in-stream errors, the feed loop.

Pure (no Flask, no requests). ``chat``, ``text`` and ``responses`` build on it;
so may the protocol translators that fold a stream before translating it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable

import orjson

from ..errors import StreamError

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DONE = "[DONE]"  # the end of a chat stream, as ``refused_data`` (and the bridges' reader) give it
_CODE_LIMIT = 200  # characters of an upstream error code kept when it is not a plain string or number


def slow_json(data: bytes | str, strict: bool = False) -> dict | list | object:
    """Parse JSON orjson refused: raw newlines in strings, lone surrogate escapes, huge integers.

    The ONE slow JSON path of the proxy: the fold and the bridges' reader for a data line, a bridge
    for a JSON answer (``translate/completion.load``), the check of a JSON answer relayed as it came
    (``strict``: raw control characters in strings and bytes that are not UTF-8 are refused, as a
    client's parser refuses them), and the repair of a model's tool arguments (``translate/tools.py``).
    Deeply nested JSON (orjson stops at 1,024 levels) is refused up front, before the recursive
    parser can spend its stack on it. Anything it cannot read is a ``StreamError``.
    """
    try:
        text = data if type(data) is str else data.decode("utf-8-sig", "strict") if strict \
            else data.decode("utf-8", "replace")
    except UnicodeDecodeError:
        raise StreamError(f"upstream sent a data line that is not JSON: {preview(data)}") from None
    head = text.lstrip()[:1025]
    if len(head) > 1024 and head.count("[") + head.count("{") > 1024:
        raise StreamError("upstream sent JSON nested deeper than 1024 levels", code="upstream_bad_chunk")
    try:
        # strict=False accepts control characters inside strings (llama.cpp verbose mode);
        # integers too long for 64 bits become floats, as orjson reads them, and numbers
        # no float can hold (a 400-digit prompt_tokens, 1e400, NaN) become null: an
        # infinity would break whoever adds the usage up later.
        return json.loads(text, strict=strict, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_no_number)
    except RecursionError:
        raise StreamError("upstream sent JSON nested too deeply", code="upstream_bad_chunk") from None
    except ValueError:
        raise StreamError(f"upstream sent a data line that is not JSON: {preview(data)}") from None


def json_at(text: str, start: int) -> Any:
    """The JSON value that starts at ``start`` of ``text`` (what follows it is ignored), its numbers read as
    ``slow_json`` reads them; ``ValueError`` when none does (cut off), ``RecursionError`` when nested past
    the stack. For a scan through text that is not one JSON document (a native stream's tail)."""
    return _AT.raw_decode(text, start)[0]


def refused_data(data: bytes) -> Any:
    """A data line orjson refused, as every chat-stream reader (the fold, the bridges') reads it: None for
    blank data (some servers send empty ``data:`` lines; not an error), ``DONE`` for ``[DONE]``, else what
    ``slow_json`` reads."""
    stripped = data.strip()
    if not stripped:
        return None
    if stripped == b"[DONE]":
        return DONE
    return slow_json(data)


def _parse_int(text: str) -> int | float | None:
    return int(text) if len(text) < 19 else _parse_float(text)


def _parse_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _no_number(_: str) -> None:
    return None


_AT = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_no_number)


def kept_finish(held: Any, sent: Any) -> Any:
    """The ``finish_reason`` a choice keeps when a chunk says ``sent`` and it kept ``held`` before (None: none
    yet): the LAST explicit one (SPEC, "Folding SSE": "the upstream's last explicit value"). null and ``""``
    (Ollama's on every non-final chunk) are none.

    The ONE rule of every reader (the folds, ``fold/chat.py`` and ``fold/text.py``, and the bridges'
    ``translate/chat_stream.ChatStream``, which passes each new one on, so a bridge ends with it), so a client
    gets the same ending from a folded answer as from a bridged stream, and the one the openai SDK's own
    stream accumulator gives for the same stream. vLLM, llama.cpp and Ollama send one reason per choice; a
    layer that ends every stream with its own ``stop`` after the real reason (RayBytes/ChatMock#114) is read
    as it says, the way the SDK reads it.
    """
    return sent if sent else held


def stream_error(payload: dict) -> StreamError:
    """Turn an in-stream error event into the error the client gets (429 stays 429, else 502)."""
    error = payload.get("error", payload)
    if isinstance(error, dict):
        message = error.get("message") or "upstream reported an error in the stream"
        code, kind = error.get("code"), error.get("type")
    else:
        message, code, kind = str(error), None, None
    if not isinstance(message, str):
        message = _text(message)
    if code is not None and type(code) not in (str, int):
        code = _text(code)[:_CODE_LIMIT]  # an object or a float as code: kept as text, bounded
    text = f"{code} {kind} {error.get('status') if isinstance(error, dict) else ''}".lower()
    if code == 429 or "429" in text or "rate_limit" in text or "resource_exhausted" in text:
        return StreamError(message, status=429, type="rate_limit_error",
                           code=code if code is not None else "rate_limit_exceeded", retryable=True)
    return StreamError(message, code=code if code is not None else "upstream_stream_error", retryable=True)


def _text(value: object) -> str:
    """A JSON value the upstream put where a string belongs, as text (orjson cannot write all of them)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return "(unprintable value)"


def preview(data: bytes | str) -> str:
    text = data[:80] if type(data) is str else data[:80].decode("utf-8", "replace")
    return repr(text + ("..." if len(data) > 80 else ""))


def run_fold(fold, batches: Iterable[list[tuple[bytes, bytes]]]) -> dict:
    """Feed batches of ``(event, data)`` to a fold until it is done or the stream ends; return its result."""
    feed = fold.feed
    for batch in batches:
        for event, data in batch:
            if feed(event, data):
                return fold.result()
    return fold.result()
