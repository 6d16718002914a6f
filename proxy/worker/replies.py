"""The answers the worker writes itself, before or instead of the app: JSON errors in the route's shape.

Stock gunicorn answers its parse errors with HTML pages; an API client wants
the error body it gets from every other failure on that route: OpenAI's
``{"error": {...}}``, or Anthropic's on ``/v1/messages`` (the app's
``ErrorShapes`` says which, from the path of the request line, as far as it
arrived).
"""
from __future__ import annotations

import ssl

from gunicorn.http import errors as http_errors

from ..errors import ErrorShapes, ProxyError


def parse_error(exc: Exception) -> tuple[int, str, str, str]:
    """(status, reason, message, code) for what gunicorn's parser raised."""
    e = http_errors
    if isinstance(exc, (e.InvalidResponseHeader, e.InvalidResponseHeaderName)):
        return 500, "Internal Server Error", "The proxy hit an internal error; see its log.", "server_error"
    if isinstance(exc, e.LimitRequestLine):
        return 414, "URI Too Long", "The request line (method and URL) is too long.", "uri_too_long"
    if isinstance(exc, e.LimitRequestHeaders):
        return 431, "Request Header Fields Too Large", "The request's headers are too large.", \
            "headers_too_large"
    if isinstance(exc, e.ExpectationFailed):
        return 417, "Expectation Failed", "Only 'Expect: 100-continue' is supported.", "expectation_failed"
    if isinstance(exc, e.UnsupportedTransferCoding):
        return 501, "Not Implemented", "Unsupported Transfer-Encoding.", "unsupported_transfer_coding"
    if isinstance(exc, e.ForbiddenProxyRequest):
        return 403, "Forbidden", "Request forbidden.", "forbidden"
    if isinstance(exc, (e.InvalidChunkSize, e.ChunkMissingTerminator, e.InvalidChunkExtension)):
        return 400, "Bad Request", "The chunked request body is malformed.", "invalid_chunked_body"
    if isinstance(exc, (e.ParseException, e.InvalidProxyHeader, ssl.SSLError)):
        name = exc.__class__.__name__
        return 400, "Bad Request", f"The HTTP request is malformed ({name}).", "invalid_http_request"
    return 500, "Internal Server Error", "The proxy hit an internal error; see its log.", "server_error"


def json_reply(shapes: ErrorShapes, path: str, status: int, reason: str, message: str, code: str) -> bytes:
    """A whole answer that closes the connection, its body in the shape of ``path``'s route family."""
    error = ProxyError(message, status=status, type="invalid_request_error" if status < 500 else "server_error",
                       code=code)
    return reply(status, reason, shapes.body(path, error))


def reply(status: int, reason: str, body: bytes, extra: bytes = b"") -> bytes:
    """A whole answer with a JSON ``body`` that closes the connection; ``extra``: more header lines."""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n" % (status, reason.encode(), len(body), extra)) + body
