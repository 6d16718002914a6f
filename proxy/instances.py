"""Which instances share this Redis, for the operator page's overview.

Every worker of an instance refreshes one short-lived record,
``instance:<host>:<master pid>`` in the shared state store (so all workers of
one gunicorn instance write the same key), every ``INTERVAL`` seconds from
the store's background tick; an instance that stops is gone from the list
within ``TTL`` seconds. Nothing here runs on the request path, and while the
store does not answer the list is unknown.
"""
from __future__ import annotations

import os
import socket
import time

import orjson

from .shared import Shared
from .state import StoreUnavailable

KEY_PREFIX = "instance:"
INTERVAL, TTL = 10.0, 30


def instance_id() -> str:
    """``host:pid`` of the gunicorn master (a worker's parent), the same for all workers of an instance."""
    return f"{socket.gethostname()}:{os.getppid()}"


def start(shared: Shared) -> None:
    """Announce this instance now and every ``INTERVAL`` seconds (on the store's tick)."""
    started, store = time.time(), shared.store
    due = 0.0

    def beat() -> None:
        nonlocal due
        if time.monotonic() < due:
            return
        due = time.monotonic() + INTERVAL
        record = {"id": instance_id(), "host": socket.gethostname(), "started": started, "seen": time.time(),
                  "providers-version": shared.version}
        try:
            store.announce(KEY_PREFIX + instance_id(), orjson.dumps(record), TTL)
        except StoreUnavailable:
            pass  # the store says it is down, and is probed until it is back

    beat()
    store.on_tick(beat)


def listing(shared: Shared) -> list[dict] | None:
    """The instances seen in the last ``TTL`` seconds (None when the store cannot be asked)."""
    try:
        found = shared.store.announced(KEY_PREFIX)
    except StoreUnavailable:
        return None
    this = instance_id()
    out = []
    for _, raw in sorted(found):
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append({**record, "this": record.get("id") == this})
    return out
