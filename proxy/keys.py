"""Which provider key to use next, and which keys and providers are sitting out.

State lives in the worker process: round-robin counters per provider,
cooldowns per ``(replica, key id)`` after a 429 or a refused key, and a short
back-off per replica after a connect failure (a replica is a provider, or one
of its ``base-urls`` named ``<provider>#<n>``). It survives config reloads
because it is keyed by names and key ids, not by config objects. A key id is a
hash of the key, so cooldowns can be shared through Redis (``shared.py``)
without the key ever leaving the process. Without Redis each gunicorn worker
has its own; with it, every cooldown is also announced to all workers of all
instances (``publish``) and theirs arrive through ``apply_remote``.

Plain dict operations are atomic under the GIL; the lock only guards the
read-modify-write of back-off doubling.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from typing import Callable, Iterator

from .config.model import KeyEntry
from .routing import Target

REFUSED_KEY_COOLDOWN = 300.0  # an upstream 401/403: the key is wrong, don't hammer it
RATE_LIMIT_DEFAULT = 30.0     # a 429 without Retry-After
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
_NO_KEY = KeyEntry(api_key="")


def key_id(api_key: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 - deliberate memo
    """A stable, non-reversible id for a key (safe to share and to log)."""
    found = _cache.get(api_key)
    if found is None:
        found = _cache[api_key] = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return found


class KeyPool:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.publish: Callable[[str, str, float, str], None] | None = None  # set when Redis is on
        # (provider, key id, seconds, reason): the operator page's instance-wide key state (activity.py)
        self.observe: Callable[[str, str, float, str], None] | None = None
        self.max_cooldown = 3600.0  # settings' max-cooldown, kept current by the config holder
        self._turns: dict[str, itertools.count] = {}
        self._cooling: dict[tuple[str, str], float] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # provider -> (until, current step)
        self._lock = threading.Lock()

    def plan(self, targets: tuple[Target, ...]) -> Iterator[tuple[Target, KeyEntry]]:
        """Attempts in order: each target's usable keys (round-robin), providers in back-off last."""
        now = self.clock()
        healthy = [t for t in targets if self._backoff.get(t.replica_name, (0.0, 0.0))[0] <= now]
        resting = [t for t in targets if t not in healthy]
        for target in healthy + resting:
            yield from ((target, entry) for entry in self.keys(target.replica_name,
                                                                  target.provider.api_key_entries))

    def sitting_out(self) -> bool:
        """False when no key cools and no replica backs off here (then nothing is resting)."""
        return bool(self._cooling or self._backoff)

    def resting(self, target: Target) -> bool:
        """True while the replica backs off after a connect failure or every key of it is cooling down."""
        now, name = self.clock(), target.replica_name
        if self._backoff.get(name, (0.0, 0.0))[0] > now:
            return True
        cooling = self._cooling
        if not cooling:
            return False
        entries = target.provider.api_key_entries or (_NO_KEY,)
        return all(cooling.get((name, key_id(e.api_key)), 0.0) > now for e in entries)

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
        if not cooling:
            return list(ordered)
        return [e for e in ordered if cooling.get((provider, key_id(e.api_key)), 0.0) <= now]

    def soonest_recovery(self, targets: tuple[Target, ...]) -> float:
        """Seconds until the first cooling key of these targets is usable again."""
        now = self.clock()
        waits = [self._cooling.get((t.replica_name, key_id(e.api_key)), now) - now
                 for t in targets for e in t.provider.api_key_entries]
        return max(1.0, min(waits, default=1.0))

    def cool(self, provider: str, entry: KeyEntry, seconds: float, reason: str = "rate_limited") -> None:
        seconds = self._bounded(seconds)
        ident = key_id(entry.api_key)
        self._cooling[(provider, ident)] = self.clock() + seconds
        if self.publish is not None:
            self.publish(provider, ident, seconds, "key")
        if self.observe is not None:
            self.observe(provider, ident, seconds, reason)

    def connect_failed(self, provider: str) -> None:
        with self._lock:
            _, step = self._backoff.get(provider, (0.0, BACKOFF_START / 2))
            step = min(step * 2, BACKOFF_MAX)
            self._backoff[provider] = (self.clock() + step, step)
        if self.publish is not None:
            self.publish(provider, "", step, "backoff")
        if self.observe is not None:
            self.observe(provider, "", step, "backoff")

    def connected(self, provider: str) -> None:
        if provider in self._backoff:
            self._backoff.pop(provider, None)

    def cooling(self) -> dict[tuple[str, str], float]:
        """Read-only: ``(provider, key id)`` -> wall-clock end of each cooldown still running here."""
        now, wall = self.clock(), time.time()
        return {k: wall + (until - now) for k, until in list(self._cooling.items()) if until > now}
    def _bounded(self, seconds: float) -> float:
        """Cooldowns are finite and at most ``max-cooldown``, whatever a number from outside says."""
        if math.isnan(seconds):
            return 0.0
        return min(max(0.0, seconds), self.max_cooldown)

    def apply_remote(self, kind: str, provider: str, ident: str, until_epoch: float) -> None:
        """A cooldown or back-off announced by another worker or instance (wall-clock ``until``)."""
        remaining = self._bounded(until_epoch - time.time())
        if remaining <= 0:
            return
        until = self.clock() + remaining
        if kind == "key":
            if self._cooling.get((provider, ident), 0.0) < until:
                self._cooling[(provider, ident)] = until
        elif kind == "backoff":
            with self._lock:
                current, step = self._backoff.get(provider, (0.0, remaining))
                self._backoff[provider] = (max(until, current), step)
