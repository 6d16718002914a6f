"""The built-in demo upstream: a small SSE-only chat server at /demo/v1, so a first run folds something.

It behaves like the servers streamfold exists for: every chat request is
answered with an SSE stream, even ``stream: false``. Reasoning first, then
text word by word with a short delay (so streaming is visible), a tool call
when tools are given, a finish chunk, a usage chunk when asked, ``[DONE]``.
It is not a model and says so; it is deterministic and echoes the last user
message so it feels live.

Off unless ``demo-upstream: true``. Each view checks the *current* settings,
so a hot reload turns it on or off, and with it off everything under /demo is
the ordinary JSON 404 (for every method, so not even a 405 tells it exists).
Even on, it answers only the proxy itself: a loopback peer with no forwarding
header (the executor drops those upstream) that carries the instance's demo
secret (``Streamfold-Demo``, sent by the executor to the demo provider only;
``proxy.hop``), so a platform router (Heroku), a reverse proxy that adds
X-Forwarded-For, or a same-host TCP forwarder gets the same 404. Its answers
are not logged or counted as requests of their own: the client's request
that reached it through the demo provider is (``provider=demo``).
It registers no request hook: other routes' request path is unchanged.
"""
from __future__ import annotations

import ipaddress
import re
import time
from typing import Iterator

import orjson
from flask import Blueprint, Response, g, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from .. import hop
from ..errors import BadRequest
from ..relay import SSE_HEADERS
from .common import holder, read_json_body

bp = Blueprint("demo", __name__, url_prefix="/demo")

MODEL = "streamfold-demo"
CREATED = 1764115200         # fixed, like every other field: the demo answers the same bytes each time
WORD_DELAY = 0.02            # seconds between events: visible streaming, ~0.7 s per answer
ECHO_LIMIT = 60              # characters of the user's message echoed back
# Every method, so that with the demo off even a wrong method gets the 404 (not a 405).
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Headers a reverse proxy or platform router adds, and the executor never sends upstream.
FORWARDED = ("HTTP_FORWARDED", "HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP")
_SPACE = re.compile(r"\s+")


def is_open() -> bool:
    """Whether the demo answers this request: the settings turn it on and the proxy itself calls."""
    return holder().current().settings.demo_upstream and _from_this_host() \
        and hop.is_demo_secret(request.headers.get(hop.DEMO_HEADER))


def _open_for(*methods: str) -> None:
    """404 unless the demo answers this request (``is_open``); then 405 for other methods."""
    if not is_open():
        g.record.rule = "unmatched"  # logged and counted exactly like an unknown URL
        raise NotFound()
    g.record.quiet = True  # the client's request that came here through the demo provider is logged
    if request.method not in methods:
        raise MethodNotAllowed(valid_methods=list(methods))


@bp.route("/v1/models", methods=ANY_METHOD)
def models() -> Response:
    _open_for("GET", "HEAD")
    body = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": CREATED,
                                        "owned_by": "streamfold-demo"}]}
    return Response(orjson.dumps(body), 200, {"Content-Type": "application/json"})


@bp.route("/v1/chat/completions", methods=ANY_METHOD)
def chat_completions() -> Response:
    _open_for("POST")
    # The demo takes any Bearer key or none: it stands in for an upstream, whose key is the proxy's.
    body = read_json_body(holder().current().settings.max_request_bytes)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array", param="messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("tools must be an array", param="tools")
    tool = _first_tool_name(tools) if tools and body.get("tool_choice") != "none" else None
    options = body.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    events = demo_chunks(_last_user_text(messages), tool, usage, _prompt_tokens(messages))
    # Always SSE, whatever "stream" says: that is the misbehaviour being demonstrated.
    return Response(_paced(events), 200, {"Content-Type": "text/event-stream", **SSE_HEADERS})


def demo_chunks(echo: str, tool: str | None, usage: bool, prompt_tokens: int) -> list[dict]:
    """The chat.completion.chunk objects of one demo answer, in order (pure, deterministic)."""
    head = {"id": "chatcmpl-streamfold-demo", "object": "chat.completion.chunk", "created": CREATED,
            "model": MODEL}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return dict(head, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    quoted = f'"{echo}"' if echo else "nothing"
    thinking = ["The ", "user ", "wrote ", f"{quoted}. ", "I ", "am ", "a ", "demo, ", "so ", "I ",
                "answer ", "the ", "same ", "way ", "every ", "time."]
    # The echo is one piece, so a long message cannot make the answer slow.
    words = ["This ", "is ", "streamfold's ", "demo ", "upstream, ", "not ", "a ", "model. ", "You ",
             "said ", f"{quoted}. ", "It ", "answers ", "in ", "SSE ", "even ", "when ", "stream ", "is ",
             "false; ", "streamfold ", "folds ", "it ", "into ", "one ", "chat.completion."]
    out = [chunk({"role": "assistant", "content": "", "reasoning_content": thinking[0]})]
    out += [chunk({"reasoning_content": piece}) for piece in thinking[1:]]
    out += [chunk({"content": piece}) for piece in words]
    if tool is not None:
        arguments = orjson.dumps({"text": echo}).decode()
        third = max(1, len(arguments) // 3)
        parts = [arguments[:third], arguments[third:2 * third], arguments[2 * third:]]
        out.append(chunk({"tool_calls": [{"index": 0, "id": "call_streamfold_demo", "type": "function",
                                          "function": {"name": tool, "arguments": parts[0]}}]}))
        out += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}) for part in parts[1:]]
    out.append(chunk({}, "tool_calls" if tool is not None else "stop"))
    if usage:
        reasoning = len(thinking)
        completion = len(out) - 1
        out.append(dict(head, choices=[], usage={
            "prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}))
    return out


def _paced(chunks: list[dict]) -> Iterator[bytes]:
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(WORD_DELAY)
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _from_this_host() -> bool:
    environ = request.environ
    if any(name in environ for name in FORWARDED):
        return False
    try:
        return ipaddress.ip_address((request.remote_addr or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _text(content: object) -> str:
    """A message's text: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user_text(messages: list) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _SPACE.sub(" ", _text(message.get("content"))).strip()
            return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT - 3] + "..."
    return ""


def _prompt_tokens(messages: list) -> int:
    """A deterministic stand-in for a tokenizer: words in the messages' text, plus a few per message."""
    return sum(4 + len(_text(m.get("content")).split()) for m in messages if isinstance(m, dict))


def _first_tool_name(tools: list) -> str:
    first = tools[0]
    function = first.get("function") if isinstance(first, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequest("tools[0].function.name must be a non-empty string", param="tools")
    return name
