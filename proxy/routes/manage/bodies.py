"""What every management view reads and answers: a capped JSON body in, JSON out."""
from __future__ import annotations

import orjson
from flask import Response

from ...config import file as settings_file
from ...config.model import Settings
from ...errors import BadRequest
from ..common import holder, read_capped


def json_response(body, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, {"Content-Type": "application/json"})


def read_body():
    """The request's JSON body, read at most ``max-request-bytes`` (with or without Content-Length)."""
    raw = read_capped(holder().runtime.settings.max_request_bytes)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None


def providers_answer(settings: Settings, version: int | None) -> Response:
    """The answer to a provider change: the providers now in force (and the shared version, with Redis)."""
    body: dict = {"status": "ok"}
    if version is not None:
        body["version"] = version
    body["openai-compatibility"] = [settings_file.public_provider(p) for p in settings.providers]
    return json_response(body)
