"""A state store in this process's memory: what the limiter counts in while the real store is down.

The limit operations only (sliding windows and concurrency slots, through
``Store``'s own ``admit`` and ``settle``), so client limits hold per worker
during an outage by the same rules, in the same code, as they hold in SQLite
and Redis. Usage and blobs keep their own memory copies in ``store.py`` and
``usage.py`` until the real store is back.

Nothing here outlives the process, so a slot has no lease: it is held until
released (a worker killed mid-request takes its slots with it).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from .store import Store


class MemoryStore(Store):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__("this process")
        self._state = threading.RLock()  # one admit is all or nothing for the worker's threads
        self._windows: dict[str, deque[tuple[float, int, str]]] = {}  # name -> (at, amount, nonce)
        self._slots: dict[str, set[str]] = {}
        self._nonce = ""  # the reservation ``_take`` is adding for (set by ``_admit``)

    def _admit(self, checks, slot, counts, span: float, lease: float, nonce: str = ""):
        with self._state:
            self._nonce = nonce
            try:
                return super()._admit(checks, slot, counts, span, lease, nonce)
            finally:
                self._nonce = ""

    def _take(self, name: str, limit: int, span: float, cost: int) -> float:
        now = time.monotonic()
        with self._state:
            window = self._windows.setdefault(name, deque())
            while window and window[0][0] <= now - span:
                window.popleft()
            if sum(entry[1] for entry in window) < limit:
                if cost:
                    window.append((now, cost, self._nonce))
                return 0.0
            return max(0.001, window[0][0] + span - now)

    def _unreserve(self, name: str, amount: int, nonce: str) -> None:
        with self._state:
            window = self._windows.get(name)
            if window:
                for index, (_, taken, named) in enumerate(window):
                    if taken == amount and named == nonce:
                        del window[index]
                        return

    def _record(self, name: str, amount: int, span: float) -> None:
        with self._state:
            self._windows.setdefault(name, deque()).append((time.monotonic(), amount, ""))

    def _acquire(self, name: str, token: str, limit: int, lease: float) -> bool:
        with self._state:
            held = self._slots.setdefault(name, set())
            if len(held) >= limit:
                return False
            held.add(token)
            return True

    def _release(self, name: str, token: str) -> None:
        with self._state:
            self._slots.get(name, set()).discard(token)

    def _renew(self, held: list[tuple[str, str]], lease: float) -> None:
        """Slots here have no lease to renew."""
