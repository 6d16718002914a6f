"""Background threads that tick objects of the process at a fixed interval, and the final flush.

One daemon thread per kind of object, not one per object: tests build many
apps, and a thread each would pile up. Objects are held weakly, so a dropped
app's store or config holder goes away. A thread is started with the first
object and again in a forked child (threads do not survive ``fork``, and
gunicorn may build the app before forking its workers). ``STORES`` ticks every
state store about once a second; ``flush_all`` runs at exit (gunicorn's
``worker_exit`` hook and ``atexit``) so usage held in memory is written on a
graceful stop.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable

log = logging.getLogger(__name__)
TICK = 1.0  # seconds between store ticks (usage flush, held blobs, probes of a store that is down)


class Ticker:
    """One daemon thread calling ``tick(member)`` on every member every ``interval`` seconds."""

    def __init__(self, name: str, interval: float, tick: Callable[[Any], None]) -> None:
        self.name, self.interval, self._tick = name, interval, tick
        self._members: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._running = False
        os.register_at_fork(after_in_child=self._after_fork)

    def add(self, member) -> None:
        with self._lock:
            self._members.add(member)
            if not self._running:
                self._start()

    def discard(self, member) -> None:
        with self._lock:
            self._members.discard(member)

    def clear(self) -> None:
        with self._lock:
            self._members.clear()

    def members(self) -> list:
        return list(self._members)

    def _start(self) -> None:
        self._running = True
        threading.Thread(target=self._run, args=(os.getpid(),), name=self.name, daemon=True).start()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork time would never be released
        self._running = False
        if len(self._members):
            self._start()

    def _run(self, pid: int) -> None:
        while os.getpid() == pid:
            time.sleep(self.interval)
            for member in list(self._members):
                try:
                    self._tick(member)
                except Exception:  # noqa: BLE001 - one member's failure must not stop the others' ticks
                    log.exception("%s: a tick failed", self.name)


STORES = Ticker("streamfold-state", TICK, lambda store: store.tick())


def register(store) -> None:
    STORES.add(store)


def unregister(store) -> None:
    STORES.discard(store)


def forget_all() -> None:
    """Stop ticking every store of this process (a test session, before it removes their files)."""
    STORES.clear()


def flush_all() -> None:
    """Write what every store of this process holds (graceful stop: gunicorn ``worker_exit``, atexit)."""
    for store in STORES.members():
        store.flush()
        if not store.up:
            log.error("state store: stopping while the %s store at %s is unavailable; usage and blobs held in "
                      "memory by this process are lost", store.kind, store.where)


atexit.register(flush_all)
