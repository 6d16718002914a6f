"""The Anthropic Messages protocol (``POST /v1/messages``) as a bridge: ``translate/bridge.py``'s interface.

Per target (``Messages.plan``) a provider with ``messages`` in its
``native-apis`` gets the client's body passed through (with ``x-api-key``);
any other the chat translation, made once per (reasoning replay, vision)
variant for all targets. The answer comes back translated
(``response.to_message``), the stream through ``stream.MessageStream``
(pings while the upstream is silent: ``keepalive``), and every error in the
shape ``errors.py`` builds.

Pure: no Flask, no requests.
"""
from __future__ import annotations

import orjson

from ...errors import BadRequest, ProxyError
from ...fold import fold_chat_chunks
from ...models import Outcome, Plan
from ...routing import Target
from ..bridge import Exchange, Incoming, MachineWriter, Protocol
from ..completion import check_message
from ..completion import load as load_completion
from ..tools import ToolNames, clamp_max_tokens
from . import request as translate
from .errors import AnthropicError, client_error, error_shape, upstream_error
from .response import to_message
from .stream import PING, MessageStream
from .tokens import estimate
from .validate import validate

# Client headers that only mean something to Anthropic (or its SDKs' telemetry):
# never sent to a chat upstream, kept for a native one.
_ANTHROPIC_ONLY = ("anthropic-", "x-stainless-", "x-claude-")
_ANTHROPIC_ONLY_NAMES = frozenset(("x-app",))


def too_deep() -> BadRequest:
    """orjson writes at most 255 levels of nesting (it reads 1024): such a body cannot be sent on, to any target."""
    error = BadRequest("The request body nests JSON too deeply to be forwarded (the limit is 255 levels).")
    error.retryable = False
    return error


class Messages(Protocol):
    name = "anthropic"
    native_api = "messages"
    error_paths = ("/v1/messages",)
    keepalive = PING

    def open(self, body: dict, incoming: Incoming) -> MessagesExchange:
        validate(body)
        return MessagesExchange(body, incoming.headers)

    def client_error(self, error: ProxyError) -> ProxyError:
        return client_error(error)

    def error_body(self, error: ProxyError) -> bytes:
        return error_shape(error)

    def failed_answer(self, outcome: Outcome) -> ProxyError:
        status, body = upstream_error(outcome.status, outcome.body)
        error = orjson.loads(body)["error"]
        return AnthropicError(error["message"], status=status, type=error["type"])


class MessagesExchange(Exchange):
    """One request: how each target is asked, translating the body once for all targets."""

    def __init__(self, body: dict, headers: dict[str, str]) -> None:
        self.body = body
        self.model = body["model"]
        self.stream = bool(body.get("stream"))
        self.names = ToolNames()
        self.native_headers = headers
        self.chat_headers = {k: v for k, v in headers.items()
                             if not k.startswith(_ANTHROPIC_ONLY) and k not in _ANTHROPIC_ONLY_NAMES}
        self._chat: dict[tuple[bool, bool], dict] = {}  # by (reasoning-replay, vision)
        self._estimate: int | None = None
        self.usage = None

    @property
    def stops(self) -> tuple[str, ...]:
        """The client's ``stop_sequences`` (validated: strings)."""
        return tuple(self.body.get("stop_sequences") or ())

    @property
    def prompt_tokens(self) -> int:
        if self._estimate is None:
            try:
                self._estimate = estimate(self.body)
            except orjson.JSONEncodeError:
                raise too_deep() from None
        return self._estimate

    def targets(self, targets: tuple[Target, ...]) -> tuple[Target, ...]:
        if self.stream:  # message_start needs it: estimated before any upstream is asked (a 400 if it cannot be)
            self.prompt_tokens  # noqa: B018
        return targets

    def plan(self, target: Target) -> Plan:
        provider = target.provider
        if "messages" in provider.native_apis:
            return Plan("/messages", {**self.body, "model": target.model}, fold=None,
                        headers=self.native_headers, native=True, key_header="x-api-key", check=check_message)
        spec = target.spec
        variant = (provider.reasoning_replay, spec is None or spec.vision)
        try:
            chat = self._chat.get(variant)
            if chat is None:
                chat = self._chat[variant] = translate.to_chat(self.body, self.names, reasoning_replay=variant[0],
                                                               vision=variant[1])
            max_tokens = self.body["max_tokens"]
            if spec is not None and (spec.max_output_tokens or spec.context_length):
                max_tokens = clamp_max_tokens(max_tokens, spec.max_output_tokens, spec.context_length,
                                              self.prompt_tokens if spec.context_length else 0)
        except orjson.JSONEncodeError:
            raise too_deep() from None
        return Plan("/chat/completions",
                    translate.for_target(chat, target.model, max_tokens, stream_usage=provider.stream_usage,
                                         efforts=provider.reasoning_efforts),
                    fold=fold_chat_chunks, headers=self.chat_headers, native=False)

    def answer(self, outcome: Outcome) -> Outcome:
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
        self.usage = completion.get("usage")
        message = to_message(completion, self.model, self.names, self.stops)
        if not isinstance(self.usage, dict):
            message["usage"]["input_tokens"] = self.prompt_tokens  # the estimate, as a stream without usage says
        return Outcome(200, "application/json", orjson.dumps(message), plan=outcome.plan)

    def writer(self) -> MachineWriter:
        return MachineWriter(MessageStream(self.model, self.names, self.prompt_tokens, self.stops))


MESSAGES = Messages()
