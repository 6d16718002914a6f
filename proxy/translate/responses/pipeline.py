"""From upstream reads to Responses event bytes: per-read batches of chat chunks through the translator.

``chunk_batches`` groups the shared layer's decoded chunks by the upstream
read they came in, ``translate_stream`` runs them through ``ChatStream`` and
``ResponsesStream`` and yields one bytes object per batch, so the client gets
one write per upstream read, as with the chat relay.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

from ...errors import ProxyError
from ..chat_reads import FastDelta, raw, read_batches
from ..chat_stream import DONE, ChatStream, has_surrogates, iter_chat_chunks
from .stream import INTERNAL, ResponsesStream

log = logging.getLogger(__name__)
SPLIT_ABOVE = 1 << 20  # bytes of final events written as they are instead of joined into one write


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
    return text if type(text) is str and text and not has_surrogates(text) else None


def translate_stream(translator: ResponsesStream, batches: Iterable[list],
                     before_end: Callable[[ResponsesStream], None] | None = None) -> Iterator[bytes]:
    """All the events for ``chunk_batches`` output, one bytes per batch; an upstream error ends it.

    Any exception ends it too, with the protocol's terminal failure event
    (``translator.fail``), never a cut body: a bug in a translation step is
    logged and named in ``translator.internal`` for the access log.

    The opening events go out with the first batch's, and the terminal event
    with the last batch's (as many writes as the chat relay makes for the same
    reads: each write through gunicorn costs more than its events' bytes).
    ``before_end`` runs once the terminal object is known and before the
    terminal event goes out (the route stores the answer there, so a client
    that continues the moment it sees ``response.completed`` finds it).
    """
    out: list[bytes] = []
    chat = ChatStream(translator.held)
    feed, chat_feed, text, literals = translator.feed_into, chat.feed, translator.text, translator.literals
    closing = None
    try:
        out.append(translator.start())
        done = False
        for batch in batches:
            for chunk in batch:
                if type(chunk) is FastDelta:
                    # plain text/reasoning deltas, not decoded (chat_reads): once ChatStream is ``plain`` they
                    # change nothing in it, so their literals go straight out
                    if chat.plain:
                        literals(out, chunk[0], chunk[1])
                    else:
                        for decoded in iter_chat_chunks((raw(chunk),), 1 << 62):
                            feed(out, chat_feed(decoded))
                    continue
                if chunk == DONE:
                    done = True
                    break
                # Most chunks are one text delta: those skip ChatStream (they change nothing in it once it is
                # ``plain``) and the event tuples; about half the bridge's per-token CPU.
                if translator.kind == "message" and chat.plain:
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
        closing = []
        translator.close_into(closing, chat.close(done), chat.ended_early)
        if before_end is not None:
            before_end(translator)
        out += closing
    except Exception as exc:  # noqa: BLE001 - whatever broke, the client gets the terminal failure event
        if closing is not None:
            translator.ended = False  # its terminal event was built but never went out
        if isinstance(exc, ProxyError):
            out.append(translator.fail(exc.message, exc.code))
        else:
            log.error("responses stream translation failed: %s", type(exc).__name__, exc_info=exc)
            translator.internal = type(exc).__name__
            out.append(translator.fail(INTERNAL, "server_error"))
    if sum(map(len, out)) > SPLIT_ABOVE:
        yield from out  # the *.done events repeat the answer: a large one is not copied once more to be joined
    else:
        yield b"".join(out)
