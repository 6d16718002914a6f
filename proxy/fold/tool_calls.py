"""Which tool call of an answer a streamed tool-call delta belongs to: the ONE rule the fold
(``fold/chat.py``) and the bridges' chat-stream reader (``translate/chat_stream.py``) both follow.

Real servers make it hard: an explicit ``index`` names the call (indexes may start at 1 or skip);
Gemini's OpenAI layer and Ollama send no ``index`` at all, and then a delta with a new ``id``
starts a call while one without an id continues the last call. Both readers keep the first
non-empty name and id a call got (a later one never renames it) and join the argument fragments
as sent; broken JSON in them is the translators' to repair (``translate/tools.py``).

Pure: no Flask, no requests.
"""
from __future__ import annotations

from typing import Any

from ..errors import StreamError


def call_slot(calls: dict[int, Any], last: Any, index: Any, call_id: Any) -> tuple[Any, int]:
    """``(call, 0)`` when the delta continues ``call`` (one of ``calls``, by index), ``(None, index)`` when it
    starts a new call at ``index``. ``last`` is the call the previous delta went to (or None); a call has
    an ``id`` attribute. A non-integer index is the upstream's mistake (502)."""
    if index is None:
        if last is None or (call_id and call_id != last.id):
            return None, max((i for i in calls if i >= 0), default=-1) + 1  # -1: the legacy function_call
        return last, 0
    if type(index) is not int:
        raise StreamError(f"upstream sent a chunk of the wrong shape: a tool call index is {index!r}, "
                          "not an integer", code="upstream_bad_chunk")
    call = calls.get(index)
    return (call, 0) if call is not None else (None, index)
