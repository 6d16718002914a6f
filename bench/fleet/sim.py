"""Simulated vLLM-like replicas and a trace of agent sessions, for ``bench/fleet/run.py``.

A replica speaks ``POST /v1/chat/completions`` (stream and non-stream) like
vLLM with automatic prefix caching:

* the prompt (its messages rendered in order) is cut into blocks of
  ``block_tokens`` tokens (4 characters a token, no tokenizer); each block's
  hash chains the one before, so a hit on block i means the prompt is the same
  up to there;
* the cache holds ``capacity_tokens`` worth of blocks, least recently used
  evicted first; a request's leading blocks found there are "cached tokens";
* at most ``batch`` requests run at once; the rest queue (FIFO);
* a running request waits ``prefill_ms`` per uncached prompt token before its
  first token (time to first token = queueing + prefill), then ``decode_ms``
  per output token; usage reports ``prompt_tokens_details.cached_tokens``.

Times are real (sleeps), scaled by the caller so a run takes about a minute.

The trace: ``sessions`` agent sessions run at once, Claude-Code-shaped (a large
shared system prompt and tool list, ``x-claude-code-session-id``) or
Codex-shaped (another shared prefix, ``prompt_cache_key``), plus some without
any hint (the prefix index must find them); each turn appends a tool result
or a user message to a history that only grows; a few one-off requests come
in between.
"""
from __future__ import annotations

import collections
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHARS_PER_TOKEN = 4
WORDS = ("def class return import self value result error path file test list dict open read write json "
         "config server client request response stream token cache block replica index model prompt").split()


@dataclass
class ReplicaParams:
    block_tokens: int = 16
    capacity_tokens: int = 200_000
    prefill_ms: float = 0.02     # per uncached prompt token
    decode_ms: float = 2.0       # per output token
    batch: int = 8


class Replica:
    """One simulated model server: its prefix cache, its batch slots, its counters."""

    def __init__(self, number: int, params: ReplicaParams) -> None:
        self.number, self.params = number, params
        self.cache: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(params.batch)
        self.waiting = 0
        self.running = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def reset(self) -> None:
        with self.lock:
            self.cache.clear()
            self.requests = self.prompt_tokens = self.cached_tokens = 0

    def blocks(self, prompt: str) -> list[int]:
        size = self.params.block_tokens * CHARS_PER_TOKEN
        out, previous = [], 0
        for start in range(0, len(prompt) - size + 1, size):
            previous = hash((previous, prompt[start:start + size]))
            out.append(previous)
        return out

    def match(self, blocks: list[int]) -> int:
        """Leading blocks of this prompt in the cache (read only: what the oracle asks)."""
        cache, found = self.cache, 0
        for block in blocks:
            if block not in cache:
                break
            found += 1
        return found

    def admit(self, prompt: str) -> tuple[int, int]:
        """(prompt tokens, cached tokens) of a request now starting; its blocks enter the cache."""
        blocks = self.blocks(prompt)
        tokens = max(1, len(prompt) // CHARS_PER_TOKEN)
        with self.lock:
            hit = self.match(blocks)
            for block in blocks:
                self.cache[block] = None
                self.cache.move_to_end(block)
            limit = self.params.capacity_tokens // self.params.block_tokens
            while len(self.cache) > limit:
                self.cache.popitem(last=False)
            cached = min(tokens, hit * self.params.block_tokens)
            self.requests += 1
            self.prompt_tokens += tokens
            self.cached_tokens += cached
        return tokens, cached

    def load(self) -> int:
        return self.waiting + self.running


def render(messages: list[dict]) -> str:
    return "".join(f"<|{m.get('role')}|>{m.get('content') or ''}" for m in messages)


def serve(replica: Replica, port: int = 0) -> ThreadingHTTPServer:
    """Start the replica's HTTP server on loopback (a daemon thread); returns the server."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw)
            params = replica.params
            with replica.lock:
                replica.waiting += 1
            replica.slots.acquire()
            with replica.lock:
                replica.waiting -= 1
                replica.running += 1
            try:
                prompt_tokens, cached = replica.admit(render(body.get("messages") or []))
                time.sleep((prompt_tokens - cached) * params.prefill_ms / 1000)
                out = int(body.get("max_tokens") or 16)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": out,
                         "total_tokens": prompt_tokens + out, "prompt_tokens_details": {"cached_tokens": cached}}
                head = {"id": f"chatcmpl-r{replica.number}", "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": body.get("model")}
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._chunk(dict(head, choices=[{"index": 0, "delta": {"role": "assistant",
                                                                           "content": f"r{replica.number}"},
                                                     "finish_reason": None}]))
                    time.sleep(out * params.decode_ms / 1000)
                    self._chunk(dict(head, choices=[{"index": 0, "delta": {"content": " done"},
                                                     "finish_reason": "stop"}]))
                    self._chunk(dict(head, choices=[], usage=usage))
                    self._write(b"data: [DONE]\n\n")
                    self._write(b"")
                else:
                    time.sleep(out * params.decode_ms / 1000)
                    answer = json.dumps({**head, "object": "chat.completion", "usage": usage, "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": f"r{replica.number} done"},
                         "finish_reason": "stop"}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                with replica.lock:
                    replica.running -= 1
                replica.slots.release()

        def _chunk(self, event: dict) -> None:
            self._write(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")

        def _write(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512

    server = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


# -- the trace ------------------------------------------------------------------------------------


@dataclass
class Turn:
    delay: float              # seconds to wait before sending (think time, or an offset for one-offs)
    messages: list[dict]
    max_tokens: int
    headers: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Session:
    name: str
    turns: list[Turn]
    concurrent: int = 1       # the hot session sends this many requests at once per turn


def _text(rng: random.Random, tokens: int) -> str:
    words, size = [], 0
    while size < tokens * CHARS_PER_TOKEN:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def trace(sessions: int, turns: int, seed: int, prefix_tokens: tuple[int, int], tail_tokens: tuple[int, int],
          output_tokens: tuple[int, int], think: tuple[float, float], one_offs: int,
          hot: int = 0) -> list[Session]:
    """Agent sessions (half Claude-Code-shaped, half Codex-shaped; every fourth without a hint)."""
    rng = random.Random(seed)
    shared = {"claude": _text(rng, prefix_tokens[0]), "codex": _text(rng, prefix_tokens[1])}
    out = []
    for number in range(sessions):
        kind = "claude" if number % 2 == 0 else "codex"
        history = [{"role": "system", "content": shared[kind]},
                   {"role": "user", "content": f"task {number}: " + _text(rng, rng.randint(*tail_tokens))}]
        steps = []
        for index in range(turns):
            headers, extra = {}, {}
            if number % 4 != 3:  # every fourth session sends no hint at all
                if kind == "claude":
                    headers["x-claude-code-session-id"] = f"cc-{seed}-{number}"
                else:
                    extra["prompt_cache_key"] = f"codex-{seed}-{number}"
            steps.append(Turn(rng.uniform(*think) if index else rng.uniform(0, think[1] * 2), list(history),
                              rng.randint(*output_tokens), headers, extra))
            history = history + [{"role": "assistant", "content": _text(rng, rng.randint(20, 60))},
                                 {"role": "tool" if rng.random() < 0.7 else "user",
                                  "content": _text(rng, rng.randint(*tail_tokens))}]
        out.append(Session(f"s{number}", steps))
    for number in range(one_offs):
        prompt = [{"role": "user", "content": _text(rng, rng.randint(*tail_tokens))}]
        out.append(Session(f"once{number}", [Turn(rng.uniform(0, think[1] * turns), prompt,
                                                  rng.randint(*output_tokens))]))
    if hot:
        history = [{"role": "system", "content": shared["claude"]},
                   {"role": "user", "content": "hot: " + _text(rng, rng.randint(*tail_tokens))}]
        steps = [Turn(rng.uniform(*think) / 4, list(history), rng.randint(*output_tokens),
                      {"x-claude-code-session-id": f"hot-{seed}"}) for _ in range(turns * 2)]
        out.append(Session("hot", steps, concurrent=hot))
    return out


def working_set_tokens(sessions: list[Session], block_tokens: int) -> int:
    """The trace's working set: its distinct prompt tokens, counted in cache blocks (every block of every
    prompt it sends, each once: the shared prefixes once, each session's final context, the one-offs).
    This is what one replica with an unbounded cache would hold at the end of the run, so "a cache of a
    third of the working set" means four such replicas together could hold all of it once, but not one
    replica all of it, nor each of them every session."""
    probe = Replica(-1, ReplicaParams(block_tokens=block_tokens))
    seen: set[int] = set()
    for session in sessions:
        for turn in session.turns:
            seen.update(probe.blocks(render(turn.messages)))
    return len(seen) * block_tokens
