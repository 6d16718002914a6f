"""The real Codex CLI (tests/agents/package.json) through /v1/responses, under gunicorn, against a scripted
vLLM-like chat upstream (issue 22). Each test checks what the user sees: exit code 0, the command really
ran, the final message printed, and what reached the upstream."""
from __future__ import annotations

import json

import pytest

from tests.agent_cli import (
    answer,
    chat_provider,
    check_upstream,
    codex,
    codex_items,
    deploy,
    text,
    tool_call,
    turns,
)

pytest_plugins = ["tests.agent_cli"]  # its fixtures: scripted, where

pytestmark = pytest.mark.timeout(240)
MODEL = "qwen3-coder"


@pytest.fixture(scope="module")
def proxy(scripted, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("codex-proxy"), chat_provider(scripted, "local", MODEL, ["agent"]))
    yield server
    server.stop()


def shell(index: int, call_id: str, command: str) -> list[dict]:
    return tool_call(index, call_id, "exec_command", {"cmd": command})


def test_plain_tool_turn_runs_a_command(scripted, proxy, where):
    home, work = where
    tag = scripted.script("plain", turns(
        lambda rec: answer(rec, text("I'll create it.") + shell(
            0, "call_sh1", "printf 'Hello from Codex\\n' > hello.txt"), finish="tool_calls"),
        lambda rec: answer(rec, text("Created hello.txt."))))
    run = codex(proxy, home, work, f"{tag} Create hello.txt saying hello.")
    assert run.code == 0, run
    assert (work / "hello.txt").read_text() == "Hello from Codex\n"
    (command,) = codex_items(run, "command_execution")
    assert command["exit_code"] == 0 and "hello.txt" in command["command"]
    assert [m["text"] for m in codex_items(run, "agent_message")] == ["I'll create it.", "Created hello.txt."]
    assert run.events[-1]["type"] == "turn.completed"
    first, second = check_upstream(scripted, "plain", MODEL)
    assert "exec_command" in [t["function"]["name"] for t in first["tools"]]
    (called,) = [m for m in second["messages"] if m["role"] == "assistant"]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in called["tool_calls"]] \
        == [("call_sh1", "exec_command", {"cmd": "printf 'Hello from Codex\\n' > hello.txt"})]
    (result,) = [m for m in second["messages"] if m["role"] == "tool"]
    assert result["tool_call_id"] == "call_sh1"
    assert not scripted.unexpected
