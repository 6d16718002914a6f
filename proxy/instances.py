"""Which instances share this Redis, for the operator page's overview.

Every worker of an instance refreshes one short-lived key,
``streamfold:instance:<host>:<master pid>`` (so all workers of one gunicorn
instance write the same key), every ``INTERVAL`` seconds from a daemon thread;
an instance that stops is gone from the list within ``TTL`` seconds. Nothing
here runs on the request path, and a Redis outage only makes the list unknown.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import orjson
import redis

from .shared import PREFIX, Shared

log = logging.getLogger(__name__)
KEY_PREFIX = PREFIX + "instance:"
INTERVAL, TTL = 10.0, 30


def instance_id() -> str:
    """``host:pid`` of the gunicorn master (a worker's parent), the same for all workers of an instance."""
    return f"{socket.gethostname()}:{os.getppid()}"


def start(shared: Shared) -> None:
    """Announce this instance now and every ``INTERVAL`` seconds, until ``shared`` is stopped."""
    started = time.time()

    def beat() -> bool:
        try:
            shared.client.set(KEY_PREFIX + instance_id(), orjson.dumps(
                {"id": instance_id(), "host": socket.gethostname(), "started": started, "seen": time.time(),
                 "providers-version": shared.version}), ex=TTL)
            return True
        except (redis.RedisError, OSError):
            return False  # the listener thread already says when Redis is down

    def run() -> None:
        while not shared._stop.wait(INTERVAL):  # stops with the worker's Redis link
            beat()

    beat()
    threading.Thread(target=run, name="streamfold-instance", daemon=True).start()


def listing(shared: Shared) -> list[dict] | None:
    """The instances seen in the last ``TTL`` seconds (None when Redis cannot be asked)."""
    try:
        keys = sorted(shared.client.scan_iter(match=KEY_PREFIX + "*", count=100))
        values = shared.client.mget(keys) if keys else []
    except (redis.RedisError, OSError):
        return None
    out = []
    for raw in values:
        try:
            found = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(found, dict):
            found["this"] = found.get("id") == instance_id()
            out.append(found)
    return out
