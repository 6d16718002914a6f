"""Fold a ``/v1/responses`` event stream into the ``response`` object a JSON answer would carry.

The Responses API streams typed events and ends with one terminal event that
carries the whole response: ``response.completed`` (the answer),
``response.incomplete`` (a real answer whose ``status`` says why it stopped,
returned as such), or ``response.failed``/``error`` (an error response, never
a fake success). Only terminal events are parsed; deltas are skipped by their
``event:`` name when the server sends one.
"""
from __future__ import annotations

from typing import Iterable

import orjson

from ..errors import StreamError
from .base import DEFAULT_MAX_BYTES, run_fold, stream_error
from .sse import iter_event_batches

TERMINAL = {b"response.completed", b"response.incomplete", b"response.failed", b"error"}


class ResponsesFold:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # holds nothing until the terminal event: the framing's budget is the whole limit
        self.done = False
        self.response: dict | None = None

    def feed(self, event: bytes, data: bytes) -> bool:
        """Take one event; True once the terminal event has arrived."""
        if event and event not in TERMINAL:
            return False
        if len(data) > self.max_bytes:
            raise StreamError(f"folded answer exceeds max-aggregate-bytes ({self.max_bytes} bytes)",
                              code="aggregate_too_large")
        stripped = data.strip()
        if not stripped or stripped == b"[DONE]":
            return self.done
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamError("upstream sent a data line that is not JSON") from None
        if not isinstance(payload, dict):
            raise StreamError("upstream sent an event that is not a JSON object")
        kind = payload.get("type") or event.decode("utf-8", "replace")
        if kind == "error":
            raise stream_error(payload if "error" in payload else {"error": payload})
        if kind == "response.failed":
            response = payload.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise stream_error({"error": error or {"message": "upstream response failed"}})
        if kind in ("response.completed", "response.incomplete"):
            self.response = payload.get("response")
            self.done = True
        return self.done

    def result(self) -> dict:
        if not isinstance(self.response, dict):
            raise StreamError("upstream stream ended early", retryable=True, code="upstream_stream_ended_early")
        return self.response


def fold_responses_chunks(chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Fold raw reads of a ``/v1/responses`` stream into its final ``response`` object."""
    fold = ResponsesFold(max_bytes)
    return run_fold(fold, iter_event_batches(chunks, fold))
