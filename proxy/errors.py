"""The exception tree of streamfold, and the OpenAI-shaped body each one renders to.

Every failure the proxy reports is a ``ProxyError`` (or a subclass) carrying the
HTTP status, the OpenAI error ``type`` and optional ``code``/``param``. One Flask
handler (``proxy.web``) turns them into ``{"error": {...}}``; this module stays
free of Flask so the pure parts (settings, fold) can raise these too.
"""
from __future__ import annotations

import re
from typing import Callable

import orjson


class ProxyError(Exception):
    """Root of every error the client may see; rendered as an OpenAI error."""

    status = 500
    type = "server_error"
    code: str | int | None = None

    def __init__(self, message: str, *, status: int | None = None,
                 type: str | None = None, code: str | int | None = None,
                 param: str | None = None, headers: dict | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail  # what the operator reads (log, operator page), which may say more than the message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ManagementUnauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_management_key"


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class InvalidSettings(BadRequest):
    """A management change that does not validate: each problem named by its key path (also in ``problems``)."""

    code = "invalid_settings"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the change does not validate: " + "; ".join(problems))
        self.problems = problems

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code, "problems": self.problems}})


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class LoopDetected(ProxyError):
    """The request came round to this proxy again (``proxy.hop``): a provider's base-url points back at it."""

    status = 508
    type = "server_error"
    code = "loop_detected"


class RateLimited(ProxyError):
    """Every key that could serve the request is cooling down (or the upstream said 429)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ClientRateLimited(RateLimited):
    """The client key's own policy (rpm, tpm, max-concurrent) refuses the request."""

    code = "client_rate_limited"


class UpstreamUnavailable(ProxyError):
    """The upstream could not be reached or refused the provider's credentials."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class StateStoreDown(ProxyError):
    """The state store cannot answer a question only it can (recorded usage)."""

    status = 503
    type = "server_error"
    code = "state_store_unavailable"


class StreamError(ProxyError):
    """An upstream event stream that cannot be folded into an honest answer.

    ``retryable`` tells the executor whether another attempt could succeed
    (a stream cut off or an in-stream rate limit) or not (malformed data, a
    folded answer over ``max-aggregate-bytes``).
    """

    status = 502
    type = "upstream_error"
    code = "upstream_stream_error"

    def __init__(self, message: str, *, retryable: bool = False, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retryable = retryable


def error_body(message: str, type: str = "server_error",
               code: str | int | None = None, param: str | None = None) -> bytes:
    """Serialise an OpenAI error object."""
    return orjson.dumps({"error": {"message": message, "type": type,
                                   "param": param, "code": code}})


# -- the error shape of each route family ----------------------------------------------------------
Shape = Callable[[ProxyError], bytes]  # an error -> its body in one client protocol's shape


def openai_shape(error: ProxyError) -> bytes:
    """The OpenAI error body: what every route speaks unless its family registered another shape."""
    return error.body()


class ErrorShapes:
    """Which error shape each route family speaks, by path prefix; OpenAI's where none was registered.

    ``web.create_app`` registers a family per client protocol (``/v1/messages``
    answers Anthropic-shaped errors; a Gemini family is one more ``register``).
    Every error the proxy renders without a view behind it asks here: the
    app's routing errors (404, 405) and unexpected failures, and the errors the
    gunicorn worker writes itself (a bad chunked body, 408, 414, 431, a request
    refused from its head).
    """

    __slots__ = ("_families",)

    def __init__(self) -> None:
        self._families: tuple[tuple[str, Shape], ...] = ()

    def register(self, prefix: str, shape: Shape) -> None:
        families = {p: s for p, s in self._families if p != prefix}
        families[prefix] = shape
        self._families = tuple(sorted(families.items(), key=lambda family: -len(family[0])))  # longest first

    def shape(self, path: str) -> Shape:
        if "//" in path:  # as a client mistyping its base URL sends it; the family is still plain to see
            path = SLASHES.sub("/", path)
        for prefix, shape in self._families:
            if path.startswith(prefix):
                return shape
        return openai_shape

    def body(self, path: str, error: ProxyError) -> bytes:
        return self.shape(path)(error)


SLASHES = re.compile(r"/{2,}")


def request_path(head: bytes | bytearray) -> str:
    """The path in a raw request line, from whatever of it has arrived ("" when not even that): enough for
    ``ErrorShapes`` to tell the route family of a request no parser accepted (an over-long line still
    starts with its path)."""
    line = bytes(head[:1024]).split(b"\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2:
        return ""
    target = parts[1].split(b"?", 1)[0]
    if b"://" in target:  # absolute-form: http://host/path
        target = b"/" + target.split(b"/", 3)[-1] if target.count(b"/") >= 3 else b"/"
    return target.decode("latin-1")


def loggable(text: str, limit: int = 128) -> str:
    """A client-supplied string made safe for one log line or an error message: no control characters, bounded."""
    if text.isprintable() and len(text) <= limit:
        return text
    return text[:limit].encode("unicode_escape").decode("ascii")[:limit * 4]
