"""The background thread that ticks every state store of the process about once a second, and the final flush.

One daemon thread per process, not one per store: tests build many apps, and
a thread each would pile up. Stores are held weakly, so a dropped app's store
goes away. The thread is started with the first store and again in a forked
child (threads do not survive ``fork``, and gunicorn may build the app before
forking its workers). ``flush_all`` runs at exit (gunicorn's ``worker_exit``
hook and ``atexit``) so usage held in memory is written on a graceful stop.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

log = logging.getLogger(__name__)
TICK = 1.0  # seconds between ticks (usage flush, held blobs, probes of a store that is down)

_stores: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()
_running = False


def register(store) -> None:
    with _lock:
        _stores.add(store)
        if not _running:
            _start()


def unregister(store) -> None:
    with _lock:
        _stores.discard(store)


def forget_all() -> None:
    """Stop ticking every store of this process (a test session, before it removes their files)."""
    with _lock:
        _stores.clear()


def _start() -> None:
    global _running
    _running = True
    threading.Thread(target=_run, args=(os.getpid(),), name="streamfold-state", daemon=True).start()


def _after_fork() -> None:
    global _lock, _running
    _lock = threading.Lock()  # a lock held by another thread at fork time would never be released
    _running = False
    if len(_stores):
        _start()


def _run(pid: int) -> None:
    while os.getpid() == pid:
        time.sleep(TICK)
        for store in list(_stores):
            store.tick()


def flush_all() -> None:
    """Write what every store of this process holds (graceful stop: gunicorn ``worker_exit``, atexit)."""
    for store in list(_stores):
        store.flush()
        if not store.up:
            log.error("state store: stopping while the %s store at %s is unavailable; usage and blobs held in "
                      "memory by this process are lost", store.kind, store.where)


os.register_at_fork(after_in_child=_after_fork)
atexit.register(flush_all)
