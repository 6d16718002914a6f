"""The real Claude Code, Codex and Gemini CLIs driven through the proxy (issues 22, 24): the harness the agent tests
share.

``tests/system-deps.sh`` installs both from the npm registry, pinned by ``tests/agents/package-lock.json``
(their native binaries come inside the packages). A test runs one non-interactively (``claude -p``,
``codex exec``, ``gemini -p``) against the proxy under gunicorn (2 workers) and a scripted loopback upstream that speaks
chat completions the way vLLM does: chunked SSE, one event per chunk, the usage chunk only when asked.

Each scenario's prompt carries a tag, ``[[name]]``. The upstream answers by the tag of the conversation's
latest tagged user message and by how many model turns (assistant messages) came after it, so one upstream
serves every scenario, across the agent's own retries and across a continued session, and records what
reached it per scenario. A request it has no script for is answered 400 and kept in ``unexpected``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from proxy.fold.chat import fold_chat_chunks
from tests.conftest import CLIENT_KEY, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import FakeUpstream, Recorded, Reply, sse

AGENTS = Path(__file__).resolve().parent / "agents"
PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex", "gemini": "@google/gemini-cli"}
VERSIONS = {cli: json.loads((AGENTS / "package.json").read_text())["dependencies"][package]
            for cli, package in PACKAGES.items()}  # the exact versions the lockfile pins
TAG = re.compile(r"\[\[([a-z0-9-]+)\]\]")
RUN_TIMEOUT = 60  # seconds one CLI run may take before the test fails (a scripted turn takes 1-5 s)
# Every CLI run's (cli, scenario, seconds, exit code): the terminal summary reports them (tests/conftest.py).
RUNS: list[tuple[str, str, float, int]] = []


def binary(name: str) -> str:
    """The installed CLI; a missing one fails the test (never a skip: the suite must run the real agents)."""
    path = AGENTS / "node_modules" / ".bin" / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed in {AGENTS}: run `bash tests/system-deps.sh`")
    return str(path)


# --- what the scripted upstream says ------------------------------------------------------------------------

def text(content: str) -> list[dict]:
    """Deltas streaming ``content`` a few characters per chunk."""
    return [{"content": content[i:i + 8]} for i in range(0, len(content), 8)]


def split_surrogates(content: str) -> list[str]:
    """``content`` cut between the two UTF-16 halves of every character outside the BMP, as a server that
    streams UTF-16 code units sends an emoji: ``"\\ud83d"`` ending one chunk, ``"\\ude00"`` starting the next."""
    pieces, current = [], ""
    for char in content:
        if ord(char) > 0xFFFF:
            high, low = divmod(ord(char) - 0x10000, 0x400)
            pieces.append(current + chr(0xD800 + high))
            current = chr(0xDC00 + low)
        else:
            current += char
    return [*pieces, current]


def reasoning(content: str) -> list[dict]:
    """Deltas streaming ``content`` as reasoning (vLLM's ``reasoning_content``)."""
    return [{"reasoning_content": content[i:i + 9]} for i in range(0, len(content), 9)]


def tool_call(index: int, call_id: str, name: str, arguments: dict | list[str]) -> list[dict]:
    """Deltas of one tool call as vLLM streams it: id and name first, then the arguments in pieces (a
    list of strings is sent as those pieces, to split them exactly where a test wants)."""
    if isinstance(arguments, dict):
        whole = json.dumps(arguments)
        arguments = [whole[i:i + 12] for i in range(0, len(whole), 12)]
    return [{"tool_calls": [{"index": index, "id": call_id, "type": "function",
                             "function": {"name": name, "arguments": ""}}]},
            *({"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in arguments)]


def answer(rec: Recorded, deltas: list[dict], finish: str = "stop", **reply) -> Reply:
    """``deltas`` as chat completion chunks: an SSE stream (usage last, only if the request asked for it)
    or, for a non-stream request, their fold as one completion (with usage)."""
    head = {"id": f"chatcmpl-agent{len(deltas)}", "object": "chat.completion.chunk", "created": 1764000000,
            "model": rec.body.get("model")}

    def chunk(delta: dict, reason: str | None = None) -> dict:
        return dict(head, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])

    chunks = [chunk({"role": "assistant", "content": ""}), *map(chunk, deltas), chunk({}, finish)]
    if not rec.body.get("stream") or (rec.body.get("stream_options") or {}).get("include_usage"):
        chunks.append(dict(head, choices=[], usage={"prompt_tokens": 120, "completion_tokens": 9 * len(deltas),
                                                    "total_tokens": 120 + 9 * len(deltas)}))
    events = sse(*chunks)
    if rec.body.get("stream"):
        return Reply(events=events, **reply)
    return Reply(body=json.dumps(fold_chat_chunks(events)).encode(), **reply)


# A scenario's script: (recorded request, model turn since the scenario's prompt, how many requests this
# scenario has seen at that turn before this one) -> the reply.
Script = Callable[[Recorded, int, int], Reply]


def turns(*steps: Callable[[Recorded], Reply]) -> Script:
    """The usual script: the n-th model turn gets ``steps[n]``, also when the agent retries it."""
    def script(rec: Recorded, turn: int, attempt: int) -> Reply:
        if turn >= len(steps):
            return Reply(status=400, body=b'{"error": {"message": "the script has no more turns"}}')
        return steps[turn](rec)
    return script


def failing_once(*steps: Callable[[Recorded], Reply]) -> Script:
    """``turns``, but the first try of the first turn breaks off mid-stream (the upstream drops the
    connection after a few chunks of text, no [DONE])."""
    script = turns(*steps)

    def run(rec, turn, attempt):
        if turn == 0 and attempt == 0:
            return answer(rec, text("I'll run that command for you now."), drop_after=3)
        return script(rec, turn, attempt)
    return run


def busy_once(*steps: Callable[[Recorded], Reply]) -> Script:
    """``turns``, but the first try of each turn is refused: 429 with Retry-After 1 on the first turn,
    503 on the others, as a loaded server answers."""
    script = turns(*steps)

    def run(rec, turn, attempt):
        if attempt == 0:
            return Reply(status=429 if turn == 0 else 503, headers={"Retry-After": "1"},
                         body=b'{"error": {"message": "server busy", "type": "server_error"}}')
        return script(rec, turn, attempt)
    return run


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def locate(messages: list[dict]) -> tuple[str | None, int]:
    """The tag of the latest user message that has one, and the assistant messages after it."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            tags = TAG.findall(message_text(messages[i]))
            if tags:
                return tags[-1], sum(1 for m in messages[i + 1:] if m.get("role") == "assistant")
    return None, 0


class ScriptedUpstream:
    """A FakeUpstream answering each scenario from its script and recording its requests by tag."""

    def __init__(self, **scripted) -> None:
        self.scripts: dict[str, Script] = {}
        self.seen: dict[str, list[Recorded]] = {}
        self.unexpected: list[Recorded] = []
        self.lock = threading.Lock()
        self.fake = FakeUpstream(**scripted)
        self.fake.handler = self.handle

    @property
    def url(self) -> str:
        return self.fake.url

    def stop(self) -> None:
        self.fake.stop()

    def script(self, tag: str, script: Script) -> str:
        """Registers a scenario and returns its tag as the prompt should carry it."""
        self.scripts[tag] = script
        self.seen[tag] = []
        return f"[[{tag}]]"

    def handle(self, rec: Recorded) -> Reply:
        tag, turn = locate(rec.body.get("messages") or []) if isinstance(rec.body, dict) else (None, 0)
        if rec.path != "/v1/chat/completions" or tag not in self.scripts:
            self.unexpected.append(rec)
            return Reply(status=400, body=b'{"error": {"message": "no script for this request"}}')
        with self.lock:
            attempt = sum(1 for r in self.seen[tag] if locate(r.body["messages"]) == (tag, turn))
            self.seen[tag].append(rec)
        return self.scripts[tag](rec, turn, attempt)


@pytest.fixture(scope="module")
def scripted():
    """One scripted upstream per test module (its scenarios are told apart by their tags)."""
    fake = ScriptedUpstream()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def strict_scripted():
    """A second one, with a strict chat template: a request whose roles do not alternate gets vLLM's 400."""
    fake = ScriptedUpstream(strict_roles=True)
    yield fake
    fake.stop()


def check_strict(strict: ScriptedUpstream, tag: str) -> None:
    """Every request of scenario ``tag`` the strict upstream received passed its template (reached the
    script; the 400s it answers itself never do)."""
    assert strict.seen[tag] and len(strict.fake.requests) == sum(len(seen) for seen in strict.seen.values())


@pytest.fixture
def where(tmp_path):
    """(HOME, working directory) of one agent user: its own settings, sessions and files."""
    (tmp_path / "work").mkdir()
    return tmp_path / "home", tmp_path / "work"


# --- the proxy ----------------------------------------------------------------------------------------------

def deploy(directory: Path, *providers: dict) -> Gunicorn:
    """The proxy under gunicorn with 2 workers, the shipped gunicorn.conf.py, these providers."""
    return Gunicorn(write_settings(directory / "settings.yaml", settings_doc(*providers)), workers=2, threads=4)


def stop_checked(server: Gunicorn) -> None:
    """Stops the proxy, whose log must hold no traceback and no error line: an agent that finished may
    still have met an exception the proxy turned into an error event."""
    output = server.output()
    server.stop()
    assert not re.search(r"Traceback|\] ERROR |\[ERROR\]", output), output[-8000:]


def chat_provider(upstream: ScriptedUpstream, name: str, model: str, aliases: list[str], **extra) -> dict:
    """A chat-only provider (both bridges translate to chat for it) serving ``model`` under ``aliases``."""
    return provider(upstream.url, name=name, **{"native-apis": ["chat"],
                                                "models": [{"name": model, "alias": a} for a in aliases], **extra})


# --- running a CLI ------------------------------------------------------------------------------------------

@dataclass(repr=False)
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    events: list[dict] = field(default_factory=list)

    def __repr__(self) -> str:  # what a failing assert shows (pytest cuts it short; the output is printed)
        return f"<run: exit {self.code} after {self.seconds:.1f} s; its output is under 'Captured stdout'>"


def _base_env(home: Path) -> dict:
    """Nothing from the caller's environment but PATH: no proxy variables, no real keys or config."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "TMPDIR": str(home), "NO_COLOR": "1"}


def _run(cli: str, scenario: str, cmd: list[str], cwd: Path, env: dict) -> Run:
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=RUN_TIMEOUT, text=True, errors="replace")
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        code = -9
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")) \
            + f"\n[killed after {RUN_TIMEOUT} s]"
    seconds = time.monotonic() - started
    RUNS.append((cli, scenario, seconds, code))
    events = []
    for line in out.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    # Printed whole for pytest to show when the test fails (an assert's message is cut to a few lines).
    print(f"$ {' '.join(cmd[:2])} ... exit {code} after {seconds:.1f} s\n--- stdout\n{out[-20000:]}\n"
          f"--- stderr\n{err[-5000:]}")
    return Run(code, out, err, seconds, events)


def claude(proxy: Gunicorn, home: Path, cwd: Path, prompt: str, *args: str, model: str | None = None) -> Run:
    """``claude -p PROMPT`` in stream-json, every tool allowed; ``model`` sets all of Claude Code's model
    names (main and small), else it asks for its own ``claude-*`` names."""
    env = _base_env(home) | {
        "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_API_KEY": CLIENT_KEY,
        "IS_SANDBOX": "1",  # --dangerously-skip-permissions is refused as root otherwise
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}
    if model:
        env |= {"ANTHROPIC_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
                "ANTHROPIC_DEFAULT_SONNET_MODEL": model, "ANTHROPIC_DEFAULT_OPUS_MODEL": model}
    cmd = [binary("claude"), "-p", prompt, "--output-format", "stream-json", "--verbose",
           "--dangerously-skip-permissions", *args]
    return _run("claude", TAG.findall(prompt)[-1], cmd, cwd, env)


def claude_result(run: Run) -> dict:
    """Claude Code's final ``result`` event (what ``-p`` prints as the answer)."""
    results = [e for e in run.events if e.get("type") == "result"]
    assert len(results) == 1, run
    return results[0]


def claude_blocks(run: Run, kind: str) -> list[dict]:
    """The content blocks of type ``kind`` in the assistant messages Claude Code printed."""
    return [block for e in run.events if e.get("type") == "assistant"
            for block in e["message"]["content"] if block.get("type") == kind]


def codex(proxy: Gunicorn, home: Path, cwd: Path, prompt: str, *args: str, model: str = "agent",
          resume: bool = False) -> Run:
    """``codex exec --json PROMPT`` (or ``codex exec resume --last``) with a config.toml whose provider
    points at the proxy's Responses API; no sandbox, no approvals (the test's directory is its own)."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "streamfold"\n\n[model_providers.streamfold]\nname = "streamfold"\n'
        f'base_url = "{proxy.url}/v1"\nenv_key = "STREAMFOLD_API_KEY"\nwire_api = "responses"\n')
    env = _base_env(home) | {"CODEX_HOME": str(codex_home), "STREAMFOLD_API_KEY": CLIENT_KEY}
    verb = ["exec", "resume", "--last"] if resume else ["exec"]
    cmd = [binary("codex"), *verb, "--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
           *args, prompt]
    return _run("codex", TAG.findall(prompt)[-1], cmd, cwd, env)


def codex_items(run: Run, kind: str) -> list[dict]:
    """The completed items of type ``kind`` Codex printed (agent_message, reasoning, command_execution...)."""
    return [e["item"] for e in run.events if e.get("type") == "item.completed" and e["item"].get("type") == kind]


def gemini(proxy: Gunicorn, home: Path, cwd: Path, prompt: str, *args: str, model: str = "agent") -> Run:
    """``gemini -p PROMPT --yolo`` in stream-json against the proxy's Gemini API: ``GOOGLE_GEMINI_BASE_URL``
    and ``GEMINI_API_KEY``, the API-key auth type in ``settings.json`` (without it the pinned CLI picks its
    ``gateway`` type from the base URL, which its headless mode refuses: "Invalid auth method selected"),
    and ``-m`` (a named model skips the CLI's routing classifier, another request to a flash model)."""
    settings = home / ".gemini"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "settings.json").write_text(json.dumps({
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "privacy": {"usageStatisticsEnabled": False}, "telemetry": {"enabled": False},
        "general": {"disableAutoUpdate": True, "disableUpdateNag": True}}))
    env = _base_env(home) | {"GEMINI_CLI_HOME": str(home), "GOOGLE_GEMINI_BASE_URL": proxy.url,
                             "GEMINI_API_KEY": CLIENT_KEY, "GEMINI_CLI_TRUST_WORKSPACE": "true",
                             "GEMINI_SANDBOX": "false"}
    cmd = [binary("gemini"), "-m", model, "-p", prompt, "--output-format", "stream-json", "--yolo", *args]
    return _run("gemini", TAG.findall(prompt)[-1], cmd, cwd, env)


def gemini_events(run: Run, kind: str) -> list[dict]:
    """The stream-json events of type ``kind`` Gemini CLI printed (message, tool_use, tool_result, result)."""
    return [e for e in run.events if e.get("type") == kind]


# --- what reached the upstream ------------------------------------------------------------------------------

def check_upstream(scripted: ScriptedUpstream, tag: str, model: str) -> list[dict]:
    """What a scenario sent upstream is only what it should be: chat requests for the model its provider
    names with the provider's key, usage asked for on streams, chat roles and function tools only, no
    Anthropic headers. Returns the request bodies in order."""
    bodies = [rec.body for rec in scripted.seen[tag]]
    assert bodies, f"nothing reached the upstream for {tag}"
    for rec in scripted.seen[tag]:
        assert rec.key is not None and rec.key != CLIENT_KEY  # the provider's key, never the client's
        assert not any(h.startswith(("anthropic-", "x-api-key")) for h in rec.headers)
        body = rec.body
        assert body["model"] == model
        assert body.get("stream_options") == ({"include_usage": True} if body.get("stream") else None)
        for m in body["messages"]:
            assert m["role"] in ("system", "user", "assistant", "tool")
            assert "cache_control" not in json.dumps(m)
        for tool in body.get("tools", []):
            assert tool["type"] == "function" and tool["function"]["name"]
    return bodies


def assistant_turns(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "assistant"]


def tool_results(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "tool"]


def calls(message: dict) -> list[tuple[str, str, dict]]:
    """An assistant message's tool calls as (id, name, parsed arguments)."""
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message.get("tool_calls") or []]


def check_calls_answered(body: dict, expected: list[tuple[str, str]]) -> None:
    """The request's one assistant message made these calls (id, name), and their tool results follow it
    at once, in the same order."""
    (called,) = assistant_turns(body)
    assert [c[:2] for c in calls(called)] == expected
    at = body["messages"].index(called)
    assert [(m["role"], m.get("tool_call_id")) for m in body["messages"][at + 1:at + 1 + len(expected)]] \
        == [("tool", call_id) for call_id, _ in expected]


def check_continued(scripted: ScriptedUpstream, model: str, first: str, second: str, first_call: tuple[str, str],
                    first_answer: str) -> None:
    """Scenario ``second`` continued scenario ``first``'s session: its requests carry the first
    conversation (its prompt, its call, its final answer) and then the results of both turns' calls."""
    check_upstream(scripted, first, model)
    resumed, last = check_upstream(scripted, second, model)
    history = str(resumed["messages"])
    assert f"[[{first}]]" in history and first_answer in history
    assert [c[:2] for m in assistant_turns(resumed) for c in calls(m)] == [first_call]
    assert [m["tool_call_id"] for m in tool_results(last)][:1] == [first_call[0]]
    assert len(tool_results(last)) == 2 and not scripted.unexpected
