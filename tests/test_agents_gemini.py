"""The real Gemini CLI (tests/agents/package.json) through the Gemini API bridge, under gunicorn, against a
scripted vLLM-like chat upstream (issue 24, acceptance 2). What the user sees: exit code 0, the tool really ran,
the final text printed, and what reached the upstream."""
from __future__ import annotations

import pytest

from tests.agent_cli import (
    answer,
    assistant_turns,
    calls,
    chat_provider,
    check_upstream,
    deploy,
    gemini,
    gemini_events,
    stop_checked,
    text,
    tool_call,
    tool_results,
    turns,
)

pytest_plugins = ["tests.agent_cli"]  # its fixtures: scripted, where

pytestmark = pytest.mark.timeout(240)
MODEL = "qwen3-coder"


@pytest.fixture(scope="module")
def proxy(scripted, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("gemini-proxy"), chat_provider(scripted, "local", MODEL, ["agent"]))
    yield server
    stop_checked(server)


def test_tool_turn_runs_a_shell_command_and_prints_the_answer(scripted, proxy, where):
    home, work = where
    tag = scripted.script("gemini-plain", turns(
        lambda rec: answer(rec, text("I'll create it.") + tool_call(
            0, "call_sh1", "run_shell_command", {"command": "printf 'Hello from Gemini\\n' > hello.txt"}),
            "tool_calls"),
        lambda rec: answer(rec, text("Created hello.txt."))))
    run = gemini(proxy, home, work, f"{tag} Create hello.txt saying hello.")
    assert run.code == 0, run
    assert (work / "hello.txt").read_text() == "Hello from Gemini\n"
    (used,) = gemini_events(run, "tool_use")
    assert used["tool_name"] == "run_shell_command"
    (result,) = gemini_events(run, "tool_result")
    assert result["status"] == "success", run
    said = "".join(e.get("content", "") for e in gemini_events(run, "message") if e.get("role") == "assistant")
    assert said.endswith("Created hello.txt."), run
    first, second = check_upstream(scripted, "gemini-plain", MODEL)
    assert "run_shell_command" in [t["function"]["name"] for t in first["tools"]]
    (called,) = assistant_turns(second)
    assert calls(called) == [("call_sh1", "run_shell_command",
                              {"command": "printf 'Hello from Gemini\\n' > hello.txt"})]
    (answered,) = tool_results(second)
    assert answered["tool_call_id"] == "call_sh1"
    assert not scripted.unexpected
