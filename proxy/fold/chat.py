"""Fold a chat-completion event stream into the one ``chat.completion`` a JSON server would send.

Pure: lines (bytes) in, a dict out, or a ``StreamError``. No Flask, no
requests. The rules are the SPEC's "Folding SSE" section; the quirks of real
servers it names (Ollama's ``finish_reason: ""``, tool calls without
``index``, indexes starting at 1, usage on every chunk, Azure's empty first
chunk, llama.cpp's extra blank lines...) are ordinary input here.

Speed matters (this runs for every forced request): each text fragment is
appended to a list and joined once at the end, never ``+=``-ed, and the
per-chunk loop touches each key once.

Untrusted input: ``max-aggregate-bytes`` bounds everything the fold holds (text
fragments with their overhead, unknown fields, logprobs, usage, one charge per
choice and tool-call index; ``guard.held`` estimates it), and the SSE framing
counts the partial line it buffers against the same budget. Valid JSON of the
wrong shape (``choices: [1]``, ``delta`` as a list...) is a 502 naming the
problem, never a crash: the loops run unchecked and a ``TypeError`` or
``AttributeError`` is turned into ``guard.wrong_shape`` afterwards.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable

import orjson

from ..errors import StreamError
from . import guard
from .base import DEFAULT_MAX_BYTES, DONE, kept_finish, preview, refused_data, run_fold, stream_error
from .choice import Choice as _Choice
from .choice import render_choice as _render_choice
from .guard import CONTAINER_FACTOR, EXACT_ABOVE, FRAGMENT, Budget, held
from .sse import batches_from_lines, iter_event_batches
from .tool_calls import ToolCalls

__all__ = ["DEFAULT_MAX_BYTES", "ChatFold", "fold_chat", "fold_chat_chunks", "run_fold", "stream_error"]

# Top-level fields taken from the first chunk that has a non-empty value.
_FIRST = frozenset(("id", "created", "model", "system_fingerprint"))
# Stream-only fields that a JSON answer never has.
_DROP = frozenset(("object", "obfuscation"))
_REASONING = ("reasoning_content", "reasoning")


class ChatFold(Budget):
    """Accumulates decoded chunks; ``result()`` gives the ``chat.completion``.

    Use ``fold_chat``/``fold_chat_chunks`` unless you feed events yourself.
    """

    __slots__ = ("first", "settled", "extra", "choices", "usage", "done", "repair")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(max_bytes)
        self.first: dict[str, Any] = {}
        self.settled = set(_DROP)  # top-level keys with nothing left to take
        self.extra: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage = None
        self.done = False
        self.repair = False  # the slow JSON path ran: strings may hold UTF-16 surrogates to join

    # -- input -------------------------------------------------------------
    def feed(self, event: bytes, data: bytes) -> bool:
        """Take one SSE event; True (and ``done``) once ``[DONE]`` has arrived."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = refused_data(data)  # blank data, [DONE], or JSON only the slow parser reads
            if chunk is None or chunk is DONE:
                if chunk is DONE:
                    self.done = True
                return self.done
            self.repair = True  # the slow JSON path ran: strings may hold UTF-16 surrogates to join
        if type(chunk) is not dict:
            raise StreamError(f"upstream sent an event that is not a JSON object: {preview(data)}")
        if event == b"error":
            raise stream_error(chunk)
        settled = self.settled
        self.event = data
        try:
            for key, value in chunk.items():
                if key in settled:
                    continue
                if key == "choices":
                    if value:
                        self._choices(value)
                elif key == "usage":
                    if value is not None:  # replaced, never accumulated: charge it, credit the old one
                        # NIM sends it on every chunk: the cheap bound unless the event is big
                        size = len(data)
                        cost = CONTAINER_FACTOR * size if size <= EXACT_ABOVE else self._cost(value)
                        self.size += cost - self.usage_cost
                        self.usage, self.usage_cost = value, cost
                elif key in _FIRST:
                    if value:
                        self.first[key] = value
                        self.size += held(value)
                        settled.add(key)  # first non-empty value wins; skip this key from now on
                    else:
                        self.first.setdefault(key, value)
                elif key == "error":
                    if value is not None:
                        raise stream_error(chunk)
                else:
                    self._keep(self.extra, key, value)
        except (AttributeError, TypeError):
            self.event = b""  # a failed fold must not keep the line alive (nor should result())
            raise guard.wrong_shape(chunk) from None
        except StreamError:
            self.event = b""
            raise
        if self.size > self.max_bytes:
            self.event = b""
            raise guard.too_large(self.max_bytes)
        return False

    def _choices(self, choices: list) -> None:
        states = self.choices
        for raw in choices:
            index = raw.get("index", 0)
            state = states.get(index) or self._new_choice(index)
            extra = state.extra
            for key, value in raw.items():
                if key == "delta":
                    if value:
                        self._delta(state, value)
                elif key == "index":
                    continue
                elif key == "finish_reason":
                    if value:  # Ollama sends "" on every non-final chunk
                        state.finish = kept_finish(state.finish, value)  # the last (base.kept_finish)
                        self.size += held(value)  # sent once per choice, normally
                elif key == "logprobs":
                    if value is not None:
                        self._logprobs(state, value)
                elif key in _DROP:
                    continue
                else:
                    self._keep(extra, key, value)

    def _new_choice(self, index: Any) -> _Choice:
        if type(index) is not int:
            raise StreamError(f"upstream sent a chunk of the wrong shape: a choice index is {index!r}, "
                              "not an integer", code="upstream_bad_chunk")
        self.size += guard.CHOICE_COST
        state = self.choices[index] = _Choice()
        return state

    def _delta(self, state: _Choice, delta: dict) -> None:
        for key, value in delta.items():
            if key == "content":
                if value:
                    state.content.append(value)
                    self.size += len(value) + FRAGMENT
            elif key in _REASONING:
                parts = state.texts.get(key)
                if parts is None:
                    parts = state.texts[key] = []
                if value:
                    parts.append(value)
                    self.size += len(value) + FRAGMENT
            elif key == "tool_calls":
                if value:
                    self._tool_calls(state, value)
            elif key == "role":
                if value and state.role is None:
                    state.role = value
                    self.size += held(value)
            elif key == "refusal":
                if state.refusal is None:
                    state.refusal = []
                if value:
                    state.refusal.append(value)
                    self.size += len(value) + FRAGMENT
            elif key == "function_call":
                if value:
                    (state.tools or self._new_tools(state)).legacy(value)
            elif key == "audio":
                if value is not None:
                    self._audio(state, value)
            else:
                self._keep(state.message_extra, key, value)

    def _audio(self, state: _Choice, audio: dict) -> None:
        """``delta.audio`` as the openai SDK accumulates it: strings (id, data, transcript) concatenated."""
        if state.audio is None:
            state.audio = ({}, {})
            self.size += guard.CHOICE_COST
        texts, other = state.audio
        for key, value in audio.items():
            if type(value) is str:
                parts = texts.get(key)
                if parts is None:
                    parts = texts[key] = []
                    other.pop(key, None)
                parts.append(value)
                self.size += len(value) + FRAGMENT
            elif key not in texts:
                self._keep(other, key, value)

    def _tool_calls(self, state: _Choice, deltas: list) -> None:
        add = (state.tools or self._new_tools(state)).add  # the one assembler (fold/tool_calls.py)
        for delta in deltas:
            add(delta)

    def _new_tools(self, state: _Choice) -> ToolCalls:
        tools = state.tools = ToolCalls(self, self._keep)  # charged to this fold; unknown fields kept
        return tools

    def _logprobs(self, state: _Choice, logprobs: dict) -> None:
        """As the SDK does: the first logprobs object is taken as sent (``content: []`` stays a list),
        later ones extend it."""
        first = state.logprobs is None
        if first:
            state.logprobs = {"content": None, "refusal": None}
            self.size += guard.CHOICE_COST
        kept = state.logprobs
        for key, items in logprobs.items():
            if key not in ("content", "refusal"):
                self._keep(kept, key, items)
                continue
            if items is None or (not items and not first):
                continue
            if type(items) is not list:
                raise guard.wrong_shape({"choices": [{"logprobs": logprobs}]})
            have = kept[key]
            if have is None:
                have = kept[key] = []
            have.extend(items)
            self.size += self._accumulated(items)

    # -- output ------------------------------------------------------------
    def result(self) -> dict:
        """The folded ``chat.completion``, or ``StreamError`` if the stream was not complete."""
        states = self.choices
        try:
            choices = [_render_choice(index, states[index]) for index in sorted(states)]
        except TypeError:  # a text field that was a list or an object
            raise StreamError("upstream sent a chunk of the wrong shape: a text field is not a string",
                              code="upstream_bad_chunk") from None
        return self._envelope("chat.completion", "chatcmpl-", choices)

    def _envelope(self, kind: str, id_prefix: str, choices: list[dict]) -> dict:
        """Check the stream was complete, then wrap rendered choices with the top-level fields."""
        self.event = b""
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
        if self.repair:
            try:
                out = guard.repair_surrogates(out)
            except RecursionError:
                raise StreamError("upstream sent JSON nested too deeply", code="upstream_bad_chunk") from None
        return out


def fold_chat(lines: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Fold SSE lines (bytes, without terminators) into a ``chat.completion`` dict."""
    fold = ChatFold(max_bytes)
    return run_fold(fold, batches_from_lines(lines, fold))


def fold_chat_chunks(chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Fold raw network reads (split anywhere) into a ``chat.completion`` dict."""
    fold = ChatFold(max_bytes)
    return run_fold(fold, iter_event_batches(chunks, fold))
