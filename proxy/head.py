"""What the worker may answer from a request's head alone, before it reads (and holds) the body.

The worker (``proxy.worker``) buffers a request whole before a thread takes
it, so a body costs memory from its first byte: 100 clients each sending
9.99 MB of a 10 MB body held ~1 GB of one worker. A request the app would
refuse whatever its body says is refused as soon as its head is in: one that
came round a loop (508, ``proxy.hop``; not the demo's hop, which carries
this instance's id by design and proxies nothing further), and a POST to a route that takes a
client key without a valid key (401). The answers are the app's own errors,
which the worker renders in the route's shape (``ErrorShapes``); the app
checks both again for whatever this lets through (an open proxy, a path
spelled some other way), with the same ``find_key``.

No Flask here: the worker imports this in the gunicorn master, before the
metrics directory is set up (``gunicorn.conf.py``).
"""
from __future__ import annotations

import hmac

from . import hop
from .config.model import ClientKey, Settings
from .errors import LoopDetected, ProxyError, Unauthorized

NO_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
WRONG_KEY = "Incorrect API key provided."

# The routes whose view authenticates the client key before it reads the body.
CLIENT_KEY_ROUTES = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                               "/v1/messages", "/v1/messages/count_tokens"))
# Path prefixes of routes that take the key from a header or the query (Gemini's ``?key=``): refused from the
# head only when a header carries a wrong key (the query is not read here; without a header the app decides).
CLIENT_KEY_PREFIXES = ("/v1beta/models/", "/v1/models/")
# Header names (lower case) ``refusal`` reads; the worker collects just these from the head.
HEADERS = frozenset((b"authorization", b"x-api-key", b"x-goog-api-key", b"streamfold-hop"))


def refusal(settings: Settings, method: str, path: str, headers: dict[bytes, list[bytes]]) -> ProxyError | None:
    """The error to answer when the head alone settles it, else None (read the body, let the app answer).
    ``headers``: the values of each name in ``HEADERS`` the head carried."""
    hops = headers.get(b"streamfold-hop")
    if hops and not path.startswith("/demo/") and hop.looped(",".join(v.decode("latin-1") for v in hops)):
        return LoopDetected(hop.LOOP_MESSAGE)
    if method != "POST" or not settings.api_keys:
        return None
    exact = path in CLIENT_KEY_ROUTES
    if not exact and not path.startswith(CLIENT_KEY_PREFIXES):
        return None
    if any(len(headers.get(name, ())) > 1 for name in (b"authorization", b"x-api-key", b"x-goog-api-key")):
        return None  # repeated: how the app joins them is the app's business
    token = client_token({"Authorization": _one(headers, b"authorization"), "x-api-key": _one(headers, b"x-api-key"),
                          "x-goog-api-key": _one(headers, b"x-goog-api-key")})
    if not token:
        return Unauthorized(NO_KEY) if exact else None
    if find_key(settings.api_keys, token) is None:
        return Unauthorized(WRONG_KEY)
    return None


def _one(headers: dict[bytes, list[bytes]], name: bytes) -> str:
    values = headers.get(name)
    return values[0].decode("latin-1") if values else ""


def client_token(headers, args=None, query: str | None = None) -> str:
    """The client key a request carries: ``Authorization: Bearer``, else ``x-api-key``, else ``x-goog-api-key``
    (Gemini clients), else the ``query`` parameter of ``args`` when the route takes one; "" when none.
    ``headers``/``args``: mappings with ``get`` (werkzeug's, or plain dicts of str)."""
    auth = headers.get("Authorization", "") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    token = headers.get("x-api-key", "") or headers.get("x-goog-api-key", "")
    if not token and query and args is not None:
        token = args.get(query, "") or ""
    return token


def find_key(keys: tuple[ClientKey, ...], token: str) -> ClientKey | None:
    """The client key ``token`` is, compared with every key in constant time each; None if none."""
    given = token.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.key.encode()):
            found = key
    return found
