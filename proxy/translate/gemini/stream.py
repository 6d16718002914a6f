"""Chat stream events -> Gemini ``streamGenerateContent`` records: one ``GenerateContentResponse`` each.

Pure: ``ChatStream`` events in (see ``proxy.translate.chat_stream``), bytes
out. What Gemini clients rely on holds by construction:

- every record is a whole ``GenerateContentResponse`` with one candidate
  (index 0) whose parts are what is new: a text delta is one ``text`` part,
  a reasoning delta one ``text`` part with ``thought: true`` (only when the
  client asked for thoughts, ``includeThoughts``);
- function calls are held to the end and sent whole, each a ``functionCall``
  part with its ``args`` an object (Gemini clients act on complete calls;
  the arguments are repaired when the model wrote broken JSON);
- exactly one record has a ``finishReason``: the last, which also carries the
  function calls and the only ``usageMetadata``;
- a stream that broke after it was committed ends with an ``{"error": ...}``
  record instead, which ``google-genai`` raises as ``APIError``; never a
  clean-looking end.

Framing: with ``?alt=sse`` (what the SDKs and Gemini CLI ask for) each record
is ``data: <json>\\r\\n\\r\\n``; without it the Gemini API streams one JSON
array whose elements are the records, and so does this (``sse=False``).

Hot path: text deltas are written from byte templates made once per stream;
the chat stream's literal JSON string bodies go in unchanged.
"""
from __future__ import annotations

from typing import Iterable

import orjson

from ..tools import ToolNames
from .errors import error_event
from .response import finish_reason, function_call, new_response_id, usage_metadata

PING = b"\r\n"  # a blank line: skipped by SSE readers, whitespace between array elements
INTERNAL = "The proxy hit an internal error; see its log for details."
_FIXED_ERROR = b'{"error":{"code":500,"message":"' + INTERNAL.encode() + b'","status":"INTERNAL"}}'


class GeminiStream:
    """One Gemini record stream being written from one upstream chat stream."""

    __slots__ = ("model", "names", "thoughts", "prompt_tokens", "response_id", "sse", "started", "ended",
                 "tools", "finish", "usage", "_lead", "_next_lead", "_tail", "_text", "_thought", "_post")

    def __init__(self, model: str, names: ToolNames, *, thoughts: bool = False, prompt_tokens: int = 0,
                 sse: bool = True, response_id: str | None = None) -> None:
        self.model = model                  # the name the client asked for (modelVersion)
        self.names = names
        self.thoughts = thoughts            # includeThoughts: reasoning is sent as thought parts
        self.prompt_tokens = prompt_tokens  # the estimate, when the upstream reports no usage
        self.response_id = response_id or new_response_id()
        self.sse = sse
        self.started = False
        self.ended = False
        self.tools: list = []               # started ToolCalls, sent whole at the end
        self.finish: str | None = None
        self.usage: dict | None = None
        # what goes before a record (the first one's differs in the array form), and after it
        self._lead = b"data: " if sse else b"["
        self._next_lead = b"data: " if sse else b",\r\n"
        self._tail = b"\r\n\r\n" if sse else b""
        head = b'{"candidates":[{"content":{"role":"model","parts":[{"text":"'
        self._post = (b'}]},"index":0}],"modelVersion":' + orjson.dumps(model) + b',"responseId":"'
                      + self.response_id.encode() + b'"}' + self._tail)
        self._text = (head, b'"' + self._post)
        self._thought = (head, b'","thought":true' + self._post)

    def start(self) -> bytes:
        """Nothing: a Gemini stream has no opening record (kept for the bridges' common shape)."""
        self.started = True
        return b""

    def feed(self, events: Iterable[tuple]) -> bytes:
        """The records for a run of ``ChatStream`` events."""
        if self.ended:
            return b""
        self.started = True
        out: list[bytes] = []
        for event in events:
            kind = event[0]
            if kind == "run":  # ("run", TextRun): plain deltas as JSON string bodies (chat_reads)
                run = event[1]
                if run.kind == "text" or self.thoughts:
                    pre, post = self._text if run.kind == "text" else self._thought
                    out += (self._lead, pre, (post + self._next_lead + pre).join(run.bodies), post)
                    self._lead = self._next_lead
            elif kind == "text" or (kind == "reasoning" and self.thoughts):
                pre, post = self._text if kind == "text" else self._thought
                out.append(self._lead + pre + orjson.dumps(event[1])[1:-1] + post)
                self._lead = self._next_lead
            elif kind == "tool_start":
                self.tools.append(event[1])
            elif kind == "finish":
                self.finish = event[1]
            elif kind == "usage":
                self.usage = event[1]
            # "tool_args": the ToolCall keeps its fragments; the call is sent whole at the end
        return b"".join(out)

    def close(self, events: Iterable[tuple], ended_early: bool) -> bytes:
        """The end: the last events (from ``ChatStream.close``), then the one record with the function calls,
        ``finishReason`` and ``usageMetadata``. ``ended_early`` (cut off, no finish): an error record instead."""
        if self.ended:
            return b""
        if ended_early:
            return self.fail(502, "upstream stream ended early")
        body = self.feed(events)
        parts = [function_call(tool.id or "", self.names.to_client(tool.name) if tool.name else f"tool_{tool.index}",
                               tool.arguments) for tool in self.tools]
        self.tools = []
        record = {"candidates": [{"content": {"role": "model", "parts": parts},
                                  "finishReason": finish_reason(self.finish), "index": 0}],
                  "usageMetadata": usage_metadata(self.usage, self.prompt_tokens),
                  "modelVersion": self.model, "responseId": self.response_id}
        self.ended = True
        return body + self._lead + orjson.dumps(record) + self._tail + (b"" if self.sse else b"]")

    def fail(self, status: int, message: str) -> bytes:
        """The error record for a stream that broke after it was committed; nothing may follow it. It cannot
        fail itself: should writing it raise, fixed bytes say the same."""
        if self.ended:
            return b""
        self.ended = True
        try:
            record = error_event(status, message, self.sse)
        except Exception:  # noqa: BLE001 - the stream must still end with its error record
            record = b"data: " + _FIXED_ERROR + b"\r\n\r\n" if self.sse else _FIXED_ERROR
        if self.sse:
            return record
        return self._lead + record + b"]"
