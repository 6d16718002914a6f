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
SSE client can act on half an event); the relay already knows whether a read
holds ``_tokens"`` (a usage object with counts), and only such a read is
searched further, only the events holding one are parsed and rewritten.
"""
from __future__ import annotations

import orjson


class UsageStripper:
    """Feed it the upstream's reads in order; send what ``feed`` and ``finish`` return."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes, tokens: bool) -> bytes:
        """``tokens``: whether ``data`` contains ``_tokens"`` (the relay tests that anyway)."""
        if self.held:
            joint = len(self.held)
            data = self.held + data
            # a usage object may have started in the held part, or "_tokens" straddle the two
            tokens = tokens or b'_tokens"' in data[:joint + 8]
        end = _boundary(data)
        self.held = data[end:]
        if not end:
            return b""
        return self._strip(data[:end]) if tokens else data[:end]

    def finish(self) -> bytes:
        """What is still held when the stream ends (a last event without its blank line)."""
        data, self.held = self.held, b""
        return self._strip(data) if b'_tokens"' in data else data

    def _strip(self, data: bytes) -> bytes:
        """``data`` (whole events) with each usage object handled; only those events are touched.

        Found from their ``..._tokens"`` keys backwards, so a big read costs a
        few short searches, not a scan per event.
        """
        has_cr = b"\r" in data
        out, at = [], 0
        while True:
            found = data.find(b'_tokens"', at)
            if found < 0:
                break
            usage = data.rfind(b'"usage"', at, found)
            if usage < 0:  # "max_tokens" or the like outside a usage object
                at = found + 8
                continue
            start = _after_last(data, b"\n\n", at, usage)
            if has_cr:
                start = max(start, _after_last(data, b"\r\r", at, usage), _after_last(data, b"\n\r\n", at, usage))
            end, separator_end = _next_boundary(data, found, has_cr)
            out.append(data[at:start])
            out.append(_strip_event(data[start:end], data[end:separator_end]))
            at = separator_end
        if not out:
            return data
        out.append(data[at:])
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


def _after_last(data: bytes, separator: bytes, start: int, end: int) -> int:
    found = data.rfind(separator, start, end)
    return found + len(separator) if found >= 0 else start


def _next_boundary(data: bytes, at: int, has_cr: bool) -> tuple[int, int]:
    """Where the event holding ``at`` ends, and where its separator ends (the data's end if it has none)."""
    best = (len(data), len(data))
    for separator in ((b"\r\n\r\n", b"\n\n", b"\r\r") if has_cr else (b"\n\n",)):
        found = data.find(separator, at)
        if 0 <= found < best[0]:
            best = (found, found + len(separator))
    return best


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
