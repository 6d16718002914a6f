"""Anthropic Messages request -> chat completions request (translation.md §1.1 and the SPEC's request rules).

Pure: a body that passed ``validate`` in, a chat body out. ``to_chat``
builds the chat body once per request (it does not depend on the target)
and ``for_target`` adds what does: the upstream model id and the clamped
``max_tokens``.

What never reaches a chat upstream: ``cache_control`` (we build fresh dicts,
so it is simply never copied), Claude Code's ``x-anthropic-billing-header``
system block (per-request data that would also defeat prefix caching),
server tools and their result blocks, ``redacted_thinking``, thinking
signatures, and Anthropic-only fields (``context_management``, ``container``,
``mcp_servers``, ``service_tier``).
"""
from __future__ import annotations

from typing import Any

import orjson

from ..effort import DEFAULT_LEVELS, for_provider, from_anthropic
from ..roles import alternate, result_images, user_message
from ..tools import ToolNames, chat_schema

BILLING_HEADER = "x-anthropic-billing-header:"


def to_chat(body: dict, names: ToolNames, *, reasoning_replay: bool = False, vision: bool = True) -> dict:
    """The chat body for a validated Anthropic body, without ``model`` and ``max_tokens`` (see ``for_target``).

    ``vision=False`` (a text-only model): images become the text ``[image
    omitted]``, so a screenshot in the history does not make every later
    request of the conversation fail.
    """
    messages: list[dict] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body["messages"]:
        _message(message, messages, names, reasoning_replay, vision)
    chat: dict[str, Any] = {"messages": alternate(messages)}  # strict templates: roles must alternate
    if body.get("stream"):
        chat["stream"] = True
    for name in ("temperature", "top_p", "top_k"):  # top_k: vLLM, llama.cpp, SGLang and Ollama take it
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    tools = [_tool(t, names) for t in body.get("tools") or () if _is_custom_tool(t)]
    if tools:
        chat["tools"] = tools
        choice = body.get("tool_choice")
        if choice:
            mapped = _tool_choice(choice, names)
            if mapped is not None:
                chat["tool_choice"] = mapped
            if choice.get("disable_parallel_tool_use") is True:
                chat["parallel_tool_calls"] = False
    effort = from_anthropic(body.get("thinking"), body.get("output_config"))
    if effort:
        chat["reasoning_effort"] = effort  # a level; ``for_target`` maps it onto what the provider accepts
    fmt = _output_format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    metadata = body.get("metadata")
    if metadata and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    return chat


def for_target(chat: dict, model: str, max_tokens: int, *, stream_usage: bool = True,
               efforts: tuple[str, ...] = DEFAULT_LEVELS) -> dict:
    """A copy of ``chat`` for one upstream: its model id, the clamped ``max_tokens``, usage in streams, the
    reasoning effort as one of the values it accepts (``efforts``)."""
    out = {"model": model, **chat, "max_tokens": max_tokens}
    if chat.get("stream") and stream_usage:
        out["stream_options"] = {"include_usage": True}
    if "reasoning_effort" in chat:
        out["reasoning_effort"] = for_provider(chat["reasoning_effort"], efforts)
    return out


def _system_text(system: Any) -> str:
    """One string: text blocks joined by blank lines, the billing-header block dropped.

    A plain string, not a parts array: several chat templates concatenate
    ``message['content']`` as a string and break on arrays.
    """
    if isinstance(system, str):
        return system.strip() and system
    if not isinstance(system, list):
        return ""
    texts = [b["text"] for b in system
             if b.get("type") == "text" and b["text"].strip() and not b["text"].startswith(BILLING_HEADER)]
    return "\n\n".join(texts)


def _message(message: dict, out: list[dict], names: ToolNames, replay: bool, vision: bool) -> None:
    role, content = message["role"], message["content"]
    if role == "system":
        # Strict templates refuse a system message after the first one.
        text = content if isinstance(content, str) else _joined_text(content)
        if text.strip():
            out.append({"role": "user", "content": f"<system-reminder>\n{text}\n</system-reminder>"})
        return
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if role == "assistant":
        out.append(_assistant(content, names, replay))
        return
    parts: list[dict] = []
    images: list[dict] = []  # from tool results: chat puts images in user messages only
    for block in content:
        kind = block["type"]
        if kind == "tool_result":
            # Tool results first: the chat format needs them right after the
            # assistant's tool calls, before the user's own words.
            call_id = str(block.get("tool_use_id") or "")
            found = [] if vision else None
            out.append({"role": "tool", "tool_call_id": call_id, "content": _tool_result_text(block, found)})
            images += result_images(call_id, found)
        elif kind == "text":
            if block["text"].strip():
                parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            part = _image(block) if vision else {"type": "text", "text": "[image omitted]"}
            if part is not None:
                parts.append(part)
        elif kind in ("document", "search_result"):
            text = _document_text(block)
            if text:
                parts.append({"type": "text", "text": text})
        # tool_use / thinking in a user turn: ignored (never injected as calls)
    message = user_message(images + parts)  # after the tool messages: the results' images, then the user's own
    if message is not None:
        out.append(message)


def _assistant(blocks: list, names: ToolNames, replay: bool) -> dict:
    """One assistant turn stays one chat message (splitting it breaks tool-call adjacency)."""
    texts: list[str] = []
    calls: list[dict] = []
    reasoning: list[str] = []
    for block in blocks:
        kind = block["type"]
        if kind == "text":
            if block["text"].strip():
                texts.append(block["text"])
        elif kind == "tool_use":
            arguments = block.get("input")
            calls.append({"id": str(block.get("id") or ""), "type": "function",
                          "function": {"name": names.to_upstream(str(block.get("name") or "")),
                                       "arguments": orjson.dumps(arguments if arguments is not None else {}).decode()}})
        elif kind == "thinking" and replay and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "\n\n".join(reasoning)
    return message


def _joined_text(blocks: list) -> str:
    return "\n\n".join(b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str))


def _tool_result_text(block: dict, images: list[dict] | None) -> str:
    """A tool result's text. Its images go to ``images`` (an ``image_url`` part each; the text says
    ``[image attached below]``), or, when ``images`` is None (``vision: false``), become ``[image omitted]``.

    OpenAI's chat format has images in user messages only, and vLLM, llama.cpp and SGLang read tool
    messages as text (research/translation.md §1.1, CPA's NormalizeOpenAIToolResultsTextOnly): the images
    follow in the user message right after the tool messages.
    """
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif part.get("type") == "image":
                image = _image(part) if images is not None else None
                if image is not None:
                    images.append(image)
                pieces.append("[image attached below]" if image is not None else "[image omitted]")
            elif part.get("type") in ("document", "search_result"):
                pieces.append(_document_text(part))
        text = "\n\n".join(p for p in pieces if p)
    else:
        text = orjson.dumps(content).decode()
    if block.get("is_error") is True:
        return "Error: " + text
    return text


def _image(block: dict) -> dict | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") if isinstance(source.get("media_type"), str) else "image/jpeg"
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{source['data']}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    return None


def _document_text(block: dict) -> str:
    """Plain-text documents become text; PDFs and other binaries cannot go to a chat server."""
    source = block.get("source")
    title = block.get("title") if isinstance(block.get("title"), str) else ""
    if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif isinstance(source, dict) and source.get("type") == "content" and isinstance(source.get("content"), list):
        text = _joined_text(source["content"])
    elif block.get("type") == "search_result" and isinstance(block.get("content"), list):
        text = _joined_text(block["content"])
    else:
        return "[document omitted]"
    return f"{title}\n\n{text}" if title else text


def _is_custom_tool(tool: dict) -> bool:
    """Client tools have no ``type`` (or ``custom``); typed ones are Anthropic server tools, dropped."""
    return tool.get("type") in (None, "custom")


def _tool(tool: dict, names: ToolNames) -> dict:
    function: dict[str, Any] = {"name": names.to_upstream(tool["name"])}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    schema = tool.get("input_schema")
    function["parameters"] = chat_schema(schema) if isinstance(schema, dict) else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _tool_choice(choice: dict, names: ToolNames) -> Any:
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": names.to_upstream(choice["name"])}}
    return None


def _output_format(body: dict) -> dict | None:
    fmt = body.get("output_format")
    if fmt is None and isinstance(body.get("output_config"), dict):
        fmt = body["output_config"].get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema",
                "json_schema": {"name": "structured_output", "schema": fmt["schema"], "strict": True}}
    return None
