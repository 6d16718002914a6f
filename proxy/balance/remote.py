"""The balancer across instances sharing Redis: in-flight counts and session affinity.

The request path talks to Redis once per session an instance has not seen:
one MULTI/EXEC that puts the session on the replica this instance would pick
unless another instance already put it somewhere, and reads back the winner
(``streamfold:fleet:session:<hash>``, expiring after ``fleet.session-ttl``),
so two instances that see a session's first turns at once agree; and once
more when a session moves off a failed replica. In-flight counts never wait:
every ``INTERVAL`` seconds a daemon thread per worker writes this worker's
counts per replica to ``streamfold:fleet:busy:<instance>:<pid>`` (expiring
after ``TTL_MS``) and sums the other instances' keys into ``busy``, which the
balancer adds to the instance's own live counts.

While Redis does not answer, ``busy`` is emptied and nothing is queued or
asked: each instance decides alone, with its own counts and sessions, and
catches up when Redis is back.
"""
from __future__ import annotations

import logging
import os
import threading

import orjson
import redis

from ..shared import Shared

log = logging.getLogger(__name__)
PREFIX = "streamfold:"
BUSY_PREFIX = PREFIX + "fleet:busy:"
SESSION_PREFIX = PREFIX + "fleet:session:"
INTERVAL = 0.25
TTL_MS = 2000


class RemoteLink:
    def __init__(self, shared: Shared, instance: str) -> None:
        self.shared = shared
        self.client = shared.store.client
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
        return self.shared.up

    # -- request path -------------------------------------------------------------
    def claim(self, session: int, replica: int, ttl: float) -> int:
        """Put a session this instance has not seen on ``replica`` unless another instance already put it
        somewhere; the replica hash it is on now (0: Redis cannot say)."""
        if not self.up:
            return 0
        self.start()
        key = f"{SESSION_PREFIX}{session:x}"
        try:
            pipe = self.client.pipeline()  # MULTI/EXEC: set-if-absent and read back, atomically
            pipe.set(key, replica, px=max(1, int(ttl * 1000)), nx=True)
            pipe.get(key)
            found = pipe.execute()[1]
        except (redis.RedisError, OSError):
            return 0
        try:
            return int(found) if found else 0
        except ValueError:
            return 0

    def move(self, session: int, replica: int, ttl: float) -> None:
        """The session is on ``replica`` now (its old one failed here); skipped while Redis is down."""
        if not self.up:
            return
        try:
            self.client.set(f"{SESSION_PREFIX}{session:x}", replica, px=max(1, int(ttl * 1000)))
        except (redis.RedisError, OSError):
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
                self.client.set(key, orjson.dumps(counts), px=TTL_MS)
                busy: dict[str, int] = {}
                names = [k for k in self.client.scan_iter(match=BUSY_PREFIX + "*", count=1000)
                         if not k.decode("utf-8", "replace").startswith(mine)]
                for raw in self.client.mget(names) if names else ():
                    if not raw:
                        continue
                    try:
                        found = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(found, dict):
                        for name, count in found.items():
                            if isinstance(name, str) and isinstance(count, int) and 0 < count < 1 << 20:
                                busy[name] = busy.get(name, 0) + count
                self.busy = busy
                self._failing = False
            except (redis.RedisError, OSError) as exc:
                self.busy = {}
                if not self._failing:
                    log.warning("fleet: redis did not answer (%s); this instance balances alone until it does",
                                type(exc).__name__)
                self._failing = True
                self._stop.wait(1.0)
