"""Usage recording: per (UTC day, client, model, provider) counters, summed in memory and flushed ~1/s.

The request path only adds to a dict under a lock; the store's background
tick writes the sums (one transaction for all rows) and a failed write keeps
them in memory for the next tick, so nothing is lost while the store is down
and nothing is counted twice. ``flush_all`` (gunicorn ``worker_exit``, atexit)
writes what is left on a graceful stop.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Callable

from ..translate.anthropic.tokens import body_tokens
from .store import COUNTERS, Store, StoreUnavailable, UsageKey

_PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')
_CACHED = re.compile(rb'"(?:cached_tokens|cache_read_input_tokens)"\s*:\s*(\d+)')
_REASONING = re.compile(rb'"reasoning_tokens"\s*:\s*(\d+)')

Tokens = tuple[int, int, int, int]  # prompt, completion, cached, reasoning


def usage_counts(data: bytes) -> Tokens | None:
    """(prompt, completion, cached, reasoning) from the last ``usage`` object in raw JSON or SSE bytes.

    A targeted scan, not a parse: relayed answers are never decoded. Accepts
    OpenAI (``prompt_tokens``, ``*_tokens_details``) and Responses/Anthropic
    (``input_tokens``, ``cache_read_input_tokens``) names.
    """
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    tail = data[at:]
    prompt, completion = _PROMPT.search(tail), _COMPLETION.search(tail)
    if prompt is None and completion is None:
        return None
    cached, reasoning = _CACHED.search(tail), _REASONING.search(tail)
    return (_count(prompt), _count(completion), _count(cached), _count(reasoning))


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


def _count(match: re.Match | None) -> int:
    """A token count from an upstream; absurd ones (more than 15 digits) count as 0, not as an overflow later."""
    if match is None:
        return 0
    digits = match.group(1)
    return int(digits) if len(digits) <= 15 else 0


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
