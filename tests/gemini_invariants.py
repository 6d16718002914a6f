"""The one checker every Gemini streaming test uses: parse the records, assert the invariants.

Invariants (SPEC "Gemini API", issue 24): every record parses as a
``GenerateContentResponse`` (one candidate, index 0, role ``model``, each part
exactly one of ``text`` or ``functionCall``; ``thought`` only on text, and
``true``); function calls are complete (a name, an ``args`` object, an id);
exactly one record has a ``finishReason``, the last, and only it carries
``usageMetadata`` (whole: prompt, candidates, total); every record names the
same ``modelVersion`` and ``responseId``; a broken stream ends with one
``{"error": {"code", "message", "status"}}`` record and has no
``finishReason``. ``?alt=sse`` bodies are ``data:`` events; others one JSON
array of the same records.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

FINISH_REASONS = {"STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "LANGUAGE", "OTHER", "BLOCKLIST",
                  "PROHIBITED_CONTENT", "SPII", "MALFORMED_FUNCTION_CALL"}


@dataclass
class Checked:
    """What a valid stream said, for the test's own assertions."""

    records: list[dict]
    parts: list[dict] = field(default_factory=list)   # every part in order, as sent
    finish: str | None = None
    usage: dict | None = None
    error: dict | None = None

    @property
    def text(self) -> str:
        return "".join(p["text"] for p in self.parts if "text" in p and not p.get("thought"))

    @property
    def thought(self) -> str:
        return "".join(p["text"] for p in self.parts if "text" in p and p.get("thought"))

    @property
    def calls(self) -> list[dict]:
        return [p["functionCall"] for p in self.parts if "functionCall" in p]

    def merged_parts(self) -> list[dict]:
        """The parts as one answer: neighbouring text parts of the same kind joined (what a client keeps)."""
        out: list[dict] = []
        for part in self.parts:
            if out and "text" in part and "text" in out[-1] and part.get("thought") == out[-1].get("thought"):
                out[-1] = {**out[-1], "text": out[-1]["text"] + part["text"]}
            else:
                out.append(dict(part))
        return out


def parse(raw: bytes, sse: bool = True) -> list[dict]:
    """The records of a body: ``data:`` events (blank-line separated), or the elements of one JSON array."""
    if not sse:
        records = json.loads(raw)
        assert isinstance(records, list), "the array form is not a JSON array"
        return records
    records = []
    for frame in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not frame.strip():
            continue
        lines = [line for line in frame.split(b"\n") if line]
        assert all(line.startswith(b"data: ") for line in lines), f"not a data event: {frame[:200]!r}"
        records.append(json.loads(b"\n".join(line[6:] for line in lines)))
    return records


def check_stream(raw: bytes, *, broken: bool = False, sse: bool = True) -> Checked:
    """Assert the invariants on a raw Gemini stream body; ``broken``: it must end with an error record."""
    records = parse(raw, sse)
    checked = Checked(records)
    assert records, "empty stream"
    ids = set()
    for position, record in enumerate(records):
        last = position == len(records) - 1
        assert isinstance(record, dict), record
        if "error" in record:
            assert last, "records after the error"
            assert list(record) == ["error"], record
            error = record["error"]
            assert isinstance(error["code"], int) and isinstance(error["message"], str)
            assert isinstance(error["status"], str) and error["status"].isupper()
            checked.error = error
            continue
        ids.add((record.get("modelVersion"), record.get("responseId")))
        candidates = record["candidates"]
        assert isinstance(candidates, list) and len(candidates) == 1, candidates
        candidate = candidates[0]
        assert candidate.get("index") == 0
        content = candidate["content"]
        assert content["role"] == "model"
        parts = content["parts"]
        assert isinstance(parts, list)
        for part in parts:
            kinds = [k for k in ("text", "functionCall", "inlineData", "executableCode") if k in part]
            assert len(kinds) == 1, f"a part with {kinds}: {part}"
            if "thought" in part:
                assert part["thought"] is True and "text" in part, part
            if "text" in part:
                assert isinstance(part["text"], str) and part["text"], f"empty text part {part}"
            if "functionCall" in part:
                call = part["functionCall"]
                assert isinstance(call["name"], str) and call["name"], call
                assert isinstance(call["args"], dict), f"incomplete call args {call}"
                assert isinstance(call.get("id"), str) and call["id"], call
        checked.parts += parts
        if "finishReason" in candidate:
            assert checked.finish is None, "a second finishReason"
            assert last, "a record after the finishReason"
            assert candidate["finishReason"] in FINISH_REASONS, candidate["finishReason"]
            checked.finish = candidate["finishReason"]
        else:
            assert parts, "a record with nothing in it"
        if "usageMetadata" in record:
            assert last and "finishReason" in candidate, "usageMetadata before the end"
            usage = record["usageMetadata"]
            for key in ("promptTokenCount", "candidatesTokenCount", "totalTokenCount"):
                assert isinstance(usage[key], int) and usage[key] >= 0, usage
            assert usage["totalTokenCount"] == (usage["promptTokenCount"] + usage["candidatesTokenCount"]
                                                + usage.get("thoughtsTokenCount", 0)), usage
            checked.usage = usage
    assert len(ids) <= 1, f"records name different models or response ids: {ids}"
    if ids:
        model, response_id = next(iter(ids))
        assert isinstance(model, str) and isinstance(response_id, str) and response_id
    if broken:
        assert checked.error is not None and checked.finish is None, "a broken stream must end with an error"
    else:
        assert checked.error is None, f"stream ended with error {checked.error}"
        assert checked.finish is not None and checked.usage is not None, "no final record"
    return checked
