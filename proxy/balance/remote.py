"""The balancer across instances sharing the state store (Redis): in-flight counts and session affinity.

Everything goes through the store's interface (``state/store.py``). The
request path asks the store once per session an instance has not seen:
one ``claim`` that puts the session on the replica this instance would pick
unless another instance already put it somewhere, and reads back the winner
(``fleet:session:<hash>``, expiring after ``fleet.session-ttl``),
so two instances that see a session's first turns at once agree; and once
more when a session moves off a failed replica. In-flight counts never wait:
every ``INTERVAL`` seconds a daemon thread per worker announces this worker's
counts per replica as ``fleet:busy:<instance>:<pid>`` (expiring after
``TTL``) and sums the other instances' records into ``busy``, which the
balancer adds to the instance's own live counts.

While the store does not answer (its one up/down flag), ``busy`` is emptied and nothing is queued or
asked: each instance decides alone, with its own counts and sessions, and
catches up when Redis is back.
"""
from __future__ import annotations

import logging
import os
import threading

import orjson

from ..state import Store, StoreUnavailable

log = logging.getLogger(__name__)
BUSY_PREFIX = "fleet:busy:"
SESSION_PREFIX = "fleet:session:"
INTERVAL = 0.25
TTL = 2.0


class RemoteLink:
    def __init__(self, store: Store, instance: str) -> None:
        self.store = store
        self.instance = instance
        self.busy: dict[str, int] = {}   # replica name -> requests in flight at the other instances
        self.counts = None               # set by the balancer: () -> {replica name: this worker's count}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pid = 0
        self._failing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start (again, in a forked worker) the background thread."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="streamfold-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def up(self) -> bool:
        return self.store.up

    # -- request path -------------------------------------------------------------
    def claim(self, session: int, replica: int, ttl: float) -> int:
        """Put a session this instance has not seen on ``replica`` unless another instance already put it
        somewhere; the replica hash it is on now (0: Redis cannot say)."""
        if not self.up:
            return 0
        self.start()
        try:
            found = self.store.claim(f"{SESSION_PREFIX}{session:x}", b"%d" % replica, ttl)
        except StoreUnavailable:
            return 0
        try:
            return int(found) if found else 0
        except ValueError:
            return 0

    def move(self, session: int, replica: int, ttl: float) -> None:
        """The session is on ``replica`` now (its old one failed here); skipped while the store is down."""
        if not self.up:
            return
        try:
            self.store.announce(f"{SESSION_PREFIX}{session:x}", b"%d" % replica, ttl)
        except StoreUnavailable:
            pass

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        mine = f"{BUSY_PREFIX}{self.instance}:"
        key = f"{mine}{os.getpid()}"
        while not self._stop.is_set():
            self._wake.wait(INTERVAL)
            self._wake.clear()
            if not self.up:
                self.busy = {}
                continue
            try:
                counts = self.counts() if self.counts is not None else {}
                self.store.announce(key, orjson.dumps(counts), TTL)
                busy: dict[str, int] = {}
                for name, raw in self.store.announced(BUSY_PREFIX):
                    if name.startswith(mine):
                        continue
                    try:
                        found = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(found, dict):
                        for replica, count in found.items():
                            if isinstance(replica, str) and isinstance(count, int) and 0 < count < 1 << 20:
                                busy[replica] = busy.get(replica, 0) + count
                self.busy = busy
                self._failing = False
            except StoreUnavailable as exc:
                self.busy = {}
                if not self._failing:
                    log.warning("fleet: redis did not answer (%s); this instance balances alone until it does", exc)
                self._failing = True
                self._stop.wait(1.0)
