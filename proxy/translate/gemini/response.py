"""chat.completion -> Gemini ``GenerateContentResponse``, and the pieces the stream shares with it.

Pure: dicts in, dicts out. One candidate (index 0) whose ``content`` is role
``model`` with parts in the order thought text, text, function calls;
``finishReason`` STOP for an answer that ended or called tools (the Gemini
API says STOP for a function call too), MAX_TOKENS for ``length``, SAFETY for
a content filter; ``usageMetadata`` with prompt, candidates (the answer
without reasoning), thoughts and cached token counts; ``modelVersion`` is the
model the client asked for, ``responseId`` ours.
"""
from __future__ import annotations

import os
from typing import Any

import orjson

from ...errors import StreamError
from ...fold.base import json_at
from ..completion import first_choice, message_calls, message_text, usage_count
from ..tokens import body_tokens
from ..tools import ToolNames, repair_json_object

_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP", "function_call": "STOP",
           "content_filter": "SAFETY"}


def new_response_id() -> str:
    return os.urandom(12).hex()


def finish_reason(finish: Any) -> str:
    """The Gemini ``finishReason`` for a chat ``finish_reason`` (STOP when there is none)."""
    return _FINISH.get(finish, "STOP") if isinstance(finish, str) else "STOP"


def usage_metadata(chat_usage: Any, prompt_estimate: int = 0) -> dict:
    """``usageMetadata`` from a chat ``usage``; without one, the prompt estimate and no output.

    Gemini counts thoughts apart from the candidates: ``candidatesTokenCount`` is the completion without its
    reasoning tokens, ``thoughtsTokenCount`` those (when the upstream says), and the total is all of them.
    """
    if not isinstance(chat_usage, dict):
        return {"promptTokenCount": prompt_estimate, "candidatesTokenCount": 0, "totalTokenCount": prompt_estimate}
    prompt = usage_count(chat_usage.get("prompt_tokens"))
    completion = usage_count(chat_usage.get("completion_tokens"))
    details = chat_usage.get("completion_tokens_details")
    thoughts = min(usage_count(details.get("reasoning_tokens")), completion) if isinstance(details, dict) else 0
    details = chat_usage.get("prompt_tokens_details")
    cached = min(usage_count(details.get("cached_tokens")), prompt) if isinstance(details, dict) else 0
    metadata = {"promptTokenCount": prompt, "candidatesTokenCount": completion - thoughts,
                "totalTokenCount": prompt + completion}
    if thoughts:
        metadata["thoughtsTokenCount"] = thoughts
    if cached:
        metadata["cachedContentTokenCount"] = cached
    return metadata


def function_call(call_id: str, name: str, arguments: Any) -> dict:
    """A ``functionCall`` part: the whole call, its arguments an object (repaired when the model wrote broken
    JSON, ``{}`` when hopeless)."""
    if isinstance(arguments, dict):
        args = arguments
    elif isinstance(arguments, str) and arguments.strip():
        args = repair_json_object(arguments)
    else:
        args = {}
    return {"functionCall": {"id": call_id, "name": name, "args": args}}


def to_response(completion: dict, model: str, names: ToolNames, *, thoughts: bool = False,
                prompt_estimate: int = 0, response_id: str | None = None) -> dict:
    """The ``GenerateContentResponse`` for a ``chat.completion`` (choice 0). ``model``: the name the client
    asked for; ``thoughts``: the client asked for thought parts (``includeThoughts``)."""
    choice, message = first_choice(completion)
    parts: list[dict] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if thoughts and isinstance(reasoning, str) and reasoning:
        parts.append({"text": reasoning, "thought": True})
    text = message_text(message.get("content"))
    if text:
        parts.append({"text": text})
    for i, call_id, name, arguments in message_calls(message, names):
        parts.append(function_call(call_id or f"call_{i}", name, arguments))
    return {"candidates": [{"content": {"role": "model", "parts": parts},
                            "finishReason": finish_reason(choice.get("finish_reason")), "index": 0}],
            "usageMetadata": usage_metadata(completion.get("usage"), prompt_estimate),
            "modelVersion": model, "responseId": response_id or new_response_id()}


def check_native(body: bytes) -> Any:
    """A native provider's 200 JSON answer, relayed as it came, must be a ``GenerateContentResponse`` (a list of
    candidates, or the prompt feedback of a blocked prompt): else a 502 ``upstream_bad_answer``. Returns it parsed."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or not (isinstance(answer.get("candidates"), list)
                                            or isinstance(answer.get("promptFeedback"), dict)):
        raise StreamError("upstream answer is not a GenerateContentResponse: no list of candidates",
                          code="upstream_bad_answer")
    return answer


def native_usage(body: bytes) -> dict | None:
    """A native answer's ``usageMetadata`` as the chat usage the proxy counts (None without one)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _chat_usage(answer.get("usageMetadata") if isinstance(answer, dict) else None)


def streamed_usage(tail: bytes) -> dict | None:
    """The last complete ``usageMetadata`` object in the end of a native stream (either framing), as chat usage;
    None when there is none (yet)."""
    text = tail.decode("utf-8", "replace")
    at = text.rfind('"usageMetadata"')
    while at >= 0:
        start = text.find("{", at)
        if start >= 0:
            try:
                return _chat_usage(json_at(text, start))
            except (ValueError, RecursionError):
                pass  # cut off at the end of what came so far (or nested past the stack): the one before, if any
        at = text.rfind('"usageMetadata"', 0, at)
    return None


def _chat_usage(metadata: Any) -> dict | None:
    if not isinstance(metadata, dict):
        return None
    prompt = usage_count(metadata.get("promptTokenCount"))
    thoughts = usage_count(metadata.get("thoughtsTokenCount"))
    completion = usage_count(metadata.get("candidatesTokenCount")) + thoughts
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    cached = usage_count(metadata.get("cachedContentTokenCount"))
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


GENERATION_METHODS = ["generateContent", "streamGenerateContent", "countTokens"]


def model_resource(name: str, context_length: int = 0, max_output_tokens: int = 0) -> dict:
    """The ``Model`` resource ``GET /v1beta/models[/{name}]`` answers for a name the client may call; the token
    limits when the model entry sets them (``context-length``, ``max-output-tokens``)."""
    resource: dict[str, Any] = {"name": f"models/{name}", "baseModelId": name, "version": "", "displayName": name,
                                "description": f"{name}, served by streamfold",
                                "supportedGenerationMethods": GENERATION_METHODS}
    if context_length:
        resource["inputTokenLimit"] = context_length
    if max_output_tokens:
        resource["outputTokenLimit"] = max_output_tokens
    return resource


def estimate(chat: dict) -> int:
    """The prompt's tokens, estimated from its chat translation (messages and tools by the character rule,
    images at a fixed cost each): ``countTokens`` without a tokenizer, the clamp, an answer without usage."""
    return body_tokens([chat["messages"], chat.get("tools")])


def count_response(count: int | None, chat: dict) -> dict:
    """``countTokens``' answer: the tokenizer's ``count``, else the estimate."""
    return {"totalTokens": count if count is not None else estimate(chat)}
