"""The Anthropic Messages routes: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Parse, authenticate, validate, then hand off: ``Bridge.plan`` tells the
executor per target whether to pass the request through (a provider with
``messages`` in ``native-apis``) or send the translated chat request; the
answer is translated back here once (non-stream) or by ``anthropic_stream``
(stream). Every error on these paths renders Anthropic-shaped, in one place
(``render``).
"""
from __future__ import annotations

import logging

import orjson
from flask import Blueprint, Response, g, request

from .. import tokenizer
from ..errors import BadRequest, ModelNotFound, ProxyError, UpstreamTimeout, UpstreamUnavailable
from ..executor import client_headers, execute
from ..models import Call, Outcome, Plan
from ..fold import fold_chat_chunks
from ..relay import SSE_HEADERS, padded_answer, to_response
from ..routing import Target
from ..translate.anthropic import request as translate
from ..translate.anthropic.response import error_body, error_type, is_context_overflow, to_message, upstream_error
from ..translate.anthropic.stream import MessageStream
from ..translate.anthropic.tokens import estimate
from ..translate.anthropic.validate import validate
from ..translate.completion import check_message
from ..translate.completion import load as load_completion
from ..translate.tools import ToolNames, clamp_max_tokens
from . import anthropic_stream
from .common import admit, authenticate, end_logger, hold, holder, loggable, read_json_body

log = logging.getLogger(__name__)
bp = Blueprint("anthropic", __name__)
JSON = {"Content-Type": "application/json"}
# Client headers that only mean something to Anthropic (or its SDKs' telemetry):
# never sent to a chat upstream, kept for a native one.
_ANTHROPIC_ONLY = ("anthropic-", "x-stainless-", "x-claude-")
_ANTHROPIC_ONLY_NAMES = frozenset(("x-app",))


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
        return AnthropicError(f"prompt is too long: {exc.message}", status=400, type="invalid_request_error")
    return AnthropicError(exc.message, status=status, type=error_type(status), headers=exc.headers)


@bp.after_request
def _request_id(response: Response) -> Response:
    response.headers["request-id"] = g.request_id  # where Anthropic SDKs read it (``message._request_id``)
    return response


@bp.errorhandler(ProxyError)
def render(exc: ProxyError) -> Response:
    mapped = client_error(exc)
    g.log["status"] = mapped.status
    g.log["result"] = exc.code or mapped.type
    return Response(mapped.body(), mapped.status, {**JSON, **mapped.headers})


def error_shape(error: ProxyError) -> bytes:
    """This family's error body for errors no view rendered (``web`` registers it for ``/v1/messages``):
    routing errors, unexpected failures, and what the gunicorn worker answers itself."""
    if isinstance(error, AnthropicError):
        return error.body()
    return error_body(error.status, error.message, "overloaded_error" if error.status == 503 else None)


class Bridge:
    """Per request: how each target is asked (``plan``), translating the body once for all targets."""

    def __init__(self, body: dict, headers: dict[str, str]) -> None:
        self.body = body
        self.names = ToolNames()
        self.native_headers = headers
        self.chat_headers = {k: v for k, v in headers.items()
                             if not k.startswith(_ANTHROPIC_ONLY) and k not in _ANTHROPIC_ONLY_NAMES}
        self._chat: dict[tuple[bool, bool], dict] = {}  # by (reasoning-replay, vision)
        self._estimate: int | None = None
        self.usage: dict | None = None  # the upstream's chat usage, for the token metrics

    @property
    def stops(self) -> tuple[str, ...]:
        """The client's ``stop_sequences`` (validated: strings)."""
        return tuple(self.body.get("stop_sequences") or ())

    @property
    def prompt_tokens(self) -> int:
        if self._estimate is None:
            self._estimate = estimate(self.body)
        return self._estimate

    def plan(self, target: Target) -> Plan:
        provider = target.provider
        if "messages" in provider.native_apis:
            return Plan("/messages", {**self.body, "model": target.model}, fold=None,
                        headers=self.native_headers, native=True, key_header="x-api-key", check=check_message)
        spec = target.spec
        variant = (provider.reasoning_replay, spec is None or spec.vision)
        chat = self._chat.get(variant)
        if chat is None:
            chat = self._chat[variant] = translate.to_chat(self.body, self.names, reasoning_replay=variant[0],
                                                           vision=variant[1])
        max_tokens = self.body["max_tokens"]
        if spec is not None and (spec.max_output_tokens or spec.context_length):
            max_tokens = clamp_max_tokens(max_tokens, spec.max_output_tokens, spec.context_length,
                                          self.prompt_tokens if spec.context_length else 0)
        return Plan("/chat/completions",
                    translate.for_target(chat, target.model, max_tokens, stream_usage=provider.stream_usage,
                                         efforts=provider.reasoning_efforts),
                    fold=fold_chat_chunks, headers=self.chat_headers, native=False)


@bp.post("/v1/messages")
def messages() -> Response:
    config = holder()
    runtime = config.current()
    settings = runtime.settings
    g.log["client"] = authenticate(runtime)
    body = read_json_body(settings.max_request_bytes)
    model = body.get("model")
    if isinstance(model, str):
        g.log["model"] = loggable(model)
    validate(body)
    stream = bool(body.get("stream"))
    targets = admit(model, runtime.router.resolve(model), body)  # the key's policy: allowed targets, rpm, tpm, concurrency
    bridge = Bridge(body, client_headers(request.environ))
    call = Call("/chat/completions", body, stream, g.request_id, bridge.native_headers, fold_chat_chunks,
                True, g.log, adapt=bridge.plan)

    def run() -> Outcome:
        try:
            return execute(settings, config.sessions, config.keys, targets, call, config.balancer)
        except orjson.JSONEncodeError:
            raise _too_deep() from None

    on_end = _chat_usage(end_logger(g.log), bridge)
    if stream:
        return _stream(run, bridge, model, settings.max_aggregate_bytes, on_end,
                       not any("messages" in t.provider.native_apis for t in targets))

    def run_translated() -> Outcome:
        try:
            return answer(run(), bridge, model)
        except ProxyError as exc:
            raise client_error(exc) from None

    if settings.nonstream_keepalive_interval > 0:
        return padded_answer(settings.nonstream_keepalive_interval, run_translated, on_end, g.log)
    outcome = run_translated()
    if outcome.stream is not None:
        g.log["deferred"] = True  # a native stream answering a non-stream request: relayed
    return to_response(outcome, on_end)


def _stream(run, bridge: Bridge, model: str, max_bytes: int, on_end, early_commit: bool) -> Response:
    """A streamed answer: translated (pings while the upstream is silent), or a native stream relayed.

    Only an all-translated target list may commit before the upstream's first
    event: a native stream is relayed byte for byte, so nothing of ours may
    precede it.
    """
    try:  # message_start needs it: estimated before any upstream is asked, so a body it cannot read is a 400
        prompt_tokens = bridge.prompt_tokens
    except orjson.JSONEncodeError:
        raise _too_deep() from None
    pump = anthropic_stream.Pump(run, max_bytes, hold(g.log))
    try:
        outcome, pending = anthropic_stream.first_items(
            pump, anthropic_stream.PING_INTERVAL if early_commit else None)
    except BaseException:
        pump.cancel()
        raise
    if outcome is not None:
        outcome = answer(outcome, bridge, model)
        if outcome.stream is not None:
            g.log["deferred"] = True  # logged when the relayed stream ends
        return to_response(outcome, on_end)
    g.log["deferred"] = True

    def ended(chat, result: str) -> None:
        bridge.usage = chat.usage
        on_end(200, result, b"")

    stream = MessageStream(model, bridge.names, prompt_tokens, bridge.stops)
    body = anthropic_stream.events(pump, pending, stream, _failure, ended)
    response = Response(body, 200, {"Content-Type": "text/event-stream", **SSE_HEADERS}, direct_passthrough=True)
    response.call_on_close(pump.cancel)  # also when the body never started (the client left first)
    return response


def _failure(what: ProxyError | Outcome) -> tuple[int, str]:
    """Status and message for an ``event: error`` after the stream was committed."""
    if isinstance(what, ProxyError):
        mapped = client_error(what)
        return mapped.status, mapped.message
    status, body = upstream_error(what.status, what.body)
    return status, orjson.loads(body)["error"]["message"]


def _chat_usage(on_end, bridge: Bridge):
    """The token metrics and usage hooks count the CHAT usage when the answer was translated."""
    def end(status: int, result: str, usage_bytes: bytes) -> None:
        on_end(status, result, orjson.dumps({"usage": bridge.usage}) if bridge.usage else usage_bytes)
    return end


def answer(outcome: Outcome, bridge: Bridge, model: str) -> Outcome:
    """The outcome the client gets: a translated message or error; native answers as they came."""
    native = outcome.plan is None or outcome.plan.native
    if outcome.status >= 400:
        if native and b'"type":"error"' in outcome.body.replace(b" ", b"")[:200]:
            return outcome  # already Anthropic-shaped
        status, body = upstream_error(outcome.status, outcome.body)
        return Outcome(status, "application/json", body, headers=outcome.headers, plan=outcome.plan)
    if native or outcome.stream is not None:
        return outcome
    completion = load_completion(outcome.body)
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        raise AnthropicError("upstream answered with something that is not a chat completion",
                             status=502, type="api_error")
    bridge.usage = completion.get("usage")
    message = to_message(completion, model, bridge.names, bridge.stops)
    if not isinstance(bridge.usage, dict):
        message["usage"]["input_tokens"] = bridge.prompt_tokens  # the estimate, as a stream without usage says
    return Outcome(200, "application/json", orjson.dumps(message), plan=outcome.plan)


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """``{"input_tokens": N}``: the upstream's tokenizer when configured, else the estimate; never the chat upstream."""
    config = holder()
    runtime = config.current()
    g.log["client"] = authenticate(runtime)
    body = read_json_body(runtime.settings.max_request_bytes)
    validate(body, need_max_tokens=False)
    g.log["model"] = loggable(body["model"])
    try:
        targets = runtime.router.resolve(body["model"])
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
        raise _too_deep() from None
    return Response(orjson.dumps({"input_tokens": count}), 200, JSON)


def _too_deep() -> BadRequest:
    # orjson writes at most 255 levels of nesting (it reads 1024): such a body cannot be sent on
    return BadRequest("The request body nests JSON too deeply to be forwarded (the limit is 255 levels).")
