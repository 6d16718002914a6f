"""The first choice of an upstream ``chat.completion``, checked before a bridge translates it.

A bridge has to understand a JSON answer to translate it. An answer that is
JSON but not a chat completion (no choices, a choice or message that is no
object, content that is a number, tool calls that are no list) is the
upstream's fault: a 502 naming the field, never an empty answer sent as a 200.
Pure; both bridges' non-stream translations call ``first_choice``, and the
routes check every JSON answer they relay as it came: ``check_relayed``
(chat), ``check_text_completion``, ``check_embeddings``, and for providers
serving a protocol natively ``check_message`` and ``check_response`` (also for ``/v1/responses/compact``).
"""
from __future__ import annotations

from typing import Any

import orjson

from ..errors import StreamError
from ..fold.base import slow_json
from ..fold.guard import repair_surrogates
from .tools import ToolNames
from .values import is_int

_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def first_choice(completion: Any) -> tuple[dict, dict]:
    """``(choice, message)`` of choice 0, or ``StreamError`` (502 ``upstream_bad_answer``) naming what is wrong."""
    choices = _choices(completion)
    if not choices:
        raise _bad("choices is an empty list")
    return choices[0], _message(choices[0], 0)


def load(body: bytes) -> Any:
    """A JSON answer's body as the bridges read it: what ``orjson`` refuses goes through the fold's slow
    path (lone UTF-16 surrogate halves, raw control characters) with halves joined or replaced as the fold
    does; None when it is not JSON at all."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return repair_surrogates(slow_json(body))
    except (StreamError, RecursionError):
        return None


def usage_count(value: Any) -> int:
    """A chat usage field's token count: a positive int, else 0 (a bool, a string or a negative is no count)."""
    return value if is_int(value) and value > 0 else 0


def message_text(content: Any) -> str:
    """A chat message's ``content`` as text: the string, or the text parts of a parts array (some servers
    answer with one), joined; anything else is no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and p.get("type") in ("text", "output_text")
                       and isinstance(p.get("text"), str))
    return ""


def message_functions(message: dict) -> list[tuple[int, Any, dict]]:
    """``(index, id, function)`` of each call of a message: the legacy ``function_call`` first (index -1, no
    id), then each of its ``tool_calls``, as a streamed answer's reader orders them (``fold/tool_calls.py``),
    so a bridge answers the same whether the upstream streamed or not."""
    found: list[tuple[int, Any, dict]] = []
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and legacy:
        found.append((-1, None, legacy))
    calls = message.get("tool_calls")
    for i, call in enumerate(calls if isinstance(calls, list) else ()):
        if isinstance(call, dict):
            found.append((i, call.get("id"), call.get("function") if isinstance(call.get("function"), dict) else {}))
    return found


def message_calls(message: dict, names: ToolNames) -> list[tuple[int, str, str, Any]]:
    """``(index, id, name, arguments)`` of each tool call of a message ``first_choice`` checked: the id as
    sent ("" when none), the name as the client knows it (``tool_<index>`` when the model gave none)."""
    found = []
    for i, call_id, function in message_functions(message):
        name = function.get("name")
        found.append((i, str(call_id or ""), names.to_client(name) if isinstance(name, str) and name
                      else f"tool_{i}", function.get("arguments")))
    return found


def upstream_message(status: int, body: bytes) -> str:
    """An upstream error answer's message, for the bridges' own error bodies: ``error.message`` of an
    OpenAI-style (or Anthropic- or Gemini-style) body, else its ``code``/``type``/``detail``, else the raw text."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            for key in ("message", "code", "type", "detail"):
                if isinstance(error.get(key), str) and error[key]:
                    return error[key]
        elif isinstance(error, str) and error:
            return error
    text = body[:500].decode("utf-8", "replace").strip()
    return text or f"upstream returned HTTP {status}"


def check_relayed(body: bytes) -> Any:
    """A chat answer relayed byte for byte (the chat route) must be a chat completion as well: every choice
    checked as ``first_choice`` checks the first (an empty list passes: nothing in it can be misread).

    Every ``check_*`` returns the answer it parsed, so its usage is read without parsing it again."""
    answer = _parsed(body)
    for i, choice in enumerate(_choices(answer)):
        _message(choice, i)
    return answer


def check_text_completion(body: bytes) -> Any:
    """A relayed ``/v1/completions`` answer: an object whose ``choices`` are objects with text."""
    answer = _parsed(body)
    for i, choice in enumerate(_choices(answer, "text completion")):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), (str, type(None))):
            raise _bad(f"choices[{i}] is not an object with a text", "text completion")
    return answer


def check_embeddings(body: bytes) -> Any:
    """A relayed ``/v1/embeddings`` answer: an object whose ``data`` is a list of objects, each with an
    ``embedding`` (a list of numbers, or base64 text)."""
    answer = _parsed(body)
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise _bad("data is not a list", "list of embeddings")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("embedding"), (list, str)):
            raise _bad(f"data[{i}] is not an object with an embedding", "list of embeddings")
    return answer


def check_message(body: bytes) -> Any:
    """A native ``/v1/messages`` answer relayed as it came: an Anthropic message (``type`` message, a list of
    content blocks)."""
    answer = _parsed(body)
    if not isinstance(answer, dict) or answer.get("type") != "message" or not isinstance(answer.get("content"), list):
        raise _bad("no message with a list of content blocks", "message of the Anthropic API")
    return answer


def check_response(body: bytes) -> Any:
    """A native ``/v1/responses`` answer relayed as it came: a Response object with a list of output items."""
    answer = _parsed(body)
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), list):
        raise _bad("no object with a list of output items", "Response")
    return answer


def _parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # orjson refuses numbers past a double (a 400-digit count): JSON all the same, relayed as sent
            return slow_json(body, strict=True)
        except StreamError:
            raise _bad("the answer is not JSON") from None


def _choices(completion: Any, kind: str = "chat completion") -> list:
    if not isinstance(completion, dict):
        raise _bad("the answer is not a JSON object", kind)
    choices = completion.get("choices")
    if not isinstance(choices, list):
        raise _bad("choices is not a list", kind)
    usage = completion.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _bad("usage is not an object", kind)
    return choices


def _message(choice: Any, index: int) -> dict:
    where = f"choices[{index}]"
    if not isinstance(choice, dict):
        raise _bad(f"{where} is not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _bad(f"{where}.message is not an object")
    for name in _TEXT_FIELDS:
        value = message.get(name)
        if value is not None and not isinstance(value, (str, list)):
            raise _bad(f"{where}.message.{name} is neither text nor a list of parts")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _bad(f"{where}.message.tool_calls is not a list")
        for i, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise _bad(f"{where}.message.tool_calls[{i}].function is not an object")
            if not isinstance(function.get("name"), (str, type(None))):
                raise _bad(f"{where}.message.tool_calls[{i}].function.name is not a string")
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        raise _bad(f"{where}.finish_reason is not a string")
    return message


def _bad(what: str, kind: str = "chat completion") -> StreamError:
    return StreamError(f"upstream answer is not a {kind}: {what}", code="upstream_bad_answer")
