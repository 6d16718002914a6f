"""Who owns a response id that a provider serving ``/v1/responses`` itself created.

Such a provider keeps the conversation under the one shared provider key, so
any client that learns an id could continue it (``previous_response_id``)
through the proxy. The proxy records, in the state store beside the stored
responses (same TTL and caps), the client identity each native response id
it relayed belongs to, and passes a ``previous_response_id`` upstream only
for its owner. An id the proxy never relayed (made before this record
existed, or by a client talking to the upstream directly) belongs to nobody
and is refused like an unknown id.
"""
from __future__ import annotations

from typing import Callable, Iterator

import orjson

from ..errors import BadRequest, loggable

NAMESPACE = "response-owners"
# How much of one SSE line is looked at for the id: response.created comes first and is small; a longer
# line (a large response.completed) is skipped rather than held.
LINE_LIMIT = 256 * 1024


def _key(identity: str, response_id: str) -> str:
    return f"{identity}/{response_id}"


def record(store, identity: str, response_id: str, ttl: float) -> None:
    store.put_blob(NAMESPACE, _key(identity, response_id), b"1", float(ttl))


def owns(store, identity: str, response_id: str) -> bool:
    return store.get_blob(NAMESPACE, _key(identity, response_id)) is not None


def answer_id(body: bytes) -> str | None:
    """The ``id`` of a JSON Responses answer, or None."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    found = answer.get("id") if isinstance(answer, dict) else None
    return found if isinstance(found, str) and found else None


def _event_id(line: bytes) -> str | None:
    """The response id of a ``data:`` line holding a response.created/in_progress/completed event."""
    if not line.startswith(b"data:") or b'"response.' not in line:
        return None
    try:
        event = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return None
    response = event.get("response") if isinstance(event, dict) else None
    found = response.get("id") if isinstance(response, dict) else None
    return found if isinstance(found, str) and found else None


def watch(chunks: Iterator[bytes], found: Callable[[str], None]) -> Iterator[bytes]:
    """Relay ``chunks`` unchanged, calling ``found`` once with the first response id the stream names."""
    line, skipping = b"", False
    try:
        for data in chunks:
            if found is not None:
                for piece in data.splitlines(keepends=True):
                    if not skipping:
                        line += piece
                    if piece.endswith((b"\n", b"\r")):
                        response_id = None if skipping else _event_id(line.strip())
                        line, skipping = b"", False
                        if response_id is not None:
                            found(response_id)
                            found = None
                            break
                    elif len(line) > LINE_LIMIT:
                        line, skipping = b"", True
            yield data
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def previous_response(body: dict, store, identity: str) -> tuple[str | None, bool]:
    """The request's ``previous_response_id`` (None when absent), and whether a provider serving /responses
    itself created it for this client ``identity``; a malformed one is a 400."""
    previous = body.get("previous_response_id")
    if previous is None:
        return None, False
    if not isinstance(previous, str) or not previous:
        raise BadRequest("previous_response_id must be a non-empty string", param="previous_response_id")
    return previous, owns(store, identity, previous)


def previous_not_found(previous: str) -> BadRequest:
    """What an id this client may not continue gets: exactly what an id that never existed gets."""
    return BadRequest(f"Previous response with id '{loggable(previous)}' not found.",
                      code="previous_response_not_found", param="previous_response_id")
