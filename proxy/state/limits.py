"""Client key policy: allowed models (globs), requests and tokens per minute, requests in flight.

Counts live in the state store, so every worker of an instance (SQLite) or
every instance (Redis) sees the same numbers: windows are sliding (the last
60 s, not the calendar minute), and each check-and-add is one atomic store
step, so N rpm admits at most N in any 60 s. ``tpm`` is checked on admission
against the tokens recorded in the last 60 s and charged when the answer's
usage is known, so the request that crosses the budget finishes and the next
one is refused. A concurrency slot is a lease the holder renews every
``RENEW_EVERY`` s, so a killed worker's slots free themselves within ``LEASE``.

While the store is down every count falls back to this worker's own memory
(the store logs that once), so limits still hold, per worker.
"""
from __future__ import annotations

import fnmatch
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from .. import metrics
from ..errors import ClientRateLimited, ModelNotAllowed
from ..settings import ClientKey
from .store import Store, StoreUnavailable

WINDOW = 60.0      # seconds: rpm and tpm are per minute
LEASE = 30.0       # seconds a concurrency slot survives without renewal (a worker killed mid-request)
RENEW_EVERY = 10   # ticks between lease renewals
MAX_HOLD = 6 * 3600.0  # a slot still held after this long is a leak, not a stream: stop renewing it


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds until its answer has gone out (no key material: it sits in g.log)."""

    name: str             # the client key's name (limits are kept per name)
    tpm: int = 0
    slot: str = ""        # the concurrency slot's token, "" when the key has no max-concurrent
    local: bool = False   # the slot was taken in this worker's memory (store down)


def model_allowed(key: ClientKey, model: str) -> bool:
    return not key.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in key.models)


class Limiter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.local = _LocalCounts()
        self._held: dict[str, tuple[str, float]] = {}  # slot token -> (name, since), taken in the store here
        store.on_tick(self._renew)

    def admit(self, key: ClientKey, model: str) -> Ticket:
        """Check ``key``'s policy for one request; raise ``ModelNotAllowed`` or ``ClientRateLimited``."""
        if not model_allowed(key, model):
            metrics.CLIENT_LIMITED.labels(key.name, "model").inc()
            raise ModelNotAllowed(f"The client key {key.name!r} may not use the model {model!r}.", param="model")
        ticket = Ticket(key.name, key.tpm)
        if key.tpm:
            wait = self._take(f"tpm:{key.name}", key.tpm, 0)
            if wait:
                self._refuse(key, "tpm", f"{key.tpm} tokens per minute", wait)
        if key.max_concurrent:
            token = os.urandom(9).hex()
            try:
                ticket.local = not self._acquire(f"conc:{key.name}", token, key.max_concurrent)
            except _Full:
                self._refuse(key, "concurrency", f"{key.max_concurrent} requests in flight", 1.0)
            ticket.slot = token
        if key.rpm:
            wait = self._take(f"rpm:{key.name}", key.rpm, 1)
            if wait:
                self.release(ticket)
                self._refuse(key, "rpm", f"{key.rpm} requests per minute", wait)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give back the concurrency slot (the answer has gone out, or failed)."""
        token, ticket.slot = ticket.slot, ""
        if not token:
            return
        name = f"conc:{ticket.name}"
        if ticket.local:
            self.local.release(name, token)
            return
        self._held.pop(token, None)
        try:
            self.store.release(name, token)
        except StoreUnavailable:
            pass  # the lease runs out on its own

    def spend(self, ticket: Ticket, tokens: int) -> None:
        """Charge the answer's tokens to the key's tpm window."""
        if not ticket.tpm or tokens <= 0:
            return
        name = f"tpm:{ticket.name}"
        try:
            self.store.record(name, tokens, WINDOW)
        except StoreUnavailable:
            self.local.record(name, tokens)

    # -- store first, this worker's memory while it is down ---------------------
    def _take(self, name: str, limit: int, cost: int) -> float:
        try:
            return self.store.take(name, limit, WINDOW, cost)
        except StoreUnavailable:
            return self.local.take(name, limit, cost)

    def _acquire(self, name: str, token: str, limit: int) -> bool:
        """True when the slot was taken in the store, False when locally; raises when none is free."""
        try:
            if self.store.acquire(name, token, limit, LEASE):
                self._held[token] = (name, time.monotonic())
                return True
            raise _Full
        except StoreUnavailable:
            if self.local.acquire(name, token, limit):
                return False
            raise _Full from None

    def _renew(self) -> None:
        if not self._held or self.store.ticks % RENEW_EVERY:
            return
        oldest = time.monotonic() - MAX_HOLD
        held = []
        for token, (name, since) in list(self._held.items()):
            if since < oldest:
                self._held.pop(token, None)  # its lease runs out within LEASE
            else:
                held.append((name, token))
        try:
            self.store.renew(held, LEASE)
        except StoreUnavailable:
            pass

    @staticmethod
    def _refuse(key: ClientKey, reason: str, what: str, wait: float) -> None:
        metrics.CLIENT_LIMITED.labels(key.name, reason).inc()
        seconds = max(1, math.ceil(wait))
        raise ClientRateLimited(f"Rate limit reached for client key {key.name!r}: {what}. "
                                f"Retry after {seconds} s.", headers={"Retry-After": str(seconds)})


class _Full(Exception):
    pass


class _LocalCounts:
    """Per-worker windows and slots, used only while the store is down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, deque[tuple[float, int]]] = {}
        self._slots: dict[str, set[str]] = {}

    def take(self, name: str, limit: int, cost: int) -> float:
        now = time.monotonic()
        with self._lock:
            window = self._windows.setdefault(name, deque())
            while window and window[0][0] <= now - WINDOW:
                window.popleft()
            if sum(amount for _, amount in window) < limit:
                if cost:
                    window.append((now, cost))
                return 0.0
            return max(0.001, window[0][0] + WINDOW - now)

    def record(self, name: str, amount: int) -> None:
        with self._lock:
            self._windows.setdefault(name, deque()).append((time.monotonic(), amount))

    def acquire(self, name: str, token: str, limit: int) -> bool:
        with self._lock:
            held = self._slots.setdefault(name, set())
            if len(held) >= limit:
                return False
            held.add(token)
            return True

    def release(self, name: str, token: str) -> None:
        with self._lock:
            self._slots.get(name, set()).discard(token)
