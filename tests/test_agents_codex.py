"""The real Codex CLI (tests/agents/package.json) through /v1/responses, under gunicorn, against a scripted
vLLM-like chat upstream (issue 22). Each test checks what the user sees: exit code 0, the command really
ran, the final message printed, and what reached the upstream."""
from __future__ import annotations

import json
import re

import pytest

from tests.agent_cli import (
    answer,
    assistant_turns,
    busy_once,
    calls,
    chat_provider,
    check_calls_answered,
    check_continued,
    check_strict,
    check_upstream,
    codex,
    codex_items,
    deploy,
    failing_once,
    reasoning,
    split_surrogates,
    stop_checked,
    text,
    tool_call,
    tool_results,
    turns,
)

pytest_plugins = ["tests.agent_cli"]  # its fixtures: scripted, strict_scripted, where

pytestmark = pytest.mark.timeout(240)
MODEL = "qwen3-coder"
FORCED = "qwen3-coder-forced"
STRICT = "mistral-small"  # served with a strict chat template
KNOWN = "gpt-5.5"  # a name Codex knows: it then offers its freeform apply_patch tool


@pytest.fixture(scope="module")
def proxy(scripted, strict_scripted, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("codex-proxy"), chat_provider(scripted, "local", MODEL, ["agent", KNOWN]),
                    chat_provider(strict_scripted, "strict", STRICT, ["strict"]),
                    chat_provider(scripted, "forced", FORCED, ["forced"], **{"force-upstream-stream": True}))
    yield server
    stop_checked(server)


def shell(index: int, call_id: str, command: str) -> list[dict]:
    return tool_call(index, call_id, "exec_command", {"cmd": command})


def succeeded(run, *messages: str) -> None:
    """Exit 0, the turn completed, and these agent messages printed, in order."""
    assert run.code == 0, run
    assert run.events[-1]["type"] == "turn.completed", run
    assert [m["text"] for m in codex_items(run, "agent_message")] == list(messages), run


def test_plain_tool_turn_runs_a_command(scripted, proxy, where):
    home, work = where
    tag = scripted.script("plain", turns(
        lambda rec: answer(rec, text("I'll create it.") + shell(
            0, "call_sh1", "printf 'Hello from Codex\\n' > hello.txt"), "tool_calls"),
        lambda rec: answer(rec, text("Created hello.txt."))))
    run = codex(proxy, home, work, f"{tag} Create hello.txt saying hello.")
    succeeded(run, "I'll create it.", "Created hello.txt.")
    assert (work / "hello.txt").read_text() == "Hello from Codex\n"
    (command,) = codex_items(run, "command_execution")
    assert command["exit_code"] == 0 and "hello.txt" in command["command"]
    first, second = check_upstream(scripted, "plain", MODEL)
    assert "exec_command" in [t["function"]["name"] for t in first["tools"]]
    (called,) = assistant_turns(second)
    assert calls(called) == [("call_sh1", "exec_command", {"cmd": "printf 'Hello from Codex\\n' > hello.txt"})]
    (result,) = tool_results(second)
    assert result["tool_call_id"] == "call_sh1"
    assert not scripted.unexpected


def test_session_on_a_strict_template(strict_scripted, proxy, where):
    """A strict chat template (roles must alternate): Codex's instructions, its environment context and
    the prompt arrive as one system and one user message, and a tool turn passes it."""
    home, work = where
    tag = strict_scripted.script("strict", turns(
        lambda rec: answer(rec, text("Writing.") + shell(0, "call_st", "echo alternating > strict.txt"), "tool_calls"),
        lambda rec: answer(rec, text("strict.txt written."))))
    run = codex(proxy, home, work, f"{tag} Write strict.txt.", model="strict")
    succeeded(run, "Writing.", "strict.txt written.")
    assert (work / "strict.txt").read_text() == "alternating\n"
    check_strict(strict_scripted, "strict")
    first, second = check_upstream(strict_scripted, "strict", STRICT)
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert not strict_scripted.unexpected


def test_parallel_tool_calls_both_run(scripted, proxy, where):
    home, work = where
    tag = scripted.script("parallel", turns(
        lambda rec: answer(rec, shell(0, "call_a", "echo alpha > a.txt") + shell(1, "call_b", "echo beta > b.txt"),
                           "tool_calls"),
        lambda rec: answer(rec, text("Made a.txt and b.txt."))))
    run = codex(proxy, home, work, f"{tag} Make a.txt and b.txt.")
    succeeded(run, "Made a.txt and b.txt.")
    assert (work / "a.txt").read_text() == "alpha\n" and (work / "b.txt").read_text() == "beta\n"
    assert len(codex_items(run, "command_execution")) == 2
    first, second = check_upstream(scripted, "parallel", MODEL)
    assert first["parallel_tool_calls"] is True
    check_calls_answered(second, [("call_a", "exec_command"), ("call_b", "exec_command")])
    assert second["messages"][-1]["role"] == "tool"
    assert not scripted.unexpected


def test_reasoning_stream_shows_reasoning(scripted, proxy, where):
    home, work = where
    thought = "A file is wanted; one shell command makes it."
    tag = scripted.script("reasoning", turns(
        lambda rec: answer(rec, reasoning(thought) + shell(0, "call_r", "echo reasoned > r.txt"), "tool_calls"),
        lambda rec: answer(rec, [{"reasoning_content": "Done, say so."}] + text("r.txt is written."))))
    run = codex(proxy, home, work, f"{tag} Think, then write r.txt.", "-c", 'model_reasoning_effort="xhigh"')
    succeeded(run, "r.txt is written.")
    assert (work / "r.txt").read_text() == "reasoned\n"
    assert [item["text"] for item in codex_items(run, "reasoning")] == [thought, "Done, say so."]
    first, second = check_upstream(scripted, "reasoning", MODEL)
    assert first["reasoning_effort"] == "high"  # xhigh, as the nearest level the provider accepts
    assert "reasoning_content" not in assistant_turns(second)[0]  # reasoning-replay is off
    assert not scripted.unexpected


def test_mid_stream_failure_then_codex_retries(scripted, proxy, where):
    home, work = where
    tag = scripted.script("failure", failing_once(
        lambda rec: answer(rec, text("Retrying worked.") + shell(0, "call_f", "echo retried > retry.txt"),
                           "tool_calls"),
        lambda rec: answer(rec, text("retry.txt says retried."))))
    run = codex(proxy, home, work, f"{tag} Write retry.txt.")
    succeeded(run, "Retrying worked.", "retry.txt says retried.")  # nothing of the broken answer shown
    assert any(e["type"] == "error" and "Reconnecting" in e["message"] for e in run.events)
    assert (work / "retry.txt").read_text() == "retried\n"
    broken, retry, second = check_upstream(scripted, "failure", MODEL)
    # Codex's own retry after response.failed carries the same conversation: no fragment of the failed answer.
    assert broken["stream"] is True and retry["stream"] is True
    assert retry["messages"] == broken["messages"]
    assert [m["content"] for m in assistant_turns(second)] == ["Retrying worked."]
    assert "I'll run" not in str(second["messages"])
    assert not scripted.unexpected


def test_busy_upstream_then_codex_retries(scripted, proxy, where):
    """The upstream refuses a turn's first try (429, then 503): Codex retries each on its own and the
    session finishes."""
    home, work = where
    tag = scripted.script("busy", busy_once(
        lambda rec: answer(rec, shell(0, "call_busy", "echo patient > busy.txt"), "tool_calls"),
        lambda rec: answer(rec, text("busy.txt written after all."))))
    run = codex(proxy, home, work, f"{tag} Write busy.txt.")
    succeeded(run, "busy.txt written after all.")
    assert (work / "busy.txt").read_text() == "patient\n"
    refused, first, refused_again, second = check_upstream(scripted, "busy", MODEL)
    assert refused == first and refused_again == second  # the same request again, nothing lost or added
    assert not scripted.unexpected


def test_forced_fold_provider(scripted, proxy, where):
    """A provider with force-upstream-stream: Codex always streams, so its requests are relayed as
    streams (nothing to fold) and a tool turn works as on any provider."""
    home, work = where
    tag = scripted.script("forced", turns(
        lambda rec: answer(rec, shell(0, "call_x", "echo forced > forced.txt"), "tool_calls"),
        lambda rec: answer(rec, text("forced.txt is there."))))
    run = codex(proxy, home, work, f"{tag} Write forced.txt.", model="forced")
    succeeded(run, "forced.txt is there.")
    assert (work / "forced.txt").read_text() == "forced\n"
    assert [b["stream"] for b in check_upstream(scripted, "forced", FORCED)] == [True, True]
    lines = re.findall(r"route=/v1/responses model=forced .*", proxy.output())
    assert len(lines) == 2 and all("folded=no" in line and "result=complete" in line for line in lines)
    assert not scripted.unexpected


def test_two_turn_session_with_exec_resume(scripted, proxy, where):
    home, work = where
    first_tag = scripted.script("session-one", turns(
        lambda rec: answer(rec, shell(0, "call_s1", "echo first > note.txt"), "tool_calls"),
        lambda rec: answer(rec, text("Saved the note."))))
    second_tag = scripted.script("session-two", turns(
        lambda rec: answer(rec, shell(0, "call_s2", "echo second >> note.txt"), "tool_calls"),
        lambda rec: answer(rec, text("Appended to the note."))))
    succeeded(codex(proxy, home, work, f"{first_tag} Save a note."), "Saved the note.")
    run = codex(proxy, home, work, f"{second_tag} Add to the note.", resume=True)
    succeeded(run, "Appended to the note.")
    assert (work / "note.txt").read_text() == "first\nsecond\n"
    check_continued(scripted, MODEL, "session-one", "session-two", ("call_s1", "exec_command"), "Saved the note.")


def test_apply_patch_freeform_tool_edits_files(scripted, proxy, where):
    """Codex's apply_patch is a freeform (custom) tool: the upstream sees a function with one string
    parameter, and its call comes back as the custom tool call Codex applies to the files."""
    home, work = where
    (work / "old.txt").write_text("one\ntwo\n")
    patch = ("*** Begin Patch\n*** Add File: new.txt\n+patched in\n*** Update File: old.txt\n@@\n one\n-two\n"
             "+TWO\n*** End Patch\n")
    tag = scripted.script("patch", turns(
        lambda rec: answer(rec, text("Patching.") + tool_call(0, "call_p", "apply_patch", {"input": patch}),
                           "tool_calls"),
        lambda rec: answer(rec, text("Patched both files."))))
    run = codex(proxy, home, work, f"{tag} Patch the files.", model=KNOWN)
    succeeded(run, "Patching.", "Patched both files.")
    assert (work / "new.txt").read_text() == "patched in\n" and (work / "old.txt").read_text() == "one\nTWO\n"
    (change,) = codex_items(run, "file_change")
    assert change["status"] == "completed" and sorted(c["kind"] for c in change["changes"]) == ["add", "update"]
    first, second = check_upstream(scripted, "patch", MODEL)
    (tool,) = [t["function"] for t in first["tools"] if t["function"]["name"] == "apply_patch"]
    assert tool["parameters"]["required"] == ["input"]
    check_calls_answered(second, [("call_p", "apply_patch")])
    assert "Success" in tool_results(second)[0]["content"]
    assert not scripted.unexpected


def test_split_surrogates_in_text_and_tool_arguments(scripted, proxy, where):
    """An emoji streamed as two UTF-16 halves in consecutive chunks, in a tool call's arguments and in the
    final text, arrives whole: in the file the command writes and in the message Codex prints."""
    home, work = where
    arguments = json.dumps({"cmd": "printf 'smile \U0001F600 party \U0001F389\\n' > smile.txt"}, ensure_ascii=False)
    tag = scripted.script("surrogates", turns(
        lambda rec: answer(rec, tool_call(0, "call_u", "exec_command", split_surrogates(arguments)), "tool_calls"),
        lambda rec: answer(rec, [{"content": p} for p in split_surrogates("Done \U0001F600 ok")])))
    run = codex(proxy, home, work, f"{tag} Write smile.txt.")
    succeeded(run, "Done \U0001F600 ok")
    assert (work / "smile.txt").read_text(encoding="utf-8") == "smile \U0001F600 party \U0001F389\n"
    _, second = check_upstream(scripted, "surrogates", MODEL)
    assert "\U0001F600 party \U0001F389" in calls(assistant_turns(second)[0])[0][2]["cmd"]
    assert not scripted.unexpected
