"""The Anthropic Messages routes: ``POST /v1/messages`` (the generic runner) and ``/v1/messages/count_tokens``.

The protocol itself (plans, answers, the event stream, the error shape) is
``translate/anthropic/bridge.py``; every error on these paths renders
Anthropic-shaped through it.
"""
from __future__ import annotations

from functools import partial

import orjson
from flask import Blueprint, Response, g

from .. import tokenizer
from ..errors import ModelNotFound
from ..translate.anthropic import request as translate
from ..translate.anthropic.bridge import MESSAGES, too_deep
from ..translate.anthropic.tokens import estimate
from ..translate.anthropic.validate import validate
from ..translate.tools import ToolNames
from . import bridged
from .common import admit, authenticate, holder, loggable, read_json_body

bp = Blueprint("anthropic", __name__)
bridged.errors(bp, MESSAGES)
bp.post("/v1/messages", endpoint="messages")(partial(bridged.serve, MESSAGES))


@bp.after_request
def _request_id(response: Response) -> Response:
    response.headers["request-id"] = g.record.request_id  # where Anthropic SDKs read it (``message._request_id``)
    return response


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """``{"input_tokens": N}``: the upstream's tokenizer when configured, else the estimate; never the chat upstream."""
    config = holder()
    runtime = config.current()
    authenticate(runtime)
    body = read_json_body(runtime.settings.max_request_bytes)
    validate(body, need_max_tokens=False)
    g.record.model = loggable(body["model"])
    try:
        targets = runtime.router.named(body["model"])  # a count is no routed request: it takes no turn
    except ModelNotFound:
        targets = ()  # still answered: a count must never make a model look missing (CLIProxyAPI#4410)
    # The same policy as /v1/messages: a model the key may not use is refused (it may reach the upstream's
    # tokenizer), and a count is a request for rpm and max-concurrent.
    targets = admit(body["model"], targets)
    count = None
    try:
        for target in targets:
            if target.provider.tokenizer != "none":
                count = tokenizer.count(config.sessions, target, translate.to_chat(body, ToolNames()))
                break
        if count is None:
            count = estimate(body)
    except orjson.JSONEncodeError:
        raise too_deep() from None
    return Response(orjson.dumps({"input_tokens": count}), 200, bridged.JSON)
