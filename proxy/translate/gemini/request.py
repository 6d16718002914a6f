"""Gemini ``GenerateContentRequest`` -> chat completions request.

Pure: a body that passed ``validate`` in, a chat body out. ``to_chat`` builds
the chat body once per request and ``for_target`` adds what depends on the
target (the upstream model id, ``max_tokens`` clamped by its
``max-output-tokens``, the reasoning effort it accepts, stream options).

Field mapping (README "Gemini CLI with your own models" has the table):

- ``systemInstruction`` -> one leading system message (its text parts joined);
- ``contents`` role ``user`` -> user messages, ``model`` -> assistant; ``text``
  parts joined, ``inlineData`` images -> ``image_url`` data URLs (``[image
  omitted]`` for a text-only model), other media -> a text note;
  ``functionCall`` (model) -> ``tool_calls`` (arguments JSON), ``functionResponse``
  (user) -> one ``tool`` message each, before the user's own parts; thought parts
  -> ``reasoning_content`` only with ``reasoning-replay``, else dropped;
- a call without ``id`` gets ``call_<turn>_<part>``; a response without
  ``id`` answers the oldest unanswered call of its name (Gemini CLI sends ids,
  older clients only names);
- ``tools[].functionDeclarations`` -> function tools (``parameters``, Gemini's
  OpenAPI subset, written as JSON Schema; ``parametersJsonSchema`` as is);
  search grounding, code execution, URL context and other Google server tools
  are dropped;
- ``toolConfig.functionCallingConfig``: AUTO/VALIDATED -> ``auto``, NONE ->
  ``none``, ANY -> ``required`` (one allowed name: that function; several:
  only those tools are sent);
- ``generationConfig``: temperature, topP, topK, seed, presence/frequency
  penalties, stopSequences -> stop, maxOutputTokens -> max_tokens,
  responseMimeType ``application/json`` (+ responseSchema /
  responseJsonSchema; Gemini CLI writes upper-case type names even in
  the latter, so both are read as the OpenAPI subset) -> ``response_format``, thinkingConfig ->
  ``reasoning_effort`` (``effort.from_gemini``);
- ``safetySettings``, ``labels`` and the like are ignored.
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import orjson

from ...errors import BadRequest
from ..effort import DEFAULT_LEVELS, for_provider, from_gemini
from ..roles import alternate, result_images, user_message
from ..tools import ToolNames, chat_schema


def wants_thoughts(body: dict) -> bool:
    """Whether the answer carries thought parts: ``thinkingConfig.includeThoughts`` (the Gemini API's
    default is without)."""
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    return thinking.get("includeThoughts") is True


def to_chat(body: dict, names: ToolNames, *, reasoning_replay: bool = False, vision: bool = True) -> dict:
    """The chat body for a validated Gemini body, without ``model`` and ``max_tokens`` (see ``for_target``)."""
    messages: list[dict] = []
    system = _system_text(body.get("systemInstruction"))
    if system:
        messages.append({"role": "system", "content": system})
    calls: dict[str, deque[str]] = defaultdict(deque)  # unanswered call ids by function name, oldest first
    for turn, content in enumerate(body["contents"]):
        if content.get("role") == "model":
            _model_turn(content["parts"], turn, messages, names, calls, reasoning_replay)
        else:
            _user_turn(content["parts"], turn, messages, calls, vision)
    chat: dict[str, Any] = {"messages": alternate(messages)}  # strict templates: roles must alternate
    config = body.get("generationConfig") or {}
    for name, field in (("temperature", "temperature"), ("topP", "top_p"), ("topK", "top_k"), ("seed", "seed"),
                        ("presencePenalty", "presence_penalty"), ("frequencyPenalty", "frequency_penalty")):
        if config.get(name) is not None:
            chat[field] = config[name]
    if config.get("stopSequences"):
        chat["stop"] = list(config["stopSequences"])
    fmt = _response_format(config)
    if fmt is not None:
        chat["response_format"] = fmt
    effort = from_gemini(config.get("thinkingConfig"))
    if effort:
        chat["reasoning_effort"] = effort  # a level; ``for_target`` maps it onto what the provider accepts
    _tools(body, names, chat)
    return chat


def for_target(chat: dict, model: str, max_tokens: int | None, *, stream: bool, stream_usage: bool = True,
               efforts: tuple[str, ...] = DEFAULT_LEVELS) -> dict:
    """A copy of ``chat`` for one upstream: its model id, ``max_tokens`` when there is one, the stream flag
    (from the route: Gemini says it in the method name), usage in streams, the reasoning effort it accepts."""
    out = {"model": model, **chat}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if stream:
        out["stream"] = True
        if stream_usage:
            out["stream_options"] = {"include_usage": True}
    if "reasoning_effort" in chat:
        out["reasoning_effort"] = for_provider(chat["reasoning_effort"], efforts)
    return out


def max_output_tokens(body: dict) -> int | None:
    """``generationConfig.maxOutputTokens`` (validated: an int >= 1), or None."""
    return (body.get("generationConfig") or {}).get("maxOutputTokens")


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system if system.strip() else ""
    if not isinstance(system, dict):
        return ""
    texts = [p["text"] for p in system.get("parts") or () if isinstance(p.get("text"), str) and p["text"].strip()
             and not p.get("thought")]
    return "\n\n".join(texts)


def _model_turn(parts: list, turn: int, out: list[dict], names: ToolNames, calls: dict, replay: bool) -> None:
    """One model turn stays one assistant message (text, reasoning, calls)."""
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict] = []
    for index, part in enumerate(parts):
        if isinstance(part.get("text"), str):
            if part.get("thought"):
                if replay and part["text"]:
                    reasoning.append(part["text"])
            elif part["text"]:
                texts.append(part["text"])
        elif part.get("functionCall") is not None:
            call = part["functionCall"]
            call_id = call.get("id") or f"call_{turn}_{index}"
            calls[call["name"]].append(call_id)
            args = call.get("args")
            arguments = _json(args if args is not None else {}, f"contents[{turn}].parts[{index}].functionCall.args")
            tool_calls.append({"id": call_id, "type": "function",
                               "function": {"name": names.to_upstream(call["name"]), "arguments": arguments}})
        # executableCode / codeExecutionResult: Google's server tool, nothing a chat server can read back
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if texts or tool_calls or reasoning:
        out.append(message)


def _user_turn(parts: list, turn: int, out: list[dict], calls: dict, vision: bool) -> None:
    """Tool messages first (chat wants them right after the calls), then the results' images, then the
    user's own parts, as one user message."""
    own: list[dict] = []
    images: list[dict] = []
    for index, part in enumerate(parts):
        if part.get("functionResponse") is not None:
            response = part["functionResponse"]
            call_id = _answered_call(response, calls, turn, index)
            found: list[dict] | None = [] if vision else None
            text = _response_text(response, found, f"contents[{turn}].parts[{index}].functionResponse.response")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
            images += result_images(call_id, found)
        elif not part.get("thought"):
            item = _media_or_text(part, vision)
            if item is not None:
                own.append(item)
    message = user_message(images + own)
    if message is not None:
        out.append(message)


def _answered_call(response: dict, calls: dict, turn: int, index: int) -> str:
    name = response["name"]
    waiting = calls.get(name)
    call_id = response.get("id")
    if call_id:
        if waiting and call_id in waiting:
            waiting.remove(call_id)
        return call_id
    if waiting:
        return waiting.popleft()
    return f"call_{turn}_{index}"  # a response to no call we saw: still a tool message, with an id of its own


def _json(value: Any, where: str) -> str:
    """``value`` as JSON text; a 400 naming ``where`` when it nests deeper than orjson writes (255 levels)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        error = BadRequest(f"'{where}' nests JSON too deeply to be forwarded (the limit is 255 levels).",
                           param=where)
        error.retryable = False  # the same for every target
        raise error from None


def _response_text(response: dict, images: list[dict] | None, where: str) -> str:
    """A function's result as the tool message's text: the ``output``/``content``/``result`` string when the
    response is just that, else the response as JSON; images among its ``parts`` go to ``images``."""
    value = response.get("response")
    if isinstance(value, dict) and len(value) == 1:
        (key, inner), = value.items()
        if key in ("output", "content", "result") and isinstance(inner, str):
            value = inner
        elif key == "error" and isinstance(inner, str):
            value = "Error: " + inner
    text = value if isinstance(value, str) else _json(value if value is not None else {}, where)
    for part in response.get("parts") or ():
        item = _media_or_text(part, images is not None)
        if item is None:
            continue
        if item["type"] == "image_url" and images is not None:
            images.append(item)
            text += "\n[image attached below]"
        else:
            text += "\n" + item["text"]
    return text


def _media_or_text(part: dict, vision: bool) -> dict | None:
    if isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]} if part["text"] else None
    data = part.get("inlineData")
    if data is not None:
        mime = data.get("mimeType") or "application/octet-stream"
        if not mime.lower().startswith("image/"):
            return {"type": "text", "text": f"[{mime} data omitted]"}
        if not vision:
            return {"type": "text", "text": "[image omitted]"}
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data['data']}"}}
    data = part.get("fileData")
    if data is not None:
        mime = data.get("mimeType") or ""
        if mime.lower().startswith("image/") and vision:
            return {"type": "image_url", "image_url": {"url": data["fileUri"]}}
        return {"type": "text", "text": "[image omitted]" if mime.lower().startswith("image/")
                else f"[file {data['fileUri'][:200]} omitted]"}
    return None  # a functionCall in a user turn, executable code...: never sent as a call


def _tools(body: dict, names: ToolNames, chat: dict) -> None:
    declarations = [d for tool in body.get("tools") or () for d in tool.get("functionDeclarations") or ()]
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode = calling.get("mode") or "AUTO"
    allowed = calling.get("allowedFunctionNames")
    if mode == "ANY" and allowed:
        declarations = [d for d in declarations if d["name"] in allowed]
    if not declarations:
        return
    chat["tools"] = [_function(d, names) for d in declarations]
    if mode == "NONE":
        chat["tool_choice"] = "none"
    elif mode == "ANY":
        chat["tool_choice"] = ({"type": "function", "function": {"name": names.to_upstream(allowed[0])}}
                               if allowed and len(allowed) == 1 else "required")


def _function(declaration: dict, names: ToolNames) -> dict:
    function: dict[str, Any] = {"name": names.to_upstream(declaration["name"])}
    if declaration.get("description"):
        function["description"] = declaration["description"]
    # Gemini CLI writes Gemini's upper-case type names in its JSON schemas too: both are read as the OpenAPI subset
    # (lower-case JSON Schema types are left as they are)
    if isinstance(declaration.get("parametersJsonSchema"), dict):
        function["parameters"] = chat_schema(declaration["parametersJsonSchema"], openapi=True)
    elif isinstance(declaration.get("parameters"), dict):
        function["parameters"] = chat_schema(declaration["parameters"], openapi=True)
    else:
        function["parameters"] = {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _response_format(config: dict) -> dict | None:
    mime = config.get("responseMimeType")
    if not isinstance(mime, str) or mime.lower() != "application/json":
        return None  # text/plain; text/x.enum is not bridged (the answer is plain text)
    if isinstance(config.get("responseJsonSchema"), dict):
        schema = chat_schema(config["responseJsonSchema"], openapi=True)
    elif isinstance(config.get("responseSchema"), dict):
        schema = chat_schema(config["responseSchema"], openapi=True)
    else:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema, "strict": True}}
