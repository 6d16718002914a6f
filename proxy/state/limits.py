"""Client key policy: allowed models (globs), requests and tokens per minute, requests in flight.

Everything is kept per client identity (``identity.py``), never per label.

Counts live in the state store, so every worker of an instance (SQLite) or
every instance (Redis) sees the same numbers: windows are sliding (the last
60 s, not the calendar minute), and each check-and-add is atomic in the store
(one SQL statement, one Lua script), so N rpm admits at most N in any 60 s. ``tpm`` is checked on admission
against the tokens in the last 60 s and the request's estimate is reserved
there in the same step, so requests in flight at once count; when the
answer's usage is known the reservation is replaced by it. The request that
crosses the budget finishes and the next ones are refused. A concurrency slot is a lease the holder renews every
``RENEW_EVERY`` s, so a killed worker's slots free themselves within ``LEASE``.

While the store is down every count falls back to this worker's own memory
(the store logs that once), so limits still hold, per worker: a
``MemoryStore`` (``memory.py``) answers the same operations by the same rules.
"""
from __future__ import annotations

import fnmatch
import math
import os
import time
from dataclasses import dataclass

from .. import metrics
from ..config.model import ClientKey
from ..errors import ClientRateLimited
from ..routing import Target, model_not_found, narrowed
from .memory import MemoryStore
from .store import Store, StoreUnavailable

WINDOW = 60.0      # seconds: rpm and tpm are per minute
LEASE = 30.0       # seconds a concurrency slot survives without renewal (a worker killed mid-request)
RENEW_EVERY = 10   # ticks between lease renewals
MAX_HOLD = 6 * 3600.0  # a slot still held after this long is a leak, not a stream: stop renewing it


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds until its answer has gone out (``Record.ticket``; no key material)."""

    name: str             # the client key's identity (limits are kept per identity, never per label)
    tpm: int = 0
    slot: str = ""        # the concurrency slot's token, "" when the key has no max-concurrent
    reserved: int = 0     # tokens reserved in the tpm window on admission, replaced by the real ones at the end
    nonce: str = ""       # names the reservation in the store
    local: bool = False   # the slot was taken in this worker's memory (store down)


def allowed_targets(key: ClientKey, targets: tuple[Target, ...]) -> tuple[Target, ...]:
    """The targets ``key``'s allow-list lets serve a request: decided on what serves, not on what was typed.

    A pattern without ``/`` is matched against the served model's alias (a
    glob alias as written) and its upstream name; a pattern with ``/``
    against those and the provider-qualified names (``<provider>/<model>``,
    ``<prefix>/<model>``). So ``qwen*`` never admits ``qwen-pool/llama`` (a
    provider whose name starts with qwen), and every spelling of one model
    gets the same answer.
    """
    if not key.models:
        return targets
    return narrowed(targets, [t for t in targets if _target_allowed(key.models, t)])


def _target_allowed(patterns: tuple[str, ...], target: Target) -> bool:
    spec, provider = target.spec, target.provider
    bare = (target.model,) if spec is None else (spec.name, spec.alias) if spec.alias else (spec.name,)
    qualified = [f"{provider.name}/{name}" for name in bare]
    if provider.prefix:
        qualified += [f"{provider.prefix}/{name}" for name in bare]
    qualified += bare  # a name with its own "/" (vLLM's Qwen/Qwen2.5-7B-Instruct) is matched as it is, too
    for pattern in patterns:
        names = qualified if "/" in pattern else bare
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return True
    return False


def unmatched_patterns(keys: tuple[ClientKey, ...], targets: list[Target]) -> list[str]:
    """``api-keys[i].models`` patterns that admit no configured model (a typo, or a model since removed):
    one line each, naming the key by its place in the file, never by its characters."""
    return [f"api-keys[{i}].models: {pattern!r} matches no configured model"
            for i, key in enumerate(keys) for pattern in key.models
            if not any(_target_allowed((pattern,), target) for target in targets)]


class Limiter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.local = MemoryStore()  # counts while the store is down: the same operations, per worker
        self._held: dict[str, tuple[str, float]] = {}  # slot token -> (name, since), taken in the store here
        store.on_tick(self._renew)

    def admit(self, key: ClientKey, identity: str, label: str, model: str,
              targets: tuple[Target, ...], reserve: int = 0) -> tuple[tuple[Target, ...], Ticket]:
        """Check ``key``'s policy for one request for ``model`` (resolved to ``targets``): the targets it may
        use and its ticket; raise ``ModelNotFound`` (a model outside the allow-list) or ``ClientRateLimited``.

        Windows and slots are kept per ``identity``; ``label`` is only shown.
        With a ``tpm``, ``reserve`` tokens (the request's estimate) are added to
        its window on admission, so requests in flight at once count against it.
        One store call for all of the key's limits (one Lua script with Redis,
        a few single-statement steps with SQLite); nothing is kept when any refuses.
        """
        if key.models:
            targets = allowed_targets(key, targets)
            if not targets:
                metrics.CLIENT_LIMITED.labels(label, "model").inc()
                raise model_not_found(model)  # the 404 of an unknown model: which models exist stays hidden
        if not (key.rpm or key.tpm or key.max_concurrent):
            return targets, Ticket(identity)
        ticket = Ticket(identity, key.tpm, os.urandom(9).hex() if key.max_concurrent else "",
                        max(0, reserve) if key.tpm else 0, os.urandom(6).hex())
        checks = ((f"tpm:{identity}", key.tpm, ticket.reserved),) if key.tpm else ()
        slot = (f"conc:{identity}", ticket.slot, key.max_concurrent) if key.max_concurrent else None
        counts = ((f"rpm:{identity}", key.rpm),) if key.rpm else ()
        try:
            refused = self.store.admit(checks, slot, counts, WINDOW, LEASE, ticket.nonce)
            if refused is None and slot is not None:
                self._held[ticket.slot] = (slot[0], time.monotonic())
        except StoreUnavailable:
            ticket.local = True
            refused = self.local.admit(checks, slot, counts, WINDOW, LEASE, ticket.nonce)
        if refused is not None:
            ticket.slot, ticket.reserved = "", 0
            kind, wait = refused
            if kind == "check":
                self._refuse(label, "tpm", f"{key.tpm} tokens per minute", wait)
            if kind == "slot":
                self._refuse(label, "concurrency", f"{key.max_concurrent} requests in flight", wait)
            self._refuse(label, "rpm", f"{key.rpm} requests per minute", wait)
        return targets, ticket

    def finish(self, ticket: Ticket, tokens: int) -> None:
        """The request is over: give back its slot, charge its tokens to the tpm window in place of its
        reservation (one store operation)."""
        token, ticket.slot = ticket.slot, ""
        reserved, ticket.reserved = ticket.reserved, 0
        release = (f"conc:{ticket.name}", token) if token else None
        record = (f"tpm:{ticket.name}", tokens) if ticket.tpm and tokens > 0 else None
        unreserve = (f"tpm:{ticket.name}", reserved, ticket.nonce) if reserved else None
        if release is None and record is None and unreserve is None:
            return
        if token:
            self._held.pop(token, None)
        if not ticket.local:
            try:
                self.store.settle(release, record, WINDOW, unreserve)
                return
            except StoreUnavailable:  # taken in the store: the lease and the reservation run out on their own
                release = unreserve = None
        self.local.settle(release, record, WINDOW, unreserve)

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
    def _refuse(label: str, reason: str, what: str, wait: float) -> None:
        metrics.CLIENT_LIMITED.labels(label, reason).inc()
        seconds = max(1, math.ceil(wait))
        raise ClientRateLimited(f"Rate limit reached for client key {label!r}: {what}. "
                                f"Retry after {seconds} s.", headers={"Retry-After": str(seconds)})

