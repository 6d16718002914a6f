"""The official anthropic SDK, unmodified, against the proxy under gunicorn with 2 workers."""
from __future__ import annotations

import base64
import json

import anthropic
import pytest

from tests.anthropic_invariants import check_stream
from tests.conftest import CLIENT_KEY, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import Reply, described, streamed_text, tool_call

PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                     "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
                                     )).decode()
BASH = {"name": "Bash", "description": "Run a command",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}


def answer(rec) -> Reply:
    """One scripted upstream for every case: what the request asks for decides the reply."""
    body = rec.body or {}
    last = body.get("messages", [{}])[-1].get("content")
    text = last if isinstance(last, str) else json.dumps(last)
    if "rate-limit-me" in text:
        return Reply(status=429, headers={"Retry-After": "1"}, body=b'{"error":{"message":"slow down"}}')
    if "too-long" in text:
        return Reply(status=400, body=b'{"error":{"message":"maximum context length is 4096 tokens"}}')
    if body.get("tools") and "use a tool" in text:
        return tool_call("Bash", '{"command":"ls"}')
    if body.get("stream"):
        return streamed_text()
    return described(body)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from tests.upstream import FakeUpstream

    upstream = FakeUpstream()
    upstream.handler = answer
    models = [{"name": "qwen3-coder", "alias": "claude-*"}]
    doc = settings_doc(provider(upstream, models=models), **{"request-retry": 0})
    server = Gunicorn(write_settings(tmp_path_factory.mktemp("sdk") / "settings.yaml", doc), workers=2)
    client = anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0, timeout=20)
    yield client, upstream, server
    client.close()
    server.stop()
    upstream.stop()


def test_sdk_messages_create_text_with_system_string_and_blocks(proxy):
    client, _, _ = proxy
    for system in ("Be brief.", [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]):
        message = client.messages.create(model="claude-sonnet-4-6", max_tokens=64, system=system,
                                         messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text == "system=Be brief. images=0"
        assert message.model == "claude-sonnet-4-6" and message.stop_reason == "end_turn"
        assert message.usage.input_tokens == 5 and message.usage.output_tokens == 2
        assert message._request_id  # the proxy's request id, as Anthropic's request-id header


def test_sdk_messages_create_with_an_image(proxy):
    client, _, _ = proxy
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "text", "text": "describe"}]}])
    assert message.content[0].text == "system=- images=1"


def test_sdk_messages_create_with_tools_returns_tool_use(proxy):
    client, _, _ = proxy
    message = client.messages.create(model="claude-sonnet-4-6", max_tokens=64, tools=[BASH],
                                     messages=[{"role": "user", "content": "use a tool"}])
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert (block.type, block.id, block.name, block.input) == ("tool_use", "call_7", "Bash", {"command": "ls"})


def test_sdk_messages_stream_text_and_final_message(proxy):
    client, _, _ = proxy
    for _ in range(4):  # spread over both workers
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=64,
                                    messages=[{"role": "user", "content": "stream please"}]) as stream:
            assert "".join(stream.text_stream) == "Hello from the stream"
            final = stream.get_final_message()
        assert final.content[0].text == "Hello from the stream" and final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 3 and final.usage.input_tokens == 12


def test_sdk_raw_stream_keeps_the_invariants(proxy):
    client, _, _ = proxy
    with client.messages.with_streaming_response.create(
            model="claude-sonnet-4-6", max_tokens=64, stream=True,
            messages=[{"role": "user", "content": "stream please"}]) as response:
        raw = response.read()
    assert check_stream(raw).text == "Hello from the stream"


def test_sdk_count_tokens(proxy):
    client, upstream, _ = proxy
    before = len(upstream.requests)
    counted = client.messages.count_tokens(model="claude-sonnet-4-6", system="Be brief.", tools=[BASH],
                                           messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens > 10
    assert len(upstream.requests) == before


def test_sdk_exception_classes_match_the_statuses(proxy, tmp_path):
    client, _, server = proxy
    hi = [{"role": "user", "content": "hi"}]
    with anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            stranger.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=hi)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-unknown", max_tokens=8, messages=hi)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=8,
                               messages=[{"role": "user", "content": "too-long"}])
    assert bad.value.body["error"]["message"].startswith("prompt is too long:")
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-sonnet-4-6", max_tokens=8,
                               messages=[{"role": "user", "content": [{"type": "hologram"}]}])
    # last: the 429 puts the worker's only upstream key on a cooldown
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="claude-sonnet-4-6", max_tokens=8,
                               messages=[{"role": "user", "content": "rate-limit-me"}])
