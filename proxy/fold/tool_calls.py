"""The ONE tool-call assembler: the fold (``fold/chat.py``) and the bridges' chat-stream reader
(``translate/chat_stream.py``) both build an answer's tool calls from their streamed deltas here.

Real servers make it hard. Which call a delta belongs to (``call_slot``): an explicit ``index``
names the call (indexes may start at 1 or skip); Gemini's OpenAI layer and Ollama send no
``index`` at all, and then a delta with a new ``id`` starts a call while one without an id
continues the last call. Late names: the first non-empty name and id a call gets are kept (a later
one never renames it), and a name or id that is not a string is the upstream's mistake (502, as
for a JSON answer). Broken arguments: the fragments are joined as sent; arguments sent as a JSON
value instead of text (some servers send an object) are that value's JSON text; surrogate halves
split between fragments are joined for a reader that passes fragments on (``guard.Halves``).
Broken JSON in the joined arguments is the translators' to repair (``translate/tools.py``).

What a call holds is charged to the reader's budget (anything with ``size``), as the fold charges:
``CALL_COST`` per call, each string with its overhead; the reader compares it with its bound.

Pure: no Flask, no requests.
"""
from __future__ import annotations

from typing import Any, Callable

import orjson

from ..errors import StreamError
from .guard import CALL_COST, FRAGMENT, Halves, clean, held, repair_surrogates


class ToolCall:
    """One tool call (or the legacy ``function_call``) of a choice, merged over its deltas.

    ``index`` is the upstream's (or the assembler's own, for deltas without one; -1 for the legacy
    ``function_call``); ``args`` the argument fragments in order; ``started`` is the bridges' reader's
    (the call was announced to the writer)."""

    __slots__ = ("index", "id", "type", "name", "args", "extra", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.type: Any = None
        self.name: str | None = None
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}
        self.started = False

    @property
    def arguments(self) -> str:
        """The arguments as text: the fragments joined (the one place that joins them)."""
        return "".join(self.args)

    def render(self) -> dict:
        """The call as a ``chat.completion`` message lists it."""
        out = {} if self.id is None else {"id": self.id}
        out["type"] = self.type or "function"
        out["function"] = {"name": self.name, "arguments": self.arguments}
        out.update(self.extra)
        return out


def call_slot(calls: dict[int, Any], last: Any, index: Any, call_id: Any, top: int) -> tuple[Any, int]:
    """``(call, 0)`` when the delta continues ``call`` (one of ``calls``, by index), ``(None, index)`` when it
    starts a new call at ``index``. ``last`` is the call the previous delta went to (or None); a call has
    an ``id`` attribute; ``top`` is the highest index of ``calls`` from 0 up (-1: none), which a call
    without an index follows. A non-integer index is the upstream's mistake (502)."""
    if index is None:
        if last is None or (call_id and call_id != last.id):
            return None, top + 1
        return last, 0
    if type(index) is not int:
        raise StreamError(f"upstream sent a chunk of the wrong shape: a tool call index is {index!r}, "
                          "not an integer", code="upstream_bad_chunk")
    call = calls.get(index)
    return (call, 0) if call is not None else (None, index)


_KNOWN = frozenset(("index", "id", "type", "function"))  # a tool-call delta's fields; others are kept as sent


class ToolCalls:
    """The tool calls of one choice as their deltas arrive (see the module docstring).

    ``budget`` is charged (its ``size``) with what the calls hold; ``keep(extra, key, value)``, when
    given, keeps a delta's unknown fields on the call (the fold renders them); ``halves``, when given,
    joins surrogate halves fragment by fragment (the bridges' reader, which passes fragments on; the
    fold repairs its whole answer at the end instead). A delta of the wrong shape raises
    ``AttributeError`` or ``TypeError``, which the reader turns into its 502 naming the field.
    """

    __slots__ = ("calls", "last", "top", "function_call", "budget", "keep", "halves")

    def __init__(self, budget: Any, keep: Callable[[dict, str, Any], None] | None = None,
                 halves: Halves | None = None) -> None:
        self.calls: dict[int, ToolCall] = {}   # by upstream index (or the assembler's own, see call_slot)
        self.last: ToolCall | None = None      # the call the previous delta went to
        self.top = -1                          # the highest index of ``calls`` from 0 up (see call_slot)
        self.function_call: ToolCall | None = None  # the legacy ``delta.function_call``
        self.budget = budget
        self.keep = keep
        self.halves = halves

    def add(self, delta: dict, call: ToolCall | None = None) -> tuple[ToolCall, str]:
        """Merge one ``tool_calls`` delta: ``(its call, the argument fragment it added, else "")``. ``call``:
        merge into this call instead of the one ``call_slot`` names (the legacy ``function_call``)."""
        call_id, given = delta.get("id"), delta.get("index")
        if call is None:
            calls = self.calls
            call, index = call_slot(calls, self.last, given, call_id, self.top)
            if call is None:
                call = calls[index] = ToolCall(index)
                self.budget.size += CALL_COST
                if index > self.top:
                    self.top = index
            self.last = call
        if call_id and call.id is None:
            call.id = self._label(call_id)
        kind = delta.get("type")
        if kind and call.type is None:
            call.type = kind
            self.budget.size += held(kind)
        function = delta.get("function")
        # unknown fields, for a reader that keeps them; not looked for in the usual {index, function} delta
        if self.keep is not None and (len(delta) != 2 or given is None or function is None):
            for key, value in delta.items():
                if key not in _KNOWN:
                    self.keep(call.extra, key, value)
        if not function:
            return call, ""
        name = function.get("name")
        if name and call.name is None:
            call.name = self._label(name)
        fragment = function.get("arguments")
        if type(fragment) is not str:
            if fragment is None:
                return call, ""
            fragment = _json_text(fragment)  # an empty object too: a call with no arguments is "{}", not ""
        if not fragment:
            return call, ""
        halves = self.halves
        if halves is not None and (halves.waiting or not fragment.isascii()):
            fragment = halves.join(call, fragment)
            if not fragment:
                return call, ""
        call.args.append(fragment)
        self.budget.size += len(fragment) + FRAGMENT
        return call, fragment

    def legacy(self, function: dict) -> tuple[ToolCall, str]:
        """Merge one legacy ``function_call`` delta (the one call at index -1; ``last`` stays)."""
        call = self.function_call
        if call is None:
            call = self.function_call = ToolCall(-1)
            self.budget.size += CALL_COST
        return self.add({"function": function}, call)

    def ordered(self) -> list[ToolCall]:
        """Every call: the legacy ``function_call`` first, then the tool calls by index."""
        calls = self.calls
        found = [calls[i] for i in sorted(calls)]
        return found if self.function_call is None else [self.function_call, *found]

    def append(self, call: ToolCall, fragment: str) -> None:
        """Add an argument fragment to ``call`` (charged), as ``add`` adds a delta's (inline: it runs per delta)."""
        call.args.append(fragment)
        self.budget.size += len(fragment) + FRAGMENT

    def _label(self, value: Any) -> str:
        """A call's name or id: a string (else ``TypeError``), charged, halves repaired for the bridges."""
        if type(value) is not str:
            raise TypeError("a tool call's name or id is not a string")
        self.budget.size += FRAGMENT + len(value)
        return value if self.halves is None else clean(value)


def _json_text(value: Any) -> str:
    """Arguments sent as a JSON value instead of text: that value's JSON text."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        pass
    try:  # surrogate halves from the slow JSON path, joined or replaced first
        return orjson.dumps(repair_surrogates(value)).decode()
    except (orjson.JSONEncodeError, RecursionError):
        raise StreamError("upstream sent tool arguments as a JSON value nested too deeply to write as text",
                          code="upstream_bad_chunk") from None
