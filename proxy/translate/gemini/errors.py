"""The Gemini error shape, rendered here and nowhere else: ``{"error": {"code", "message", "status"}}``.

Pure: a status and a message in, bytes out; ``client_error`` maps any of the
proxy's errors to the status a Gemini client gets (``GeminiError``, whose
``body()`` is this shape). ``status`` is the google.rpc
code name the Gemini API and its SDKs use (``google-genai`` raises
``ClientError``/``ServerError`` by the HTTP code and shows ``status``; the
Gemini CLI retries 429 and 5xx and reads ``message``). In a stream that
broke after it was committed, the same object is one last event:
``google-genai`` raises on an event whose first key is ``error``, so the
client reports an error, never a clean (short) answer.
"""
from __future__ import annotations

import orjson

from ...errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from ...fold.guard import clean
from ..completion import upstream_message
from ..tools import is_context_overflow

# HTTP status -> google.rpc status name (google/rpc/code.proto's HTTP mapping).
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
          499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
          504: "DEADLINE_EXCEEDED", 529: "UNAVAILABLE"}


def status_name(status: int) -> str:
    """The google.rpc status name for an HTTP status."""
    name = STATUS.get(status)
    if name is not None:
        return name
    return "INTERNAL" if status >= 500 else "FAILED_PRECONDITION" if status == 412 else "INVALID_ARGUMENT"


def error_body(status: int, message: str, name: str | None = None) -> bytes:
    """``{"error": {"code", "message", "status"}}`` (surrogate halves in an upstream's message replaced)."""
    return orjson.dumps({"error": {"code": status, "message": clean(message), "status": name or status_name(status)}})


def error_event(status: int, message: str, sse: bool = True) -> bytes:
    """The last event of a stream that broke after it was committed: the error object as one more
    ``GenerateContentResponse``-sized record (an SSE event, or an array element; the caller closes the array)."""
    body = error_body(status, message)
    return b"data: " + body + b"\r\n\r\n" if sse else body


def upstream_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An upstream's error answer (OpenAI-shaped, or anything) as a Gemini one: ``(status, body)``.

    A prompt that does not fit the model is a 400 ``INVALID_ARGUMENT`` whatever status the upstream
    used (the Gemini API's own answer for too many input tokens); a 429 keeps its status, so clients back off.
    """
    message = upstream_message(status, body)
    if status >= 400 and status != 429 and is_context_overflow(message):
        return 400, error_body(400, message)
    return status, error_body(status, message)


def is_gemini_error(body: bytes) -> bool:
    """Whether an answer is already a Gemini error object (a provider serving the Gemini API itself)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if isinstance(parsed, list) and len(parsed) == 1:  # the streaming endpoint's array form
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return isinstance(error, dict) and isinstance(error.get("status"), str) and isinstance(error.get("code"), int)


class GeminiError(ProxyError):
    """A failure already mapped to the status a Gemini client gets; ``body()`` is Gemini-shaped."""

    def body(self) -> bytes:
        return error_body(self.status, self.message)


def client_error(error: ProxyError) -> GeminiError:
    """Any of the proxy's errors as a Gemini client should see it (status names: ``errors.STATUS``)."""
    if isinstance(error, GeminiError):
        return error
    status = error.status
    if isinstance(error, UpstreamTimeout):
        status = 504  # DEADLINE_EXCEEDED
    elif isinstance(error, UpstreamUnavailable):
        # a provider refusing its own key: PERMISSION_DENIED (retrying cannot help); unreachable: UNAVAILABLE,
        # which Gemini clients retry
        status = 403 if error.code == "upstream_auth_failed" else 503
    elif status >= 400 and status != 429 and is_context_overflow(error.message):
        status = 400
    return GeminiError(error.message, status=status, type=status_name(status), code=error.code,
                       headers=error.headers)
