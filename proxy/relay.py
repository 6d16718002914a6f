"""Turn an executor ``Outcome`` into the Flask response the client gets.

Streams are relayed read by read as they arrive (never re-serialised, never
split per line); the upstream response is closed in ``finally``, which runs
when the stream ends, fails, or the client goes away (the server closes the
generator on a failed write). A non-stream answer may be padded with blank
lines while a long fold runs (``nonstream-keepalive-interval``).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from flask import Response

from . import metrics, upstream
from .errors import ProxyError
from .fold.usage_strip import UsageStripper
from .models import AnswerEnd, Outcome, Record
from .state.usage import StreamUsage, Tokens

log = logging.getLogger(__name__)
# Sent with every response that is written bit by bit (streams, padded folds).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def to_response(outcome: Outcome, on_end: AnswerEnd) -> Response:
    """The client's response; ``on_end`` (``Record.answered``) runs once the body is out or cut."""
    if outcome.stream is None:
        headers = {"Content-Type": outcome.content_type, **outcome.headers}
        on_end(outcome.status, "complete", *_usage(outcome))
        return Response(outcome.body, outcome.status, headers)
    return Response(_relay(outcome, on_end), 200,
                    {"Content-Type": outcome.content_type, **SSE_HEADERS}, direct_passthrough=True)


def _relay(outcome: Outcome, on_end: AnswerEnd):
    response, result = outcome.stream, "client closed"
    stripper = UsageStripper() if outcome.strip_usage else None
    usage = StreamUsage(outcome.usage_limit)  # the stream's token counts, for the token metrics and accounting
    metrics.ACTIVE_STREAMS.inc()
    try:
        for data in upstream.read_chunks(response, outcome.first):
            usage.feed(data)
            tokens = b'_tokens"' in data
            if stripper is not None:
                data = stripper.feed(data, tokens)
                if not data:
                    continue
            yield data
        if stripper is not None:
            tail = stripper.finish()
            if tail:
                yield tail
        result = "complete"
    except ProxyError as exc:
        # Headers are gone; say it in the stream so SDKs raise instead of
        # silently returning a truncated answer.
        result = f"upstream failed mid-stream: {exc.message}"
        yield b"data: " + exc.body() + b"\n\n"
    finally:
        response.close()
        metrics.ACTIVE_STREAMS.dec()
        on_end(200, result, usage.finish())


def _usage(outcome: Outcome) -> tuple[Tokens | None, bytes]:
    """A complete answer's (tokens, body to read them from) for ``on_end``: the counts when the executor had
    them (a fold, a checked answer), else the body (an error answer carries none)."""
    if outcome.usage is not None:
        return outcome.usage, b""
    return None, outcome.body if outcome.status < 300 else b""


def padded_answer(interval: float, run: Callable[[], Outcome], on_end: AnswerEnd,
                  record: Record) -> Response:
    """``with_keepalive`` for a route: once padding has committed the 200, the log line waits for the JSON,
    and the request's accounting (its concurrency slot) waits for the fold, even after the client left."""
    response = with_keepalive(interval, run, on_end, record.hold())
    if response.is_streamed:
        record.streamed = True
    return response


def with_keepalive(interval: float, run: Callable[[], Outcome], on_end: AnswerEnd,
                   work_ended: Callable[[bytes], None] | None = None) -> Response:
    """Run ``run`` in a helper thread; if it takes longer than ``interval``, commit 200 and pad.

    JSON parsers skip leading whitespace, so the client sees blank lines and
    then the answer. Once 200 is committed, an error can only be reported in
    the body: it goes out as an OpenAI error object after the padding. A
    client that leaves does not stop the helper (the upstream is still
    working for it): ``work_ended(usage bytes)`` runs when the helper is done.
    """
    done = threading.Event()
    box: dict = {}

    def work() -> None:
        try:
            box["outcome"] = run()
        except ProxyError as exc:
            box["error"] = exc
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500 body
            log.exception("fold failed")
            box["error"] = ProxyError(f"internal error: {type(exc).__name__}")
        finally:
            done.set()
            if work_ended is not None:
                outcome = box.get("outcome")
                work_ended(outcome.body if outcome is not None and outcome.status < 300 else b"")

    threading.Thread(target=work, name="streamfold-fold", daemon=True).start()
    if done.wait(interval):
        if "error" in box:
            raise box["error"]
        return to_response(box["outcome"], on_end)

    def padded():
        result, usage = "client closed", (None, b"")
        try:
            yield b"\n"  # commit the 200 now: the interval has already passed once
            while not done.wait(interval):
                yield b"\n"
            if "error" in box:
                result = f"error after keep-alive: {box['error'].status}"
                yield box["error"].body()
            else:
                outcome = box["outcome"]
                result = "complete" if outcome.status < 400 else f"upstream {outcome.status} after keep-alive"
                usage = _usage(outcome)
                yield outcome.body
        finally:
            on_end(200, result, *usage)

    return Response(padded(), 200, {"Content-Type": "application/json", **SSE_HEADERS}, direct_passthrough=True)
