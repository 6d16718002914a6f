"""``POST /v1/responses``: passed through to providers that serve it, bridged to chat for the others.

Per target (``Call.adapt``): a provider whose ``native-apis`` lists
``responses`` gets the client's body with its model id (and a forced stream
is folded by the Responses fold, as before Part 2); any other gets the chat
translation (``proxy.translate.responses``) and its answer is translated
back: a JSON answer once, a stream event by event.

Answers of bridged requests are stored for ``previous_response_id`` (unless
``store: false``) before the client sees their end, so a client that
continues at once finds them. The view captures everything from ``request``
and ``current_app`` before a stream's generator runs.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Callable, Iterator

import orjson
from flask import Blueprint, Response, current_app, g, request

from .. import metrics, upstream
from ..errors import BadRequest, PayloadTooLarge, StreamError, error_body
from ..executor import client_headers, execute
from ..models import Call, Outcome, Plan
from ..fold import fold_chat_chunks
from ..relay import SSE_HEADERS, padded_answer, to_response
from ..routing import Target, narrowed
from ..state import owners
from ..translate.chat_stream import DONE, Held
from ..translate.completion import check_response
from ..translate.completion import load as load_completion
from ..translate.responses import request as translate
from ..translate.responses import response as reply
from ..translate.responses.pipeline import chunk_batches, translate_stream
from ..translate.responses.stream import INTERNAL, ResponsesStream
from .common import (admit, end_logger, holder, loggable, openai_request, previous_not_found, previous_response,
                     stream_flag)
from .openai import RESPONSES

bp = Blueprint("responses", __name__)
log = logging.getLogger(__name__)
STORE_NAMESPACE = "responses"


@bp.post("/v1/responses")
def create_response() -> Response:
    config = holder()
    runtime = config.current()
    settings = runtime.settings
    body, model = openai_request(runtime)
    stream = stream_flag(body)
    targets = admit(model, runtime.router.resolve(model), body)  # the key's policy: allowed targets, rpm, tpm, concurrency
    store = current_app.extensions["streamfold.state"]
    store.cap(STORE_NAMESPACE, settings.responses_store_max_count, settings.responses_store_max_bytes)
    identity, ttl = g.client.identity, settings.responses_store_ttl
    store.cap(owners.NAMESPACE, settings.responses_store_max_count, settings.responses_store_max_bytes)
    # a native provider's id is passed on only for the identity it was relayed to (state/owners.py)
    previous, owned = previous_response(body, store)
    bridge = None
    if any(not _native(t) for t in targets):
        history = None
        if previous is not None:
            raw = store.get_blob(STORE_NAMESPACE, _store_key(identity, previous))
            history = _history(raw)
            if history is not None:
                _check_size(previous, history, len(raw) + g.body_bytes, settings.max_request_bytes)
            if history is None and (not owned or all(not _native(t) for t in targets)):
                raise previous_not_found(previous)
            if history is None:  # the id came from a provider that serves /responses itself
                targets = narrowed(targets, [t for t in targets if _native(t)])
        prepared = translate.prepare(body, history)
        ctx = reply.new_context(body, prepared.toolmap)
        keep = None if body.get("store") is False else (store, ttl, identity, settings.max_request_bytes)
        bridge = _Bridge(prepared, ctx, keep, _is_codex(request.environ), settings.max_aggregate_bytes)
    elif previous is not None and not owned:
        raise previous_not_found(previous)
    mine = None if body.get("store") is False else partial(owners.record, store, identity, ttl=ttl)

    def adapt(target: Target) -> Plan:
        if _native(target):
            return Plan(RESPONSES.path, dict(body, model=target.model), RESPONSES.fold,
                        usage_option=RESPONSES.usage_option, check=check_response)
        spec, provider = target.spec, target.provider
        chat = translate.to_chat(bridge.prepared, target.model, stream=stream,
                                 reasoning_replay=provider.reasoning_replay, stream_usage=provider.stream_usage,
                                 max_output=spec.max_output_tokens if spec else 0,
                                 context_length=spec.context_length if spec else 0,
                                 efforts=provider.reasoning_efforts)
        return Plan("/chat/completions", chat, fold_chat_chunks, native=False)

    call = Call(RESPONSES.path, body, stream, g.request_id, client_headers(request.environ), RESPONSES.fold,
                RESPONSES.usage_option, g.log, adapt=adapt)
    base_end = end_logger(g.log)
    usage = {}  # chat usage of a bridged answer: what usage accounting reads

    def on_end(status: int, result: str, usage_bytes: bytes) -> None:
        base_end(status, result, usage["bytes"] if "bytes" in usage else usage_bytes)

    def run() -> Outcome:
        outcome = execute(settings, config.sessions, config.keys, targets, call, config.balancer)
        if outcome.plan is None or outcome.plan.native:
            if mine is not None and outcome.stream is None and outcome.status == 200:
                response_id = owners.answer_id(outcome.body)
                if response_id is not None:
                    mine(response_id)
            return outcome
        return bridge.answer(outcome, usage)

    if not stream and settings.nonstream_keepalive_interval > 0:
        return padded_answer(settings.nonstream_keepalive_interval, run, on_end, g.log)
    outcome = run()
    if outcome.stream is not None:
        g.log["deferred"] = True  # logged when the stream ends
        if not outcome.plan.native:
            return Response(bridge.events(outcome, usage, on_end), 200,
                            {"Content-Type": "text/event-stream", **SSE_HEADERS}, direct_passthrough=True)
        answer = to_response(outcome, on_end)
        answer.response = owners.watch(answer.response, mine)
        return answer
    return to_response(outcome, on_end)


class _Bridge:
    """One bridged request: its translation, and what to do with the chat answer."""

    def __init__(self, prepared: translate.Prepared, ctx: reply.Context, keep: tuple | None, codex: bool,
                 max_bytes: int) -> None:
        self.prepared, self.ctx, self.keep = prepared, ctx, keep  # keep: (store, ttl, identity) or None
        self.codex, self.max_bytes = codex, max_bytes

    def answer(self, outcome: Outcome, usage: dict) -> Outcome:
        """A JSON chat answer (or an error) as the Responses client must get it."""
        if outcome.stream is not None:
            return outcome
        if outcome.status >= 400:
            return _upstream_error(outcome)
        completion = _completion(outcome.body)
        result = reply.from_completion(completion, self.ctx)
        if isinstance(completion.get("usage"), dict):
            usage["bytes"] = orjson.dumps({"usage": completion["usage"]})
        self._save(reply.answer_parts(completion, self.ctx)[:3])
        return Outcome(200, "application/json", orjson.dumps(result), plan=outcome.plan)

    def events(self, outcome: Outcome, usage: dict, on_end: Callable[[int, str, bytes], None]) -> Iterator[bytes]:
        """The Responses event stream for a live chat stream (the 200 is already committed)."""
        response, result = outcome.stream, "client closed"
        translator = ResponsesStream(self.ctx, self.codex, Held(self.max_bytes))
        metrics.ACTIVE_STREAMS.inc()
        try:
            yield from translate_stream(translator, self._batches(outcome), self._save_streamed)
            if translator.internal is not None:
                result = f"internal error: {translator.internal}"
            elif translator.error is not None:
                result = f"upstream failed mid-stream: {loggable(translator.error, 200)}"
            else:
                result = "complete"
        except Exception as exc:  # noqa: BLE001 - the client still gets a terminal event
            log.error("responses bridge failed: %s", type(exc).__name__, exc_info=exc)
            result = f"internal error: {type(exc).__name__}"
            yield translator.fail(INTERNAL, "server_error")  # b"" when the terminal event went out
        finally:
            if result == "complete":
                upstream.finish(response)  # after the terminal event went out; keeps the connection
            else:
                response.close()
            metrics.ACTIVE_STREAMS.dec()
            if translator.usage is not None:
                usage["bytes"] = orjson.dumps({"usage": translator.usage})
            on_end(200, result, usage.get("bytes", b""))

    def _save_streamed(self, translator: ResponsesStream) -> None:
        if translator.error is None:
            self._save(translator.history_parts())

    def _batches(self, outcome: Outcome) -> Iterator[list]:
        first = outcome.first.lstrip()
        if first.startswith(b"{") and "json" in outcome.content_type:
            # an upstream that ignores stream: true and answers JSON: one chunk, then the end
            yield []  # the opening events go out now, not once the whole answer is read
            body = upstream.read_body(outcome.stream, outcome.first, self.max_bytes)
            yield [reply.completion_as_chunk(_completion(body)), DONE]
            return
        yield from chunk_batches(upstream.read_chunks(outcome.stream, outcome.first), self.max_bytes)

    def _save(self, parts: tuple[str, str, list]) -> None:
        if self.keep is None:
            return
        state, ttl, client, limit = self.keep
        record = orjson.dumps({"system": self.prepared.system,
                               "messages": [*self.prepared.messages, translate.assistant_message(*parts)]})
        if len(record) > limit:  # it could never be sent upstream again: kept as a note that says why
            record = orjson.dumps({"messages": [], "too_large": len(record)})
        state.put_blob(STORE_NAMESPACE, _store_key(client, self.ctx.id), record, float(ttl))


def _upstream_error(outcome: Outcome) -> Outcome:
    """An upstream error before commit: a context overflow becomes 400 ``context_length_exceeded``."""
    if outcome.status in (400, 413, 422) and reply.overflow(outcome.body):
        try:
            error = orjson.loads(outcome.body)
            error = error.get("error", error)
            message = error.get("message") if isinstance(error, dict) else None
        except (orjson.JSONDecodeError, AttributeError):
            message = None
        message = message if isinstance(message, str) else "The input exceeds the model's context window."
        body = error_body(message, "invalid_request_error", "context_length_exceeded", "input")
        return Outcome(400, "application/json", body, plan=outcome.plan)
    return outcome


def _completion(body: bytes) -> dict:
    completion = load_completion(body)
    if not isinstance(completion, dict):
        raise StreamError("upstream answered 200 with a body that is not a JSON object", code="upstream_bad_answer")
    return completion


def _history(raw: bytes | None) -> dict | None:
    """A stored turn, or None (absent, expired, or unreadable: a damaged record is "not found", never a 500)."""
    if raw is None:
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("messages"), list) else None


def _check_size(previous: str, history: dict, size: int, limit: int) -> None:
    """A conversation whose history, re-expanded for the upstream, would be over max-request-bytes is a 413
    (also when a larger limit came since: a turn that was too large to store holds no history)."""
    stored = history.get("too_large")
    if stored is not None:
        size = stored if type(stored) is int else size
    if stored is not None or size > limit:
        raise PayloadTooLarge(f"The conversation up to previous_response_id '{loggable(previous)}' is {size} bytes "
                              f"with this request, over max-request-bytes ({limit}); start a new conversation, or "
                              "send the part of the history you need as input.", code="conversation_too_large",
                              param="previous_response_id")


def _store_key(identity: str, response_id: str) -> str:
    # Per client identity (never the label): another key that learns a response id finds nothing there,
    # exactly as for an id that never existed.
    return f"{identity}/{response_id}"


def _native(target: Target) -> bool:
    return "responses" in target.provider.native_apis


def _is_codex(environ: dict) -> bool:
    """Codex CLI/TUI/exec/IDE clients: ``originator: codex_cli_rs`` and friends, or their User-Agent."""
    return (environ.get("HTTP_ORIGINATOR", "").lower().startswith("codex")
            or environ.get("HTTP_USER_AGENT", "").lower().startswith("codex"))
