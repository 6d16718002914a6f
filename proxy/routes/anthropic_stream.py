"""The streaming half of ``/v1/messages``: upstream chat chunks -> Anthropic events, pinging through silences.

Why helper threads: Claude Code gives up on a stream that stays silent (its
idle watchdog), and a local server can think for a minute before its first
token. The view's thread must be free to send a ``ping`` every
``PING_INTERVAL`` while the upstream says nothing, but a blocking read on the
upstream socket cannot be woken up cleanly (a short socket timeout would
leave http.client's chunked reader in an undefined state). So whatever may
block goes to a helper thread while the view waits for it with a timeout:
the request itself (connect, headers, first bytes), and each read for which
the socket has no bytes yet. A read whose bytes are already there is made
inline by the view's thread: a thread hand-over per read was ~0.4 ms of CPU
per request, a third of what the bridge added over a chat stream. Helpers
are daemon threads kept for reuse (``_spawn``).

Commit point (SPEC): the 200 goes out when the first upstream event
arrives, so failures before that are ordinary errors (after failover). If
nothing has arrived after ``PING_INTERVAL``, the 200 is committed anyway
with ``message_start`` and pings follow; a failure after that is an
``event: error``.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import select
import threading
import time
from typing import Callable, Iterator

from .. import metrics, upstream
from ..errors import ProxyError
from ..models import Outcome
from ..translate.anthropic.stream import INTERNAL, PING, MessageStream, completion_as_chunk
from ..translate.chat_reads import chat_events, read_batches
from ..translate.chat_stream import DONE, ChatStream, Held
from .common import loggable

log = logging.getLogger(__name__)
PING_INTERVAL = 10.0
MAX_IDLE_HELPERS = 64  # more idle helper threads than this end instead of waiting for work
BUSY, IDLE = "streamfold-messages", "streamfold-messages-idle"

_idle: list[_Helper] = []
os.register_at_fork(after_in_child=_idle.clear)  # a forked worker has none of its parent's threads


class _Helper:
    """A daemon thread that runs one blocking job at a time, then waits in ``_idle`` for the next."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=BUSY, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.jobs.get()()  # a job never raises (Pump._job)
            if len(_idle) >= MAX_IDLE_HELPERS:
                return
            self.thread.name = IDLE  # the name says whether it works for a stream (thread dumps, tests)
            _idle.append(self)


def _spawn(job: Callable[[], None]) -> None:
    try:
        helper = _idle.pop()
        helper.thread.name = BUSY
    except IndexError:
        helper = _Helper()
    helper.jobs.put(job)



def _ready(response) -> bool:
    """Whether the next read returns without waiting on the upstream: the body is complete, or the socket
    holds bytes (one read returns them). Otherwise (bytes only in a buffer, a compressed or TLS body) a
    helper reads: slower, never wrong."""
    raw = getattr(response, "_fp", None)  # urllib3 wraps http.client's response
    if raw is None or getattr(raw, "fp", None) is None or getattr(raw, "length", None) == 0:
        return True
    if response.headers.get("content-encoding", "identity") != "identity":
        return False
    sock = getattr(response.connection, "sock", None)
    if sock is None or hasattr(sock, "pending"):
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Pump:
    """Runs the request and reads the upstream; ``next`` gives what happened, in order.

    Items: ``("outcome", Outcome)`` once the executor answered, then for a
    translated stream ``("chunks", [chunk dicts, FastDelta or DONE])`` per
    network read, and finally ``("end", None)`` or ``("error", ProxyError)``.
    """

    def __init__(self, run: Callable[[], Outcome], max_bytes: int,
                 work_ended: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        # Called once when no helper works for this stream any more and none will: the request's
        # accounting (its concurrency slot) waits for it, also when the client left while the upstream worked.
        self.work_ended = work_ended
        self.items: collections.deque = collections.deque()
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # what a helper's job produced
        self.busy = True           # a helper job was started; its items come through ``results``
        self.running = True        # ... and has not finished yet (under ``lock``: who closes the response)
        self.lock = threading.Lock()
        self.cancelled = False
        self.closed = False
        self.complete = False      # the upstream's stream ended ([DONE] or the body's end): finish, not drop
        self.response = None       # the upstream stream being read
        self.batches: Iterator[list] | None = None  # the read phase, stepped inline or by a helper
        _spawn(lambda: self._job(self._start, run))

    def next(self, timeout: float | None) -> tuple | None:
        """The next item; None when ``timeout`` (seconds) passed first."""
        items = self.items
        while not items:
            if not self.busy:
                if self.batches is None:
                    return ("end", None)  # nothing more comes (never a silence to ping through forever)
                if _ready(self.response):
                    self._job(self._read)
                else:
                    self.busy = self.running = True
                    _spawn(lambda: self._job(self._read))
            try:
                got = self.results.get(timeout=timeout)
            except queue.Empty:
                return None
            self.busy = False
            items.extend(got)
        return items.popleft()

    def cancel(self, interrupt: bool = True) -> None:
        """Stop reading. ``interrupt``: a helper may be blocked on a silent upstream, so shut the socket
        down (urllib3's ``shutdown``, meant for this) and its read returns at once.

        Only while reading: once the body is complete, urllib3 has handed the
        connection back to its pool, and shutting it down could cut another
        request's connection.
        """
        ended = None
        with self.lock:
            self.cancelled = True
            if not self.running:
                self._close()  # no helper holds the response: it is the view's to close
                ended = self._ended()
            elif interrupt and self.response is not None and not self.closed:
                try:
                    self.response.shutdown()  # the helper's read returns, and the helper closes it
                except (ValueError, RuntimeError, OSError):
                    pass  # not connected, or already released to the pool
        if ended is not None:
            ended()  # outside the lock: the request's accounting may wait on the state store

    # -- jobs (a helper's or the view's thread; never two at once) -----------------------
    def _job(self, step: Callable, *args) -> None:
        try:
            items = step(*args)
        except ProxyError as exc:
            items = [("error", exc)]
            self.batches = None
        except Exception as exc:  # noqa: BLE001 - reported to the client, never a dead thread silently
            log.error("streaming reader failed: %s", type(exc).__name__, exc_info=exc)
            items = [("error", ProxyError(f"internal error: {type(exc).__name__}", code="internal_error"))]
            self.batches = None
        with self.lock:
            self.running = False
            # a complete stream is closed by ``cancel`` at the end of the view's generator, once the client
            # has its last event (``upstream.finish`` may wait a little for the body's end)
            if (self.batches is None and not self.complete) or self.cancelled:
                self._close()
            ended = self._ended() if self.batches is None or self.cancelled else None
        self.results.put(items)
        if ended is not None:
            ended()  # outside the lock, after the view has what it waits for

    def _start(self, run: Callable[[], Outcome]) -> list[tuple]:
        outcome = run()
        items = [("outcome", outcome)]
        if outcome.stream is None or outcome.plan is None or outcome.plan.native:
            return items  # an error answer or a native stream: the view relays it
        self.response = outcome.stream
        if "json" in outcome.content_type and outcome.first.lstrip()[:1] == b"{":
            # A server that ignored stream: true and answered one JSON completion.
            body = upstream.read_body(self.response, outcome.first, self.max_bytes)
            return [*items, ("chunks", [completion_as_chunk(body), DONE]), ("end", None)]
        self.batches = read_batches(upstream.read_chunks(self.response, outcome.first), self.max_bytes,
                                    every_read=True)
        return items

    def _read(self) -> list[tuple]:
        batch = next(self.batches, None)  # type: ignore[arg-type]
        if batch is None:
            self.batches = None
            self.complete = True
            return [("end", None)]
        return [("chunks", batch)] if batch else []  # a read that completed no event: read on

    def _ended(self) -> Callable[[], None] | None:
        """No more upstream work for this stream (under ``lock``): what to call, once, to tell the request's
        accounting (None when it was told already)."""
        ended, self.work_ended = self.work_ended, None
        return ended

    def _close(self) -> None:
        if not self.closed and self.response is not None:
            self.closed = True
            if self.complete:
                upstream.finish(self.response)  # keeps the connection for the next request
            else:
                self.response.close()


def first_items(pump: Pump, deadline: float | None) -> tuple[Outcome | None, list[tuple]]:
    """Wait for the commit point: ``(outcome, [])`` when the answer is not a translated stream (an error,
    a native stream), ``(None, [first item])`` at the first event, ``(None, [])`` when ``deadline``
    (seconds) passed first. A ``ProxyError`` before the commit point is raised."""
    until = None if deadline is None else time.monotonic() + deadline
    while True:
        item = pump.next(None if until is None else max(0.0, until - time.monotonic()))
        if item is None:
            return None, []
        kind, value = item
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
    """The Anthropic event stream: ``message_start``, then translated chunks, pings in silences.

    ``message_start`` goes out with the first event's bytes when there is one
    (at once when the 200 was committed early, in a silence), and the
    answer's end with the bytes of the read that held ``[DONE]``: as many
    writes as the chat relay makes for the same reads.
    """
    chat = ChatStream(Held(pump.max_bytes))  # the tool arguments held until the end are bounded
    done = False
    result = "client closed"
    items = iter(pending)
    head = b""  # message_start, until it went out
    metrics.ACTIVE_STREAMS.inc()
    try:
        head = stream.start()
        if not pending:  # committed in a silence: message_start and the silence's first ping go out now
            yield head + PING
            head = b""
        while not stream.ended:
            item = next(items, None)
            if item is None:
                item = pump.next(PING_INTERVAL)
                if item is None:
                    yield head + PING
                    head = b""
                    continue
            kind, value = item
            try:
                if kind == "chunks":
                    found, ended = chat_events(chat, value)
                    done = done or ended
                    data = stream.feed(found)
                    if ended:  # [DONE]: the answer is whole; no need to wait for the reader's end
                        pump.complete = True
                        data += stream.close(chat.close(True), chat.ended_early)
                        result = "complete"
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
                result = exc.message if exc.code == "internal_error" else \
                    f"upstream failed mid-stream: {loggable(message, 200)}"
                data = stream.fail(status, message)
            if data:
                yield head + data
                head = b""
    except Exception as exc:  # noqa: BLE001 - a bug must still end the stream with event: error, not a cut body
        log.error("messages stream translation failed: %s", type(exc).__name__, exc_info=exc)
        result = f"internal error: {type(exc).__name__}"
        yield head + stream.fail(500, INTERNAL)
    finally:
        pump.cancel(interrupt=not stream.ended)  # ended: the reader is done; else the client went away
        metrics.ACTIVE_STREAMS.dec()
        on_end(chat, result)
