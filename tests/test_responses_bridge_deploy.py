"""The Responses bridge deployed: real gunicorn (2 workers), the unmodified openai SDK, stored responses
across workers, across a restart (SQLite) and across two instances (real redis-server). Issue 16, points 1, 5.
"""
from __future__ import annotations

import json
import re

import openai
import pytest

from tests import responses_invariants
from tests.conftest import CLIENT_KEY, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.redis_util import RedisServer
from tests.test_responses_bridge import (  # noqa: F401 - closes this module's clients
    APPLY_PATCH,
    PARALLEL,
    PATCH,
    PATCH_CALL,
    REASONING_TEXT,
    TEXT,
    _clients,
    _close_sdk_clients,
    answer,
    chat_only,
    chunk,
    usage,
)
from tests.upstream import FakeUpstream

SHELL = {"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {
    "command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"]}}
READ = {"type": "function", "name": "read", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}}}}
SCENARIOS = {
    "text": TEXT,
    "reason": REASONING_TEXT,
    "parallel": PARALLEL,
    "patch": PATCH_CALL,
    "shell": (chunk({"content": "Listing."}),
              chunk({"tool_calls": [{"index": 0, "id": "call_s", "type": "function",
                                     "function": {"name": "shell", "arguments": "{\"command\":[\"ls\"]}"}}]}),
              chunk(finish="tool_calls"), usage(30, 9)),
}


def scripted(rec):
    """Answer by the last user message's first word (so one upstream serves every scenario)."""
    last = next(m for m in reversed(rec.body["messages"]) if m["role"] in ("user", "tool"))
    word = last["content"].split()[0] if last["role"] == "user" else "text"
    return answer(*SCENARIOS.get(word, TEXT))(rec)


@pytest.fixture(scope="module")
def chat_upstream():
    fake = FakeUpstream()
    fake.handler = scripted
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def deployed(chat_upstream, tmp_path_factory):
    path = write_settings(tmp_path_factory.mktemp("bridge") / "settings.yaml", settings_doc(chat_only(chat_upstream)))
    server = Gunicorn(path, workers=2, threads=4)
    yield server
    server.stop()


def sdk(server, codex: bool = False) -> openai.OpenAI:
    headers = {"originator": "codex_exec"} if codex else {}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=15,
                           default_headers=headers)
    _clients.append(client)
    return client


def checked(events, codex: bool = False) -> dict:
    """Run SDK stream events through the shared invariant checker; return the terminal payload.

    The ``responses.stream`` helper adds ``parsed``/``parsed_arguments: null`` to what it parsed; that is
    the SDK's own field, not the proxy's, so it is taken out before comparing.
    """
    return responses_invariants.check([(e.type, _unparsed(e.to_dict(warnings=False))) for e in events], codex=codex)


def _unparsed(value):
    if isinstance(value, dict):
        return {k: _unparsed(v) for k, v in value.items() if not (k in ("parsed", "parsed_arguments") and v is None)}
    if isinstance(value, list):
        return [_unparsed(v) for v in value]
    return value


def test_sdk_create_and_stream_text_and_reasoning_under_gunicorn(deployed):
    client = sdk(deployed)
    result = client.responses.create(model="m", input="text please")
    assert result.output_text == "Hello" and result.status == "completed"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (12, 5, 17)
    events = list(client.responses.create(model="m", input="reason about it", stream=True))
    terminal = checked(events)
    assert [o["type"] for o in terminal["response"]["output"]] == ["reasoning", "message"]
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert deltas == "Thinking." and terminal["response"]["usage"]["total_tokens"] == 17
    with client.responses.stream(model="m", input="reason again") as stream:
        events = list(stream)
        final = stream.get_final_response()
    checked(events)
    assert final.output_text == "Answer" and final.output[0].type == "reasoning"
    assert final.output[0].summary[0].text == "Thinking."


def test_sdk_function_calls_parallel_calls_and_custom_tool_calls_under_gunicorn(deployed):
    client = sdk(deployed, codex=True)
    result = client.responses.create(model="m", input="shell out", tools=[SHELL])
    message, call = result.output
    assert message.type == "message" and call.type == "function_call"
    assert (call.name, call.call_id, json.loads(call.arguments)) == ("shell", "call_s", {"command": ["ls"]})
    with client.responses.stream(model="m", input="parallel reads", tools=[READ]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    checked(events, codex=True)
    assert [(o.call_id, o.arguments) for o in final.output] == [("call_1", "{\"path\":\"a\"}"),
                                                                ("call_2", "{\"path\":\"b\"}")]
    assert sum(1 for e in events if e.type == "response.function_call_arguments.done") == 2
    events = list(client.responses.create(model="m", input="patch hello", tools=[APPLY_PATCH], stream=True))
    terminal = checked(events, codex=True)
    (item,) = terminal["response"]["output"]
    assert item["type"] == "custom_tool_call" and item["input"] == PATCH
    result = client.responses.create(model="m", input="patch hello", tools=[APPLY_PATCH])
    assert result.output[0].type == "custom_tool_call" and result.output[0].input == PATCH
    assert result.usage.total_tokens == 17


def worker_of(server: Gunicorn, request_id: str) -> str:
    match = re.search(r"\[(\d+)\] INFO streamfold\.access request_id=" + re.escape(request_id), server.output())
    assert match, "no access log line"
    return match.group(1)


def continue_chain(server: Gunicorn, n: int) -> set[tuple[str, str]]:
    """``n`` two-turn conversations on fresh connections; (storing worker, continuing worker) pairs."""
    pairs = set()
    for i in range(n):
        client = sdk(server)
        first = client.responses.with_raw_response.create(model="m", input=f"text {i}",
                                                          extra_headers={"Connection": "close"})
        first_id = first.parse().id
        second = client.responses.with_raw_response.create(model="m", input="and then", previous_response_id=first_id,
                                                           extra_headers={"Connection": "close"})
        assert second.parse().status == "completed"
        pairs.add((worker_of(server, first.headers["x-request-id"]), worker_of(server, second.headers["x-request-id"])))
    return pairs


def test_previous_response_id_works_across_workers_and_a_restart(chat_upstream, tmp_path):
    path = write_settings(tmp_path / "settings.yaml", settings_doc(chat_only(chat_upstream)))
    server = Gunicorn(path, workers=2, threads=1)
    try:
        pairs = set()
        for _ in range(5):  # the kernel picks the accepting worker; a few rounds see both
            pairs |= continue_chain(server, 4)
            if any(a != b for a, b in pairs):
                break
        assert any(a != b for a, b in pairs), "every continuation landed on the storing worker"
        with sdk(server).responses.stream(model="m", input="text kept") as stream:
            kept = stream.get_final_response().id
    finally:
        server.stop()
    restarted = Gunicorn(path, workers=2, threads=1)
    try:
        result = sdk(restarted).responses.create(model="m", input="after restart", previous_response_id=kept)
        assert result.status == "completed"
        messages = chat_upstream.requests[-1].body["messages"]
        assert messages[:2] == [{"role": "user", "content": "text kept"}, {"role": "assistant", "content": "Hello"}]
        with pytest.raises(openai.BadRequestError) as raised:
            sdk(restarted).responses.create(model="m", input="x", previous_response_id="resp_never_stored")
        assert raised.value.code == "previous_response_not_found"
    finally:
        restarted.stop()


def test_previous_response_id_works_across_two_instances_sharing_redis(chat_upstream, tmp_path):
    redis = RedisServer()
    instances = []
    try:
        for name in ("a", "b"):
            doc = settings_doc(chat_only(chat_upstream), **{"redis-url": redis.url})
            instances.append(Gunicorn(write_settings(tmp_path / f"{name}.yaml", doc), workers=2, threads=2))
        a, b = instances
        first = sdk(a).responses.create(model="m", input="text on a", instructions="Be kind.")
        second = sdk(b).responses.create(model="m", input="text on b", previous_response_id=first.id)
        assert second.status == "completed"
        assert chat_upstream.requests[-1].body["messages"] == [
            {"role": "system", "content": "Be kind."}, {"role": "user", "content": "text on a"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "text on b"}]
        with pytest.raises(openai.BadRequestError):
            sdk(a).responses.create(model="m", input="x", previous_response_id="resp_not_anywhere")
    finally:
        for instance in instances:
            instance.stop()
        redis.stop()
