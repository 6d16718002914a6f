"""Server-Sent Events framing: network reads in, ``(event, data)`` pairs out.

Pure functions over bytes (no Flask, no requests), used by the fold. Following
the WHATWG spec (https://html.spec.whatwg.org/multipage/server-sent-events.html):

    "Lines must be separated by either a U+000D CARRIAGE RETURN U+000A LINE
    FEED (CRLF) character pair, a single U+000A LINE FEED (LF) character, or a
    single U+000D CARRIAGE RETURN (CR) character."

Lines are split on those *bytes* before anything is decoded, so a U+2028 or a
multi-byte UTF-8 character split across two network reads never breaks a line
(``str.splitlines`` would). Payloads stay bytes; ``orjson`` parses bytes.

For speed the work is done per network read, not per line: CRs are
normalised with two ``bytes.replace`` calls and the read is split once.

Memory: given a ``budget`` (a fold: anything with ``size`` and ``max_bytes``),
the bytes buffered for a line or an event that has not ended yet count against
what the fold may still hold, so one endless ``data:`` line with no newline is
the fold's 502 after ``max-aggregate-bytes``, not a worker out of memory.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..errors import StreamError


def _over(budget: Any, held: int) -> bool:
    return budget is not None and held > budget.max_bytes - budget.size


def _too_large(budget: Any) -> StreamError:
    return StreamError(f"an upstream event exceeds max-aggregate-bytes ({budget.max_bytes} bytes)",
                       code="aggregate_too_large")


def _line_batches(chunks: Iterable[bytes], budget: Any = None) -> Iterator[list[bytes]]:
    """Turn reads split anywhere into lists of complete lines (terminators removed).

    A partial line is kept as a list of pieces and joined once its end arrives,
    so one huge line spread over many reads costs linear time, not quadratic.
    A CR at the very end of a read is held back: it may be half of a CRLF.
    """
    pending: list[bytes] = []
    held = 0  # bytes in pending
    held_cr = False
    for chunk in chunks:
        if held_cr:
            chunk = b"\r" + chunk
            held_cr = False
        if b"\r" in chunk:
            if chunk[-1] == 13:
                held_cr = True
                chunk = chunk[:-1]
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            if chunk:
                pending.append(chunk)
                held += len(chunk)
                if _over(budget, held):
                    raise _too_large(budget)
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending = []
        lines = chunk.split(b"\n")
        tail = lines.pop()
        held = len(tail)
        if tail:
            pending.append(tail)
        yield lines
    if pending:
        yield [b"".join(pending)]


def iter_event_batches(chunks: Iterable[bytes], budget: Any = None) -> Iterator[list[tuple[bytes, bytes]]]:
    """Parse raw network reads into lists of ``(event_name, data)``, one list per read that completed events.

    ``event_name`` is ``b""`` by default. Lists rather than one event at a
    time because the fold runs per event and a generator resume per event is
    measurable there.

    Spec rules kept: ``:`` lines are comments (keep-alives such as OpenRouter's
    ``: OPENROUTER PROCESSING``); ``id:``/``retry:`` are ignored; several
    ``data:`` lines in one event are joined with ``\\n``; ``data:{...}``
    without a space is accepted (the optional space is left on the payload, see
    below). An event is dispatched at a blank line, or at the end of the stream.

    One deliberate deviation: a line that is no field at all, directly after a
    ``data:`` line of the same event, continues that data. llama.cpp's verbose
    mode writes raw newlines inside its JSON, so the spec's reading (ignore the
    line) would cut the payload in half; the fold re-joins it instead.
    """
    data: bytes | None = None
    more: list[bytes] | None = None
    more_size = 0  # bytes in more: an event of many data lines and no blank line must not grow forever
    event = b""
    for lines in _line_batches(chunks, budget):
        batch = []
        for line in lines:
            if not line:
                if data is not None:
                    if more:
                        data = b"\n".join([data, *more])
                        more = None
                    batch.append((event, data))
                    data = None
                event = b""
            elif line.startswith(b"data:"):
                # The spec drops one space after the colon; it is kept here
                # because payloads only ever go to a JSON parser (which skips
                # it) or are compared stripped ([DONE]), and one copy less per
                # event is measurable.
                value = line[5:]
                if data is None:
                    data = value
                else:
                    if more is None:
                        more, more_size = [value], len(data)
                    else:
                        more.append(value)
                    more_size += len(value) + 1
                    if _over(budget, more_size):
                        raise _too_large(budget)
            elif line[0] == 58:  # ":" starts a comment
                continue
            elif line.startswith(b"event:"):
                event = line[6:].strip()
            elif data is not None and not line.startswith((b"id:", b"retry:")):
                if more is None:
                    more, more_size = [line], len(data)
                else:
                    more.append(line)
                more_size += len(line) + 1
                if _over(budget, more_size):
                    raise _too_large(budget)
        if batch:
            yield batch
    if data is not None:
        if more:
            data = b"\n".join([data, *more])
        yield [(event, data)]


def batches_from_lines(lines: Iterable[bytes], budget: Any = None) -> Iterator[list[tuple[bytes, bytes]]]:
    """Like ``iter_event_batches`` for input already split into lines (terminators removed)."""
    return iter_event_batches((line + b"\n" for line in lines), budget)
