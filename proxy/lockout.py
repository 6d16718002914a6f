"""The management lockout: failed secrets counted per address and for all addresses together.

Five bad secrets from one address within a minute lock that address out for
a minute, and twenty from all addresses together lock every address out for a
minute. The failures are kept in Redis for all instances (``shared.py``), and
in the instance's activity files for all its workers (``activity.py``), or,
in one process without either, in memory. While Redis does not answer, each
instance counts its own. ``routes/manage/guard.py`` asks it on every
management request.
"""
from __future__ import annotations

import threading
import time

from . import activity
from .errors import RateLimited
from .shared import Shared

LOCKOUT_FAILURES, LOCKOUT_WINDOW, LOCKOUT_SECONDS = 5, 60.0, 60.0
# Failed secrets from all addresses together within the window: past it every address is locked out
# for LOCKOUT_SECONDS, so rotating source addresses (127.x.y.z, a botnet) gets no more guesses than this.
GLOBAL_FAILURES = 20
EVERYONE = "*"  # the lockout's name for all addresses together (no address is spelt so)


class Lockout:
    """Failed secrets per address: in Redis for all instances, and in the instance's activity files, or (one
    process) in this app."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def check(self, address: str, shared: Shared | None) -> None:
        for who, limit, whose in ((address, LOCKOUT_FAILURES, "from this address"),
                                  (EVERYONE, GLOBAL_FAILURES, "from all addresses together")):
            times = None if shared is None else shared.auth_failures(who, LOCKOUT_WINDOW + LOCKOUT_SECONDS)
            if times is None:  # no Redis, or it does not answer: this instance's own count
                times = self._local(who)
            until = activity.locked_until(times, limit, LOCKOUT_WINDOW, LOCKOUT_SECONDS)
            now = time.time()
            if until > now:
                raise RateLimited(f"too many failed management logins {whose}; try again later",
                                  headers={"Retry-After": str(int(until - now) + 1)})

    def _local(self, address: str) -> list[float]:
        if activity.recorder().configured:
            return [r["t"] for r in activity.recorder().read("auth") if address in (EVERYONE, r.get("address"))]
        return [t for a, t in self.failures if address in (EVERYONE, a)]

    def failed(self, address: str, shared: Shared | None) -> None:
        if shared is not None:
            shared.record_auth_failure(address, LOCKOUT_WINDOW + LOCKOUT_SECONDS)
            shared.record_auth_failure(EVERYONE, LOCKOUT_WINDOW + LOCKOUT_SECONDS)
        if activity.recorder().configured:  # counted locally all the same, for when Redis does not answer
            activity.record_auth_failure(address)
            return
        now = time.time()
        with self.lock:
            keep = LOCKOUT_WINDOW + LOCKOUT_SECONDS
            self.failures = [(a, t) for a, t in self.failures if now - t < keep] + [(address, now)]
