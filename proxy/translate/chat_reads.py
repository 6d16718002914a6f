"""Upstream reads -> per-read batches of chat chunks, with a no-decode fast path for plain text deltas.

Both bridges write one client write per upstream read (as the chat relay
does), so the decoded chunks are grouped by the read they completed in: each
read is cut after its last complete event and the rest waits for the next.

The fast path: almost every chunk of an answer is one text (or reasoning)
delta of choice 0 and nothing else. Such an event is recognised by a strict
bytes pattern over the usual compact layouts (vLLM, SGLang, llama.cpp,
OpenAI: any order of the plain members, ``"finish_reason":null``, no
``usage`` but ``null``, no tool calls, no error, exactly one delta key) and
handed over as ``FastDelta(kind, literal, data)`` without being decoded:
``literal`` is the JSON string literal copied from the upstream bytes. The
pattern only accepts literals that ``orjson.dumps`` would write the same way
(raw UTF-8, only the escapes ``\\" \\\\ \\b \\f \\n \\r \\t``), so writing the literal
is byte-identical to decoding and re-encoding the text. Anything else falls
back to ``iter_chat_chunks`` (the full decode and its error rules).
A consumer whose state needs the whole chunk (its ``id``/``model``/``created``
not known yet) decodes ``data`` instead.

Pure: bytes in, lists out; no Flask, no requests.
"""
from __future__ import annotations

import re
from typing import Generator, Iterable, Iterator, NamedTuple

import orjson

from ..errors import ProxyError, StreamError
from .chat_stream import DONE, ChatStream, iter_chat_chunks


class FastDelta(NamedTuple):
    """A chunk that only carries one text or reasoning delta of choice 0, not decoded."""

    kind: str       # "text" or "reasoning", as ChatStream's events
    literal: bytes  # the JSON string literal, quotes included; b'""' carries nothing
    data: bytes     # the whole chunk's JSON, for a consumer that must decode it after all


_LITERAL = rb'"(?:[^"\\\x00-\x1f]|\\["\\bfnrt])*"'
_ASCII_STRING = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_NUMBER = rb"-?(?:0|[1-9][0-9]{0,17})"
_PLAIN = (rb'"(?:id|object|created|model|system_fingerprint|service_tier|obfuscation)":(?:%s|%s|null)'
          rb'|"usage":null' % (_ASCII_STRING, _NUMBER))
_CHOICE_PLAIN = rb'"index":0|"logprobs":null|"finish_reason":null'
_DELTA = rb'"delta":\{"(content|reasoning_content|reasoning)":(%s)\}' % _LITERAL
_CHOICES = rb'"choices":\[\{(?:(?:%s),)*%s(?:,(?:%s))*\}\]' % (_CHOICE_PLAIN, _DELTA, _CHOICE_PLAIN)
_FAST = re.compile(rb'data: ?(\{(?:(?:%s),)*%s(?:,(?:%s))*\})\n\n' % (_PLAIN, _CHOICES, _PLAIN))
_KINDS = {b"content": "text", b"reasoning_content": "reasoning", b"reasoning": "reasoning"}
_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n")


def read_batches(reads: Iterable[bytes], max_bytes: int, fast: bool = True) -> Iterator[list]:
    """Decoded chunks (dicts, ``FastDelta`` when ``fast``) grouped per upstream read; ``DONE`` ends it.

    An in-stream error raises ``StreamError`` (as ``iter_chat_chunks``) after
    the chunks before it in the same read were yielded. An event that does
    not end within ``max_bytes`` is an error too.
    """
    carry = b""
    for data in reads:
        buf = carry + data if carry else data
        cut = _events_end(buf)
        if not cut:
            carry = buf
            if len(carry) > max_bytes:
                raise StreamError(f"one upstream event exceeds max-aggregate-bytes ({max_bytes} bytes)",
                                  code="aggregate_too_large")
            continue
        carry = buf[cut:]
        batch = yield from _decoded(buf, cut, max_bytes, fast)
        if batch and batch[-1] == DONE:
            return
    if carry.strip():
        yield from _decoded(carry, len(carry), max_bytes, False)


def chat_events(chat: ChatStream, batch: list) -> tuple[list[tuple], bool]:
    """The ``ChatStream`` events of one batch, and whether it ended with ``DONE``.

    A ``FastDelta`` becomes ``("literal", kind, literal)`` once ``chat``
    knows the answer's meta (then the chunk changes nothing else in it);
    before that it is decoded and fed like any chunk.
    """
    events: list[tuple] = []
    append, feed = events.append, chat.feed
    for chunk in batch:
        if type(chunk) is FastDelta:
            if len(chat.meta) == 3:
                if chunk.literal != b'""':
                    append(("literal", chunk.kind, chunk.literal))
                continue
            chunk = orjson.loads(chunk.data)
        elif chunk == DONE:
            return events, True
        events += feed(chunk)
    return events, False


def _events_end(data: bytes) -> int:
    """Where the last complete event of ``data`` ends (just after a blank line), 0 if none has."""
    end = 0
    for separator in _SEPARATORS:
        at = data.rfind(separator)
        if at >= 0 and at + len(separator) > end:
            end = at + len(separator)
    return end


def _next_end(data: bytes, start: int, stop: int) -> int:
    """Where the first complete event at ``start`` ends (``stop`` if none ends before it)."""
    end = stop
    for separator in _SEPARATORS:
        at = data.find(separator, start, end)
        if at >= 0 and at + len(separator) < end:
            end = at + len(separator)
    return end


def _decoded(buf: bytes, cut: int, max_bytes: int, fast: bool) -> Generator[list, None, list]:
    batch: list = []
    try:
        if fast:
            _scan(buf, cut, max_bytes, batch)
        else:
            batch.extend(iter_chat_chunks((buf[:cut],), max_bytes))
    except ProxyError:
        if batch:
            yield batch  # what came before an in-stream error is still the client's
        raise
    if batch:
        yield batch
    return batch


def _scan(buf: bytes, cut: int, max_bytes: int, batch: list) -> None:
    """Complete events ``buf[:cut]`` into ``batch``: fast ones as ``FastDelta``, runs of others decoded."""
    match, at = _FAST.match, 0
    append = batch.append
    while at < cut:
        m = match(buf, at, cut)
        if m is not None and m.end() - at <= max_bytes:
            literal = m.group(3)
            if len(literal) > 2 and not literal.isascii():
                try:
                    literal.decode()
                except UnicodeDecodeError:
                    m = None  # the full decode's replacement rules apply
            if m is not None:
                append(FastDelta(_KINDS[m.group(2)], literal, m.group(1)))
                at = m.end()
                continue
        start = at  # a run of events the pattern does not take: decoded together
        at = _next_end(buf, at, cut)
        while at < cut and match(buf, at, cut) is None:
            at = _next_end(buf, at, cut)
        for chunk in iter_chat_chunks((buf[start:at],), max_bytes):
            append(chunk)
            if chunk == DONE:
                return
