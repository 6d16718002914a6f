"""The Gemini API routes: ``/v1beta/models/{model}:generateContent``, ``:streamGenerateContent`` (the generic
runner), ``:countTokens``, and ``GET /v1beta/models[/{model}]``; all also under ``/v1/models...``, the API
version ``google-genai`` asks by default (``GET /v1/models`` is the OpenAI list unless a Gemini client asks).

The protocol itself (plans, answers, the record stream, the error shape) is
``translate/gemini/bridge.py``; every error on these paths renders
Gemini-shaped through it. The client key comes as ``x-goog-api-key`` or
``?key=`` (``Protocol.key_query``) like the other keys, and never goes further.
"""
from __future__ import annotations

from functools import partial

import orjson
from flask import Blueprint, Response, g, request

from .. import tokenizer
from ..errors import ModelNotFound, NotFound, ProxyError
from ..state.limits import allowed_targets
from ..translate.gemini.bridge import GEMINI, count_body, model_name
from ..translate.gemini.request import to_chat
from ..translate.gemini.response import count_response, model_resource
from ..translate.tools import ToolNames
from . import bridged
from .common import admit, authenticate, holder, loggable, read_json_body

bp = Blueprint("gemini", __name__)
bridged.errors(bp, GEMINI)


@bp.post("/v1beta/models/<path:name>")
@bp.post("/v1/models/<path:name>")
def call(name: str) -> Response:
    """``models/{model}:{method}``: the method after the last colon (a model name may hold colons itself)."""
    model, _, method = name.rpartition(":")
    if method == "countTokens":
        return count_tokens(model_name(model))
    return bridged.serve(GEMINI, model=model, method=method, alt=request.args.get("alt", ""))


def count_tokens(model: str) -> Response:
    """``{"totalTokens": N}``: the upstream's tokenizer when configured, else the estimate; never a generation."""
    config = holder()
    runtime = config.current()
    authenticate(runtime, query=GEMINI.key_query)
    g.record.model = loggable(model)
    body = count_body(read_json_body(runtime.settings.max_request_bytes))
    try:
        targets = runtime.router.named(model)  # a count is no routed request: it takes no turn
    except ModelNotFound:
        targets = ()  # still answered: a count must never make a model look missing (CLIProxyAPI#4410)
    targets = admit(model, targets)  # the key's policy, as for a generation
    chat = to_chat(body, ToolNames())
    count = next((tokenizer.count(config.sessions, t, chat) for t in targets if t.provider.tokenizer != "none"), None)
    return Response(orjson.dumps(count_response(count, chat)), 200, bridged.JSON)


def from_gemini_client() -> bool:
    """Whether a ``GET /v1/models[/{name}]`` comes from a Gemini client (``google-genai`` asks API version v1 by
    default): its key as ``x-goog-api-key`` or ``?key=``. OpenAI clients get the OpenAI list as before."""
    return "x-goog-api-key" in request.headers or GEMINI.key_query in request.args


@bp.get("/v1/models/<path:name>")
def v1_model(name: str) -> Response:
    if not from_gemini_client():
        # what any other client got before the Gemini routes: the app's 404, OpenAI-shaped (not this path
        # family's Gemini shape: the OpenAI SDK's models.retrieve asks here with a bearer key)
        error = NotFound(f"Unknown request URL: GET {request.path}.")
        return Response(error.body(), 404, bridged.JSON)
    return models(name)


@bp.get("/v1beta/models", defaults={"name": None})
@bp.get("/v1beta/models/<path:name>")
def models(name: str | None) -> Response:
    """The models the key may call (``models.list``), or one of them (``models.get``; else 404). Gemini-shaped
    errors also when ``openai.models`` hands a Gemini client's ``GET /v1/models`` here."""
    try:
        return _models(name)
    except ProxyError as exc:
        raise GEMINI.client_error(exc) from None


def _models(name: str | None) -> Response:
    runtime = holder().current()
    authenticate(runtime, account=False, query=GEMINI.key_query)
    key = g.record.client.key
    allow = partial(allowed_targets, key) if key is not None and key.models else None
    names = [entry["id"] for entry in runtime.router.listing(allow)]
    if name is None:
        return Response(orjson.dumps({"models": [_resource(runtime, n) for n in names]}), 200, bridged.JSON)
    wanted = model_name(name)
    if wanted not in names:
        raise ModelNotFound(f"models/{wanted} is not found for API version v1beta, or is not supported.")
    return Response(orjson.dumps(_resource(runtime, wanted)), 200, bridged.JSON)


def _resource(runtime, name: str) -> dict:
    spec = runtime.router.named(name)[0].spec
    return model_resource(name, spec.context_length if spec else 0, spec.max_output_tokens if spec else 0)
