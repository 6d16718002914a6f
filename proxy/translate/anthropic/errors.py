"""The Anthropic error shape: the one module that builds an Anthropic error body (translation.md §1.7).

``{"type":"error","error":{"type":...,"message":...}}``, as a JSON answer
(``AnthropicError.body``), as the ``event: error`` that ends a committed stream
(``error_event``, and ``FIXED_ERROR_EVENT`` for when even that cannot be
written), and for errors no view rendered (``error_shape``, registered for
``/v1/messages``). ``client_error`` maps any of the proxy's errors to
Anthropic's status and type, ``upstream_error`` an upstream's error answer.

Pure: no Flask, no requests.
"""
from __future__ import annotations

import orjson

from ...errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from ...fold.guard import clean
from ..completion import upstream_message
from ..tools import is_context_overflow

# HTTP status -> Anthropic error type (Anthropic's docs, CLIProxyAPI claudeErrorTypeFromStatus).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
INTERNAL = "The proxy hit an internal error; see its log for details."
# ``event: error`` in fixed bytes, for a stream whose error event could not be written (a bug elsewhere)
FIXED_ERROR_EVENT = (b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"'
                     + INTERNAL.encode() + b'"}}\n\n')


def error_type(status: int) -> str:
    """The Anthropic error ``type`` for an HTTP status."""
    kind = ERROR_TYPES.get(status)
    if kind is not None:
        return kind
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    """``{"type":"error","error":{"type","message"}}`` (surrogate halves in an upstream's message replaced)."""
    return orjson.dumps({"type": "error", "error": {"type": kind or error_type(status), "message": clean(message)}})


def error_event(status: int, message: str) -> bytes:
    """The ``event: error`` frame that ends a stream that broke after it was committed."""
    return b"event: error\ndata: " + error_body(status, message) + b"\n\n"


class AnthropicError(ProxyError):
    """A failure already mapped to Anthropic's status and type; ``body()`` is Anthropic-shaped.

    Raised inside the non-stream keep-alive helper too, so an error after the
    padding committed a 200 still reaches the client in this route's shape.
    """

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.type)


def client_error(exc: ProxyError) -> AnthropicError:
    """Status and type per translation.md §1.7 for one of the proxy's own errors."""
    if isinstance(exc, AnthropicError):
        return exc
    status = exc.status
    if isinstance(exc, UpstreamTimeout):
        status = 504
    elif isinstance(exc, UpstreamUnavailable) and exc.code != "upstream_auth_failed":
        status = 529  # no upstream reachable: Anthropic clients back off and retry 529
    elif status >= 400 and status != 429 and is_context_overflow(exc.message):
        return AnthropicError(f"prompt is too long: {exc.message}", status=400, type="invalid_request_error",
                              code=exc.code)
    return AnthropicError(exc.message, status=status, type=error_type(status), code=exc.code, headers=exc.headers)


def error_shape(error: ProxyError) -> bytes:
    """The body for errors no view rendered (``web`` registers it for ``/v1/messages``): routing errors,
    unexpected failures, and what the gunicorn worker answers itself."""
    if isinstance(error, AnthropicError):
        return error.body()
    return error_body(error.status, error.message, "overloaded_error" if error.status == 503 else None)


def upstream_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An upstream error answer as an Anthropic one: ``(status, body)``.

    A prompt that does not fit becomes 400 ``prompt is too long: ...``
    whatever status the upstream used: that is Anthropic's own wording, and
    what makes Claude Code compact the conversation instead of resending it.
    An upstream 503 (overloaded) becomes 529, which Anthropic clients retry.
    """
    message = upstream_message(status, body)
    if status >= 400 and status != 429 and is_context_overflow(message):
        text = message if message.lower().startswith("prompt is too long") else f"prompt is too long: {message}"
        return 400, error_body(400, text, "invalid_request_error")
    if status == 503:
        status = 529
    return status, error_body(status, message)
