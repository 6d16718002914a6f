"""The Gemini API (``generateContent``, ``streamGenerateContent``) as a bridge: ``translate/bridge.py``'s interface.

Per target (``GeminiExchange.plan``) a provider with ``gemini`` in its
``native-apis`` gets the client's body passed through to
``<base-url>/models/<model>:<method>`` (the key as ``x-goog-api-key`` only:
Google refuses an API key sent as a bearer token); any other gets the chat
translation, made once per (reasoning replay, vision) variant. The model and
the method come from the path (``models/<model>:generateContent``), not the
body; ``?alt=sse`` picks the stream's framing (SSE events, else one JSON
array, as the Gemini API does). Errors in the shape ``errors.py`` builds.

Pure: no Flask, no requests.
"""
from __future__ import annotations

from typing import Any, Iterator

import orjson

from ...errors import NotFound, ProxyError
from ...fold import fold_chat_chunks
from ...models import Outcome, Plan
from ...routing import Target
from ..bridge import Exchange, Incoming, MachineWriter, Protocol
from ..completion import load as load_completion
from ..tools import ToolNames, clamp_max_tokens
from . import request as translate
from .errors import GeminiError, client_error, is_gemini_error, upstream_error
from .response import check_native, estimate, native_usage, streamed_usage, to_response
from .stream import GeminiStream
from .validate import validate

METHODS = ("generateContent", "streamGenerateContent")
USAGE_TAIL = 64 * 1024  # the end of a native stream kept to read its usage from (a usage record is ~300 bytes)


def model_name(path_model: str) -> str:
    """The model a path names: ``models/`` (the SDKs' resource prefix) and ``tunedModels/`` taken off."""
    for prefix in ("models/", "tunedModels/"):
        if path_model.startswith(prefix):
            return path_model[len(prefix):]
    return path_model


class Gemini(Protocol):
    name = "gemini"
    native_api = "gemini"
    # google-genai asks API version v1 by default: /v1/models/{model}:generateContent (the OpenAI API serves no
    # /v1/models/... path here)
    error_paths = ("/v1beta/", "/v1/models/")
    keepalive = None  # committed with the upstream's first event; an SSE comment would break google-genai
    key_query = "key"  # the client key may come as ?key= (Gemini clients' other way), never logged

    def open(self, body: dict, incoming: Incoming) -> GeminiExchange:
        method = incoming.path_args.get("method")
        if method not in METHODS:
            raise NotFound(f"Method not found: {str(method)[:60]!r}; this server serves generateContent, "
                           "streamGenerateContent and countTokens.")
        return GeminiExchange(validate(body), body, incoming)

    def model_of(self, body: dict, incoming: Incoming) -> Any:
        return model_name(incoming.path_args.get("model", ""))

    def client_error(self, error: ProxyError) -> ProxyError:
        return client_error(error)

    def failed_answer(self, outcome: Outcome) -> ProxyError:
        status, body = upstream_error(outcome.status, outcome.body)
        return GeminiError(orjson.loads(body)["error"]["message"], status=status)


class GeminiExchange(Exchange):
    """One request: how each target is asked, translating the body once for all targets."""

    def __init__(self, body: dict, raw: dict, incoming: Incoming) -> None:
        self.body = body                      # validated: structural keys camelCase
        self.raw = raw                        # as the client sent it (a native provider gets this)
        self.model = model_name(incoming.path_args.get("model", ""))
        self.method = incoming.path_args["method"]
        self.stream = self.method == "streamGenerateContent"
        self.sse = incoming.path_args.get("alt") == "sse"
        self.stream_type = "text/event-stream" if self.sse else "application/json"  # without alt=sse: one array
        self.names = ToolNames()
        self.thoughts = translate.wants_thoughts(body)
        self.headers = incoming.headers
        self._chat: dict[tuple[bool, bool], dict] = {}  # by (reasoning-replay, vision)
        self._estimate: int | None = None
        self.usage = None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's estimate (the chat body's text by the character rule): the clamp and a usage-less answer."""
        if self._estimate is None:
            self._estimate = estimate(self._chat_body((False, True)))
        return self._estimate

    def _chat_body(self, variant: tuple[bool, bool]) -> dict:
        chat = self._chat.get(variant)
        if chat is None:
            chat = self._chat[variant] = translate.to_chat(self.body, self.names, reasoning_replay=variant[0],
                                                           vision=variant[1])
        return chat

    def plan(self, target: Target) -> Plan:
        provider = target.provider
        if self.native_for(target):
            path = f"/models/{target.model}:{self.method}" + ("?alt=sse" if self.stream and self.sse else "")
            return Plan(path, self.raw, fold=None, headers=self.headers, native=True,
                        key_header="x-goog-api-key", bearer=False, check=check_native)
        spec = target.spec
        chat = self._chat_body((provider.reasoning_replay, spec is None or spec.vision))
        max_tokens = translate.max_output_tokens(self.body)
        if spec is not None and spec.max_output_tokens and max_tokens is None:
            max_tokens = spec.max_output_tokens  # agents leave it out; the model's own bound then
        if max_tokens is not None and spec is not None and (spec.max_output_tokens or spec.context_length):
            max_tokens = clamp_max_tokens(max_tokens, spec.max_output_tokens, spec.context_length,
                                          self.prompt_tokens if spec.context_length else 0)
        return Plan("/chat/completions",
                    translate.for_target(chat, target.model, max_tokens, stream=self.stream,
                                         stream_usage=provider.stream_usage, efforts=provider.reasoning_efforts),
                    fold=fold_chat_chunks, headers=self.headers, native=False)

    @staticmethod
    def native_for(target: Target) -> bool:
        return "gemini" in target.provider.native_apis

    def answer(self, outcome: Outcome) -> Outcome:
        native = outcome.plan is None or outcome.plan.native
        if outcome.status >= 400:
            if native and is_gemini_error(outcome.body):
                return outcome
            status, body = upstream_error(outcome.status, outcome.body)
            return Outcome(status, "application/json", body, headers=outcome.headers, plan=outcome.plan)
        if outcome.stream is not None:
            if native and not self.framed(outcome.first):
                outcome.stream.close()
                raise GeminiError("upstream's stream is not a Gemini stream in the framing asked ("
                                  + ("SSE events" if self.sse else "a JSON array") + ")", status=502,
                                  code="upstream_bad_answer")
            return outcome
        if native:
            self.usage = native_usage(outcome.body)
            return outcome
        completion = load_completion(outcome.body)
        if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
            raise GeminiError("upstream answered with something that is not a chat completion", status=502)
        self.usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else None
        answer = to_response(completion, self.model, self.names, thoughts=self.thoughts,
                             prompt_estimate=0 if self.usage else self.prompt_tokens)
        return Outcome(200, "application/json", orjson.dumps(answer), plan=outcome.plan)

    def framed(self, first: bytes) -> bool:
        """Whether a native stream's first bytes open the framing the client asked (``data:`` or an SSE comment
        with ``alt=sse``, else ``[``): a provider answering a chat completion, an HTML page or anything else with
        a 200 is a 502 before the client's 200, not bytes ``google-genai`` reads as an empty answer."""
        head = first.lstrip()[:6]
        if self.sse:
            return head.startswith((b"data:", b":", b"event:", b"id:", b"retry:"))
        return head.startswith(b"[")

    def relay(self, body: Iterator[bytes]) -> Iterator[bytes]:
        """A native stream as it comes; its ``usageMetadata`` (the last one, running totals) is what the
        request is charged (the relay's own scan reads OpenAI-style ``usage`` only)."""
        tail = b""
        for piece in body:
            if tail or b"usageMetadata" in piece:
                tail = (tail + piece)[-USAGE_TAIL:]
                usage = streamed_usage(tail)
                if usage is not None:
                    self.usage = usage
            yield piece

    def writer(self) -> MachineWriter:
        return MachineWriter(GeminiStream(self.model, self.names, thoughts=self.thoughts,
                                         prompt_tokens=self.prompt_tokens, sse=self.sse))


def count_body(body: Any) -> dict:
    """The request a ``countTokens`` body counts, validated: its ``generateContentRequest`` when it has one,
    else the body itself (``contents``...)."""
    checked = validate(body, count=True)
    return checked.get("generateContentRequest") or checked


GEMINI = Gemini()
