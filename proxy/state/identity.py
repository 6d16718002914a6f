"""Who a client key is: a keyed hash of the key itself (HMAC-SHA256 with the deployment's secret).

Every per-tenant record (usage rows, rpm / tpm / concurrency windows, stored
Responses conversations) is keyed by this identity, never by the key and
never by its label: ``name`` is for display only, so two keys that share
their last characters are two tenants, and two keys that share a ``name`` are
refused at load. The identity can sit in Redis or the state file without
revealing the key, and without the secret it cannot be used to test guesses.

The secret (32 random bytes) lives in the state store, so all workers of an
instance (SQLite) and all instances sharing Redis agree on it. With Redis it
lives in Redis (instances sharing Redis use no SQLite file), else in the
SQLite file. The first process that needs it stores one in a single
create-if-absent step and everyone uses what is stored, so concurrent first
requests of several workers all end up with the same secret. Each tick reads
it again: a store that came back empty (Redis restarted without persistence,
the state file deleted) gets this process's secret back, and a process that
finds another one stored adopts it (logged).

While the store cannot be reached before this process ever read the secret,
a provisional random one stands in. Limits count per worker then anyway; usage
counted under a provisional identity stays in memory until the real secret is
known and is then written under the real identity (``settled``).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading

from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)
IDENTITY_HEX = 32  # hex digits kept of the HMAC (128 bits): what rows and window names carry
OPEN = "-"         # the identity of every request to a proxy without api-keys


class Identities:
    """This process's view of the deployment secret, and the identities of keys under it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._secret: bytes | None = None        # the stored secret, once read
        self._provisional = os.urandom(32)       # stands in until then
        self._memo: dict[str, str] = {}          # key -> identity (the keys are in the settings anyway)
        self._provisional_keys: dict[str, str] = {}  # provisional identity -> key, to re-key usage later
        self._lock = threading.Lock()
        store.on_tick(self._keep)

    def of(self, key: str) -> str:
        """The identity of ``key``: ``IDENTITY_HEX`` hex digits."""
        found = self._memo.get(key)
        if found is None:
            secret = self._secret or self._load()
            found = _digest(secret, key)
            if secret is self._provisional:
                self._provisional_keys[found] = key
            self._memo[key] = found
        return found

    def settled(self, identity: str) -> str | None:
        """The identity to store a record under: itself, or for a provisional one the real one (``None``
        while the real secret is still unknown)."""
        key = self._provisional_keys.get(identity)
        if key is None:
            return identity
        secret = self._secret
        return None if secret is None else _digest(secret, key)

    def _load(self) -> bytes:
        with self._lock:
            if self._secret is None and self.store.up:
                try:
                    self._adopt(self.store.secret(os.urandom(32)))
                except StoreUnavailable:
                    pass
            return self._secret or self._provisional

    def _keep(self) -> None:
        """Tick: read the stored secret (creating or restoring it when the store has none)."""
        if not self.store.up or (self._secret is None and not self._provisional_keys):
            return  # nothing asked for an identity yet: the store is not touched (the file not created)
        try:
            stored = self.store.secret(None)
            if stored is None:
                stored = self.store.secret(self._secret or os.urandom(32))
        except StoreUnavailable:
            return
        with self._lock:
            self._adopt(stored)

    def _adopt(self, stored: bytes | None) -> None:
        if stored is None or stored == self._secret:
            return
        if self._secret is not None:
            log.warning("state store: the identity secret changed (another process stored a new one while the "
                        "store was empty); client identities follow it from now on")
        self._secret = stored
        self._memo = {}


def label(name: str, named: bool, identity: str) -> str:
    """How a key is shown in logs, metrics and the page: its ``name``, or ``key-`` and 8 digits of its identity.

    Never characters of the key: ``/metrics`` is unauthenticated.
    """
    return name if named else f"key-{identity[:8]}"


def _digest(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:IDENTITY_HEX]
