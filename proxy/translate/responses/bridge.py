"""``POST /v1/responses`` as a bridge: ``translate/bridge.py``'s interface for OpenAI Responses clients.

Per target (``ResponsesExchange.plan``): a provider whose ``native-apis``
lists ``responses`` gets the client's body with its model id (a forced
stream is folded by the Responses fold, as before Part 2); any other gets
the chat translation (``request.py``) and its answer is translated back: a
JSON answer once (``response.py``), a stream event by event (``stream.py``).

Answers of bridged requests are stored for ``previous_response_id`` (unless
``store: false``) before the client sees their end, so a client that
continues at once finds them; native response ids are recorded for their
owner (``state/owners.py``). Errors are OpenAI-shaped (``errors.py``'s
``ProxyError.body``): no mapping.

Pure: no Flask, no requests (the state store comes in on ``Incoming``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Iterator

import orjson

from ...errors import PayloadTooLarge, ProxyError, StreamError, error_body, loggable
from ...fold import fold_chat_chunks, fold_responses_chunks
from ...models import Outcome, Plan
from ...routing import Target, narrowed
from ...state import owners
from ..bridge import Exchange, Incoming, MachineWriter, Protocol
from ..chat_stream import Held
from ..completion import check_response
from ..completion import load as load_completion
from ..openai import requested_model, stream_flag
from . import request as translate
from . import response as reply
from .stream import ResponsesStream

STORE_NAMESPACE = "responses"
PATH = "/responses"


class Responses(Protocol):
    name = "responses"
    native_api = "responses"
    error_paths = ()  # OpenAI-shaped: the default shape

    def open(self, body: dict, incoming: Incoming) -> ResponsesExchange:
        model = requested_model(body)
        return ResponsesExchange(body, incoming, model, stream_flag(body))

    def client_error(self, error: ProxyError) -> ProxyError:
        return error


class ResponsesExchange(Exchange):
    """One request: its translation (when a target needs one), and what to do with the chat answer."""

    def __init__(self, body: dict, incoming: Incoming, model: str, stream: bool) -> None:
        self.body, self.incoming = body, incoming
        self.model, self.stream = model, stream
        self.prepared: translate.Prepared | None = None
        self.ctx: reply.Context | None = None
        self.keep: tuple | None = None  # (store, ttl, identity, max bytes) when the answer is stored
        self.mine = None                # records a native response id for this client
        headers = incoming.headers
        self.codex = (headers.get("originator", "").lower().startswith("codex")
                      or headers.get("user-agent", "").lower().startswith("codex"))  # Codex CLI/TUI/exec/IDE
        self.usage = None

    def targets(self, targets: tuple[Target, ...]) -> tuple[Target, ...]:
        body, incoming = self.body, self.incoming
        settings, store, identity = incoming.settings, incoming.store, incoming.identity
        store.cap(STORE_NAMESPACE, settings.responses_store_max_count, settings.responses_store_max_bytes)
        store.cap(owners.NAMESPACE, settings.responses_store_max_count, settings.responses_store_max_bytes)
        ttl = settings.responses_store_ttl
        # a native provider's id is passed on only for the identity it was relayed to (state/owners.py)
        previous, owned = owners.previous_response(body, store, identity)
        if any(not _native(t) for t in targets):
            history = None
            if previous is not None:
                raw = store.get_blob(STORE_NAMESPACE, _store_key(identity, previous))
                history = _history(raw)
                if history is not None:
                    _check_size(previous, history, len(raw) + incoming.body_bytes, settings.max_request_bytes)
                if history is None and (not owned or all(not _native(t) for t in targets)):
                    raise owners.previous_not_found(previous)
                if history is None:  # the id came from a provider that serves /responses itself
                    targets = narrowed(targets, [t for t in targets if _native(t)])
            self.prepared = translate.prepare(body, history)
            self.ctx = reply.new_context(body, self.prepared.toolmap)
            if body.get("store") is not False:
                self.keep = (store, ttl, identity, settings.max_request_bytes)
        elif previous is not None and not owned:
            raise owners.previous_not_found(previous)
        if body.get("store") is not False:
            self.mine = partial(owners.record, store, identity, ttl=ttl)
        return targets

    def plan(self, target: Target) -> Plan:
        if _native(target):
            return Plan(PATH, dict(self.body, model=target.model), fold_responses_chunks, usage_option=False,
                        check=check_response)
        spec, provider = target.spec, target.provider
        chat = translate.to_chat(self.prepared, target.model, stream=self.stream,
                                 reasoning_replay=provider.reasoning_replay, stream_usage=provider.stream_usage,
                                 max_output=spec.max_output_tokens if spec else 0,
                                 context_length=spec.context_length if spec else 0,
                                 efforts=provider.reasoning_efforts)
        return Plan("/chat/completions", chat, fold_chat_chunks, native=False)

    def answer(self, outcome: Outcome) -> Outcome:
        if outcome.plan is None or outcome.plan.native:
            if self.mine is not None and outcome.stream is None and outcome.status == 200:
                response_id = owners.answer_id(outcome.body)
                if response_id is not None:
                    self.mine(response_id)
            return outcome
        if outcome.stream is not None:
            return outcome
        if outcome.status >= 400:
            return _upstream_error(outcome)
        completion = load_completion(outcome.body)
        if not isinstance(completion, dict):
            raise StreamError("upstream answered 200 with a body that is not a JSON object",
                              code="upstream_bad_answer")
        result = reply.from_completion(completion, self.ctx)
        if isinstance(completion.get("usage"), dict):
            self.usage = completion["usage"]
        self.save(reply.answer_parts(completion, self.ctx)[:3])
        return Outcome(200, "application/json", orjson.dumps(result), plan=outcome.plan)

    def relay(self, body: Iterator[bytes]) -> Iterator[bytes]:
        return owners.watch(body, self.mine)

    def writer(self) -> ResponsesWriter:
        held = Held(self.incoming.settings.max_aggregate_bytes)
        return ResponsesWriter(ResponsesStream(self.ctx, self.codex, held), self.save)

    def save(self, parts: tuple[str, str, list]) -> None:
        if self.keep is None:
            return
        state, ttl, client, limit = self.keep
        record = orjson.dumps({"system": self.prepared.system,
                               "messages": [*self.prepared.messages, translate.assistant_message(*parts)]})
        if len(record) > limit:  # it could never be sent upstream again: kept as a note that says why
            record = orjson.dumps({"messages": [], "too_large": len(record)})
        state.put_blob(STORE_NAMESPACE, _store_key(client, self.ctx.id), record, float(ttl))


class ResponsesWriter(MachineWriter):
    """``ResponsesStream`` (the state machine) behind the interface the runner drives; it stores the answer
    before its terminal event goes out."""

    __slots__ = ("save",)
    stream: ResponsesStream

    def __init__(self, stream: ResponsesStream, save: Callable[[tuple], None] | None = None) -> None:
        super().__init__(stream)  # feed: the machine's feed_into
        self.save = save  # stores the answer (its history parts) before its terminal event goes out

    def close(self, out: list[bytes], events: Iterable[Any], ended_early: bool) -> None:
        stream, closing = self.stream, []
        items = list(stream.items)
        try:
            stream.close_into(closing, events, ended_early)
            if stream.error is None and self.save is not None:
                self.save(stream.history_parts())
        except BaseException:
            # its terminal event was built but never went out, nor the done events of the items closed here: a
            # failure lists only the items done before
            stream.ended = False
            stream.items[:] = items
            raise
        out += closing

    def fail(self, error: ProxyError) -> bytes:
        return self.stream.fail(error.message, error.code)


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


RESPONSES = Responses()
