"""The real Claude Code CLI (tests/agents/package.json) through /v1/messages, under gunicorn, against a
scripted vLLM-like chat upstream (issue 22). Each test checks what the user sees: exit code 0, the tool
really ran, the final text printed, and what reached the upstream."""
from __future__ import annotations

import json

import pytest

from tests.agent_cli import (
    answer,
    chat_provider,
    check_upstream,
    claude,
    claude_result,
    deploy,
    text,
    tool_call,
    turns,
)

pytest_plugins = ["tests.agent_cli"]  # its fixtures: scripted, where

pytestmark = pytest.mark.timeout(240)
MODEL = "qwen3-coder"  # what the upstream is asked for: every claude-* name Claude Code uses maps to it


@pytest.fixture(scope="module")
def proxy(scripted, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("claude-proxy"),
                    chat_provider(scripted, "local", MODEL, ["claude-*"]))
    yield server
    server.stop()


def tool_results(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "tool"]


def test_plain_tool_turn_writes_a_file(scripted, proxy, where):
    home, work = where
    target = work / "hello.txt"
    tag = scripted.script("plain", turns(
        lambda rec: answer(rec, text("I'll write the file.") + tool_call(
            0, "call_write1", "Write", {"file_path": str(target), "content": "Hello from Claude Code\n"}),
            finish="tool_calls"),
        lambda rec: answer(rec, text("Wrote hello.txt."))))
    run = claude(proxy, home, work, f"{tag} Create hello.txt saying hello.")
    assert run.code == 0, run
    assert target.read_text() == "Hello from Claude Code\n"
    result = claude_result(run)
    assert result["subtype"] == "success" and not result["is_error"] and result["result"] == "Wrote hello.txt."
    first, second = check_upstream(scripted, "plain", MODEL)
    assert "Write" in [t["function"]["name"] for t in first["tools"]]
    (called,) = [m for m in second["messages"] if m["role"] == "assistant"]
    assert called["content"] == "I'll write the file."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in called["tool_calls"]] \
        == [("call_write1", "Write", {"file_path": str(target), "content": "Hello from Claude Code\n"})]
    (result_message,) = tool_results(second)
    assert result_message["tool_call_id"] == "call_write1" and "hello.txt" in result_message["content"]
    assert not scripted.unexpected
