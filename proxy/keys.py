"""Which provider key to use next, and which keys and providers are sitting out.

State lives in the worker process (each gunicorn worker has its own; see the
README): round-robin counters per provider, cooldowns per ``(provider, key)``
after a 429 or a refused key, and a short back-off per provider after a
connect failure. It survives config reloads because it is keyed by name and
key value, not by the config objects. Plain dict operations are atomic under
the GIL; the lock only guards the read-modify-write of back-off doubling.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Iterator

from .routing import Target
from .settings import KeyEntry

REFUSED_KEY_COOLDOWN = 300.0  # an upstream 401/403: the key is wrong, don't hammer it
RATE_LIMIT_DEFAULT = 30.0     # a 429 without Retry-After
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
_NO_KEY = KeyEntry(api_key="")


class KeyPool:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._turns: dict[str, itertools.count] = {}
        self._cooling: dict[tuple[str, str], float] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # provider -> (until, current step)
        self._lock = threading.Lock()

    def plan(self, targets: tuple[Target, ...]) -> Iterator[tuple[Target, KeyEntry]]:
        """Attempts in order: each target's usable keys (round-robin), providers in back-off last."""
        now = self.clock()
        healthy = [t for t in targets if self._backoff.get(t.provider.name, (0.0, 0.0))[0] <= now]
        resting = [t for t in targets if t not in healthy]
        for target in healthy + resting:
            yield from ((target, entry) for entry in self.keys(target.provider.name,
                                                                  target.provider.api_key_entries))

    def keys(self, provider: str, entries: tuple[KeyEntry, ...]) -> list[KeyEntry]:
        """The provider's keys not cooling down, starting at the next one in turn."""
        if not entries:
            return [_NO_KEY]
        turns = self._turns.get(provider)
        if turns is None:
            turns = self._turns.setdefault(provider, itertools.count())
        start = next(turns) % len(entries)
        ordered = entries[start:] + entries[:start]
        now, cooling = self.clock(), self._cooling
        return [e for e in ordered if cooling.get((provider, e.api_key), 0.0) <= now]

    def soonest_recovery(self, targets: tuple[Target, ...]) -> float:
        """Seconds until the first cooling key of these targets is usable again."""
        now = self.clock()
        waits = [self._cooling.get((t.provider.name, e.api_key), now) - now
                 for t in targets for e in t.provider.api_key_entries]
        return max(1.0, min(waits, default=1.0))

    def cool(self, provider: str, entry: KeyEntry, seconds: float) -> None:
        self._cooling[(provider, entry.api_key)] = self.clock() + seconds

    def connect_failed(self, provider: str) -> None:
        with self._lock:
            _, step = self._backoff.get(provider, (0.0, BACKOFF_START / 2))
            step = min(step * 2, BACKOFF_MAX)
            self._backoff[provider] = (self.clock() + step, step)

    def connected(self, provider: str) -> None:
        if provider in self._backoff:
            self._backoff.pop(provider, None)
