"""Fold a chat-completion event stream into the one ``chat.completion`` a JSON server would send.

Pure: lines (bytes) in, a dict out, or a ``StreamError``. No Flask, no
requests. The rules are the SPEC's "Folding SSE" section; the quirks of real
servers it names (Ollama's ``finish_reason: ""``, tool calls without
``index``, indexes starting at 1, usage on every chunk, Azure's empty first
chunk, llama.cpp's extra blank lines...) are ordinary input here.

Speed matters (this runs for every forced request): each text fragment is
appended to a list and joined once at the end, never ``+=``-ed, and the
per-chunk loop touches each key once.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

import orjson

from ..errors import StreamError
from .sse import batches_from_lines, iter_event_batches

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Top-level fields taken from the first chunk that has a non-empty value.
_FIRST = frozenset(("id", "created", "model", "system_fingerprint"))
# Stream-only fields that a JSON answer never has.
_DROP = frozenset(("object", "obfuscation"))
_REASONING = ("reasoning_content", "reasoning")


class _ToolCall:
    __slots__ = ("id", "type", "name", "args", "extra")

    def __init__(self) -> None:
        self.id = None
        self.type = None
        self.name = None
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}

    def render(self) -> dict:
        out = {} if self.id is None else {"id": self.id}
        out["type"] = self.type or "function"
        out["function"] = {"name": self.name, "arguments": "".join(self.args)}
        out.update(self.extra)
        return out


class _Choice:
    """What one choice ``index`` has accumulated so far."""

    __slots__ = ("role", "content", "texts", "refusal", "calls", "last_call", "function_call",
                 "finish", "logprobs", "extra", "message_extra")

    def __init__(self) -> None:
        self.role = None
        self.content: list[str] = []
        self.texts: dict[str, list[str]] = {}  # reasoning_content / reasoning, as the upstream named it
        self.refusal: list[str] | None = None
        self.calls: dict[int, _ToolCall] = {}
        self.last_call: _ToolCall | None = None
        self.function_call: _ToolCall | None = None
        self.finish = None
        self.logprobs: dict[str, list | None] | None = None
        self.extra: dict[str, Any] = {}
        self.message_extra: dict[str, Any] = {}


class ChatFold:
    """Accumulates decoded chunks; ``result()`` gives the ``chat.completion``.

    Use ``fold_chat``/``fold_chat_chunks`` unless you feed events yourself.
    """

    __slots__ = ("first", "settled", "extra", "choices", "usage", "done", "size", "max_bytes")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.first: dict[str, Any] = {}
        self.settled = set(_DROP)  # top-level keys with nothing left to take
        self.extra: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage = None
        self.done = False
        self.size = 0
        self.max_bytes = max_bytes

    # -- input -------------------------------------------------------------
    def feed(self, event: bytes, data: bytes) -> bool:
        """Take one SSE event; True (and ``done``) once ``[DONE]`` has arrived."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = self._unusual_data(data)
            if chunk is None:
                return self.done
        if type(chunk) is not dict:
            raise StreamError(f"upstream sent an event that is not a JSON object: {_preview(data)}")
        if event == b"error":
            raise stream_error(chunk)
        settled = self.settled
        for key, value in chunk.items():
            if key in settled:
                continue
            if key == "choices":
                if value:
                    self._choices(value)
            elif key == "usage":
                if value is not None:
                    self.usage = value
            elif key in _FIRST:
                if value:
                    self.first[key] = value
                    settled.add(key)  # first non-empty value wins; skip this key from now on
                else:
                    self.first.setdefault(key, value)
            elif key == "error":
                if value is not None:
                    raise stream_error(chunk)
            elif value is not None or key not in self.extra:
                self.extra[key] = value
        if self.size > self.max_bytes:
            raise StreamError(f"folded answer exceeds max-aggregate-bytes ({self.max_bytes} bytes)",
                              code="aggregate_too_large")
        return False

    def _unusual_data(self, data: bytes) -> dict | None:
        """Handle what orjson refused: blank data, ``[DONE]``, or raw newlines inside JSON strings."""
        stripped = data.strip()
        if not stripped:
            return None  # some servers send empty data: lines; not an error
        if stripped == b"[DONE]":
            self.done = True
            return None
        try:
            # strict=False accepts control characters inside strings (llama.cpp verbose mode).
            return json.loads(data.decode("utf-8", "replace"), strict=False)
        except ValueError:
            raise StreamError(f"upstream sent a data line that is not JSON: {_preview(data)}") from None

    def _choices(self, choices: list) -> None:
        states = self.choices
        for raw in choices:
            index = raw.get("index", 0)
            state = states.get(index) or _new_choice(states, index)
            extra = state.extra
            for key, value in raw.items():
                if key == "delta":
                    if value:
                        self._delta(state, value)
                elif key == "index":
                    continue
                elif key == "finish_reason":
                    if value:  # Ollama sends "" on every non-final chunk
                        state.finish = value
                elif key == "logprobs":
                    if value:
                        self._logprobs(state, value)
                elif key in _DROP:
                    continue
                elif value is not None or key not in extra:
                    extra[key] = value

    def _delta(self, state: _Choice, delta: dict) -> None:
        for key, value in delta.items():
            if key == "content":
                if value:
                    state.content.append(value)
                    self.size += len(value)
            elif key in _REASONING:
                parts = state.texts.get(key)
                if parts is None:
                    parts = state.texts[key] = []
                if value:
                    parts.append(value)
                    self.size += len(value)
            elif key == "tool_calls":
                if value:
                    self._tool_calls(state, value)
            elif key == "role":
                if value and state.role is None:
                    state.role = value
            elif key == "refusal":
                if state.refusal is None:
                    state.refusal = []
                if value:
                    state.refusal.append(value)
                    self.size += len(value)
            elif key == "function_call":
                if value:
                    if state.function_call is None:
                        state.function_call = _ToolCall()
                    self._merge_function(state.function_call, value)
            elif value is not None or key not in state.message_extra:
                state.message_extra[key] = value

    def _tool_calls(self, state: _Choice, deltas: list) -> None:
        calls = state.calls
        for delta in deltas:
            index = delta.get("index")
            call_id = delta.get("id")
            if index is None:
                # Gemini/Ollama omit the index: a new id starts a call, no id continues the last.
                call = state.last_call
                if call is None or (call_id and call_id != call.id):
                    call = _ToolCall()
                    calls[max(calls) + 1 if calls else 0] = call
            else:
                call = calls.get(index)
                if call is None:
                    call = calls[index] = _ToolCall()
            state.last_call = call
            for key, value in delta.items():
                if key == "function":
                    if value:
                        self._merge_function(call, value)
                elif key == "id":
                    if value and call.id is None:
                        call.id = value
                elif key == "type":
                    if value and call.type is None:
                        call.type = value
                elif key != "index" and (value is not None or key not in call.extra):
                    call.extra[key] = value

    def _merge_function(self, call: _ToolCall, function: dict) -> None:
        name = function.get("name")
        if name and call.name is None:
            call.name = name
        arguments = function.get("arguments")
        if arguments:
            call.args.append(arguments)
            self.size += len(arguments)

    def _logprobs(self, state: _Choice, logprobs: dict) -> None:
        if state.logprobs is None:
            state.logprobs = {"content": None, "refusal": None}
        for key in ("content", "refusal"):
            items = logprobs.get(key)
            if items:
                have = state.logprobs[key]
                if have is None:
                    state.logprobs[key] = list(items)
                else:
                    have.extend(items)
                self.size += 64 * len(items)
        for key, value in logprobs.items():
            if key not in ("content", "refusal") and value is not None:
                state.logprobs[key] = value

    # -- output ------------------------------------------------------------
    def result(self) -> dict:
        """The folded ``chat.completion``, or ``StreamError`` if the stream was not complete."""
        states = self.choices
        return self._envelope("chat.completion", "chatcmpl-",
                              [_render_choice(index, states[index]) for index in sorted(states)])

    def _envelope(self, kind: str, id_prefix: str, choices: list[dict]) -> dict:
        """Check the stream was complete, then wrap rendered choices with the top-level fields."""
        states = self.choices
        if not self.done and not (states and all(s.finish for s in states.values())):
            raise StreamError("upstream stream ended early", retryable=True, code="upstream_stream_ended_early")
        if not states:
            raise StreamError("upstream stream carried no choices", code="upstream_stream_empty")
        first = self.first
        out = {
            "id": first.get("id") or f"{id_prefix}{os.urandom(12).hex()}",
            "object": kind,
            "created": first["created"] if "created" in first else int(time.time()),
            "model": first.get("model") or "",
            "choices": choices,
        }
        if "system_fingerprint" in first:
            out["system_fingerprint"] = first["system_fingerprint"]
        if self.usage is not None:
            out["usage"] = self.usage
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


def _new_choice(states: dict[int, _Choice], index: int) -> _Choice:
    state = states[index] = _Choice()
    return state


def _render_choice(index: int, state: _Choice) -> dict:
    message: dict[str, Any] = {"role": state.role or "assistant",
                               "content": "".join(state.content) or None}
    for name, parts in state.texts.items():
        message[name] = "".join(parts) or None
    if state.refusal is not None:
        message["refusal"] = "".join(state.refusal) or None
    if state.calls:
        message["tool_calls"] = [state.calls[i].render() for i in sorted(state.calls)]
    if state.function_call is not None:
        call = state.function_call
        message["function_call"] = {"name": call.name, "arguments": "".join(call.args)}
    for key, value in state.message_extra.items():
        message.setdefault(key, value)
    finish = state.finish
    if finish is None:
        # The SPEC's rule: a choice that only called tools finished with tool_calls, not stop.
        finish = "tool_calls" if state.calls else "function_call" if state.function_call else "stop"
    choice = {"index": index, "message": message, "logprobs": state.logprobs, "finish_reason": finish}
    for key, value in state.extra.items():
        choice.setdefault(key, value)
    return choice


def stream_error(payload: dict) -> StreamError:
    """Turn an in-stream error event into the error the client gets (429 stays 429, else 502)."""
    error = payload.get("error", payload)
    if isinstance(error, dict):
        message = error.get("message") or "upstream reported an error in the stream"
        code, kind = error.get("code"), error.get("type")
    else:
        message, code, kind = str(error), None, None
    if not isinstance(message, str):
        message = orjson.dumps(message).decode()
    text = f"{code} {kind} {error.get('status') if isinstance(error, dict) else ''}".lower()
    if code == 429 or "429" in text or "rate_limit" in text or "resource_exhausted" in text:
        return StreamError(message, status=429, type="rate_limit_error",
                           code=code if code is not None else "rate_limit_exceeded", retryable=True)
    return StreamError(message, code=code if code is not None else "upstream_stream_error", retryable=True)


def _preview(data: bytes) -> str:
    text = data[:80].decode("utf-8", "replace")
    return repr(text + ("..." if len(data) > 80 else ""))


def run_fold(fold, batches: Iterable[list[tuple[bytes, bytes]]]) -> dict:
    """Feed batches of ``(event, data)`` to a fold until it is done or the stream ends; return its result."""
    feed = fold.feed
    for batch in batches:
        for event, data in batch:
            if feed(event, data):
                return fold.result()
    return fold.result()


def fold_chat(lines: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Fold SSE lines (bytes, without terminators) into a ``chat.completion`` dict."""
    return run_fold(ChatFold(max_bytes), batches_from_lines(lines))


def fold_chat_chunks(chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Fold raw network reads (split anywhere) into a ``chat.completion`` dict."""
    return run_fold(ChatFold(max_bytes), iter_event_batches(chunks))
