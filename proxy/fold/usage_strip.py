"""Remove from a relayed chat stream the usage the proxy asked for and the client did not.

The proxy adds ``stream_options.include_usage`` to streamed chat requests so
usage can be recorded; a client that did not ask must get the stream it would
have got without it: no extra ``choices: []`` chunk carrying ``usage``, and no
``usage`` object on a content chunk (llama.cpp and DeepSeek put it on the
finish chunk). ``"usage": null`` fields (OpenAI adds one to every chunk when
usage is requested) are left alone: SDKs read an absent and a null usage alike,
and touching every chunk would cost a parse per read.

Pure bytes in, bytes out. Cheap on the common read: one ``rfind`` for the last
event boundary (an incomplete trailing event is held until its end arrives: no
SSE client can act on half an event) and one substring test; events are only
split and parsed in a read that holds a non-null usage.
"""
from __future__ import annotations

import re

import orjson

_EVENT = re.compile(rb"(.*?)(\r\n\r\n|\n\n|\r\r|\n\r\n|\r\n\n)", re.S)


class UsageStripper:
    """Feed it the upstream's reads in order; send what ``feed`` and ``finish`` return."""

    __slots__ = ("held", "usage")

    def __init__(self) -> None:
        self.held = b""
        self.usage = b""  # the last complete events that carried token counts (for usage recording)

    def feed(self, data: bytes) -> bytes:
        if self.held:
            data = self.held + data
        end = _boundary(data)
        self.held = data[end:]
        return self._strip(data[:end]) if end else b""

    def finish(self) -> bytes:
        """What is still held when the stream ends (a last event without its blank line)."""
        data, self.held = self.held, b""
        return self._strip(data) if data else b""

    def _strip(self, data: bytes) -> bytes:
        if b'"usage"' not in data:
            return data
        if b'_tokens"' in data:
            self.usage = data
        nulls = data.count(b'"usage":null') + data.count(b'"usage": null')
        if data.count(b'"usage"') == nulls:
            return data
        out, at = [], 0
        for match in _EVENT.finditer(data):
            out.append(_strip_event(match.group(1), match.group(2)))
            at = match.end()
        if at < len(data):  # the stream's last event, ended by the close instead of a blank line
            out.append(_strip_event(data[at:], b""))
        return b"".join(out)


def _boundary(data: bytes) -> int:
    """Index just past the last complete event in ``data`` (0 when there is none)."""
    end = data.rfind(b"\n\n")
    end = end + 2 if end >= 0 else 0
    if b"\r" in data:
        for separator in (b"\r\n\r\n", b"\r\r", b"\n\r\n"):
            found = data.rfind(separator)
            if found >= 0:
                end = max(end, found + len(separator))
    return end


def _strip_event(event: bytes, separator: bytes) -> bytes:
    """The event without its usage, or ``b""`` for a usage-only chunk; unchanged when it has none."""
    if b'"usage"' not in event:
        return event + separator
    lines = event.splitlines()  # only this event's bytes; its JSON came from one data: line
    data_lines = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
    if len(data_lines) != 1:
        return event + separator
    index = data_lines[0]
    try:
        chunk = orjson.loads(lines[index][5:])
    except orjson.JSONDecodeError:
        return event + separator
    if not isinstance(chunk, dict) or chunk.get("usage") is None:
        return event + separator
    if chunk.get("choices") == []:
        return b""
    del chunk["usage"]
    lines[index] = b"data: " + orjson.dumps(chunk)
    newline = b"\r\n" if b"\r\n" in separator else b"\n"
    return newline.join(lines) + separator
