"""The streaming half of ``/v1/messages``: upstream chat chunks -> Anthropic events, pinging through silences.

Why a helper thread: Claude Code gives up on a stream that stays silent
(its idle watchdog), and a local server can think for a minute before its
first token. The view's thread must be free to send a ``ping`` every
``PING_INTERVAL`` while the upstream says nothing, but a blocking read on
the upstream socket cannot be woken up cleanly (a short socket timeout
would leave http.client's chunked reader in an undefined state). So one
helper thread per stream runs the executor and reads and decodes the
upstream (``Pump``), handing decoded chunks over a small queue, one batch
per network read; the view's thread owns the translation and the writes.

Commit point (SPEC): the 200 goes out when the first upstream event
arrives, so failures before that are ordinary errors (after failover). If
nothing has arrived after ``PING_INTERVAL``, the 200 is committed anyway
with ``message_start`` and pings follow; a failure after that is an
``event: error``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterator

from .. import metrics, upstream
from ..errors import ProxyError
from ..executor import Outcome
from ..translate.anthropic.stream import PING, MessageStream, completion_as_chunk
from ..translate.chat_reads import chat_events, read_batches
from ..translate.chat_stream import DONE, ChatStream
from .common import loggable

log = logging.getLogger(__name__)
PING_INTERVAL = 10.0
QUEUE_SIZE = 64  # batches (network reads) in flight; a slow client makes the reader wait


class _Cancelled(Exception):
    """The client went away: the reader stops."""


class Pump:
    """Runs the request and reads the upstream in a helper thread; ``queue`` gets what happened, in order.

    Items: ``("outcome", Outcome)`` once the executor answered, then for a
    translated stream ``("chunks", [chunk dicts or DONE])`` per network read,
    and finally ``("end", None)`` or ``("error", ProxyError)``.
    """

    def __init__(self, run: Callable[[], Outcome], max_bytes: int) -> None:
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.cancelled = threading.Event()
        self.response = None  # the upstream stream being read, to unblock its read on cancel
        threading.Thread(target=self._work, args=(run, max_bytes), name="streamfold-messages",
                         daemon=True).start()

    def cancel(self, interrupt: bool = True) -> None:
        """Stop reading. ``interrupt``: the reader may be blocked on a silent upstream, so shut the
        socket down (urllib3's ``shutdown``, meant for this) and its read returns at once.

        Only while the reader is still reading: once the body is complete,
        urllib3 has handed the connection back to its pool, and shutting it
        down could cut another request's connection.
        """
        self.cancelled.set()
        if interrupt and self.response is not None:
            try:
                self.response.shutdown()
            except (ValueError, RuntimeError, OSError):
                pass  # not connected, or already released to the pool

    def _put(self, item: tuple) -> None:
        while not self.cancelled.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Cancelled

    def _work(self, run: Callable[[], Outcome], max_bytes: int) -> None:
        response = None
        try:
            outcome = run()
            if outcome.stream is not None and outcome.plan is not None and not outcome.plan.native:
                response = self.response = outcome.stream
            self._put(("outcome", outcome))
            if response is None or self.cancelled.is_set():
                return  # an error answer or a native stream: the view relays it
            head = outcome.first.lstrip()[:1]
            if "json" in outcome.content_type and head == b"{":
                # A server that ignored stream: true and answered one JSON completion.
                body = upstream.read_body(response, outcome.first, max_bytes)
                self._put(("chunks", [completion_as_chunk(body), DONE]))
                self._put(("end", None))
                return
            for batch in read_batches(upstream.read_chunks(response, outcome.first), max_bytes):
                self._put(("chunks", batch))
            self._put(("end", None))
        except _Cancelled:
            pass
        except ProxyError as exc:
            self._report(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the client, never a dead thread silently
            log.error("streaming reader failed: %s", type(exc).__name__, exc_info=exc)
            self._report(ProxyError(f"internal error: {type(exc).__name__}"))
        finally:
            if response is not None:
                response.close()

    def _report(self, exc: ProxyError) -> None:
        try:
            self._put(("error", exc))
        except _Cancelled:
            pass


def first_items(pump: Pump, deadline: float | None) -> tuple[Outcome | None, list[tuple]]:
    """Wait for the commit point: ``(outcome, [])`` when the answer is not a translated stream (an error,
    a native stream), ``(None, [first item])`` at the first event, ``(None, [])`` when ``deadline``
    (seconds) passed first. A ``ProxyError`` before the commit point is raised."""
    until = None if deadline is None else time.monotonic() + deadline
    while True:
        try:
            wait = None if until is None else max(0.0, until - time.monotonic())
            kind, value = pump.queue.get(timeout=wait)
        except queue.Empty:
            return None, []
        if kind == "error":
            raise value
        if kind == "outcome":
            if value.stream is None or value.plan is None or value.plan.native:
                return value, []
            continue
        return None, [(kind, value)]


def events(pump: Pump, pending: list[tuple], stream: MessageStream,
           failure: Callable[[ProxyError | Outcome], tuple[int, str]],
           on_end: Callable[[ChatStream, str], None]) -> Iterator[bytes]:
    """The Anthropic event stream: ``message_start`` now, then translated chunks, pings in silences."""
    chat = ChatStream()
    done = False
    result = "client closed"
    items = iter(pending)
    metrics.ACTIVE_STREAMS.inc()
    try:
        yield stream.start()
        while not stream.ended:
            item = next(items, None)
            if item is None:
                try:
                    item = pump.queue.get(timeout=PING_INTERVAL)
                except queue.Empty:
                    yield PING
                    continue
            kind, value = item
            try:
                if kind == "chunks":
                    found, ended = chat_events(chat, value)
                    done = done or ended
                    data = stream.feed(found)
                elif kind == "end":
                    data = stream.close(chat.close(done), chat.ended_early)
                    result = "upstream stream ended early" if chat.ended_early else "complete"
                elif kind == "outcome":  # after an early commit
                    if value.stream is not None:
                        continue
                    status, message = failure(value)
                    result = f"upstream {value.status} after commit"
                    data = stream.fail(status, message)
                else:
                    raise value
            except ProxyError as exc:
                status, message = failure(exc)
                result = f"upstream failed mid-stream: {loggable(message, 200)}"
                data = stream.fail(status, message)
            if data:
                yield data
    finally:
        pump.cancel(interrupt=not stream.ended)  # ended: the reader is done; else the client went away
        metrics.ACTIVE_STREAMS.dec()
        on_end(chat, result)
