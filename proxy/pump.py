"""Reading a translated upstream stream for a bridge: inline (``Direct``) or on helper threads (``Pump``).

Both give the same items through ``next(timeout)``: ``("outcome", Outcome)``
(the pump only: the executor's answer), ``("chunks", batch)`` per upstream
read that completed an event (a batch of ``translate.chat_reads.read_batches``),
then ``("end", None)`` or ``("error", ProxyError)``. ``bridging.py`` drives
either with one loop.

Why helper threads (``Pump``): a protocol with a keep-alive event
(Anthropic's ``ping``: Claude Code gives up on a stream that stays silent,
and a local server can think for a minute before its first token) needs the
view's thread free to send it every ``KEEPALIVE_INTERVAL`` while the upstream
says nothing, but a blocking read on the upstream socket cannot be woken up
cleanly (a short socket timeout would leave http.client's chunked reader in
an undefined state). So whatever may block goes to a helper thread while the
view waits for it with a timeout: the request itself (connect, headers,
first bytes), and each read for which the socket has no bytes yet
(``upstream.ready``). A read whose bytes are already there is made inline by
the view's thread: a thread hand-over per read was ~0.4 ms of CPU per
request, a third of what the bridge added over a chat stream. Helpers are
daemon threads kept for reuse (``_spawn``). A protocol without a keep-alive
reads inline (``Direct``): no hand-over at all.

No Flask here: the runner passes what it needs in.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from itertools import chain
from typing import Callable, Iterator

from . import metrics, upstream
from .errors import ProxyError, loggable
from .models import AnswerEnd, Outcome
from .translate.bridge import EventWriter, Exchange, Protocol
from .translate.chat_reads import chat_events, read_batches
from .translate.chat_stream import DONE, ChatStream, Held, completion_as_chunk

log = logging.getLogger(__name__)
KEEPALIVE_INTERVAL = 10.0  # seconds of upstream silence before a protocol's keep-alive event
SPLIT_ABOVE = 1 << 20  # bytes of one write's events written as they are instead of joined (a large ending)
INTERNAL = "The proxy hit an internal error; see its log for details."
MAX_IDLE_HELPERS = 64  # more idle helper threads than this end instead of waiting for work
BUSY, IDLE = "streamfold-messages", "streamfold-messages-idle"  # names tests and thread dumps know


def batches(outcome: Outcome, max_bytes: int) -> Iterator[list]:
    """The batches of a live translated stream, one per upstream read (``[]`` for a read that completed no
    event). A server that ignored ``stream: true`` and answered one JSON completion: ``[]`` (the opening
    events may go out now), then that completion as one chunk and ``DONE``."""
    if "json" in outcome.content_type and outcome.first.lstrip()[:1] == b"{":
        yield []
        body = upstream.read_body(outcome.stream, outcome.first, max_bytes)
        yield [completion_as_chunk(body), DONE]
        return
    yield from read_batches(upstream.read_chunks(outcome.stream, outcome.first), max_bytes, every_read=True)


class Direct:
    """The items of a translated stream's ``batches``, read by the caller's thread (no keep-alive needed).

    ``response``: the upstream response they are read from, closed (or finished) by ``cancel``; None for
    batches of bytes already at hand.
    """

    def __init__(self, stream_batches: Iterator[list], max_bytes: int, response=None) -> None:
        self.max_bytes = max_bytes
        self.response = response
        self.batches = stream_batches
        self.complete = False  # the upstream's stream ended ([DONE] or the body's end): finish, not drop
        self.closed = False

    def items(self, wait: float | None) -> Iterator[tuple]:
        """The items, in order (``wait`` is unused: reading inline, there is no silence to report)."""
        try:
            for batch in self.batches:
                yield ("chunks", batch)
            self.complete = True
        except ProxyError as exc:
            yield ("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the client, as the pump does
            log.error("streaming reader failed: %s", type(exc).__name__, exc_info=exc)
            yield ("error", ProxyError(f"internal error: {type(exc).__name__}", code="internal_error"))
        while True:
            yield ("end", None)

    def cancel(self, interrupt: bool = True) -> None:
        """Done with the stream: a complete one is finished (its connection kept), any other closed."""
        if not self.closed and self.response is not None:
            self.closed = True
            if self.complete:
                upstream.finish(self.response)
            else:
                self.response.close()


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



class Pump:
    """Runs the request and reads the upstream; ``next`` gives what happened, in order.

    Items: ``("outcome", Outcome)`` once the executor answered, then for a
    translated stream ``("chunks", batch)`` per network read that completed
    an event (``batches``), and finally ``("end", None)`` or
    ``("error", ProxyError)``.
    """

    def __init__(self, run: Callable[[], Outcome], max_bytes: int,
                 work_ended: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        # Called once when no helper works for this stream any more and none will: the request's
        # accounting (its concurrency slot) waits for it, also when the client left while the upstream worked.
        self.work_ended = work_ended
        self.queued: collections.deque = collections.deque()
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
        items = self.queued
        while not items:
            if not self.busy:
                if self.batches is None:
                    return ("end", None)  # nothing more comes (never a silence to ping through forever)
                if upstream.ready(self.response):
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

    def items(self, wait: float | None) -> Iterator[tuple | None]:
        """``next(wait)`` for ever: the items in order, None for each ``wait`` seconds of silence."""
        step = self.next
        while True:
            yield step(wait)

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
        self.batches = batches(outcome, self.max_bytes)
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


def events(protocol: Protocol, exchange: Exchange, writer: EventWriter, source: Pump | Direct,
            pending: list[tuple], on_end: AnswerEnd, silent: bool = False) -> Iterator[bytes]:
    """The protocol's event stream: its opening, then the translated reads, keep-alives in silences.

    The opening goes out with the first read's events (at once when the 200
    was committed early, in a ``silent`` upstream, or when a read completed
    nothing yet); ``pending``: items the caller took from ``source`` already;
    and the terminal event with the events of the read that held ``[DONE]``:
    as many writes as the chat relay makes for the same reads.
    """
    chat = ChatStream(Held(source.max_bytes))  # the tool arguments held until the end are bounded
    keepalive = protocol.keepalive
    wait = KEEPALIVE_INTERVAL if keepalive is not None else None
    feed = writer.feed
    result = "client closed"
    out: list[bytes] = []
    metrics.ACTIVE_STREAMS.inc()
    try:
        out.append(writer.start())
        opening = True  # ``out`` holds only the opening, not written yet
        if silent:  # committed in a silence: the opening and a keep-alive now
            out.append(keepalive)
            yield b"".join(out)
            out, opening = [], False
        for item in chain(pending, source.items(wait)):
            if item is None:  # a silence (keep-alive protocols only)
                out.append(keepalive)
                yield b"".join(out)
                out, opening = [], False
                continue
            kind, value = item
            last = True  # a terminal event goes out in this round (all but a read that did not end the answer)
            try:
                if kind == "chunks":
                    found: list[tuple] = []
                    try:
                        ended = chat_events(chat, value, found)
                    except ProxyError:
                        feed(out, found)  # the events before the failure in this read still go out
                        raise
                    feed(out, found)
                    if ended:  # [DONE]: the answer is whole; no need to wait for the reader's end
                        source.complete = True
                        writer.close(out, chat.close(True), chat.ended_early)
                        result = "complete"
                    else:
                        last = False
                        if not value:  # a read that completed no event: the opening goes out now
                            opening = False
                elif kind == "end":
                    writer.close(out, chat.close(False), chat.ended_early)
                    result = "upstream stream ended early" if chat.ended_early else "complete"
                elif kind == "outcome":  # after an early commit
                    if value.stream is not None:
                        continue
                    result = f"upstream {value.status} after commit"
                    out.append(writer.fail(protocol.failed_answer(value)))
                else:
                    raise value
            except ProxyError as exc:
                if exc.code == "internal_error":  # the reader broke (logged where it did)
                    result = exc.message
                    out.append(writer.fail(ProxyError(INTERNAL, code="server_error")))
                else:
                    mapped = protocol.client_error(exc)
                    result = f"upstream failed mid-stream: {loggable(mapped.message, 200)}"
                    out.append(writer.fail(mapped))
            if last:
                yield from _written(out)
                break
            if out and not (opening and len(out) == 1):
                yield b"".join(out)  # one piece: itself, not a copy
                out, opening = [], False
    except Exception as exc:  # noqa: BLE001 - a bug must still end the stream with its error event, not a cut body
        log.error("%s stream translation failed: %s", protocol.name, type(exc).__name__, exc_info=exc)
        result = f"internal error: {type(exc).__name__}"
        out.append(writer.fail(ProxyError(INTERNAL, code="server_error")))
        yield from _written(out)
    finally:
        source.cancel(interrupt=not writer.ended)  # ended: the reader is done; else the client went away
        metrics.ACTIVE_STREAMS.dec()
        exchange.usage = chat.usage
        on_end(200, result)


def _written(out: list[bytes]) -> Iterator[bytes]:
    """The last write: ``out`` joined; a large ending (the ``*.done`` events repeat the answer) is written as
    it is rather than copied once more to be joined."""
    if not any(out):
        return
    if sum(map(len, out)) > SPLIT_ABOVE:
        yield from (piece for piece in out if piece)
    else:
        yield b"".join(out)
