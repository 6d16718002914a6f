"""The Responses event stream for a chat stream: a state machine over ``ChatStream`` events (§2.4).

Invariants it keeps (tests/responses_invariants.py checks them): one
response id; ``sequence_number`` strictly increasing from 0; every item
``output_item.added`` -> its deltas -> its ``*.done`` events ->
``output_item.done`` carrying the whole item; one item open at a time except
tool calls (parallel calls stream side by side, as upstreams send them);
exactly one terminal event. The terminal object is built by ``response``'s
functions from what was streamed, so it equals the non-stream translation
of the fold of the same chat stream.

Terminal events: ``response.completed``; ``response.incomplete`` for a
length or content-filter finish, except for Codex clients, which end a turn
on nothing but ``response.completed`` (openai/codex ``sse/responses.rs``) and
so get ``response.completed`` with ``status: incomplete``; after an error
(or an upstream cut off before its finish) ``response.failed`` for Codex,
``error`` for other clients, as CPA does. A failure leaves the items it cut
off open (no ``*.done`` events): clients record every ``output_item.done``
item as finished output, and the failed response lists only those.
"""
from __future__ import annotations

from itertools import repeat

import orjson

from ...fold.guard import clean
from ...fold.tool_calls import ToolCall
from ..chat_stream import Held
from .response import Context, call_item, envelope, message_item, overflow, reasoning_item, status_of, usage_of


def _prefix(kind: str) -> bytes:
    return b'event: %s\ndata: {"type":"%s","sequence_number":' % (kind.encode(), kind.encode())


_TEXT_DELTA = _prefix("response.output_text.delta")
_SUMMARY_DELTA = _prefix("response.reasoning_summary_text.delta")
_ARGS_DELTA = _prefix("response.function_call_arguments.delta")
_TEXT_TAIL = b',"logprobs":[]}\n\n'
_TAIL = b"}\n\n"
INTERNAL = "The proxy hit an internal error; see its log for details."
# The last-resort terminal events (and opening), written without anything that could fail
_CREATED = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
            b'"response":{"id":"%s","object":"response","status":"in_progress","output":[]}}\n\n')
_FAILED = (b'event: response.failed\ndata: {"type":"response.failed","sequence_number":%d,"response":{"id":"%s",'
           b'"object":"response","status":"failed","output":[],"error":{"code":"server_error","message":"'
           + INTERNAL.encode() + b'"}}}\n\n')
_ERROR = (b'event: error\ndata: {"type":"error","sequence_number":%d,"code":"server_error","message":"'
          + INTERNAL.encode() + b'","param":null}\n\n')
# sequence_number digits for the first events of a stream (~190 KB per worker): with them a run of deltas is
# one C-level interleave and join instead of a %-format per event, ~3x cheaper (see ``literals``)
_NUMBERS = [b"%d" % n for n in range(4096)]


class ResponsesStream:
    __slots__ = ("ctx", "codex", "seq", "items", "kind", "open_index", "open_id", "parts", "tools",
                 "middle", "calls", "texts", "reasonings", "finish", "usage", "final", "error", "ended", "internal",
                 "held")

    def __init__(self, ctx: Context, codex: bool = False, held: Held | None = None) -> None:
        self.ctx = ctx
        self.codex = codex
        # The text is held for the *.done events and the stored answer, tool arguments by ChatStream: both are
        # charged here, so what the *.done events and the terminal object repeat is bounded as well.
        self.held = held
        self.seq = 0
        self.items: list[dict | None] = []     # by output_index: the done item, None while open
        self.kind: str | None = None           # "reasoning" or "message" while one is open
        self.open_index = 0
        self.open_id = ""
        self.parts: list[str] = []             # the open reasoning/message item's text so far
        self.middle = b""                      # its delta events' bytes between sequence_number and delta
        self.tools: dict[int, tuple] = {}      # open calls: id(call) -> (call, index, custom, delta middle)
        self.calls: list[ToolCall] = []        # every call started, in order
        self.texts: list[str] = []             # all text and reasoning, for the stored history
        self.reasonings: list[str] = []
        self.finish: str | None = None
        self.usage: dict | None = None
        self.final: dict | None = None         # the terminal event's response object
        self.error: str | None = None          # why the stream failed, once it has
        self.ended = False                     # the terminal event was written
        self.internal: str | None = None       # the exception's type when the proxy itself failed (for the log)

    # -- framing ----------------------------------------------------------------------
    def _delta(self, out: list[bytes], prefix: bytes, middle: bytes, encoded: bytes, tail: bytes) -> None:
        # The per-token events are written from pre-built pieces: a dict and a full dumps per token
        # was most of the bridge's CPU cost (bench/run.py, "bridged /v1/responses ... CPU").
        out.append(b"%s%d%s%s%s" % (prefix, self.seq, middle, encoded, tail))
        self.seq += 1

    def _event(self, out: list[bytes], kind: str, payload: dict) -> None:
        # ``type`` and ``sequence_number`` first, as OpenAI writes them; ``payload`` is never empty
        name = kind.encode()
        out.append(b'event: %s\ndata: {"type":"%s","sequence_number":%d,%s\n\n'
                   % (name, name, self.seq, orjson.dumps(payload)[1:]))
        self.seq += 1

    def start(self) -> bytes:
        response = orjson.dumps(envelope(self.ctx, "in_progress", []))  # once for both events
        seq, self.seq = self.seq, self.seq + 2
        return (b'event: response.created\ndata: {"type":"response.created","sequence_number":%d,"response":%s}\n\n'
                b'event: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":%d,'
                b'"response":%s}\n\n' % (seq, response, seq + 1, response))

    # -- chat events ----------------------------------------------------------------------
    def feed(self, events: list[tuple]) -> bytes:
        """The Responses events for some ``ChatStream`` events."""
        out: list[bytes] = []
        self.feed_into(out, events)
        return b"".join(out)

    def literals(self, out: list[bytes], kind: str, bodies: list[bytes]) -> None:
        """Text or reasoning deltas given as JSON string literal bodies (a ``chat_reads.TextRun``): written as
        they came (each is what ``orjson.dumps`` of its text gives), their text decoded once; never empty (the
        reader leaves empty ones out of a run)."""
        text = orjson.loads(b'"%s"' % b"".join(bodies))
        if self.held is not None:
            self.held.charge(text)
        if kind == "text":
            if self.kind != "message":
                self._open(out, "message")
            self.texts.append(text)
            prefix, tail = _TEXT_DELTA, _TEXT_TAIL
        else:
            if self.kind != "reasoning":
                self._open(out, "reasoning")
            self.reasonings.append(text)
            prefix, tail = _SUMMARY_DELTA, _TAIL
        self.parts.append(text)
        seq, middle, count = self.seq, self.middle, len(bodies)
        self.seq = seq + count
        if seq + count > len(_NUMBERS):
            out += [b'%s%d%s"%s"%s' % (prefix, seq + i, middle, body, tail) for i, body in enumerate(bodies)]
            return
        # prefix, then per event: number, middle + quote, body, quote + tail + the next event's prefix
        pieces = [b'"%s%s' % (tail, prefix)] * (4 * count)
        pieces[0::4] = _NUMBERS[seq:seq + count]
        pieces[1::4] = repeat(middle + b'"', count)
        pieces[2::4] = bodies
        pieces[-1] = b'"%s' % tail
        out.append(prefix)
        out.append(b"".join(pieces))

    def feed_into(self, out: list[bytes], events: list[tuple]) -> None:
        for event in events:
            kind = event[0]
            if kind == "run":  # ("run", TextRun): plain deltas as JSON string bodies (chat_reads)
                run = event[1]
                self.literals(out, run[0], run[1])
            elif kind == "text":
                if self.held is not None:
                    self.held.charge(event[1])
                if self.kind != "message":
                    self._open(out, "message")
                self.parts.append(event[1])
                self.texts.append(event[1])
                self._delta(out, _TEXT_DELTA, self.middle, orjson.dumps(event[1]), _TEXT_TAIL)
            elif kind == "reasoning":
                if self.held is not None:
                    self.held.charge(event[1])
                if self.kind != "reasoning":
                    self._open(out, "reasoning")
                self.parts.append(event[1])
                self.reasonings.append(event[1])
                self._delta(out, _SUMMARY_DELTA, self.middle, orjson.dumps(event[1]), _TAIL)
            elif kind == "tool_args":
                entry = self.tools.get(id(event[1]))
                # A custom call's input is sent whole at the end (it is unwrapped from JSON). Items close only
                # at the end, so arguments after a finish_reason are still deltas of the call's open item.
                if entry is not None and not entry[2]:
                    self._delta(out, _ARGS_DELTA, entry[3], orjson.dumps(event[2]), _TAIL)
            elif kind == "tool_start":
                self._start_tool(out, event[1])
            elif kind == "finish":
                self.finish = event[1]  # items are closed at the end, with the status of the last one
            elif kind == "usage":
                self.usage = event[1]

    def close(self, events: list[tuple], ended_early: bool) -> bytes:
        """The last events: ``events`` from ``ChatStream.close``, then the terminal event."""
        out: list[bytes] = []
        self.close_into(out, events, ended_early)
        return b"".join(out)

    def close_into(self, out: list[bytes], events: list[tuple], ended_early: bool) -> None:
        """``close``, its events appended to ``out`` one by one (a large answer is not copied to be joined)."""
        self.feed_into(out, events)
        if ended_early:
            out.append(self.fail("upstream stream ended before the answer was complete",
                                 "upstream_stream_ended_early"))
            return
        status, incomplete = status_of(self.finish)
        self._close_all(out, status)
        self.final = envelope(self.ctx, status, self.done_items(), usage_of(self.usage), incomplete)
        kind = "response.incomplete" if status == "incomplete" and not self.codex else "response.completed"
        self._event(out, kind, {"response": self.final})
        self.ended = True

    def fail(self, message: str, code: str | int | None) -> bytes:
        """The terminal event for an error after the 200 went out (``b""`` once a terminal event was written).

        It cannot fail itself: the message is cleaned of what ``orjson`` refuses, and should writing the
        event still raise (a bug elsewhere left a value it cannot write), a fixed event says the same.
        Open items get no ``*.done`` events (see below; their text would also only be sent again).
        """
        if self.ended:
            return b""
        self.ended = True
        message = clean(message)
        self.error = message
        if overflow(message):
            code = "context_length_exceeded"  # what makes Codex compact instead of retrying
        code = clean(str(code)) if code is not None else "server_error"
        opening = b"" if self.seq else self._opening()
        out = [opening]
        try:
            # The item the failure cut off gets no done events: a client keeps every ``output_item.done`` item as
            # a finished part of the answer (Codex sends it back on its retry, where each failed attempt stacked
            # another fragment); the Responses API ends a failed response with ``response.failed`` alone.
            if self.codex:
                self.final = envelope(self.ctx, "failed", self.done_items(), usage_of(self.usage),
                                      error={"code": code, "message": message})
                self._event(out, "response.failed", {"response": self.final})
            else:
                self._event(out, "error", {"code": code, "message": message, "param": None})
            return b"".join(out)
        except Exception:  # noqa: BLE001 - the stream must still end with its terminal event
            seq, self.seq = self.seq, self.seq + 1
            if not self.codex:
                return opening + _ERROR % seq
            self.final = {"id": self.ctx.id, "object": "response", "status": "failed", "output": [],
                          "error": {"code": "server_error", "message": INTERNAL}}
            return opening + _FAILED % (seq, self.ctx.id.encode())

    def _opening(self) -> bytes:
        """``response.created`` for a stream whose opening events could not be written: fixed bytes."""
        self.seq = 1
        return _CREATED % self.ctx.id.encode()

    # -- what was streamed ----------------------------------------------------------------
    def done_items(self) -> list[dict]:
        return [item for item in self.items if item is not None]

    def history_parts(self) -> tuple[str, str, list[tuple[str, str, str]]]:
        """``(reasoning, text, calls)`` of the answer, for the stored conversation."""
        calls = [(call.id, call.name, call.arguments) for call in self.calls]
        return "".join(self.reasonings), "".join(self.texts), calls

    # -- items ------------------------------------------------------------------------------

    def _open(self, out: list[bytes], kind: str) -> None:
        self._close_open(out, "completed")
        index = len(self.items)
        self.items.append(None)
        count = sum(1 for item in self.items if item is not None and item["type"] == kind)
        item_id = ("rs_" if kind == "reasoning" else "msg_") + self.ctx.suffix + (f"_{count}" if count else "")
        self.kind, self.open_index, self.open_id, self.parts = kind, index, item_id, []
        self.middle = b',"item_id":"%s","output_index":%d,"%s":0,"delta":' % (
            item_id.encode(), index, b"content_index" if kind == "message" else b"summary_index")
        if kind == "message":
            self._event(out, "response.output_item.added", {"output_index": index, "item": {
                "id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}})
            self._event(out, "response.content_part.added", {
                "item_id": item_id, "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        else:
            self._event(out, "response.output_item.added", {"output_index": index, "item": {
                "id": item_id, "type": "reasoning", "status": "in_progress", "summary": []}})
            self._event(out, "response.reasoning_summary_part.added", {
                "item_id": item_id, "output_index": index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}})

    def _close_open(self, out: list[bytes], status: str) -> None:
        kind, index, item_id = self.kind, self.open_index, self.open_id
        if kind is None:
            return
        self.kind = None
        text = "".join(self.parts)
        if kind == "message":
            self._event(out, "response.output_text.done", {
                "item_id": item_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []})
            self._event(out, "response.content_part.done", {
                "item_id": item_id, "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}})
            item = message_item(item_id, text, status)
        else:
            self._event(out, "response.reasoning_summary_text.done", {
                "item_id": item_id, "output_index": index, "summary_index": 0, "text": text})
            self._event(out, "response.reasoning_summary_part.done", {
                "item_id": item_id, "output_index": index, "summary_index": 0,
                "part": {"type": "summary_text", "text": text}})
            item = reasoning_item(item_id, text, status)
        self.items[index] = item
        self._event(out, "response.output_item.done", {"output_index": index, "item": item})

    def _start_tool(self, out: list[bytes], call: ToolCall) -> None:
        self._close_open(out, "completed")
        index = len(self.items)
        self.items.append(None)
        probe = call_item(self.ctx, call.id, call.name, "", "in_progress")
        custom = probe["type"] == "custom_tool_call"
        if custom:
            probe["input"] = ""
        else:
            probe["arguments"] = ""
        middle = b',"item_id":%s,"output_index":%d,"delta":' % (orjson.dumps(probe["id"]), index)
        self.tools[id(call)] = (call, index, custom, middle)
        self.calls.append(call)
        self._event(out, "response.output_item.added", {"output_index": index, "item": probe})

    def _close_all(self, out: list[bytes], status: str) -> None:
        self._close_open(out, status)
        for call, index, custom, _ in sorted(self.tools.values(), key=lambda entry: entry[1]):
            item = call_item(self.ctx, call.id, call.name, call.arguments, status)
            item_id = item["id"]
            if custom:
                if item["input"]:
                    self._event(out, "response.custom_tool_call_input.delta",
                                {"item_id": item_id, "output_index": index, "delta": item["input"]})
                self._event(out, "response.custom_tool_call_input.done",
                            {"item_id": item_id, "output_index": index, "input": item["input"]})
            else:
                if not call.args:  # "{}" for an empty call; the deltas must add up to the final arguments
                    self._event(out, "response.function_call_arguments.delta",
                                {"item_id": item_id, "output_index": index, "delta": item["arguments"]})
                self._event(out, "response.function_call_arguments.done",
                            {"item_id": item_id, "output_index": index, "name": item["name"],
                             "arguments": item["arguments"]})
            self.items[index] = item
            self._event(out, "response.output_item.done", {"output_index": index, "item": item})
        self.tools.clear()
