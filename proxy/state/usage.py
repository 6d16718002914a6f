"""Usage recording: per (UTC day, client, model, provider) counters, summed in memory and flushed ~1/s.

The request path only adds to a dict under a lock; the store's background
tick writes the sums (one transaction for all rows) and a failed write keeps
them in memory for the next tick, so nothing is lost while the store is down
and nothing is counted twice. ``flush_all`` (gunicorn ``worker_exit``, atexit)
writes what is left on a graceful stop.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import orjson

from ..translate.tokens import body_tokens
from .store import COUNTERS, Store, StoreUnavailable, UsageKey

_PROMPT = ("prompt_tokens", "input_tokens")
_COMPLETION = ("completion_tokens", "output_tokens")
_DETAILS = ("prompt_tokens_details", "input_tokens_details", "completion_tokens_details", "output_tokens_details")

Tokens = tuple[int, int, int, int]  # prompt, completion, cached, reasoning


def usage_counts(data: bytes) -> Tokens | None:
    """(prompt, completion, cached, reasoning) from a JSON answer's top-level ``usage``, or from an SSE stream's
    events: each event's top-level ``usage``, ``response.usage`` (Responses ``response.completed``) or
    ``message.usage`` (Anthropic ``message_start``), the largest count of each kind across events (counts in a
    stream are running totals: Anthropic's input in message_start, its output in message_delta).

    Parsed, never searched: a ``"usage"`` the client made the upstream echo (Responses ``metadata``, a tool
    schema, text) is not a usage object. Only SSE events holding ``_tokens"`` are parsed. Accepts OpenAI
    (``prompt_tokens``, ``*_tokens_details``) and Responses/Anthropic (``input_tokens``,
    ``cache_read_input_tokens``, ``cache_creation_input_tokens``) names; Anthropic's prompt is its
    ``input_tokens`` plus both cache counts (``counts``).
    """
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        try:
            return answer_counts(orjson.loads(data))
        except orjson.JSONDecodeError:
            return None
    found = None
    at = data.find(b'_tokens"')
    while at >= 0:  # only the lines holding it (a 200-event read has one or two), not every line
        start = max(data.rfind(b"\n", 0, at), data.rfind(b"\r", 0, at)) + 1  # as splitlines() cuts lines
        end = _line_end(data, at)
        at = data.find(b'_tokens"', end)
        if data[start:start + 5] != b"data:":
            continue
        try:
            tokens = answer_counts(orjson.loads(data[start + 5:end]))
        except orjson.JSONDecodeError:
            continue
        if tokens is not None:
            found = tokens if found is None else tuple(max(a, b) for a, b in zip(found, tokens))
    return found


def _line_end(data: bytes, at: int) -> int:
    """Where the line holding ``at`` ends (its \\n or \\r, or the end of ``data``)."""
    newline, ret = data.find(b"\n", at), data.find(b"\r", at)
    if newline < 0:
        return len(data) if ret < 0 else ret
    return newline if ret < 0 else min(newline, ret)


class StreamUsage:
    """The token counts of an SSE stream fed read by read (``usage_counts`` over its whole events).

    Only lines holding ``_tokens"`` are parsed; a line split across reads is
    held until it ends, at most ``limit`` bytes (a longer one is skipped).
    """

    __slots__ = ("limit", "tokens", "_held", "_size")

    def __init__(self, limit: int) -> None:
        self.limit, self.tokens = limit, None
        self._held: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        end = data.rfind(b"\n")
        if end < 0:
            self._hold(data)
            return
        if self._held:
            lines = b"".join((*self._held, data[:end]))
        else:  # the common read: whole events, copied only when one may carry usage
            lines = data[:end] if b'_tokens"' in data else b""
        if self._size < 0:  # the line that overflowed ends in this read: skip its rest
            lines = lines.partition(b"\n")[2]
        self._held, self._size = [], 0
        self._hold(data[end + 1:])
        self._scan(lines)

    def finish(self) -> Tokens | None:
        if self._held:
            lines, self._held, self._size = b"".join(self._held), [], 0
            self._scan(lines)
        return self.tokens

    def _hold(self, part: bytes) -> None:
        if not part or self._size < 0:
            return
        self._size += len(part)
        if self._size > self.limit:
            self._held, self._size = [], -1  # skipped to the end of this line
        else:
            self._held.append(part)

    def _scan(self, lines: bytes) -> None:
        tokens = usage_counts(lines)
        if tokens is not None:
            self.tokens = tokens if self.tokens is None else tuple(max(a, b) for a, b in zip(self.tokens, tokens))


def answer_counts(answer: object) -> Tokens | None:
    """``usage_counts`` of an answer or event already parsed (a folded answer: no JSON written and read back)."""
    return counts(_usage_of(answer))


def _usage_of(event: object) -> object:
    """The usage object of an answer or event: top-level, or that of its ``response`` / ``message``."""
    if not isinstance(event, dict):
        return None
    usage = event.get("usage")
    if isinstance(usage, dict):
        return usage
    for wrapper in ("response", "message"):
        inner = event.get(wrapper)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            return inner["usage"]
    return None


def counts(usage: object) -> Tokens | None:
    """(prompt, completion, cached, reasoning) of one usage object (None: not one)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _first(usage, _PROMPT), _first(usage, _COMPLETION)
    if prompt is None and completion is None:
        return None
    cached, reasoning = _count(usage.get("cache_read_input_tokens")), 0
    prompt = _count(prompt)
    if "prompt_tokens" not in usage and "input_tokens" in usage:
        # Anthropic's input_tokens leave out the prompt read from or written to its cache (OpenAI's
        # prompt_tokens and the Responses input_tokens hold their cached part): the prompt is all three
        prompt += cached + _count(usage.get("cache_creation_input_tokens"))
    for name in _DETAILS:
        details = usage.get(name)
        if isinstance(details, dict):
            cached = max(cached, _count(details.get("cached_tokens")))
            reasoning = max(reasoning, _count(details.get("reasoning_tokens")))
    return (prompt, _count(completion), cached, reasoning)


def _first(usage: dict, names: tuple[str, ...]) -> object:
    for name in names:
        if usage.get(name) is not None:
            return usage[name]
    return None


def estimate_tokens(sent: dict | None, received: int, first: bytes) -> Tokens:
    """(prompt, completion, 0, 0) for an answer the upstream gave no usage for (cut short, or never reported).

    The prompt by the character rule over the body sent upstream; the
    completion from the ``received`` body bytes of an event stream: one
    token per SSE event (streaming servers send about one token each), the
    events' size taken from the ``first`` bytes of the body. A JSON body's
    bytes are not tokens (an embeddings answer is numbers): no completion.
    """
    prompt = body_tokens(sent) if sent is not None else 0
    events = first.count(b"data:")
    return (prompt, received * events // len(first) if events else 0, 0, 0)


def _count(value: object) -> int:
    """A token count from an upstream; anything but a sane non-negative integer (absurd ones, more than 15
    digits, would overflow later) counts as 0."""
    if type(value) is int and 0 <= value < 10 ** 15:
        return value
    return 0


class Recorder:
    """One process's unflushed usage for one store."""

    def __init__(self, store: Store, settled: Callable[[str], str | None] = lambda identity: identity) -> None:
        self.store = store
        self.settled = settled  # Identities.settled: the identity a row is written under (None: not yet)
        self._rows: dict[UsageKey, list[int]] = {}
        self._lock = threading.Lock()
        self._day_number = -1
        self._day = ""
        store.on_tick(self.flush)

    def add(self, client: str, model: str, provider: str, error: bool, tokens: Tokens | None) -> None:
        """Count one finished request; ``client`` is the key's identity (``identity.py``), never its label."""
        day_number = int(time.time() // 86400)
        if day_number != self._day_number:
            self._day = time.strftime("%Y-%m-%d", time.gmtime(day_number * 86400))
            self._day_number = day_number
        key = (self._day, client, model, provider)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = [0] * len(COUNTERS)
            row[0] += 1
            if error:
                row[1] += 1
            if tokens is not None:
                row[2] += tokens[0]
                row[3] += tokens[1]
                row[4] += tokens[2]
                row[5] += tokens[3]

    def flush(self) -> None:
        """Write the sums; on an outage keep them (merged with newer ones) for the next try."""
        with self._lock:
            if not self._rows:
                return
            held, self._rows = self._rows, {}
        rows: dict[UsageKey, list[int]] = {}
        keep = {}  # counted under a provisional identity whose real one is not known yet
        for (day, client, model, provider), counts in held.items():
            identity = self.settled(client)
            if identity is None:
                keep[(day, client, model, provider)] = counts
            else:
                _merge(rows, (day, identity, model, provider), counts)
        try:
            if rows:
                self.store.add_usage(rows)
        except StoreUnavailable:
            for key, counts in rows.items():
                _merge(keep, key, counts)
        if keep:
            with self._lock:
                for key, counts in keep.items():
                    _merge(self._rows, key, counts)

    def pending(self) -> int:
        """Requests counted but not yet written (kept in memory)."""
        with self._lock:
            return sum(row[0] for row in self._rows.values())


def _merge(rows: dict[UsageKey, list[int]], key: UsageKey, counts: list[int]) -> None:
    """Add ``counts`` to row ``key`` of ``rows``."""
    row = rows.get(key)
    if row is None:
        row = rows[key] = [0] * len(COUNTERS)
    for i, amount in enumerate(counts):
        row[i] += amount
