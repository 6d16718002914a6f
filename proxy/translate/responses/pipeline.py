"""From upstream reads to Responses event bytes: per-read batches of chat chunks through the translator.

``chunk_batches`` groups the shared layer's decoded chunks by the upstream
read they came in, ``translate_stream`` runs them through ``ChatStream`` and
``ResponsesStream`` and yields one bytes object per batch, so the client gets
one write per upstream read, as with the chat relay.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ...errors import ProxyError
from ..chat_reads import FastDelta, raw, read_batches
from ..chat_stream import DONE, ChatStream, iter_chat_chunks
from .stream import ResponsesStream


def chunk_batches(reads: Iterable[bytes], max_bytes: int, fast: bool = True) -> Iterator[list]:
    """Decoded chunks grouped per upstream read, so each read becomes one client write (``read_batches``);
    a read that completed no chunk is an empty batch (so the first read is answered whatever it holds).

    The chat relay writes once per upstream read; writing once per event made
    the bridge several times as costly (a write per token through gunicorn).
    """
    return read_batches(reads, max_bytes, fast, every_read=True)


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

    The opening events go out with the first batch's, and the terminal event
    with the last batch's (as many writes as the chat relay makes for the same
    reads: each write through gunicorn costs more than its events' bytes).
    ``before_end`` runs once the terminal object is known and before the
    terminal event goes out (the route stores the answer there, so a client
    that continues the moment it sees ``response.completed`` finds it).
    """
    out: list[bytes] = [translator.start()]
    chat = ChatStream()
    feed, chat_feed, text, literals = translator.feed_into, chat.feed, translator.text, translator.literals
    try:
        done = False
        for batch in batches:
            for chunk in batch:
                if type(chunk) is FastDelta:
                    # plain text/reasoning deltas, not decoded (chat_reads): once the meta is known they
                    # change nothing in ChatStream, so their literals go straight out
                    if len(chat.meta) == 3:
                        literals(out, chunk[0], chunk[1])
                    else:
                        for decoded in iter_chat_chunks((raw(chunk),), 1 << 62):
                            feed(out, chat_feed(decoded))
                    continue
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
            if done:
                break
            if out:
                yield b"".join(out)
                out = []
        out.append(translator.close(chat.close(done), chat.ended_early))
    except ProxyError as exc:
        if out:
            yield b"".join(out)  # what was translated before the error is still the client's
        out = [translator.fail(exc.message, exc.code)]
    except Exception:
        if out:  # response.created at least: the route's closing event must not come first
            yield b"".join(out)
        raise
    if before_end is not None:
        before_end(translator)
    yield b"".join(out)
