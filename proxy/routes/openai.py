"""The OpenAI-compatible routes: chat completions, models, health.

Views capture everything they need from ``request`` before a streaming
response is returned; the generator itself never touches the request.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import orjson
from flask import Blueprint, Response, current_app, g, request

from ..errors import BadRequest
from ..executor import client_headers, execute
from ..fold import fold_chat_chunks, fold_responses_chunks, fold_text_chunks
from ..models import Call
from ..relay import padded_answer, to_response
from ..state import owners
from ..state.limits import allowed_targets
from ..translate.completion import check_embeddings, check_relayed, check_response, check_text_completion
from ..translate.openai import stream_flag
from . import gemini
from .common import admit, authenticate, holder, openai_request

bp = Blueprint("openai", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', 200, {"Content-Type": "application/json"})


@bp.get("/v1/models")
def models() -> Response:
    if gemini.from_gemini_client():
        return gemini.models(None)  # google-genai lists models at /v1/models by default: its shape
    runtime = holder().current()
    authenticate(runtime, account=False)
    key = g.record.client.key
    # exactly what the key may call: names whose served targets its allow-list admits
    listing = runtime.router.listing(partial(allowed_targets, key) if key is not None and key.models else None)
    body = {"object": "list", "data": listing}
    return Response(orjson.dumps(body), 200, {"Content-Type": "application/json"})


@dataclass(frozen=True, slots=True)
class Route:
    """How one OpenAI endpoint is proxied."""

    path: str                         # appended to the provider's base-url
    fold: Callable[..., dict] | None  # folds a stream into this endpoint's JSON; None = never forced
    required: str | None              # a body field the endpoint cannot do without
    usage_option: bool = True         # forced requests add stream_options.include_usage
    streams: bool = True              # False: the client's "stream" field is removed (never streamed)
    check: Callable[[bytes], Any] | None = None  # raises for a relayed 200 JSON answer of the wrong shape


# /v1/responses has no stream_options.include_usage (upstreams reject it) and
# always reports usage in its final event, so forcing it adds only stream: true.
# Its view is routes/responses.py (passthrough or the chat bridge, per provider).
CHAT = Route("/chat/completions", fold_chat_chunks, "messages", check=check_relayed)
COMPLETIONS = Route("/completions", fold_text_chunks, "prompt", check=check_text_completion)
RESPONSES = Route("/responses", fold_responses_chunks, None, usage_option=False)
COMPACT = Route("/responses/compact", None, None, streams=False, check=check_response)
EMBEDDINGS = Route("/embeddings", None, "input", streams=False, check=check_embeddings)


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return proxy_request(CHAT)


@bp.post("/v1/completions")
def completions() -> Response:
    return proxy_request(COMPLETIONS)


@bp.post("/v1/responses/compact")
def responses_compact() -> Response:
    return proxy_request(COMPACT)


@bp.post("/v1/embeddings")
def embeddings() -> Response:
    return proxy_request(EMBEDDINGS)


def proxy_request(route: Route) -> Response:
    """Authenticate, validate, route and run one request; shared by every proxied route."""
    config = holder()
    runtime = config.current()
    settings = runtime.settings
    body, model, raw = openai_request(runtime)
    targets = admit(model, runtime.router.resolve(model), body, answers=route is not EMBEDDINGS)
    if route is COMPACT:  # compacting a conversation the key may not continue: as for an unknown id
        store = current_app.extensions["streamfold.state"]
        previous, owned = owners.previous_response(body, store, g.record.client.identity)
        if previous is not None and not owned:
            raise owners.previous_not_found(previous)
    required = route.required
    if required is not None and required not in body:
        raise BadRequest(f"Missing required parameter: '{required}'.", param=required)
    if required == "messages" and (not isinstance(body["messages"], list) or not body["messages"]):
        raise BadRequest("messages must be a non-empty array", param="messages")
    if not route.streams:
        body.pop("stream", None)
    stream = stream_flag(body)
    fold = route.fold
    record = g.record
    call = Call(route.path, body, stream, record.request_id, client_headers(request.environ), fold,
                route.usage_option, record, check=route.check, raw=raw)

    def run():
        return execute(settings, config.sessions, config.keys, targets, call, config.balancer)

    on_end = record.answered
    if not stream and fold is not None and settings.nonstream_keepalive_interval > 0:
        return padded_answer(settings.nonstream_keepalive_interval, run, on_end, record)
    outcome = run()
    if outcome.stream is not None:
        record.streamed = True  # logged when the stream ends
    return to_response(outcome, on_end)
