"""The real Claude Code CLI (tests/agents/package.json) through /v1/messages, under gunicorn, against a
scripted vLLM-like chat upstream (issue 22). Each test checks what the user sees: exit code 0, the tool
really ran, the final text printed, and what reached the upstream."""
from __future__ import annotations

import base64
import json
import re
import struct
import zlib

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
    claude,
    claude_blocks,
    claude_result,
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
MODEL = "qwen3-coder"  # what the upstream is asked for: every claude-* name Claude Code uses maps to it
FORCED = "qwen3-coder-forced"
STRICT = "mistral-small"  # served with a strict chat template


@pytest.fixture(scope="module")
def proxy(scripted, strict_scripted, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("claude-proxy"),
                    chat_provider(scripted, "local", MODEL, ["claude-*"]),
                    chat_provider(strict_scripted, "strict", STRICT, ["strict"]),
                    chat_provider(scripted, "forced", FORCED, ["forced"], **{"force-upstream-stream": True}))
    yield server
    stop_checked(server)


def access_line(proxy, request_id: str) -> str:
    """The proxy's access log line of one request (Claude Code prints the proxy's request id)."""
    (line,) = re.findall(rf"streamfold\.access request_id={request_id} .*", proxy.output())
    return line


def succeeded(run, final: str) -> dict:
    assert run.code == 0, run
    result = claude_result(run)
    assert result["subtype"] == "success" and not result["is_error"], run
    assert result["result"] == final, run
    return result


def write(index: int, call_id: str, path, content: str) -> list[dict]:
    return tool_call(index, call_id, "Write", {"file_path": str(path), "content": content})


def bash(index: int, call_id: str, command: str) -> list[dict]:
    return tool_call(index, call_id, "Bash", {"command": command, "description": "Run a command"})


def test_plain_tool_turn_writes_a_file(scripted, proxy, where):
    home, work = where
    target = work / "hello.txt"
    tag = scripted.script("plain", turns(
        lambda rec: answer(rec, text("I'll write the file.") + write(0, "call_write1", target,
                                                                    "Hello from Claude Code\n"), "tool_calls"),
        lambda rec: answer(rec, text("Wrote hello.txt."))))
    run = claude(proxy, home, work, f"{tag} Create hello.txt saying hello.")
    succeeded(run, "Wrote hello.txt.")
    assert target.read_text() == "Hello from Claude Code\n"
    first, second = check_upstream(scripted, "plain", MODEL)
    assert first["stream"] is True and {"Write", "Bash", "Read"} <= {t["function"]["name"] for t in first["tools"]}
    (called,) = assistant_turns(second)
    assert called["content"] == "I'll write the file."
    assert calls(called) == [("call_write1", "Write",
                              {"file_path": str(target), "content": "Hello from Claude Code\n"})]
    (result,) = tool_results(second)
    assert result["tool_call_id"] == "call_write1" and "hello.txt" in result["content"]
    assert not scripted.unexpected


def test_fresh_session_on_a_strict_template(strict_scripted, proxy, where):
    """Claude Code opens every session with its prompt and a system reminder of its own (two user turns):
    a strict chat template (roles must alternate) gets them as one user message."""
    home, work = where
    target = work / "strict.txt"
    tag = strict_scripted.script("strict", turns(
        lambda rec: answer(rec, write(0, "call_st", target, "alternating\n"), "tool_calls"),
        lambda rec: answer(rec, text("strict.txt written."))))
    run = claude(proxy, home, work, f"{tag} Write strict.txt.", model="strict")
    succeeded(run, "strict.txt written.")
    assert target.read_text() == "alternating\n"
    check_strict(strict_scripted, "strict")
    first, second = check_upstream(strict_scripted, "strict", STRICT)
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert [m["role"] for m in second["messages"]][:4] == ["system", "user", "assistant", "tool"]
    assert not strict_scripted.unexpected


def png(width: int = 8, height: int = 8) -> bytes:
    """A small red RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_image_read_by_a_tool_reaches_a_vision_model(strict_scripted, proxy, where):
    """Claude Code's Read of a PNG answers with an image in the tool result: the vision model upstream
    gets that image (chat allows images only in user turns: right after the tool message), and the
    strict template still sees alternating roles."""
    home, work = where
    picture = png()
    (work / "red.png").write_bytes(picture)
    tag = strict_scripted.script("image", turns(
        lambda rec: answer(rec, tool_call(0, "call_img", "Read", {"file_path": str(work / "red.png")}), "tool_calls"),
        lambda rec: answer(rec, text("The picture is red."))))
    run = claude(proxy, home, work, f"{tag} What colour is red.png?", model="strict")
    succeeded(run, "The picture is red.")
    check_strict(strict_scripted, "image")
    _, second = check_upstream(strict_scripted, "image", STRICT)
    messages = second["messages"]
    at = next(i for i, m in enumerate(messages) if m["role"] == "tool")
    assert messages[at]["tool_call_id"] == "call_img" and messages[at + 1]["role"] == "user"
    url = "data:image/png;base64," + base64.b64encode(picture).decode()
    assert {"type": "image_url", "image_url": {"url": url}} in messages[at + 1]["content"]
    assert "[image omitted]" not in json.dumps(messages)
    assert not strict_scripted.unexpected


def test_parallel_tool_calls_both_run(scripted, proxy, where):
    home, work = where
    tag = scripted.script("parallel", turns(
        lambda rec: answer(rec, text("Both at once.") + write(0, "call_a", work / "a.txt", "alpha\n")
                           + bash(1, "call_b", "echo beta > b.txt"), "tool_calls"),
        lambda rec: answer(rec, text("Made a.txt and b.txt."))))
    run = claude(proxy, home, work, f"{tag} Make a.txt and b.txt.")
    succeeded(run, "Made a.txt and b.txt.")
    assert (work / "a.txt").read_text() == "alpha\n" and (work / "b.txt").read_text() == "beta\n"
    assert [b["name"] for b in claude_blocks(run, "tool_use")] == ["Write", "Bash"]
    _, second = check_upstream(scripted, "parallel", MODEL)
    check_calls_answered(second, [("call_a", "Write"), ("call_b", "Bash")])
    assert not scripted.unexpected


def test_reasoning_stream_shows_thinking(scripted, proxy, where):
    home, work = where
    thought = "The user wants a file; the Write tool makes it."
    tag = scripted.script("reasoning", turns(
        lambda rec: answer(rec, reasoning(thought) + text("Writing it.")
                           + write(0, "call_r", work / "r.txt", "reasoned\n"), "tool_calls"),
        lambda rec: answer(rec, [{"reasoning_content": "Done, say so."}] + text("r.txt is written."))))
    run = claude(proxy, home, work, f"{tag} Think, then write r.txt.", "--effort", "low")
    succeeded(run, "r.txt is written.")
    assert (work / "r.txt").read_text() == "reasoned\n"
    assert [b["thinking"] for b in claude_blocks(run, "thinking")] == [thought, "Done, say so."]
    first, second = check_upstream(scripted, "reasoning", MODEL)
    assert first["reasoning_effort"] == "low"  # Claude Code's --effort, sent as output_config.effort
    (called,) = assistant_turns(second)
    assert "reasoning_content" not in called  # reasoning-replay is off: thinking is not sent back
    assert calls(called)[0][:2] == ("call_r", "Write")
    assert not scripted.unexpected


def test_mid_stream_failure_then_claude_code_retries(scripted, proxy, where):
    home, work = where
    tag = scripted.script("failure", failing_once(
        lambda rec: answer(rec, text("Retrying worked.") + bash(0, "call_f", "echo retried > retry.txt"),
                           "tool_calls"),
        lambda rec: answer(rec, text("retry.txt says retried."))))
    run = claude(proxy, home, work, f"{tag} Write retry.txt.")
    succeeded(run, "retry.txt says retried.")
    assert (work / "retry.txt").read_text() == "retried\n"
    broken, retry, second = check_upstream(scripted, "failure", MODEL)
    # Claude Code's own retry after the stream's `event: error` is its non-streaming fallback, with the
    # same conversation: nothing of the broken answer in it.
    assert broken["stream"] is True and not retry.get("stream")
    assert retry["messages"] == broken["messages"]
    assert [m["content"] for m in assistant_turns(second)] == ["Retrying worked."]
    assert "I'll run" not in str(second["messages"])
    assert not scripted.unexpected


def test_busy_upstream_then_claude_code_retries(scripted, proxy, where):
    """The upstream refuses a turn's first try (429, then 503): the proxy answers 429 and 529, Claude Code
    retries each after a pause of its own, and the session finishes."""
    home, work = where
    tag = scripted.script("busy", busy_once(
        lambda rec: answer(rec, bash(0, "call_busy", "echo patient > busy.txt"), "tool_calls"),
        lambda rec: answer(rec, text("busy.txt written after all."))))
    run = claude(proxy, home, work, f"{tag} Write busy.txt.")
    succeeded(run, "busy.txt written after all.")
    assert (work / "busy.txt").read_text() == "patient\n"
    refused, first, refused_again, second = check_upstream(scripted, "busy", MODEL)
    assert refused == first and refused_again == second  # the same request again, nothing lost or added
    assert re.findall(r"route=/v1/messages .* status=(\d+) ", proxy.output()).count("529") >= 1
    assert not scripted.unexpected


def test_forced_fold_provider(scripted, proxy, where):
    """A provider with force-upstream-stream: Claude Code streams, and its non-streaming fallback after a
    broken stream is sent upstream as a stream and folded into one Anthropic message."""
    home, work = where
    tag = scripted.script("forced", failing_once(
        lambda rec: answer(rec, text("Folded.") + write(0, "call_x", work / "folded.txt", "from a fold\n"),
                           "tool_calls"),
        lambda rec: answer(rec, text("folded.txt is there."))))
    run = claude(proxy, home, work, f"{tag} Write folded.txt.", model="forced")
    succeeded(run, "folded.txt is there.")
    assert (work / "folded.txt").read_text() == "from a fold\n"
    bodies = check_upstream(scripted, "forced", FORCED)
    assert [b["stream"] for b in bodies] == [True, True, True]  # the fallback too: forced
    (folded_request,) = {e["request_id"] for e in run.events if e.get("type") == "assistant"
                         and e["message"]["content"][0].get("text") == "Folded."}
    line = access_line(proxy, folded_request)
    assert "route=/v1/messages" in line and "forced_stream=yes folded=yes" in line and "result=complete" in line
    assert not scripted.unexpected


def test_two_turn_session_with_continue(scripted, proxy, where):
    home, work = where
    note = work / "note.txt"
    first_tag = scripted.script("session-one", turns(
        lambda rec: answer(rec, write(0, "call_s1", note, "first\n"), "tool_calls"),
        lambda rec: answer(rec, text("Saved the note."))))
    second_tag = scripted.script("session-two", turns(
        lambda rec: answer(rec, bash(0, "call_s2", "echo second >> note.txt"), "tool_calls"),
        lambda rec: answer(rec, text("Appended to the note."))))
    succeeded(claude(proxy, home, work, f"{first_tag} Save a note."), "Saved the note.")
    run = claude(proxy, home, work, f"{second_tag} Add to the note.", "--continue")
    succeeded(run, "Appended to the note.")
    assert note.read_text() == "first\nsecond\n"
    check_continued(scripted, MODEL, "session-one", "session-two", ("call_s1", "Write"), "Saved the note.")


def test_subagent_runs_its_own_turns(scripted, proxy, where):
    """The Agent tool: Claude Code starts a subagent whose own conversation (its prompt, its tool call) goes
    through the proxy as well, and its answer comes back to the main agent as a tool result."""
    home, work = where
    tag = scripted.script("subagent", turns(
        lambda rec: answer(rec, tool_call(0, "call_agent", "Agent", {
            "description": "Write sub.txt", "prompt": "[[subagent-inner]] Write sub.txt.",
            "subagent_type": "general-purpose"}), "tool_calls"),
        lambda rec: answer(rec, text("The subagent wrote sub.txt."))))
    scripted.script("subagent-inner", turns(
        lambda rec: answer(rec, bash(0, "call_inner", "echo from a subagent > sub.txt"), "tool_calls"),
        lambda rec: answer(rec, text("sub.txt written."))))
    run = claude(proxy, home, work, f"{tag} Have a subagent write sub.txt.")
    succeeded(run, "The subagent wrote sub.txt.")
    assert (work / "sub.txt").read_text() == "from a subagent\n"
    assert {e.get("parent_tool_use_id") for e in run.events if e.get("type") == "assistant"} == {None, "call_agent"}
    inner_first, inner_second = check_upstream(scripted, "subagent-inner", MODEL)
    assert "[[subagent]]" not in str(inner_first["messages"])  # a conversation of its own
    check_calls_answered(inner_second, [("call_inner", "Bash")])
    _, second = check_upstream(scripted, "subagent", MODEL)
    check_calls_answered(second, [("call_agent", "Agent")])
    assert "sub.txt written." in str(tool_results(second)[0]["content"])
    assert not scripted.unexpected


def test_split_surrogates_in_text_and_tool_arguments(scripted, proxy, where):
    """An emoji streamed as two UTF-16 halves in consecutive chunks, in a tool call's arguments and in the
    final text, arrives whole: in the file Claude Code writes and in the answer it prints."""
    home, work = where
    target = work / "smile.txt"
    arguments = json.dumps({"file_path": str(target), "content": "smile \U0001F600 party \U0001F389\n"},
                           ensure_ascii=False)
    tag = scripted.script("surrogates", turns(
        lambda rec: answer(rec, tool_call(0, "call_u", "Write", split_surrogates(arguments)), "tool_calls"),
        lambda rec: answer(rec, [{"content": p} for p in split_surrogates("Done \U0001F600 ok")])))
    run = claude(proxy, home, work, f"{tag} Write smile.txt.")
    succeeded(run, "Done \U0001F600 ok")
    assert target.read_text(encoding="utf-8") == "smile \U0001F600 party \U0001F389\n"
    _, second = check_upstream(scripted, "surrogates", MODEL)
    assert calls(assistant_turns(second)[0])[0][2]["content"] == "smile \U0001F600 party \U0001F389\n"
    assert not scripted.unexpected
