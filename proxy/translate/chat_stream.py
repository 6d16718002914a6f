"""Read a chat-completion event stream as the bridges need it: semantic events, not chunks.

Every bridge (Anthropic Messages, Responses, Gemini) turns an upstream's chat
chunks into another protocol's events. What they share lives here: decoding
the SSE (the same framing, slow JSON path and in-stream error rules as the
chat fold) and the bookkeeping that real servers make hard: usage on every
chunk or only on a trailer, ``finish_reason: ""`` on every chunk, content and
finish in the same chunk, a tool call's name or id that arrives late or never.
The tool calls themselves (deltas without ``index``, indexes that start at 1,
a whole call in one delta, arguments sent as an object) are assembled by the
fold's assembler, ``fold/tool_calls.ToolCalls``; surrogate halves split between
fragments are joined by ``fold/guard.Halves``.

Pure: bytes and dicts in, tuples out; no Flask, no requests. Only choice 0 is
read (the bridged protocols have no ``n``).

Events, in the order a bridge must emit them (within one chunk: reasoning,
text, tools, finish; usage whenever it comes):

    ("reasoning", text)        ("text", text)
    ("tool_start", tool)       ("tool_args", tool, fragment)
    ("finish", reason, stop)   ("usage", usage)     stop: vLLM's matched stop string, else None
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import orjson

from ..errors import StreamError
from ..fold import guard
from ..fold.base import DONE, kept_finish, refused_data, stream_error
from ..fold.guard import FRAGMENT, REPLACEMENT, Halves
from ..fold.sse import iter_event_batches
from ..fold.tool_calls import ToolCall, ToolCalls
from .completion import first_choice, load

_DONE_DATA = (b" [DONE]", b"[DONE]")  # "data: [DONE]" and "data:[DONE]" (iter_event_batches keeps the space)
_REASONING = ("reasoning_content", "reasoning")


def iter_chat_chunks(reads: Iterable[bytes], max_bytes: int) -> Iterator[dict | str]:
    """Upstream network reads -> decoded chunk dicts in order, then ``DONE`` if the upstream sent it.

    An in-stream error (``{"error": ...}`` or ``event: error``) raises
    ``StreamError`` mapped like the chat fold maps it; so does a data line that
    is not a JSON object, or one event larger than ``max_bytes``.
    """
    for batch in iter_event_batches(reads):
        for event, data in batch:
            chunk = decode_event(event, data, max_bytes)
            if chunk is not None:
                yield chunk
                if chunk is DONE:
                    return


def decode_event(event: bytes, data: bytes, max_bytes: int) -> dict | str | None:
    """One SSE event's data (``iter_event_batches``' pair) as a chunk dict, ``DONE``, or None for blank data;
    the errors as ``iter_chat_chunks`` says."""
    if len(data) > max_bytes:
        raise StreamError(f"one upstream event exceeds max-aggregate-bytes ({max_bytes} bytes)",
                          code="aggregate_too_large")
    if data in _DONE_DATA:  # before the parser: its exception costs more than the whole check
        return DONE
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        chunk = refused_data(data)  # as the fold reads it: blank, [DONE], or the slow path and its guards
        if chunk is None or chunk is DONE:
            return chunk
    if type(chunk) is not dict:
        raise StreamError("upstream sent an event that is not a JSON object")
    if event == b"error" or chunk.get("error") is not None:
        raise stream_error(chunk)
    return chunk


def completion_as_chunk(body: bytes) -> dict:
    """One ``chat.completion`` JSON (a server that ignored ``stream: true``) as the one chunk saying it all.

    The message becomes the delta (content, reasoning, tool calls indexed by
    their place in the message), so it goes through the same ``ChatStream``
    as any stream. An error object or a body that is no completion is the
    ``StreamError`` a stream saying so would give.
    """
    completion = load(body)
    if completion is None:
        raise StreamError("upstream answered a stream request with JSON that does not parse",
                          code="upstream_bad_answer")
    if type(completion) is not dict:
        raise StreamError("upstream answered a stream request with JSON that is not an object",
                          code="upstream_bad_answer")
    if completion.get("error") is not None:
        raise stream_error(completion)
    choice, message = first_choice(completion)
    calls = message.get("tool_calls")
    delta = {k: v for k, v in message.items() if k != "tool_calls"}
    if type(calls) is list:
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(calls) if type(call) is dict]
    chunk = {k: completion[k] for k in ("id", "model", "created") if k in completion}
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason") or "stop",
                         "stop_reason": choice.get("stop_reason")}]  # vLLM's matched stop string, if any
    if type(completion.get("usage")) is dict:
        chunk["usage"] = completion["usage"]
    return chunk


class Held:
    """What one bridged stream holds until its end, against ``max-aggregate-bytes``.

    The bridges pass text through as it comes, but must hold tool arguments
    (Anthropic sends each call's input whole at the end; the Responses
    ``*.done`` events repeat them) and a Responses stream its text too. A
    200 MB tool call was held whole (+824 MB RSS on /v1/messages, +2.2 GB on
    /v1/responses); past the bound the stream ends with its protocol's error
    event instead. Charged as the fold charges: each fragment with its
    overhead (``FRAGMENT``), so a stream of 1-byte fragments is bounded too;
    the tool-call assembler charges each call and its name and id as the fold does.
    """

    __slots__ = ("size", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.size = 0
        self.max_bytes = max_bytes

    def charge(self, text: str) -> None:
        self.size += FRAGMENT + len(text)
        if self.size > self.max_bytes:
            self.over()

    def over(self) -> None:
        """The ``StreamError`` for a stream that holds more than the bound (``size`` was charged past it)."""
        raise StreamError(f"the answer holds more than max-aggregate-bytes ({self.max_bytes} bytes) "
                          "of tool arguments and text", code="aggregate_too_large")


class ChatStream:
    """Turns chat chunks (choice 0) into the events both bridges translate; see the module docstring.

    Its tool calls are the one assembler's (``fold/tool_calls.ToolCalls``, as the fold's), charged to
    ``held``; surrogate halves split between fragments are joined by ``fold/guard.Halves``."""

    __slots__ = ("meta", "usage", "finish_reason", "tools", "ended_early", "plain", "held", "calls", "halves")

    def __init__(self, held: Held | None = None) -> None:
        self.held = held if held is not None else Held(1 << 62)  # charged with what the tool calls hold
        self.meta: dict[str, Any] = {}
        # True once plain text/reasoning chunks change nothing here (the meta is known, no surrogate half is
        # waiting for its other half): the bridges may then write such chunks without feeding them
        self.plain = False
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.tools: list[ToolCall] = []          # in start order
        self.ended_early = False
        # A fragment's trailing surrogate half waits for the next fragment of the same field ("text",
        # "reasoning" or a ToolCall)
        self.halves = Halves()
        self.calls = ToolCalls(self.held, halves=self.halves)

    def feed(self, chunk: dict) -> list[tuple]:
        """The events one chunk carries."""
        events: list[tuple] = []
        meta = self.meta
        for key in ("id", "model", "created"):
            if key not in meta and chunk.get(key):
                meta[key] = chunk[key]
        choices = chunk.get("choices")
        if choices:
            if type(choices) is not list:
                raise StreamError("upstream chunk has `choices` that is not a list")
            for choice in choices:
                if type(choice) is not dict:
                    raise StreamError("upstream chunk has a choice that is not an object")
                if choice.get("index", 0) == 0:
                    try:
                        self._choice(choice, events)
                    except (AttributeError, TypeError):  # a tool call of the wrong shape (the assembler's)
                        raise guard.wrong_shape(chunk) from None
        usage = chunk.get("usage")
        if usage:
            if type(usage) is not dict:
                raise StreamError("upstream chunk has `usage` that is not an object")
            self.usage = usage
            events.append(("usage", usage))
        self.plain = len(meta) == 3 and not self.halves.waiting
        return events

    def close(self, done: bool) -> list[tuple]:
        """At ``[DONE]`` (``done``) or end of stream: start the calls that never got a name or id."""
        events: list[tuple] = []
        self._flush_halves(events)
        for call in self.calls.ordered():
            if not call.started:
                call.name = call.name or f"tool_{call.index}"
                call.id = call.id or f"call_{os.urandom(8).hex()}"
                self._start(call, events)
        self.ended_early = not done and self.finish_reason is None
        return events

    # -- one choice ----------------------------------------------------------
    def _choice(self, choice: dict, events: list[tuple]) -> None:
        delta = choice.get("delta")
        if delta:
            if type(delta) is not dict:
                raise StreamError("upstream chunk has a `delta` that is not an object")
            halves = self.halves
            for key in _REASONING:
                text = delta.get(key)
                if text:
                    text = _text(text, key)
                    if halves.waiting or not text.isascii():
                        text = halves.join("reasoning", text)
                    if text:
                        events.append(("reasoning", text))
                    break
            text = delta.get("content")
            if text:
                text = _text(text, "content")
                if halves.waiting or not text.isascii():
                    text = halves.join("text", text)
                if text:
                    events.append(("text", text))
            calls = delta.get("tool_calls")
            if calls:
                if type(calls) is not list:
                    raise StreamError("upstream chunk has `tool_calls` that is not a list")
                add, held = self.calls.add, self.held
                for call in calls:
                    if type(call) is not dict:
                        raise StreamError("upstream chunk has a tool call that is not an object")
                    call, fragment = add(call)
                    if held.size > held.max_bytes:
                        held.over()
                    if call.started:
                        if fragment:
                            events.append(("tool_args", call, fragment))
                    elif call.id and call.name:
                        self._start(call, events)
            legacy = delta.get("function_call")
            if legacy:
                self.calls.legacy(legacy)  # no id ever comes: the call starts at close, with one made up
                if self.held.size > self.held.max_bytes:
                    self.held.over()
        finish = choice.get("finish_reason")
        # each new explicit one is passed on: the last is kept, as the fold keeps it (fold/base.kept_finish)
        if finish and kept_finish(self.finish_reason, finish) != self.finish_reason:
            if type(finish) is not str:
                raise StreamError("upstream chunk has a `finish_reason` that is not a string")
            self._flush_halves(events)
            self.finish_reason = finish
            stop = choice.get("stop_reason")  # vLLM: the stop string that ended it (an int for a stop token)
            events.append(("finish", finish, stop if type(stop) is str else None))

    def _flush_halves(self, events: list[tuple]) -> None:
        """The answer's end (or its finish): a half still waiting has no other half, it is U+FFFD."""
        for key in self.halves.flush():
            if type(key) is str:
                events.append((key, REPLACEMENT))
                continue
            self.calls.append(key, REPLACEMENT)
            if key.started:
                events.append(("tool_args", key, REPLACEMENT))

    def _start(self, call: ToolCall, events: list[tuple]) -> None:
        """Announce ``call`` (its name and id are known), then the arguments that came before."""
        call.started = True
        self.tools.append(call)
        events.append(("tool_start", call))
        for fragment in call.args:
            events.append(("tool_args", call, fragment))


def _text(value: Any, field: str) -> str:
    if type(value) is str:
        return value
    if type(value) is list:  # some servers send reasoning as a list of {text} parts
        parts = [p.get("text") if type(p) is dict else p for p in value]
        if all(type(p) is str for p in parts):
            return "".join(parts)
    raise StreamError(f"upstream chunk has `{field}` that is not a string")
