"""What marks the proxy's own upstream requests: the hop header (loop detection) and the demo secret.

A provider whose ``base-url`` is the proxy itself (or a chain of proxies that
ends there) made one request re-enter until every thread of a worker was
taken. Every upstream request now carries ``Streamfold-Hop``: the hop ids it
came in with plus this instance's own, like RFC 9110's ``Via``. A request
that arrives carrying this instance's id has come round a loop and is
answered ``508 Loop Detected`` at once; so is one that has passed more than
``MAX_HOPS`` proxies (a loop through several instances, each adding its id).
Other streamfold instances in a chain see ids that are not theirs and pass.

The id is derived from a random secret per instance: ``gunicorn.conf.py``
makes one in the master before the workers fork (``SECRET_ENV``), so all
workers share it; a process without one (``python app.py``, tests) makes its
own. The built-in demo upstream answers only requests carrying
``Streamfold-Demo`` with a value derived from the same secret, which the
executor sends to the demo's provider only: a same-host TCP forwarder with
no forwarding header does not make a stranger the proxy itself.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
from functools import lru_cache
from urllib.parse import urlsplit

HEADER = "Streamfold-Hop"
DEMO_HEADER = "Streamfold-Demo"
ENVIRON_KEY = "HTTP_STREAMFOLD_HOP"
DEMO_ENVIRON_KEY = "HTTP_STREAMFOLD_DEMO"
SECRET_ENV = "STREAMFOLD_INSTANCE_SECRET"
MAX_HOPS = 8          # proxies a request may have passed; more is a loop through several instances
DEMO_PATH = "/demo/v1"
LOOP_MESSAGE = ("This request has already passed through this proxy (its Streamfold-Hop header says so): a "
                "provider's base-url points back at the proxy itself. Point it at the model server instead.")

_secret: bytes | None = None
_own_id: str | None = None  # derived once: the secret never changes after it is read
_lock = threading.Lock()


def read_secret() -> None:
    """Take the instance secret from the environment (the app factory calls this, so no request reads it)."""
    _instance_secret()


def _instance_secret() -> bytes:
    global _secret
    if _secret is None:
        with _lock:
            if _secret is None:
                given = os.environ.get(SECRET_ENV, "")
                _secret = given.encode() if len(given) >= 32 else os.urandom(32)
    return _secret


def _derived(purpose: bytes) -> str:
    return hmac.new(_instance_secret(), purpose, hashlib.sha256).hexdigest()[:32]


def own_id() -> str:
    """This instance's hop id (public: upstreams see it; it proves nothing, it only marks)."""
    global _own_id
    found = _own_id
    if found is None:
        found = _own_id = "sf-" + _derived(b"hop")[:16]
    return found


def forward(incoming: str | None) -> str:
    """The ``Streamfold-Hop`` value for an upstream request made for a request that came with ``incoming``."""
    if not incoming:
        return own_id()
    ids = _ids(incoming)[-MAX_HOPS:]
    ids.append(own_id())
    return ", ".join(ids)


def looped(incoming: str | None) -> bool:
    """Whether a request with this ``Streamfold-Hop`` value has come round to this instance again."""
    if not incoming:
        return False
    ids = _ids(incoming)
    return own_id() in ids or len(ids) > MAX_HOPS


def _ids(value: str | None) -> list[str]:
    if not value:
        return []
    return [part.strip() for part in value[:4096].split(",") if part.strip()][:64]


def demo_secret() -> str:
    """The ``Streamfold-Demo`` value the demo upstream requires (never logged, never sent elsewhere)."""
    return _derived(b"demo")


def is_demo_secret(given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), demo_secret().encode())


@lru_cache(maxsize=256)
def is_demo_url(base_url: str) -> bool:
    """A provider whose base-url is a loopback ``.../demo/v1``: the built-in demo, which gets the secret."""
    try:
        parts = urlsplit(base_url)
        host = (parts.hostname or "").split("%", 1)[0]
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
    return loopback and parts.path.rstrip("/").endswith(DEMO_PATH)
