"""Chat messages in the order strict chat templates accept: roles alternate after one leading system message.

Mistral's, Gemma's and many Llama fine-tunes' templates raise "roles must
alternate" (a 400 from vLLM) on two user or two assistant messages in a row,
and several refuse a system message anywhere but first. Both bridges build
their chat messages from protocols that allow both (Anthropic: consecutive
user turns, system messages in the middle, a turn that is only tool results
then text; Responses: items in any order), so the last step of both is
``alternate``: neighbours with the same role become one message. Tool
messages stay one per call (several in a row answer parallel calls).

A user turn that answers tool calls is, in chat, the tool messages and then
one user message: the results' images (``result_images``; chat takes images
in user messages only), then the user's own parts (``user_message``).
"""
from __future__ import annotations


def alternate(messages: list[dict]) -> list[dict]:
    """``messages`` with same-role neighbours merged (user with user, assistant with assistant); a system
    message after the first position becomes a user message. The input's dicts are not changed, and each run
    of neighbours is joined once (linear in the input's size, however long the run)."""
    runs: list[list[dict]] = []
    for message in messages:
        role = message.get("role")
        if role == "system" and runs:
            message, role = {**message, "role": "user"}, "user"
        if runs and role in ("user", "assistant") and runs[-1][0].get("role") == role:
            runs[-1].append(message)
        else:
            runs.append([message])
    return [run[0] if len(run) == 1 else _merged(run) for run in runs]


def _merged(run: list[dict]) -> dict:
    """One message for a run of same-role messages: contents joined (strings by a blank line while there are
    only strings, else one parts array), tool calls in order, reasoning joined."""
    contents = [m.get("content") or "" for m in run]
    if all(isinstance(c, str) for c in contents):
        content: str | list = "\n\n".join(c for c in contents if c)
    else:
        content = [part for c in contents for part in (c if isinstance(c, list) else
                                                        [{"type": "text", "text": c}] if c else [])]
    merged = {**run[0], "content": content}
    calls = [call for m in run for call in m.get("tool_calls") or ()]
    if calls:
        merged["tool_calls"] = calls
    reasoning = [m["reasoning_content"] for m in run if m.get("reasoning_content")]
    if reasoning:
        merged["reasoning_content"] = "\n\n".join(reasoning)
    return merged


def result_images(call_id: str, images: list[dict] | None) -> list[dict]:
    """A tool result's images for the user message after the tool messages, behind a text naming the call
    (nothing when the result has none)."""
    if not images:
        return []
    return [{"type": "text", "text": f"[images from the result of tool call {call_id}]"}, *images]


def user_message(parts: list[dict]) -> dict | None:
    """A user turn's chat parts as one message: the texts joined by a blank line when all are text (a string
    every template reads), else the parts array; None when nothing is left to say."""
    if not parts:
        return None
    if all(p["type"] == "text" for p in parts):
        return {"role": "user", "content": "\n\n".join(p["text"] for p in parts)}
    return {"role": "user", "content": parts}
