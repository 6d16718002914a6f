"""The management lockout: failed secrets counted per address and for all addresses together.

Five bad secrets from one address within a minute lock that address out for
a minute, and twenty from all addresses together lock every address out for a
minute. The failures are marks in the state store when instances share it
(Redis: ``auth:<address>``, ``auth:*``), so they count at every instance, and
in the instance's activity files for all its workers (``activity.py``), or,
in one process without either, in memory. While the shared store does not
answer, each instance counts its own. ``routes/manage/guard.py`` asks it on
every management request.
"""
from __future__ import annotations

import threading
import time

from . import activity
from .errors import RateLimited
from .state import Store, StoreUnavailable

LOCKOUT_FAILURES, LOCKOUT_WINDOW, LOCKOUT_SECONDS = 5, 60.0, 60.0
# Failed secrets from all addresses together within the window: past it every address is locked out
# for LOCKOUT_SECONDS, so rotating source addresses (127.x.y.z, a botnet) gets no more guesses than this.
GLOBAL_FAILURES = 20
EVERYONE = "*"  # the lockout's name for all addresses together (no address is spelt so)
KEEP = LOCKOUT_WINDOW + LOCKOUT_SECONDS  # how long a failure can still matter


class Lockout:
    """Failed secrets per address: in a shared store for all instances, and in the instance's activity files, or
    (one process) in this app."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failures: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def check(self, address: str) -> None:
        for who, limit, whose in ((address, LOCKOUT_FAILURES, "from this address"),
                                  (EVERYONE, GLOBAL_FAILURES, "from all addresses together")):
            times = self._shared(who)
            if times is None:  # no shared store, or it does not answer: this instance's own count
                times = self._local(who)
            until = activity.locked_until(times, limit, LOCKOUT_WINDOW, LOCKOUT_SECONDS)
            now = time.time()
            if until > now:
                raise RateLimited(f"too many failed management logins {whose}; try again later",
                                  headers={"Retry-After": str(int(until - now) + 1)})

    def _shared(self, who: str) -> list[float] | None:
        if not self.store.shares:
            return None
        try:
            return self.store.marks("auth:" + who, KEEP)
        except StoreUnavailable:
            return None

    def _local(self, address: str) -> list[float]:
        if activity.recorder().configured:
            return [r["t"] for r in activity.recorder().read("auth") if address in (EVERYONE, r.get("address"))]
        return [t for a, t in self.failures if address in (EVERYONE, a)]

    def failed(self, address: str) -> None:
        if self.store.shares:
            try:
                self.store.mark("auth:" + address, KEEP)
                self.store.mark("auth:" + EVERYONE, KEEP)
            except StoreUnavailable:
                pass  # counted below, for this instance
        if activity.recorder().configured:  # counted locally all the same, for when the store does not answer
            activity.record_auth_failure(address)
            return
        now = time.time()
        with self.lock:
            self.failures = [(a, t) for a, t in self.failures if now - t < KEEP] + [(address, now)]
