"""Upstream reads -> per-read batches of chat chunks, with a no-decode fast path for plain text deltas.

Both bridges write one client write per upstream read (as the chat relay
does), so the decoded chunks are grouped by the read they completed in: each
read is cut after its last complete event and the rest waits for the next.

The fast path: almost every chunk of an answer is one text (or reasoning)
delta of choice 0 and nothing else, and an upstream writes all of them with
the same bytes around the text. The first such event of a stream is
recognised by a strict pattern over the usual compact layouts (vLLM, SGLang,
llama.cpp, OpenAI: any order of the plain members, ``"finish_reason":null``,
``usage`` absent or null, no tool calls, no error, exactly one delta key);
its bytes before and after the string literal become the stream's template
(head, tail). Later reads, up to their last tail + blank line, are split
at the blank lines in one C call; when every piece is head + body + tail
(the read rebuilt from the bodies comes back byte for byte) the bodies are
the literals' (one slice per event, nothing decoded), and a run
of them is handed over undecoded as one ``TextRun`` (the only place one is
made; ``chat_events`` passes it on as the event ``("run", run)``, which a
bridge's writer takes in one method). Only bodies that ``orjson.dumps`` writes
the same way are taken (raw valid UTF-8, only the escapes
``\\" \\\\ \\b \\f \\n \\r \\t``), so writing a body between quotes is
byte-identical to decoding and re-encoding its text, and bodies concatenate
into the body of the concatenated text. Anything else (and any read with a
CR) goes through ``iter_chat_chunks`` (the full decode and its error rules),
in order. While ``ChatStream`` still needs whole chunks (the answer's
``id``/``model``/``created`` not known yet, a surrogate half waiting),
``chat_events`` decodes ``raw(run)`` instead.

This module with ``chat_stream`` is the one reader of a chat stream for the
bridges: ``read_batches`` frames and decodes, ``chat_events`` turns a batch
into ``ChatStream`` events (in-stream errors; its tool calls come from the
fold's assembler ``fold/tool_calls.py``, surrogate halves are joined by
``fold/guard.py``), so every bridge reads a stream the same way.

Pure: bytes in, lists out; no Flask, no requests.
"""
from __future__ import annotations

import re
from itertools import repeat
from operator import getitem, itemgetter
from typing import Generator, Iterable, Iterator

import orjson

from ..errors import ProxyError, StreamError
from ..fold.guard import has_surrogates
from .chat_stream import DONE, ChatStream, decode_event, iter_chat_chunks


class TextRun(tuple):
    """A run of plain text or reasoning deltas of choice 0, undecoded: the reader's fast path, as one event.

    ``kind`` is "text" or "reasoning". ``bodies`` are the deltas' JSON string
    literals without their quotes: valid UTF-8, only the escapes ``orjson``
    writes itself (``\\" \\\\ \\b \\f \\n \\r \\t``), so ``b'"' + body + b'"'``
    is byte-identical to ``orjson.dumps(text)`` and bodies concatenate into
    the body of the concatenated text. In a ``("run", run)`` event they are
    never empty. ``head`` and ``tail`` are the upstream bytes around each
    literal (``raw``). A tuple made here only, by ``_run_of`` (one C call: a
    run is made per upstream read), read by name or index.
    """

    __slots__ = ()
    kind = property(itemgetter(0))
    bodies = property(itemgetter(1))
    head = property(itemgetter(2))
    tail = property(itemgetter(3))

    def text(self) -> str:
        """The run's text, decoded (a writer without a fast path of its own)."""
        return orjson.loads(b'"%s"' % b"".join(self[1]))


_run_of = tuple.__new__  # TextRun(...) without a Python-level call
_LITERAL = rb'"(?:[^"\\\x00-\x1f]|\\["\\bfnrt])*"'
_ASCII_STRING = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_NUMBER = rb"-?(?:0|[1-9][0-9]{0,17})"
_PLAIN = (rb'"(?:id|object|created|model|system_fingerprint|service_tier|obfuscation)":(?:%s|%s|null)'
          rb'|"usage":null' % (_ASCII_STRING, _NUMBER))
_CHOICE_PLAIN = rb'"index":0|"logprobs":null|"finish_reason":null'
_DELTA = rb'"delta":\{"(content|reasoning_content|reasoning)":(%s)\}' % _LITERAL
_CHOICES = rb'"choices":\[\{(?:(?:%s),)*%s(?:,(?:%s))*\}\]' % (_CHOICE_PLAIN, _DELTA, _CHOICE_PLAIN)
_FAST = re.compile(rb'data: ?\{(?:(?:%s),)*%s(?:,(?:%s))*\}' % (_PLAIN, _CHOICES, _PLAIN))
_LITERAL_BODY = re.compile(rb'(?:[^"\\\x00-\x1f]|\\["\\bfnrt])*')
_DELTA_KEY = re.compile(rb'"delta":\{"(?:content|reasoning)')  # cheap test before _FAST: no match, no template
_SPECIAL = re.compile(rb'["\\\x00-\x1f]')  # a literal body without these is plain text
_PLAIN_BYTES = bytes(c for c in range(0x20, 0x80) if c not in b'"\\')  # ... and ASCII: only these bytes
_KINDS = {b"content": "text", b"reasoning_content": "reasoning", b"reasoning": "reasoning"}
_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n")


def read_batches(reads: Iterable[bytes], max_bytes: int, fast: bool = True,
                 every_read: bool = False) -> Iterator[list]:
    """Decoded chunks (dicts, and ``TextRun`` when ``fast``) grouped per upstream read; ``DONE`` ends it.

    ``every_read``: a read that completed no chunk yields ``[]`` (so a caller
    that must not block longer than one read can step it read by read).

    An in-stream error raises ``StreamError`` (as ``iter_chat_chunks``) after
    the chunks before it in the same read were yielded. An event that does
    not end within ``max_bytes`` is an error too.
    """
    carry = b""
    template: list = [None, b"", ""]  # head, tail, kind of this stream's plain deltas (none seen yet)
    for data in reads:
        buf = carry + data if carry else data
        cut = _events_end(buf)
        if not cut:
            carry = buf
            if len(carry) > max_bytes:
                raise StreamError(f"one upstream event exceeds max-aggregate-bytes ({max_bytes} bytes)",
                                  code="aggregate_too_large")
            if every_read:
                yield []
            continue
        carry = buf[cut:]
        batch = yield from _decoded(buf[:cut], max_bytes, template if fast else None)
        if batch and batch[-1] == DONE:
            return
        if not batch and every_read:
            yield []
    if carry.strip():
        yield from _decoded(carry, max_bytes, None)


def raw(run: TextRun) -> bytes:
    """The upstream events a ``TextRun`` stands for, for a consumer that must decode them after all."""
    _, bodies, head, tail = run
    end = tail + b"\n\n"
    return head + (end + head).join(bodies) + end


def chat_events(chat: ChatStream, batch: list, events: list[tuple]) -> bool:
    """The ``ChatStream`` events of one batch, appended to ``events`` (so a caller keeps those before an
    in-stream error that this raises); True when the batch ended with ``DONE``.

    A ``TextRun`` becomes the event ``("run", run)`` once ``chat`` is
    ``plain`` (its chunks change nothing else in it); before that its chunks
    are decoded and fed like any chunk. So does a decoded chunk that is one
    plain text delta and nothing else: ``("text", text)`` without going
    through ``ChatStream`` (what it would give; about half a bridge's
    per-token CPU when the fast path's template does not fit the upstream).
    """
    plain = chat.plain
    for chunk in batch:
        if type(chunk) is TextRun:
            if plain:
                bodies = chunk[1]
                if not all(bodies):  # an empty delta ("content":""): nothing to write
                    bodies = [body for body in bodies if body]
                    chunk = _run_of(TextRun, (chunk[0], bodies, chunk[2], chunk[3]))
                if bodies:
                    events.append(("run", chunk))
            else:
                for decoded in iter_chat_chunks((raw(chunk),), 1 << 62):
                    events += chat.feed(decoded)
                plain = chat.plain
        elif chunk == DONE:
            return True
        else:
            if plain:
                text = _plain_text(chunk)
                if text is not None:
                    events.append(("text", text))
                    continue
            events += chat.feed(chunk)
            plain = chat.plain
    return False


def _plain_text(chunk: dict) -> str | None:
    """The text of a chunk that carries one non-empty text delta of choice 0 and nothing else, else None."""
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or chunk.get("usage") is not None:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("finish_reason") or choice.get("index", 0) != 0:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict or len(delta) != 1:
        return None
    text = delta.get("content")
    return text if type(text) is str and text and not has_surrogates(text) else None


def _events_end(data: bytes) -> int:
    """Where the last complete event of ``data`` ends (just after a blank line), 0 if none has."""
    if data.find(b"\r") < 0:  # not ``in``: on bytes it tries the needle as an int first and raises (~5x)
        at = data.rfind(b"\n\n")
        return at + 2 if at >= 0 else 0
    end = 0
    for separator in _SEPARATORS:
        at = data.rfind(separator)
        if at >= 0 and at + len(separator) > end:
            end = at + len(separator)
    return end


def _decoded(data: bytes, max_bytes: int, template: list | None) -> Generator[list, None, list]:
    batch: list = []
    try:
        if template is not None and data.find(b"\r") < 0:
            _scan(data, max_bytes, template, batch)
        else:
            batch.extend(iter_chat_chunks((data,), max_bytes))
    except ProxyError:
        if batch:
            yield batch  # what came before an in-stream error is still the client's
        raise
    if batch:
        yield batch
    return batch


def _scan(data: bytes, max_bytes: int, template: list, batch: list) -> None:
    """Complete events ``data`` (no CR in it) into ``batch``: runs of plain deltas as ``TextRun``, other
    events decoded. Once the stream's template is known, a read of plain deltas is split and checked in a
    few C calls, so a run of them costs no Python per event but one slice."""
    at = 0
    if len(data) > max_bytes:
        _by_event(data, max_bytes, template, batch)  # it checks each event's size
        return
    if template[0] is None:
        at = _by_event(data, max_bytes, template, batch, learn=True)
        if at < 0 or at >= len(data) or template[0] is None:
            return
    head, tail, kind = template
    end, skip = tail + b"\n\n", len(head)
    region = data[at:] if at else data
    last = region.rfind(end)  # from the end: only the events after the last plain delta are scanned
    if last < 0:
        _by_event(region, max_bytes, template, batch)
        return
    cut = last + len(end)
    # Up to ``cut``, the usual read is nothing but plain deltas. Split at the tail's last three bytes and the
    # blank line (a 5-byte separator of rare bytes is found ~2x faster than the whole tail's ~45), then
    # check the read as a whole: rebuilt from the bodies, it must come back byte for byte. When
    # it does, every piece was one event, head + body + tail, so the bodies are the ones the split at every
    # tail + blank line below finds: the separator cannot overlap itself, and no body holds it.
    events = (region[:cut] if cut < len(region) else region).split(end[-5:])
    events.pop()  # what follows the last separator: nothing
    bodies = list(map(getitem, events, repeat(slice(skip, 3 - len(tail)))))  # ~1.6x cheaper than a listcomp
    joined = (end + head).join(bodies)
    if skip + len(joined) + len(end) == cut and region.startswith(head) and region.startswith(joined, skip):
        if _run(bodies, max_bytes, (head, tail, kind), batch):
            return
        rest = region[cut:]
    else:  # other events among them: the plain runs between those, each event else on its own
        parts = region.split(end)  # a plain delta is now head + body; whatever follows the last one is ``rest``
        rest = parts.pop()
        run: list[bytes] = []
        for part in parts:
            if part.startswith(head) and part.find(b"\n") < 0:
                run.append(part[skip:])
                continue
            if run and _run(run, max_bytes, (head, tail, kind), batch):
                return
            run = []
            if _by_event(part + end, max_bytes, template, batch) < 0:
                return
        if run and _run(run, max_bytes, (head, tail, kind), batch):
            return
    if rest:
        _by_event(rest, max_bytes, template, batch)


def _run(bodies: list[bytes], max_bytes: int, template: tuple, batch: list) -> bool:
    """A run of bodies that stood between the template's head and tail: one ``TextRun`` for the ones that
    are canonical literal bodies, the others decoded in order. True when the stream ended (``DONE``)."""
    head, tail, kind = template
    if not b"".join(bodies).translate(None, _PLAIN_BYTES):  # ~10x cheaper than _SPECIAL.search
        batch.append(_run_of(TextRun, (kind, bodies, head, tail)))
        return False
    good: list[bytes] = []
    for body in bodies:
        if (_SPECIAL.search(body) is None or _LITERAL_BODY.fullmatch(body) is not None) and _utf8(body):
            good.append(body)
            continue
        if good:
            batch.append(_run_of(TextRun, (kind, good, head, tail)))
            good = []
        if _slow([head + body + tail], max_bytes, batch):
            return True
    if good:
        batch.append(_run_of(TextRun, (kind, good, head, tail)))
    return False


def _by_event(data: bytes, max_bytes: int, template: list, batch: list, learn: bool = False) -> int:
    """Complete events ``data`` one by one. ``learn``: stop just after the event that set the template.
    Returns where it stopped, -1 at ``DONE``."""
    head, tail, kind = template
    skip, cut = (len(head), -len(tail)) if head is not None else (0, 0)
    append, special = batch.append, _SPECIAL.search
    run: list[bytes] = []  # events the fast path does not take, decoded together in order
    at, find = 0, data.find
    while True:  # not split(): with ``learn`` most of ``data`` is left to _scan
        stop = find(b"\n\n", at)
        if stop < 0:
            break
        event, at = data[at:stop], stop + 2
        if head is not None and event.startswith(head) and event.endswith(tail) \
                and skip - cut <= len(event) <= max_bytes:  # head and tail do not overlap
            body = event[skip:cut]
            if (special(body) is None or _LITERAL_BODY.fullmatch(body) is not None) and _utf8(body):
                if run:
                    if _slow(run, max_bytes, batch):
                        return -1
                    run = []
                append(_run_of(TextRun, (kind, [body], head, tail)))
                continue
        m = _FAST.fullmatch(event) if _DELTA_KEY.search(event) is not None else None
        if m is not None and len(event) <= max_bytes and _utf8(m.group(2)):
            head, tail, kind = event[:m.start(2) + 1], event[m.end(2) - 1:], _KINDS[m.group(1)]
            template[:] = head, tail, kind
            skip, cut = len(head), -len(tail)
            if run:
                if _slow(run, max_bytes, batch):
                    return -1
                run = []
            append(_run_of(TextRun, (kind, [m.group(2)[1:-1]], head, tail)))
            if learn:
                return at
            continue
        run.append(event)
    if run and _slow(run, max_bytes, batch):
        return -1
    return at


def _utf8(body: bytes) -> bool:
    if body.isascii():
        return True
    try:
        body.decode()
    except UnicodeDecodeError:
        return False  # the full decode's replacement rules apply
    return True


def _slow(run: list[bytes], max_bytes: int, batch: list) -> bool:
    """Decode ``run`` (complete events) into ``batch``; True when it ended with ``DONE``."""
    if all(event.startswith(b"data:") and event.find(b"\n") < 0 for event in run):
        # one data line each (the usual first, finish and usage chunks): no SSE parser needed
        for event in run:
            chunk = decode_event(b"", event[5:], max_bytes)
            if chunk is not None:
                batch.append(chunk)
                if chunk is DONE:
                    return True
        return False
    for chunk in iter_chat_chunks((b"\n\n".join(run) + b"\n\n",), max_bytes):
        batch.append(chunk)
        if chunk == DONE:
            return True
    return False
