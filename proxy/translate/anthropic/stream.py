"""Chat stream events -> Anthropic Messages SSE events: the state machine of translation.md §1.4.

Pure: ``ChatStream`` events in (see ``proxy.translate.chat_stream``), bytes
out. The invariants Claude Code depends on hold by construction:

- one ``message_start``, first;
- block indices 0, 1, 2... in order, never reused, at most one block open;
  every delta matches its block's type (a ``thinking_delta`` never goes into
  a text block: litellm#33224);
- tool calls are held until the end of the stream and then each sent as one
  ``tool_use`` block with ONE ``input_json_delta`` of valid JSON (repaired
  when the model wrote broken JSON, ``{}`` when empty). Local models do
  write broken JSON, and Claude Code only acts on the complete input anyway;
  holding them also keeps blocks strictly sequential when the upstream
  interleaves the arguments of parallel calls;
- on success one ``message_delta`` (stop reason, usage) then one
  ``message_stop``; a stream that broke instead ends with ``event: error``
  and no ``message_stop`` (never a clean ending for a broken answer).

Hot path: deltas are written from byte templates, only the text is
JSON-encoded.
"""
from __future__ import annotations

from typing import Any, Collection, Iterable

import orjson

from ..tools import ToolNames, sanitize_tool_id
from .errors import FIXED_ERROR_EVENT, error_event
from .response import new_message_id, stop_fields, tool_input, usage

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_TEXT_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' \
              b'"delta":{"type":"text_delta","text":%s}}\n\n'
_THINKING_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' \
                  b'"delta":{"type":"thinking_delta","thinking":%s}}\n\n'
_TEXT_PRE = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' \
            b'"delta":{"type":"text_delta","text":"'
_THINKING_PRE = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,' \
                b'"delta":{"type":"thinking_delta","thinking":"'
_TEXT_POST = b'"}}\n\n'
_TEXT_START = b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,' \
              b'"content_block":{"type":"text","text":""}}\n\n'
_THINKING_START = b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,' \
                  b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
# The last resort of ``fail``: written without anything that could fail
_FIXED_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"%s","type":"message",'
                b'"role":"assistant","model":"","content":[],"stop_reason":null,"stop_sequence":null,'
                b'"usage":{"input_tokens":0,"output_tokens":0}}}\n\n')


def frame(kind: str, payload: dict) -> bytes:
    """One SSE event: ``event: <type>`` and its JSON data."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessageStream:
    """One Anthropic event stream being written from one upstream chat stream."""

    __slots__ = ("model", "names", "input_tokens", "message_id", "started", "ended", "next_index",
                 "open_kind", "open_index", "tools", "emitted_tool", "finish", "matched", "stops", "usage")

    def __init__(self, model: str, names: ToolNames, input_tokens: int = 0, stops: Collection[str] = ()) -> None:
        self.model = model                # the name the client asked for
        self.names = names
        self.stops = stops                # the client's stop_sequences
        self.input_tokens = input_tokens  # the estimate, until the upstream reports usage
        self.message_id = new_message_id()
        self.started = False
        self.ended = False
        self.next_index = 0
        self.open_kind: str | None = None  # "text" | "thinking" | None
        self.open_index = -1
        self.tools: list[Any] = []        # started ToolCalls, sent at the end
        self.emitted_tool = False
        self.finish: str | None = None
        self.matched: str | None = None   # the stop string that ended it, as vLLM reports it
        self.usage: dict | None = None

    def start(self) -> bytes:
        """``message_start`` (once; later calls give ``b""``)."""
        if self.started:
            return b""
        message = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        data = frame("message_start", {"type": "message_start", "message": message})
        self.started = True
        return data

    def feed(self, events: Iterable[tuple]) -> bytes:
        """The Anthropic events for a run of ``ChatStream`` events."""
        out: list[bytes] = []
        self.feed_into(out, events)
        return b"".join(out)

    def feed_into(self, out: list[bytes], events: Iterable[tuple]) -> None:
        """``feed``, its events appended to ``out`` (the runner joins one write per upstream read)."""
        if self.ended:
            return
        if not self.started:
            out.append(self.start())
        for event in events:
            kind = event[0]
            if kind == "run":  # ("run", TextRun): plain deltas as JSON string bodies (chat_reads)
                run = event[1]
                if run[0] == "text":
                    if self.open_kind != "text":
                        out.append(self._open("text", _TEXT_START))
                    pre, post = _TEXT_PRE % self.open_index, _TEXT_POST
                else:
                    if self.open_kind != "thinking":
                        out.append(self._open("thinking", _THINKING_START))
                    pre, post = _THINKING_PRE % self.open_index, _TEXT_POST
                out += (pre, (post + pre).join(run[1]), post)  # = one _TEXT_DELTA per body, joined once by the runner
            elif kind == "text":
                if self.open_kind != "text":
                    out.append(self._open("text", _TEXT_START))
                out.append(_TEXT_DELTA % (self.open_index, orjson.dumps(event[1])))
            elif kind == "reasoning":
                if self.open_kind != "thinking":
                    out.append(self._open("thinking", _THINKING_START))
                out.append(_THINKING_DELTA % (self.open_index, orjson.dumps(event[1])))
            elif kind == "tool_start":
                self.tools.append(event[1])
            elif kind == "finish":
                self.finish, self.matched = event[1], event[2]
            elif kind == "usage":
                self.usage = event[1]
            # "tool_args": the ToolCall keeps its fragments; they are sent whole at the end

    def close(self, events: Iterable[tuple], ended_early: bool) -> bytes:
        """The end of the stream: the last events (from ``ChatStream.close``), then the tools and the stop.

        ``ended_early``: the upstream was cut off (no ``[DONE]``, no finish
        reason), so the answer is incomplete: ``event: error`` instead.
        """
        if self.ended:
            return b""
        if ended_early:
            return self.fail(502, "upstream stream ended early")
        out = [self.feed(events)]
        out.append(self._close_open())
        for tool in self.tools:
            out.append(self._tool_block(tool))
        self.tools = []
        reason, sequence = stop_fields(self.finish, self.emitted_tool, self.matched, self.stops)
        delta_usage = usage(self.usage)
        if self.usage is None:
            delta_usage["input_tokens"] = self.input_tokens
        out.append(frame("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": delta_usage}))
        out.append(_MESSAGE_STOP)
        self.ended = True
        return b"".join(out)

    def fail(self, status: int, message: str) -> bytes:
        """``event: error`` for a stream that broke after it was committed; nothing may follow it.

        It cannot fail itself: should writing the events raise (a bug elsewhere left a value that cannot
        be written), fixed bytes say the same.
        """
        if self.ended:
            return b""
        self.ended = True
        try:
            return self.start() + error_event(status, message)
        except Exception:  # noqa: BLE001 - the stream must still end with its error event
            head = b"" if self.started else _FIXED_START % self.message_id.encode()
            self.started = True
            return head + FIXED_ERROR_EVENT

    # -- blocks ------------------------------------------------------------
    def _open(self, kind: str, template: bytes) -> bytes:
        closing = self._close_open()
        self.open_kind, self.open_index = kind, self.next_index
        self.next_index += 1
        return closing + template % self.open_index

    def _close_open(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return _STOP % self.open_index

    def _tool_block(self, tool: Any) -> bytes:
        index = self.next_index
        self.next_index += 1
        self.emitted_tool = True
        name = self.names.to_client(tool.name) if tool.name else f"tool_{tool.index}"
        block = {"type": "tool_use", "id": sanitize_tool_id(tool.id or ""), "name": name, "input": {}}
        arguments = orjson.dumps(tool_input(tool.arguments)).decode()
        return (frame("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
                + frame("content_block_delta", {"type": "content_block_delta", "index": index,
                                                "delta": {"type": "input_json_delta", "partial_json": arguments}})
                + _STOP % index)
