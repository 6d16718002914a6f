"""Fold a legacy ``/v1/completions`` event stream into one ``text_completion``.

Same framing and top-level rules as the chat fold (it reuses ``ChatFold``);
per choice ``text`` is concatenated, ``finish_reason`` is the last explicit
value (``base.kept_finish``; ``stop`` after ``[DONE]`` when none was sent), and the legacy
``logprobs`` lists (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``) are appended.
"""
from __future__ import annotations

from typing import Iterable

from ..errors import StreamError
from .base import kept_finish
from .chat import DEFAULT_MAX_BYTES, ChatFold, run_fold
from .choice import Choice
from .guard import FRAGMENT, held
from .sse import iter_event_batches


class TextFold(ChatFold):
    def _choices(self, choices: list) -> None:
        for raw in choices:
            index = raw.get("index", 0)
            state = self.choices.get(index) or self._new_choice(index)
            for key, value in raw.items():
                if key == "text":
                    if value:
                        state.content.append(value)
                        self.size += len(value) + FRAGMENT
                elif key == "finish_reason":
                    if value:
                        state.finish = kept_finish(state.finish, value)
                        self.size += held(value)  # sent once per choice, normally
                elif key == "logprobs":
                    if value:
                        self._legacy_logprobs(state, value)
                elif key != "index":
                    self._keep(state.extra, key, value)

    def _legacy_logprobs(self, state: Choice, logprobs: dict) -> None:
        if state.logprobs is None:
            state.logprobs = {}
        for key, items in logprobs.items():
            if isinstance(items, list):
                state.logprobs.setdefault(key, []).extend(items)
                self.size += self._accumulated(items)
            elif items is not None:
                self._keep(state.logprobs, key, items)

    def result(self) -> dict:
        states = self.choices
        choices = []
        for index in sorted(states):
            state = states[index]
            try:
                text = "".join(state.content)
            except TypeError:
                raise StreamError("upstream sent a chunk of the wrong shape: a text field is not a string",
                                  code="upstream_bad_chunk") from None
            choice = {"index": index, "text": text, "logprobs": state.logprobs,
                      "finish_reason": state.finish or "stop"}
            for key, value in state.extra.items():
                choice.setdefault(key, value)
            choices.append(choice)
        return self._envelope("text_completion", "cmpl-", choices)


def fold_text_chunks(chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Fold raw reads of a ``/v1/completions`` stream into a ``text_completion`` dict."""
    fold = TextFold(max_bytes)
    return run_fold(fold, iter_event_batches(chunks, fold))
