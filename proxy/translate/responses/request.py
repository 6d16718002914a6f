"""Translate a Responses API request into a chat-completions request (translation.md §2.1).

Done in two steps: ``prepare`` reads and validates the client's body once
(bad input is a 400 before any upstream is asked); ``to_chat`` then builds
the body for one target, because the model id, ``max_tokens`` clamping,
``reasoning-replay`` and ``stream-usage`` depend on the provider.

What strict chat templates need (research §3 #15) shapes the messages: one
leading system message (from ``instructions`` and the leading
developer/system items), later developer/system items as user messages, no
``developer`` role, only function tools, tool messages right after the
assistant message that called them, consecutive calls in one assistant
message, and no two user or assistant messages in a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ...errors import BadRequest
from .. import tools
from ..effort import DEFAULT_LEVELS, for_provider, from_responses
from ..roles import alternate
from .items import Turn, read_items
from .toolmap import ToolMap

SIMPLE_PARAMS = ("temperature", "top_p", "user")
FREEFORM_NOTE = "Pass the whole freeform text as the string parameter `input`."


@dataclass(slots=True)
class Prepared:
    """The client's request, validated and translated up to what depends on the target."""

    system: str | None
    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    params: dict = field(default_factory=dict)       # temperature, top_p, user, reasoning_effort, response_format
    max_output_tokens: int | None = None
    toolmap: ToolMap = field(default_factory=ToolMap)


def prepare(body: dict, history: dict | None = None) -> Prepared:
    """Validate ``body`` and translate it; ``history`` is a stored turn (``previous_response_id``)."""
    toolmap = ToolMap()
    tools = _tools(body.get("tools"), toolmap, "tools")
    turn = Turn(toolmap)
    if history is not None:
        turn.replay(history.get("system"), history.get("messages") or [])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("instructions must be a string", param="instructions")
    turn.instructions(instructions)
    extra_tools = read_items(body.get("input"), turn)
    if extra_tools:  # Codex Desktop's `additional_tools` items declare tools inside `input`
        tools += _tools(extra_tools, toolmap, "input")
    messages = turn.finish()
    if not messages:
        raise BadRequest("input must contain at least one message", param="input")
    prepared = Prepared(system=turn.system_text(), messages=messages, toolmap=toolmap)
    prepared.tools = _dedupe(tools)
    if prepared.tools:
        prepared.tool_choice = _tool_choice(body.get("tool_choice"), toolmap)
        parallel = body.get("parallel_tool_calls")
        if isinstance(parallel, bool):
            prepared.parallel_tool_calls = parallel
    prepared.params = _params(body)
    limit = body.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int or limit < 1:
            raise BadRequest("max_output_tokens must be a positive integer", param="max_output_tokens")
        prepared.max_output_tokens = limit
    return prepared


def to_chat(prepared: Prepared, model: str, *, stream: bool, reasoning_replay: bool, stream_usage: bool,
            max_output: int = 0, context_length: int = 0, efforts: tuple[str, ...] = DEFAULT_LEVELS) -> dict:
    """The chat body for one target."""
    messages = prepared.messages
    if not reasoning_replay and any("reasoning_content" in m for m in messages):
        messages = [_without_reasoning(m) for m in messages]
    if prepared.system:
        messages = [{"role": "system", "content": prepared.system}, *messages]
    body: dict[str, Any] = {"model": model, "messages": alternate(messages)}
    if prepared.tools:
        body["tools"] = prepared.tools
        if prepared.tool_choice is not None:
            body["tool_choice"] = prepared.tool_choice
        if prepared.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = prepared.parallel_tool_calls
    body.update(prepared.params)
    if "reasoning_effort" in body:
        body["reasoning_effort"] = for_provider(body["reasoning_effort"], efforts)
    max_tokens = clamp_max_tokens(prepared.max_output_tokens, body, max_output, context_length)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        if stream_usage:  # the terminal event must carry usage (and usage accounting needs it)
            body["stream_options"] = {"include_usage": True}
    return body


def clamp_max_tokens(asked: int | None, body: dict, max_output: int, context_length: int) -> int | None:
    """``max_output_tokens`` clamped like every bridge clamps (``tools.clamp_max_tokens``); the prompt is
    estimated at 4 bytes a token (no tokenizer on the request path)."""
    if asked is None:
        return None
    estimate = len(orjson.dumps([body.get("messages"), body.get("tools")])) // 4 if context_length > 0 else 0
    return tools.clamp_max_tokens(asked, max_output, context_length, estimate)


def assistant_message(reasoning: str, text: str, calls: list[tuple[str, str, str]]) -> dict:
    """The chat message an answer adds to the history (``calls``: (id, upstream name, arguments))."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                                 for call_id, name, args in calls]
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


# -- tools --------------------------------------------------------------------
def _tools(tools: Any, toolmap: ToolMap, param: str) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest(f"{param} must be an array", param=param)
    out: list[dict] = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise BadRequest(f"{where} must be an object with a string `type`", param=where)
        kind = tool["type"]
        if kind == "namespace":
            space = _name(tool, where)
            for j, child in enumerate(tool.get("tools") if isinstance(tool.get("tools"), list) else ()):
                if isinstance(child, dict) and child.get("type") in ("function", "custom"):
                    out.append(_function(child, toolmap, f"{where}.tools[{j}]", space))
            continue
        if kind in ("function", "custom"):
            out.append(_function(tool, toolmap, where))
        # Anything else is a built-in tool (web_search, local_shell, image_generation, tool_search, file_search,
        # code_interpreter, computer_use, mcp, shell, apply_patch) or a newer one: a chat server cannot run it,
        # and llama.cpp rejects the whole request over it ("'type' of tool must be 'function'"). Dropped.
    return out


def _function(tool: dict, toolmap: ToolMap, where: str, namespace: str | None = None) -> dict:
    source = tool.get("function") if isinstance(tool.get("function"), dict) else tool  # nested chat shape too
    name = _name(source, where)
    upstream = toolmap.upstream(name, namespace)
    description = source.get("description")
    description = description if isinstance(description, str) else ""
    if tool["type"] == "custom":
        toolmap.custom.add(f"{namespace}__{name}" if namespace else name)
        parameters = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
        fmt = tool.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
            description += (f"\n\n{FREEFORM_NOTE} It must follow this {fmt.get('syntax') or ''} grammar:\n"
                            f"```\n{fmt['definition']}\n```")
        else:
            description += f"\n\n{FREEFORM_NOTE}"
        description = description.strip()
    else:
        parameters = source.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif not isinstance(parameters, dict):
            raise BadRequest(f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
        elif parameters.get("type", "object") == "object" and "properties" not in parameters:
            parameters = {**parameters, "type": "object", "properties": {}}  # vLLM/llama.cpp want properties
    function: dict[str, Any] = {"name": upstream, "parameters": parameters}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _name(tool: dict, where: str) -> str:
    name = tool.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(f"{where}.name must be a non-empty string", param=f"{where}.name")
    return name


def _dedupe(tools: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for tool in tools:  # first declaration wins, as in CPA
        name = tool["function"]["name"]
        if name not in seen:
            seen.add(name)
            out.append(tool)
    return out


def _tool_choice(choice: Any, toolmap: ToolMap) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom") and isinstance(choice.get("name"), str):
            namespace = choice.get("namespace")
            namespace = namespace if isinstance(namespace, str) else None
            return {"type": "function", "function": {"name": toolmap.upstream(choice["name"], namespace)}}
        if kind in ("tool", "any"):
            return "required"
        if kind == "allowed_tools":
            mode = choice.get("mode")
            return mode if mode in ("auto", "required") else "auto"
        if isinstance(kind, str):
            return None  # a built-in tool was chosen; it is not sent, so let the model choose
    raise BadRequest("tool_choice must be auto, none, required or a tool object", param="tool_choice")


# -- everything else ------------------------------------------------------------
def _params(body: dict) -> dict:
    params = {key: body[key] for key in SIMPLE_PARAMS if body.get(key) is not None}
    effort = from_responses(body.get("reasoning"))
    if effort is not None:
        params["reasoning_effort"] = effort  # a level; ``to_chat`` maps it onto what the provider accepts
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise BadRequest("text.format.schema must be an object", param="text.format.schema")
            schema = {"name": fmt.get("name") or "output", "schema": fmt["schema"]}
            if "strict" in fmt:
                schema["strict"] = fmt["strict"]
            params["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind == "json_object":
            params["response_format"] = {"type": "json_object"}
    return params


def _without_reasoning(message: dict) -> dict:
    if "reasoning_content" not in message:
        return message
    return {k: v for k, v in message.items() if k != "reasoning_content"}
