"""The checks every OpenAI-shaped request body gets before it is routed: its ``model`` and ``stream``.

Pure: the OpenAI routes (``routes/common.openai_request``) and the Responses
bridge ask the same questions with the same answers.
"""
from __future__ import annotations

from ..errors import BadRequest


def requested_model(body: dict) -> str:
    """The body's ``model``: a non-empty string, else a 400 naming it."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter" if model is None
                         else "model must be a non-empty string", param="model")
    return model


def stream_flag(body: dict) -> bool:
    """The body's ``stream`` (absent = false); anything but a boolean is the client's mistake."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    return bool(stream)
