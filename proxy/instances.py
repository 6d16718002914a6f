"""Which instances share this Redis, for the operator page's overview.

Every worker of an instance refreshes one short-lived record,
``streamfold:instance:<host>:<master pid>`` (so all workers of one gunicorn
instance write the same key), every ``INTERVAL`` seconds from a daemon thread
of its Redis link (``shared.py``, which holds every Redis command of it); an
instance that stops is gone from the list within ``TTL`` seconds. Nothing
here runs on the request path, and a Redis outage only makes the list unknown.
"""
from __future__ import annotations

import os
import socket
import time

from .shared import INSTANCE_PREFIX, Shared

KEY_PREFIX = INSTANCE_PREFIX
INTERVAL, TTL = 10.0, 30


def instance_id() -> str:
    """``host:pid`` of the gunicorn master (a worker's parent), the same for all workers of an instance."""
    return f"{socket.gethostname()}:{os.getppid()}"


def start(shared: Shared) -> None:
    """Announce this instance now and every ``INTERVAL`` seconds, until ``shared`` is stopped."""
    started = time.time()

    def beat() -> None:
        shared.announce(instance_id(), {"id": instance_id(), "host": socket.gethostname(), "started": started,
                                        "seen": time.time(), "providers-version": shared.version}, TTL)

    beat()
    shared.every(INTERVAL, beat, "streamfold-instance")


def listing(shared: Shared) -> list[dict] | None:
    """The instances seen in the last ``TTL`` seconds (None when Redis cannot be asked)."""
    found = shared.instances()
    if found is None:
        return None
    this = instance_id()
    return [{**record, "this": record.get("id") == this} for record in found]
