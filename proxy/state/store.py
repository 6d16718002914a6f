"""The state store interface: usage counters, limit windows, small keyed blobs and, in a store instances share,
what they tell each other; with outage handling.

One ``Store`` per app (``app.extensions["streamfold.state"]``), backed by
SQLite (``sqlite.py``, the default, one file per instance) or Redis
(``redis_store.py``, shared by instances). Callers never know which.

Two kinds of callers, two contracts:

* ``put_blob`` / ``get_blob`` never raise. A namespace may be capped
  (``cap``: at most so many blobs and so many bytes together); a put past the
  cap drops the oldest blobs (those that expire first) of the
  owner holding the most (the key's part before its first ``/``): Redis in
  the same script, so the store holds neither more nor fewer than it says;
  SQLite right after the put, chosen without the file's write lock held, so
  puts from several workers at once may leave it past the cap by those puts
  (or one under) until the next put. While the backend is down a put is
  kept in this process's memory (served to ``get_blob`` from there) and written
  by the background tick once the backend is back; it is dropped when its TTL
  passes first, or when the memory copy grows past ``PENDING_LIMIT`` bytes
  (one loud log line). A get while the backend is down answers from that
  memory copy, else ``None``: a stored response written by another worker is
  unreachable until the backend returns, which is reported as "not found".
* The usage and limit operations (``add_usage``, ``usage``, ``admit``,
  ``settle``, ``renew`` and the single steps ``take``, ``record``,
  ``acquire``, ``release``) and ``secret`` raise ``StoreUnavailable``
  so their owners (``usage.py``, ``limits.py``) can fall back (keep usage in
  memory, count limits per worker). While the backend is known to be down
  they raise at once, without a network or disk round trip; the tick probes
  the backend about once a second and announces its return.
* The operations instances share (``mark``, ``announce``, ``claim``,
  ``publish``, ``subscribe``, the versioned document; only a store whose
  ``shares`` is True has them) raise ``StoreUnavailable`` the same way, and
  their owners (``lockout.py``, ``instances.py``, ``shared.py``,
  ``balance/remote.py``) go on with what the instance knows alone. ``up`` is the
  one up/down flag of all of them, the tick the one probe.

The transition to down and back is logged once each, loudly.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from . import ticker

log = logging.getLogger(__name__)

PENDING_LIMIT = 64 * 1024 * 1024  # bytes of blobs held in memory while the backend is down
# The usage counters, in storage order; ``usage`` rows carry them in this order.
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
UsageKey = tuple[str, str, str, str]  # (day "YYYY-MM-DD" UTC, client, model, provider)


class StoreUnavailable(Exception):
    """The backend cannot be reached or written right now."""


class Subscription(Protocol):
    """What ``Store.subscribe`` returns: messages published by any instance since it was made."""

    def get(self, timeout: float) -> bytes | None:
        """The next message, or None after ``timeout`` seconds without one; raises ``StoreUnavailable``."""

    def close(self) -> None:
        """Stop hearing (never raises)."""


class Store:
    """Base class: the outage handling; subclasses implement the ``_``-prefixed backend operations."""

    kind = "none"
    shares = False  # True when other instances reach the same store (the operations under "shared by instances")
    redis_namespace = ""  # what every key of a shared store starts with, for the deployment's instances alone

    def __init__(self, where: str) -> None:
        self.where = where            # for log lines: a path, or a Redis URL without its password
        self.up = True
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[bytes, float]] = {}  # blobs not written yet
        self._pending_bytes = 0
        self.caps: dict[str, tuple[int, int]] = {}  # namespace -> (max blobs, max bytes); set by ``cap``
        self._tick_hooks: list[Callable[[], None]] = []
        self._tick_lock = threading.Lock()  # the background tick and a shutdown flush never overlap
        self.ticks = 0
        ticker.register(self)

    # -- blobs: never raise ------------------------------------------------
    def put_blob(self, namespace: str, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under (namespace, key) for ``ttl`` seconds."""
        expires = time.time() + ttl
        if self.up:
            try:
                self._put_blob(namespace, key, value, expires)
                return
            except StoreUnavailable as exc:
                self.mark_down(exc)
        self._hold(namespace, key, value, expires)

    def cap(self, namespace: str, max_count: int, max_bytes: int) -> None:
        """Keep at most ``max_count`` blobs and ``max_bytes`` bytes in ``namespace``: puts drop the oldest."""
        self.caps[namespace] = (max_count, max_bytes)

    def get_blob(self, namespace: str, key: str) -> bytes | None:
        """The value, or ``None`` when absent, expired, or only in an unreachable backend."""
        if self._pending:
            held = self._pending.get((namespace, key))
            if held is not None:
                return held[0] if held[1] > time.time() else None
        if not self.up:
            return None
        try:
            return self._get_blob(namespace, key, time.time())
        except StoreUnavailable as exc:
            self.mark_down(exc)
            return None

    def _hold(self, namespace: str, key: str, value: bytes, expires: float) -> None:
        with self._lock:
            old = self._pending.pop((namespace, key), None)
            if old is not None:
                self._pending_bytes -= len(old[0])
            if self._pending_bytes + len(value) > PENDING_LIMIT:
                log.error("state store: %d bytes of blobs already waiting for the %s store; dropping one in "
                          "namespace %s", self._pending_bytes, self.kind, namespace)
                return
            self._pending[(namespace, key)] = (value, expires)
            self._pending_bytes += len(value)

    def _write_pending(self) -> None:
        with self._lock:
            items = list(self._pending.items())
        now = time.time()
        for (namespace, key), (value, expires) in items:
            if expires > now:
                self._put_blob(namespace, key, value, expires)  # StoreUnavailable: try again next tick
            with self._lock:
                if self._pending.get((namespace, key), (None,))[0] is value:
                    del self._pending[(namespace, key)]
                    self._pending_bytes -= len(value)

    # -- usage and limits: raise StoreUnavailable --------------------------
    def add_usage(self, rows: Mapping[UsageKey, Sequence[int]]) -> None:
        """Add counters (in ``COUNTERS`` order) to each (day, client, model, provider) row."""
        self._guard(self._add_usage, rows)

    def usage(self, first_day: str, last_day: str) -> list[tuple]:
        """Rows ``(day, client, model, provider, *COUNTERS)`` for the days in [first_day, last_day]."""
        return self._guard(self._usage, first_day, last_day)

    def take(self, name: str, limit: int, span: float, cost: int = 1) -> float:
        """Sliding window ``name``: if its total over the last ``span`` s is below ``limit``, add ``cost``.

        Returns 0 when admitted, else the seconds until the oldest entry leaves the window.
        ``cost=0`` only checks.
        """
        return self._guard(self._take, name, limit, span, cost)

    def record(self, name: str, amount: int, span: float) -> None:
        """Add ``amount`` to window ``name`` without a check (tokens known after the answer)."""
        self._guard(self._record, name, amount, span)

    def acquire(self, name: str, token: str, limit: int, lease: float) -> bool:
        """Take one of ``limit`` slots of ``name`` for ``lease`` seconds (renewed by the holder)."""
        return self._guard(self._acquire, name, token, limit, lease)

    def release(self, name: str, token: str) -> None:
        self._guard(self._release, name, token)

    def admit(self, checks: Sequence[tuple[str, int]], slot: tuple[str, str, int] | None,
              counts: Sequence[tuple[str, int]], span: float, lease: float,
              nonce: str = "") -> tuple[str, float] | None:
        """One request's limits, all or nothing; ``None`` when admitted.

        ``checks`` are windows (name, limit, reserve) that must be under their
        limit and then get an entry of ``reserve`` (when > 0; named by ``nonce``
        so ``settle`` can take it out again),
        ``slot`` (name, token, limit) a slot to take, ``counts`` windows that
        must be under their limit and then get one more entry. A refusal is
        ``("check" | "slot" | "count", seconds to wait)``, and leaves nothing taken.
        """
        return self._guard(self._admit, checks, slot, counts, span, lease, nonce)

    def settle(self, release: tuple[str, str] | None, record: tuple[str, int] | None, span: float,
               unreserve: tuple[str, int, str] | None = None) -> None:
        """A request is over: give back its slot (name, token), take its reservation (name, amount, nonce) out
        of a window and add its tokens (name, amount)."""
        self._guard(self._settle, release, record, span, unreserve)

    def renew(self, held: Iterable[tuple[str, str]], lease: float) -> None:
        """Extend the lease of slots (name, token) this process still holds."""
        self._guard(self._renew, list(held), lease)

    # -- the deployment's identity secret (identity.py): raises StoreUnavailable --
    def secret(self, candidate: bytes | None) -> bytes | None:
        """The stored identity secret; when there is none and ``candidate`` is given, ``candidate`` is
        stored first (create-if-absent in one atomic step, so concurrent callers all get the one that won)."""
        return self._guard(self._secret, candidate)

    # -- shared by instances (a store whose ``shares`` is True): raise StoreUnavailable --
    # Names are the store's keys without its prefix (``auth:<address>``); an instance-local store has none of
    # these: each instance decides alone then, as it does while a shared store is down.
    def mark(self, name: str, keep: float) -> None:
        """Add the time now to the marks of ``name`` (each kept ``keep`` seconds)."""
        self._guard(self._mark, name, keep)

    def marks(self, name: str, keep: float) -> list[float]:
        """The times (epoch seconds) of the marks of ``name`` made at any instance in the last ``keep`` seconds."""
        return self._guard(self._marks, name, keep)

    def announce(self, name: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``name`` for ``ttl`` seconds (replacing what was there), for every instance."""
        self._guard(self._announce, name, value, ttl)

    def announced(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every ``(name, value)`` announced by any instance whose name starts with ``prefix`` and has not
        expired, in no particular order."""
        return self._guard(self._announced, prefix)

    def claim(self, name: str, value: bytes, ttl: float) -> bytes | None:
        """Announce ``value`` under ``name`` unless something is there already, in one step; what is there now."""
        return self._guard(self._claim, name, value, ttl)

    def publish(self, message: bytes) -> None:
        """Tell every instance listening now (``subscribe``); lost for those that are not (announce what a
        newcomer must know as well)."""
        self._guard(self._publish, message)

    def subscribe(self) -> Subscription:
        """Start hearing what any instance publishes from now on."""
        return self._guard(self._subscribe)

    # A versioned document: one value every instance follows, with a version number that counts its writes and a
    # random revision that tells a rewrite apart (a store that lost its data counts from 0 again).
    def put_versioned(self, name: str, value: bytes, revision: bytes) -> int:
        """Write the document ``name`` in one step; its new version. Raises ``ValueError`` (the store is up, nothing
        was written) when what is there under ``name`` was not written by a store (another type, a version that is
        no number: a hand edit, another program)."""
        return self._guard(self._put_versioned, name, value, revision)

    def revision(self, name: str) -> bytes | None:
        """The revision of the document ``name`` (None: there is none)."""
        return self._guard(self._revision, name)

    def versioned(self, name: str) -> tuple[int, bytes | None]:
        """The version and value of the document ``name`` (0, None when there is none)."""
        return self._guard(self._versioned, name)

    def reseed(self, name: str, value: bytes, version: int, revision: bytes) -> bool:
        """Put back the document ``name`` as this instance last knew it, unless another instance already did (or
        it was written meanwhile); True when this call put it back."""
        return self._guard(self._reseed, name, value, version, revision)

    def _guard(self, operation, *args):
        if not self.up:
            raise StoreUnavailable(f"the {self.kind} state store is down")
        try:
            return operation(*args)
        except StoreUnavailable as exc:
            self.mark_down(exc)
            raise

    # -- health and the background tick -------------------------------------
    def mark_down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            log.error("state store: THE %s STORE AT %s IS UNAVAILABLE (%s); requests go on: usage and stored "
                      "responses are kept in memory until it is back, client limits count per worker",
                      self.kind.upper(), self.where, exc)

    def on_tick(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on every background tick (about once a second) and at ``flush``."""
        self._tick_hooks.append(hook)

    def tick(self) -> None:
        """One background round: probe if down, write held blobs, run the hooks."""
        with self._tick_lock:
            self._tick()

    def _tick(self) -> None:
        self.ticks += 1
        if not self.up:
            try:
                self._probe()
            except StoreUnavailable:
                return
            self.up = True
            log.warning("state store: the %s store at %s is available again; writing what was kept in memory",
                        self.kind, self.where)
        else:
            try:
                self._check()
            except StoreUnavailable as exc:
                self.mark_down(exc)
                return
        try:
            if self._pending:
                self._write_pending()
            if self.ticks % 60 == 0:
                self._expire(time.time())
        except StoreUnavailable as exc:
            self.mark_down(exc)
        for hook in list(self._tick_hooks):
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook must not stop the ticker
                log.exception("state store: a tick hook failed")

    def flush(self) -> None:
        """Write everything held now (graceful stop); never raises."""
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - shutdown path
            log.exception("state store: final flush failed")

    def close(self) -> None:
        ticker.unregister(self)

    # -- backend operations (subclasses) -------------------------------------
    def _put_blob(self, namespace: str, key: str, value: bytes, expires: float) -> None:
        raise NotImplementedError

    def _get_blob(self, namespace: str, key: str, now: float) -> bytes | None:
        raise NotImplementedError

    def _add_usage(self, rows: Mapping[UsageKey, Sequence[int]]) -> None:
        raise NotImplementedError

    def _usage(self, first_day: str, last_day: str) -> list[tuple]:
        raise NotImplementedError

    def _take(self, name: str, limit: int, span: float, cost: int) -> float:
        raise NotImplementedError

    def _record(self, name: str, amount: int, span: float) -> None:
        raise NotImplementedError

    def _acquire(self, name: str, token: str, limit: int, lease: float) -> bool:
        raise NotImplementedError

    def _release(self, name: str, token: str) -> None:
        raise NotImplementedError

    def _renew(self, held: list[tuple[str, str]], lease: float) -> None:
        raise NotImplementedError

    def _secret(self, candidate: bytes | None) -> bytes | None:
        raise NotImplementedError

    def _mark(self, name: str, keep: float) -> None:
        raise NotImplementedError

    def _marks(self, name: str, keep: float) -> list[float]:
        raise NotImplementedError

    def _announce(self, name: str, value: bytes, ttl: float) -> None:
        raise NotImplementedError

    def _announced(self, prefix: str) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def _claim(self, name: str, value: bytes, ttl: float) -> bytes | None:
        raise NotImplementedError

    def _publish(self, message: bytes) -> None:
        raise NotImplementedError

    def _subscribe(self) -> Subscription:
        raise NotImplementedError

    def _put_versioned(self, name: str, value: bytes, revision: bytes) -> int:
        raise NotImplementedError

    def _revision(self, name: str) -> bytes | None:
        raise NotImplementedError

    def _versioned(self, name: str) -> tuple[int, bytes | None]:
        raise NotImplementedError

    def _reseed(self, name: str, value: bytes, version: int, revision: bytes) -> bool:
        raise NotImplementedError

    def _unreserve(self, name: str, amount: int, nonce: str) -> None:
        """Take reservation ``amount`` (named ``nonce``) out of window ``name``, unless it has left already."""
        raise NotImplementedError

    def _admit(self, checks, slot, counts, span: float, lease: float, nonce: str = "") -> tuple[str, float] | None:
        # Each step is atomic on its own (a check and its reservation are one
        # step); a backend that can do all in one transaction overrides this.
        # A refusal gives back what the earlier steps took.
        reserved = []
        for name, limit, cost in checks:
            wait = self._take(name, limit, span, cost)
            if wait:
                self._undo(reserved, None, nonce)
                return "check", wait
            if cost:
                reserved.append((name, cost))
        if slot is not None and not self._acquire(slot[0], slot[1], slot[2], lease):
            self._undo(reserved, None, nonce)
            return "slot", 1.0
        for name, limit in counts:
            wait = self._take(name, limit, span, 1)
            if wait:
                self._undo(reserved, slot, nonce)
                return "count", wait
        return None

    def _undo(self, reserved, slot, nonce: str) -> None:
        if slot is not None:
            self._release(slot[0], slot[1])
        for name, cost in reserved:
            self._unreserve(name, cost, nonce)

    def _settle(self, release, record, span: float, unreserve=None) -> None:
        if release is not None:
            self._release(*release)
        if unreserve is not None:
            self._unreserve(*unreserve)
        if record is not None:
            self._record(record[0], record[1], span)

    def _probe(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers (and can be written)."""
        raise NotImplementedError

    def _check(self) -> None:
        """A cheap health check while up (e.g. the SQLite file was deleted); raise if it failed."""

    def _expire(self, now: float) -> None:
        """Delete expired blobs and window entries (Redis expires them itself)."""
