"""State shared by several instances through the state store when instances share it (Redis: ``REDIS_URL``
or ``redis-url``).

Every command goes through the store's interface (``state/store.py``: announce,
publish, subscribe, versioned documents), and the store's up/down flag and
probe are the only ones: while it is down each instance decides alone.
Shared, each layered over what the instance has locally:

* **Runtime provider changes.** With Redis on, management writes store the
  whole ``openai-compatibility`` list (as written, ``${VAR}`` unresolved) as the
  versioned document ``providers`` (``streamfold:providers`` in Redis), and
  publish the version. That list replaces the settings file's list;
  everything else still comes from the file.
* **Cooldowns and back-offs.** A key cooled by a 429 or a refusal, or a
  provider backing off after a connect failure, is announced as an expiring
  record (``cool:<kind>:<provider>:<key id>``, the key id being a hash, never the
  key) and published, so every worker of every instance skips it too.

Each worker runs one background thread that listens to the store's events
(the ``streamfold:events`` channel), polls the version once a second in case a
message was missed, and on (re)subscribing loads the current version and
cooldowns. The request path never waits for the store: it reads local
copies, and only a cooldown (rare) is written through, with a short socket
timeout. While the store is down, the worker keeps its last known config and
local cooldowns, says so in the log, and subscribes again once the store's
probe (about once a second) finds it back.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import orjson

from .state import Store, StoreUnavailable

log = logging.getLogger(__name__)
PROVIDERS = "providers"  # the versioned document of the runtime provider list
COOL_PREFIX = "cool:"  # announced cooldowns (streamfold:cool:... in Redis)
POLL_INTERVAL = 1.0


class SharedUnavailable(Exception):
    """The store could not be reached for a write that must be shared."""


class SharedRefused(Exception):
    """The store answered, but holds a provider list no instance wrote, which a write must not count on."""


class Shared:
    """One worker's view of what instances share: the provider list, cooldowns, and a listener thread."""

    def __init__(self, store: Store, on_providers: Callable[[int, list | None], None],
                 on_cooldown: Callable[[str, str, float, str], None]) -> None:
        self.store = store
        self.safe_url = store.where  # the URL without its password
        self.on_providers = on_providers
        self.on_cooldown = on_cooldown
        self.version = 0
        self.revision: bytes | None = None  # random id of the list last applied (numbers restart with Redis)
        self.providers: list | None = None
        self._following = False  # the listener is subscribed and caught up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def up(self) -> bool:
        """The store's own flag: one up/down state for everything the instance keeps there."""
        return self.store.up

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        try:
            self._catch_up()
            self._following = True
            log.info("shared state: connected to redis at %s, namespace %s (providers version %d)", self.safe_url,
                     self.store.redis_namespace or "(none: keys under streamfold:)", self.version)
        except StoreUnavailable as exc:
            log.error("shared state: REDIS IS UNREACHABLE at %s (%s); starting from the settings file and "
                      "local cooldowns, will keep retrying", self.safe_url, exc)
        self._thread = threading.Thread(target=self._listen, name="streamfold-redis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- writes (request path / management) --------------------------------
    def store_providers(self, providers: list) -> int:
        """Store a new runtime provider list; returns its version. Raises ``SharedUnavailable`` or
        ``SharedRefused``."""
        revision = os.urandom(8).hex().encode()
        try:
            version = self.store.put_versioned(PROVIDERS, orjson.dumps(providers), revision)
            self.revision, self.version, self.providers = revision, version, providers
            self.store.publish(orjson.dumps({"kind": "providers", "version": version}))
        except StoreUnavailable as exc:
            raise SharedUnavailable(f"redis is unreachable ({exc})") from None
        except ValueError as exc:  # Redis is up: what sits there is refused, as every reader refuses it
            log.error("shared state: a provider list write was refused, nothing was changed: %s", exc)
            raise SharedRefused(str(exc)) from None
        return version

    def publish_cooldown(self, provider: str, key_id: str, seconds: float, kind: str) -> None:
        """Share a cooldown; skipped (local only) while the store is known to be down."""
        if not self.store.up:
            return
        until = time.time() + seconds
        message = orjson.dumps({"kind": kind, "provider": provider, "key": key_id, "until": until})
        try:
            self.store.announce(f"{COOL_PREFIX}{kind}:{provider}:{key_id}", message, seconds)  # for newcomers
            self.store.publish(message)
        except StoreUnavailable:
            log.error("shared state: redis unreachable while sharing a cooldown; it stays local to this worker")

    # -- the listener thread -------------------------------------------------
    def _listen(self) -> None:
        while not self._stop.is_set():
            subscription = None
            try:
                subscription = self.store.subscribe()
                # What was announced before this subscription took effect would
                # be missed: read the current version and cooldowns once now.
                self._catch_up()
                if not self._following:
                    self._following = True
                    log.warning("shared state: redis at %s is reachable again; caught up to providers version %d",
                                self.safe_url, self.version)
                next_poll = time.monotonic() + POLL_INTERVAL
                while not self._stop.is_set():
                    message = subscription.get(POLL_INTERVAL)
                    if message is not None:
                        self._handle(message)
                    if time.monotonic() >= next_poll:
                        self._poll_version()
                        next_poll = time.monotonic() + POLL_INTERVAL
            except StoreUnavailable as exc:
                self.store.mark_down(exc)  # a lost subscription says so too
                if self._following:
                    log.error("shared state: lost redis at %s (%s); serving with the last known config and local "
                              "cooldowns, retrying", self.safe_url, exc)
                self._following = False
                self._stop.wait(0.5)
                while not self.store.up and not self._stop.wait(0.25):
                    pass  # the store's tick probes it about once a second
            finally:
                if subscription is not None:
                    subscription.close()

    def _catch_up(self) -> None:
        self._poll_version(force=True)
        for _, raw in self.store.announced(COOL_PREFIX):
            self._handle(raw)

    def _poll_version(self, force: bool = False) -> None:
        revision = self.store.revision(PROVIDERS)
        if revision == self.revision and not force:
            return
        if revision is None and self.providers is not None:
            # The store came back empty (Redis restarted without persistence): put the
            # last known list back rather than silently reverting to the file.
            if self.store.reseed(PROVIDERS, orjson.dumps(self.providers), self.version,
                                 self.revision or b"reseeded"):
                log.warning("shared state: redis had no provider list; restored providers version %d",
                            self.version)
            return
        try:
            version, raw = self.store.versioned(PROVIDERS)
            providers = orjson.loads(raw) if raw else None
        except ValueError:  # a version that is no number, a list that is no JSON (not written by an instance)
            self.revision = revision  # said once per revision; the running config stays, as for one that
            log.error("shared state: the provider list in the state store is not readable (not a hash, not JSON "
                      "or its version not a number); keeping the running config")  # does not validate
            return
        self.revision = revision
        self.version = version
        self.providers = providers
        self.on_providers(self.version, self.providers)

    def _handle(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("kind")
        if kind == "providers":
            self._poll_version()
        elif kind in ("key", "backoff"):
            try:
                until = float(message.get("until", 0))
            except (TypeError, ValueError):
                return  # not a number: ignored (keys.apply_remote bounds the numbers)
            self.on_cooldown(kind, str(message.get("provider")), str(message.get("key", "")), until)
