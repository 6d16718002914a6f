"""A real OpenAI-style upstream on a loopback port, scriptable per test.

Tests set ``upstream.handler`` to a function of the recorded request that
returns a ``Reply``: JSON, an SSE stream (chunked or close-delimited, with
delays between events), a hang, or a dropped connection. Every request is
recorded (path, headers, parsed body, the provider key it carried) and a
stream notes when the proxy closed the connection on it. Every chat request
is also collected in ``CHAT_REQUESTS`` (tests/conftest.py checks their roles
alternate), and ``strict_roles=True`` answers one whose roles do not with
the 400 a strict chat template gets from vLLM.
"""
from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)
    events: list[bytes] | None = None   # SSE: written one by one
    delay: float = 0.0                  # seconds before each event after the first
    delays: dict[int, float] = field(default_factory=dict)  # per-event delay before event i
    chunked: bool = True                # False: close-delimited body (no length, Connection: close)
    hang: float = 0.0                   # sleep this long before answering at all
    drop_after: int | None = None       # close the socket after this many events, no terminator
    end_delay: float = 0.0              # seconds between the last event and the body's end (chunked)


@dataclass
class Recorded:
    path: str
    headers: dict
    body: dict | None
    raw: bytes
    started: float
    disconnected_at: float | None = None
    events_sent: int = 0
    sent_at: list[float] = field(default_factory=list)

    @property
    def key(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None


def completion(content: str = "Hello!", model: str = "upstream-model") -> dict:
    return {"id": "chatcmpl-up123", "object": "chat.completion", "created": 1764000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def sse(*chunks: dict | str, done: bool = True, crlf: bool = False) -> list[bytes]:
    """Events the way vLLM writes them: ``data: {...}\\n\\n`` and a final ``[DONE]``."""
    end = b"\r\n\r\n" if crlf else b"\n\n"
    out = [b"data: " + (c.encode() if isinstance(c, str) else json.dumps(c, separators=(",", ":")).encode())
           + end for c in chunks]
    if done:
        out.append(b"data: [DONE]" + end)
    return out


def text_chunks(pieces: list[str], model: str = "upstream-model", finish: str = "stop",
                usage: dict | None = None) -> list[dict]:
    head = {"id": "chatcmpl-stream1", "object": "chat.completion.chunk", "created": 1764000001, "model": model}
    chunks = [dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}])]
    chunks += [dict(head, choices=[{"index": 0, "delta": {"content": p}, "logprobs": None,
                                    "finish_reason": None}]) for p in pieces]
    chunks.append(dict(head, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
    if usage is not None:
        chunks.append(dict(head, choices=[], usage=usage))
    return chunks


# Every chat request any FakeUpstream received, for tests/conftest.py's per-test role check (cleared per test).
CHAT_REQUESTS: list[Recorded] = []
STRICT_ROLES_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."


def described(body: dict) -> Reply:
    """A completion that says what the request held: its system message (``-`` for none) and how many images,
    ``system=<text> images=<n>`` (the SDK tests' default answer)."""
    messages = body.get("messages") or []
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else "-"
    images = sum(1 for m in messages if isinstance(m.get("content"), list)
                 for p in m["content"] if p.get("type") == "image_url")
    return Reply(body=json.dumps(completion(f"system={system} images={images}")).encode())


def streamed_text() -> Reply:
    """A chat stream saying ``Hello from the stream`` in three deltas, usage 12 prompt + 3 completion tokens
    (the SDK tests' stream)."""
    return Reply(events=sse(*text_chunks(["Hello", " from", " the stream"],
                                         usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})))


def tool_call(name: str, arguments: str, call_id: str = "call_7") -> Reply:
    """A completion that calls one tool, ``name`` with ``arguments`` (a JSON string as chat servers send it),
    finish_reason ``tool_calls`` (the SDK tests' tool turn)."""
    reply = completion(None)
    reply["choices"][0]["message"]["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]
    reply["choices"][0]["finish_reason"] = "tool_calls"
    return Reply(body=json.dumps(reply).encode())


def role_problem(messages: object) -> str | None:
    """Why a chat ``messages`` list would make a strict chat template (Mistral's, Gemma's, many Llama
    fine-tunes') raise, or None: roles must alternate after at most one leading system message; tool
    messages may follow each other (one per parallel call)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None  # not a chat body the check can read; the proxy's own validation answers those
    roles = [m.get("role") for m in messages]
    for i, (a, b) in enumerate(zip(roles, roles[1:], strict=False), start=1):
        if b == "system":
            return f"a system message at position {i} (only the first message may be a system message)"
        if a == b and a != "tool":
            return f"messages {i - 1} and {i} are both {a!r} ({STRICT_ROLES_ERROR})"
    return None


class FakeUpstream:
    def __init__(self, tls: ssl.SSLContext | None = None, strict_roles: bool = False) -> None:
        """``strict_roles``: answer a chat request whose roles do not alternate with vLLM's 400 for a strict
        template (the message a Jinja ``raise_exception`` gives), instead of the handler's reply."""
        self.requests: list[Recorded] = []
        self.strict_roles = strict_roles
        self.scheme = "https" if tls is not None else "http"
        self.handler: Callable[[Recorded], Reply] = lambda rec: Reply(body=json.dumps(completion()).encode())
        self.release = threading.Event()  # ends hangs at teardown
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                rec = Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body, raw,
                               time.monotonic())
                upstream.requests.append(rec)
                if rec.path.endswith("/chat/completions") and isinstance(body, dict):
                    CHAT_REQUESTS.append(rec)
                    problem = role_problem(body.get("messages"))
                    if problem is not None and upstream.strict_roles:
                        upstream.answer(self, rec, Reply(status=400, body=json.dumps({"error": {
                            "message": STRICT_ROLES_ERROR, "type": "BadRequestError", "param": None,
                            "code": 400}}).encode()))
                        return
                upstream.answer(self, rec, upstream.handler(rec))

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # the handshake runs at accept, in the server's thread: fine for a test upstream
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/v1"

    @property
    def connections(self) -> int:
        return self.server.connections

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: BaseHTTPRequestHandler, rec: Recorded, reply: Reply) -> None:
        if reply.hang and self.release.wait(reply.hang):
            return
        try:
            if reply.events is None:
                h.send_response(reply.status)
                h.send_header("Content-Type", reply.content_type)
                h.send_header("Content-Length", str(len(reply.body)))
                for k, v in reply.headers.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(reply.body)
                h.wfile.flush()
                return
            self._stream(h, rec, reply)
        except (BrokenPipeError, ConnectionResetError, OSError):
            rec.disconnected_at = time.monotonic()
            h.close_connection = True

    def _stream(self, h: BaseHTTPRequestHandler, rec: Recorded, reply: Reply) -> None:
        h.send_response(reply.status)
        h.send_header("Content-Type", reply.content_type if reply.content_type != "application/json"
                      else "text/event-stream")
        for k, v in reply.headers.items():
            h.send_header(k, v)
        if reply.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        h.wfile.flush()
        for i, event in enumerate(reply.events):
            if reply.drop_after is not None and i >= reply.drop_after:
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            pause = reply.delays.get(i, reply.delay if i else 0.0)
            if pause and self.release.wait(pause):
                return
            rec.sent_at.append(time.monotonic())  # before the write: the client may read it at once
            h.wfile.write(b"%x\r\n%s\r\n" % (len(event), event) if reply.chunked else event)
            h.wfile.flush()
            rec.events_sent += 1
        if reply.chunked:
            if reply.end_delay and self.release.wait(reply.end_delay):
                return
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 drops connections when several gunicorn workers burst
    connections = 0  # TCP connections accepted: how many the proxy opened (pooled connections are reused)

    def get_request(self):
        accepted = super().get_request()
        self.connections += 1
        return accepted

    def handle_error(self, request, client_address) -> None:
        """A client (the proxy) dropping a pooled connection is normal here, not a traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
