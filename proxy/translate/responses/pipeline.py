"""From upstream reads to Responses event bytes: per-read batches of chat chunks through the translator.

``chunk_batches`` groups the shared layer's decoded chunks by the upstream
read they came in, ``translate_stream`` runs them through ``ChatStream`` and
``ResponsesStream`` and yields one bytes object per batch, so the client gets
one write per upstream read, as with the chat relay.
"""
from __future__ import annotations

from typing import Callable, Generator, Iterable, Iterator

from ...errors import ProxyError, StreamError
from ..chat_stream import DONE, ChatStream, iter_chat_chunks
from .stream import ResponsesStream


def chunk_batches(reads: Iterable[bytes], max_bytes: int) -> Iterator[list]:
    """``iter_chat_chunks`` output grouped per upstream read, so each read becomes one client write.

    The chat relay writes once per upstream read; writing once per event made
    the bridge several times as costly (a write per token through gunicorn).
    Each read is cut after its last complete event (a blank line) and the
    complete part decoded at once; the rest waits for the next read.
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
        batch = yield from _decoded(buf[:cut], max_bytes)
        if batch and batch[-1] == DONE:
            return
    if carry.strip():
        yield from _decoded(carry, max_bytes)


def _events_end(data: bytes) -> int:
    """Where the last complete event of ``data`` ends (just after a blank line), 0 if none has."""
    end = 0
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n"):
        at = data.rfind(separator)
        if at >= 0 and at + len(separator) > end:
            end = at + len(separator)
    return end


def _decoded(data: bytes, max_bytes: int) -> Generator[list, None, list]:
    batch: list = []
    try:
        for chunk in iter_chat_chunks((data,), max_bytes):
            batch.append(chunk)
    except ProxyError:
        if batch:
            yield batch  # what came before an in-stream error is still the client's
        raise
    if batch:
        yield batch
    return batch


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
    return text if type(text) is str and text else None


def translate_stream(translator: ResponsesStream, batches: Iterable[list],
                     before_end: Callable[[ResponsesStream], None] | None = None) -> Iterator[bytes]:
    """All the events for ``chunk_batches`` output, one bytes per batch; an upstream error ends it.

    ``before_end`` runs once the terminal object is known and before the
    terminal event goes out (the route stores the answer there, so a client
    that continues the moment it sees ``response.completed`` finds it).
    """
    yield translator.start()
    chat = ChatStream()
    feed, chat_feed, text = translator.feed_into, chat.feed, translator.text
    try:
        done = False
        for batch in batches:
            out: list[bytes] = []
            for chunk in batch:
                if chunk == DONE:
                    done = True
                    break
                # Most chunks are one text delta: those skip ChatStream (they change nothing in it once its
                # meta is known) and the event tuples; about half the bridge's per-token CPU.
                if translator.kind == "message" and len(chat.meta) == 3:
                    plain = _plain_text(chunk)
                    if plain is not None:
                        text(out, plain)
                        continue
                feed(out, chat_feed(chunk))
            if out:
                yield b"".join(out)
            if done:
                break
        ending = translator.close(chat.close(done), chat.ended_early)
    except ProxyError as exc:
        ending = translator.fail(exc.message, exc.code)
    if before_end is not None:
        before_end(translator)
    yield ending
