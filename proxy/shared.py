"""State shared by several instances through Redis (``REDIS_URL`` or ``redis-url``).

It talks to Redis through the state store's client (``state/redis_store.py``: one client per
process). Shared, each layered over what the instance has locally:

* **Runtime provider changes.** With Redis on, management writes store the
  whole ``openai-compatibility`` list (as written, ``${VAR}`` unresolved) under
  ``streamfold:providers`` with a version number, and announce the version on
  the ``streamfold:events`` channel. That list replaces the settings file's
  list; everything else still comes from the file.
* **Cooldowns and back-offs.** A key cooled by a 429 or a refusal, or a
  provider backing off after a connect failure, is written as an expiring key
  (``streamfold:cool:<provider>:<key id>``, the key id being a hash, never the
  key) and announced, so every worker of every instance skips it too.

Each worker runs one background thread that listens to the channel, polls the
version once a second in case a message was missed, and on (re)connecting
loads the current version and cooldowns. The request path never waits for
Redis: it reads local copies, and only a cooldown (rare) is written through,
with a short socket timeout. If Redis is down, the worker keeps its last known
config and local cooldowns, says so in the log, and retries with back-off.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import orjson
import redis

from .state import Store, StoreUnavailable

log = logging.getLogger(__name__)
PREFIX = "streamfold:"
PROVIDERS_KEY = PREFIX + "providers"
CHANNEL = PREFIX + "events"
COOL_PREFIX = "cool:"  # a store name (streamfold:cool:... in Redis)
POLL_INTERVAL = 1.0
BACKOFF_MAX = 30.0


class SharedUnavailable(Exception):
    """Redis could not be reached for a write that must be shared."""


class Shared:
    """One worker's link to Redis: a command client and a listener thread."""

    def __init__(self, store: Store, on_providers: Callable[[int, list | None], None],
                 on_cooldown: Callable[[str, str, float, str], None]) -> None:
        self.store = store
        self.safe_url = store.where  # the URL without its password
        self.on_providers = on_providers
        self.on_cooldown = on_cooldown
        self.client = store.client
        self.version = 0
        self.revision: bytes | None = None  # random id of the list last applied (numbers restart with Redis)
        self.providers: list | None = None
        self.up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        try:
            self._catch_up()
            self.up = True
            log.info("shared state: connected to redis at %s (providers version %d)", self.safe_url, self.version)
        except (redis.RedisError, OSError, StoreUnavailable) as exc:
            log.error("shared state: REDIS IS UNREACHABLE at %s (%s); starting from the settings file and "
                      "local cooldowns, will keep retrying", self.safe_url, type(exc).__name__)
        self._thread = threading.Thread(target=self._listen, name="streamfold-redis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- writes (request path / management) --------------------------------
    def store_providers(self, providers: list) -> int:
        """Store a new runtime provider list; returns its version. Raises ``SharedUnavailable``."""
        revision = os.urandom(8).hex().encode()
        try:
            pipe = self.client.pipeline()  # MULTI/EXEC: readers never see a half-written version
            pipe.hincrby(PROVIDERS_KEY, "version", 1)
            pipe.hset(PROVIDERS_KEY, mapping={"providers": orjson.dumps(providers), "revision": revision})
            version = pipe.execute()[0]
            self.revision, self.version, self.providers = revision, version, providers
            self.client.publish(CHANNEL, orjson.dumps({"kind": "providers", "version": version}))
        except (redis.RedisError, OSError, StoreUnavailable) as exc:
            self.up = False
            raise SharedUnavailable(f"redis is unreachable ({type(exc).__name__})") from None
        return version

    def publish_cooldown(self, provider: str, key_id: str, seconds: float, kind: str) -> None:
        """Share a cooldown; skipped (local only) while Redis is known to be down."""
        if not self.up:
            return
        until = time.time() + seconds
        message = orjson.dumps({"kind": kind, "provider": provider, "key": key_id, "until": until})
        try:
            self.store.announce(f"{COOL_PREFIX}{kind}:{provider}:{key_id}", message, seconds)  # for newcomers
            self.store.publish(message)
        except StoreUnavailable:
            self.up = False
            log.error("shared state: redis unreachable while sharing a cooldown; it stays local to this worker")

    # -- the listener thread -------------------------------------------------
    def _listen(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                # What was announced before this subscription took effect would
                # be missed: read the current version and cooldowns once now.
                self._catch_up()
                if not self.up:
                    self.up = True
                    log.warning("shared state: redis at %s is reachable again; caught up to providers version %d",
                                self.safe_url, self.version)
                backoff = 0.5
                next_poll = time.monotonic() + POLL_INTERVAL
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=POLL_INTERVAL)
                    if message is not None and message.get("type") == "message":
                        self._handle(message["data"])
                    if time.monotonic() >= next_poll:
                        self._poll_version()
                        next_poll = time.monotonic() + POLL_INTERVAL
            except (redis.RedisError, OSError, StoreUnavailable) as exc:
                if self.up:
                    log.error("shared state: lost redis at %s (%s); serving with the last known config and local "
                              "cooldowns, retrying", self.safe_url, type(exc).__name__)
                self.up = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass

    def _catch_up(self) -> None:
        self._poll_version(force=True)
        for _, raw in self.store.announced(COOL_PREFIX):
            self._handle(raw)

    def _poll_version(self, force: bool = False) -> None:
        revision = self.client.hget(PROVIDERS_KEY, "revision")
        if revision == self.revision and not force:
            return
        if revision is None and self.providers is not None:
            # Redis came back empty (restarted without persistence): put the
            # last known list back rather than silently reverting to the file.
            if self.client.hsetnx(PROVIDERS_KEY, "revision", self.revision or b"reseeded"):
                self.client.hset(PROVIDERS_KEY, mapping={"providers": orjson.dumps(self.providers),
                                                         "version": self.version})
                log.warning("shared state: redis had no provider list; restored providers version %d",
                            self.version)
            return
        version, raw = self.client.hmget(PROVIDERS_KEY, ["version", "providers"])
        self.revision = revision
        self.version = int(version) if version else 0
        self.providers = orjson.loads(raw) if raw else None
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
