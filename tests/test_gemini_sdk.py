"""The official google-genai SDK, unmodified, against the proxy under gunicorn with 2 workers (issue 24,
acceptance 1): generate_content (text, image, function calling with automatic calling off and on, system
instruction, JSON schema output), generate_content_stream, count_tokens, models.list/get, and the SDK's error
classes for 400/401/403/404/429/503. Every stream is checked by tests/gemini_invariants.py."""
from __future__ import annotations

import base64
import json

import pytest
import requests
from google import genai
from google.genai import errors, types

from tests.conftest import CLIENT_KEY, provider, settings_doc
from tests.gemini_invariants import check_stream
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import FakeUpstream, Reply, completion, described, sse, streamed_text, text_chunks, tool_call

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")


def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name
    """
    return f"sunny in {city}"


AGAIN = {"contents": [{"parts": [{"text": "again"}]}]}


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message["role"] in ("user", "tool"):
            content = message["content"]
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def answer(rec) -> Reply:
    """One scripted upstream for every case: what the request asks for decides the reply."""
    body = rec.body or {}
    last = last_user_text(body)
    messages = body.get("messages") or []
    if "rate-limit-me" in last:
        return Reply(status=429, headers={"Retry-After": "1"}, body=b'{"error":{"message":"slow down"}}')
    if "overloaded" in last:
        return Reply(status=503, body=b'{"error":{"message":"the model is overloaded"}}')
    if "refuse-key" in last:
        return Reply(status=403, body=b'{"error":{"message":"bad provider key"}}')
    if messages and messages[-1]["role"] == "tool":
        return Reply(body=json.dumps(completion(f"Tool said: {messages[-1]['content']}")).encode())
    if body.get("tools") and "weather" in last:
        return tool_call("get_weather", '{"city": "Paris"}')
    if body.get("stream"):
        return streamed_text()
    if body.get("response_format"):
        return Reply(body=json.dumps(completion('{"name": "Ada", "age": 36}')).encode())
    return described(body)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    upstream = FakeUpstream()
    upstream.handler = answer
    models = [{"name": "qwen3-coder", "alias": "gemini-*", "context-length": 32768, "max-output-tokens": 4096}]
    # the failing cases each on a provider of their own: a refused or rate-limited key cools down
    failing = [provider(upstream, name=f"failing-{case}", models=[{"name": "qwen3-coder", "alias": f"err-{case}"}])
               for case in ("403", "429", "503")]
    doc = settings_doc(provider(upstream, models=models), *failing, **{"request-retry": 0})
    server = Gunicorn(write_settings(tmp_path_factory.mktemp("gemini-sdk") / "settings.yaml", doc), workers=2)
    yield server, upstream
    server.stop()
    upstream.stop()


CLIENTS: list[genai.Client] = []  # kept open: a client collected while its request runs closes its connection


def sdk(server, key: str = CLIENT_KEY, version: str | None = None) -> genai.Client:
    """The SDK as a user makes it; API version v1 unless ``version`` (3.6.1's default; Gemini CLI asks v1beta)."""
    client = genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=server.url, api_version=version, timeout=20_000, retry_options=types.HttpRetryOptions(attempts=1)))
    CLIENTS.append(client)
    return client


def sent(upstream: FakeUpstream) -> dict:
    return upstream.requests[-1].body


def test_sdk_generate_content_text_with_system_instruction(proxy):
    server, upstream = proxy
    response = sdk(server).models.generate_content(
        model="gemini-2.5-pro", contents="hi",
        config=types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.3, max_output_tokens=9000,
                                           stop_sequences=["END"]))
    assert response.text == "system=Be brief. images=0"
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.model_version == "gemini-2.5-pro" and response.response_id
    usage = response.usage_metadata
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.total_token_count) == (5, 2, 7)
    body = sent(upstream)
    assert body["model"] == "qwen3-coder" and body["max_tokens"] == 4096  # clamped by max-output-tokens
    assert body["temperature"] == 0.3 and body["stop"] == ["END"]
    assert upstream.requests[-1].key != CLIENT_KEY and "x-goog-api-key" not in upstream.requests[-1].headers


def test_sdk_generate_content_with_an_image(proxy):
    server, _ = proxy
    response = sdk(server).models.generate_content(
        model="models/gemini-2.5-flash",
        contents=[types.Part.from_bytes(data=PNG, mime_type="image/png"), "describe"])
    assert response.text == "system=- images=1"


def test_sdk_function_calling_with_automatic_calling_off(proxy):
    server, upstream = proxy
    client = sdk(server)
    config = types.GenerateContentConfig(
        tools=[get_weather], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    response = client.models.generate_content(model="gemini-2.5-pro", contents="weather in Paris?", config=config)
    call = response.function_calls[0]
    assert (call.name, call.args, call.id) == ("get_weather", {"city": "Paris"}, "call_7")
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    tool = sent(upstream)["tools"][0]["function"]
    assert tool["name"] == "get_weather" and tool["parameters"]["properties"]["city"]["type"] == "string"
    # the client runs it and sends the result back: a tool message answering call_7
    history = [types.Content(role="user", parts=[types.Part.from_text(text="weather in Paris?")]),
               response.candidates[0].content,
               types.Content(role="user", parts=[types.Part.from_function_response(
                   name="get_weather", response={"output": get_weather("Paris")})])]
    final = client.models.generate_content(model="gemini-2.5-pro", contents=history, config=config)
    assert final.text == "Tool said: sunny in Paris"
    messages = sent(upstream)["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_7"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_7", "content": "sunny in Paris"}


def test_sdk_function_calling_with_automatic_calling_on(proxy):
    server, upstream = proxy
    response = sdk(server).models.generate_content(
        model="gemini-2.5-pro", contents="weather in Paris?", config=types.GenerateContentConfig(tools=[get_weather]))
    assert response.text == "Tool said: sunny in Paris"  # the SDK called get_weather and sent its result
    assert [m["role"] for m in sent(upstream)["messages"]] == ["user", "assistant", "tool"]


def test_sdk_json_schema_output(proxy):
    server, upstream = proxy
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    response = sdk(server).models.generate_content(
        model="gemini-2.5-pro", contents="who?",
        config=types.GenerateContentConfig(response_mime_type="application/json", response_json_schema=schema))
    assert json.loads(response.text) == {"name": "Ada", "age": 36}
    assert sent(upstream)["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": schema, "strict": True}}


def test_sdk_generate_content_stream(proxy):
    server, upstream = proxy
    chunks = list(sdk(server).models.generate_content_stream(model="gemini-2.5-pro", contents="stream please"))
    assert "".join(c.text or "" for c in chunks) == "Hello from the stream"
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.total_token_count == 15
    assert sent(upstream)["stream"] is True
    raw = requests.post(f"{server.url}/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                        headers={"x-goog-api-key": CLIENT_KEY}, json=AGAIN, timeout=20)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert check_stream(raw.content).text == "Hello from the stream"


def test_stream_without_alt_sse_is_one_json_array(proxy):
    server, _ = proxy
    raw = requests.post(f"{server.url}/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                        headers={"x-goog-api-key": CLIENT_KEY}, json=AGAIN, timeout=20)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    assert check_stream(raw.content, sse=False).text == "Hello from the stream"


def test_sdk_count_tokens_never_reaches_the_upstream(proxy):
    server, upstream = proxy
    before = len(upstream.requests)
    short = sdk(server).models.count_tokens(model="gemini-2.5-pro", contents="hello")
    long = sdk(server).models.count_tokens(model="gemini-2.5-pro", contents="hello " * 200)
    assert 0 < short.total_tokens < long.total_tokens
    assert len(upstream.requests) == before


@pytest.mark.parametrize("version", [None, "v1beta"])
def test_sdk_models_list_and_get(proxy, version):
    server, _ = proxy
    client = sdk(server, version=version)
    names = [m.name for m in client.models.list()]
    assert "models/gemini-*" not in names and "models/qwen3-coder" in names
    model = client.models.get(model="qwen3-coder")
    assert model.name == "models/qwen3-coder" and model.input_token_limit == 32768
    assert model.output_token_limit == 4096 and "generateContent" in model.supported_actions
    with pytest.raises(errors.ClientError) as raised:
        client.models.get(model="no-such-model")
    assert raised.value.code == 404 and raised.value.status == "NOT_FOUND"
    # an OpenAI client still gets the OpenAI list at /v1/models
    listed = requests.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10)
    assert listed.json()["object"] == "list" and "qwen3-coder" in [m["id"] for m in listed.json()["data"]]


@pytest.mark.parametrize(("contents", "key", "model", "code", "status", "kind"), [
    ([types.Content(role="robot", parts=[types.Part.from_text(text="hi")])], CLIENT_KEY, "gemini-2.5-pro", 400,
     "INVALID_ARGUMENT", errors.ClientError),
    ("hi", "sk-wrong", "gemini-2.5-pro", 401, "UNAUTHENTICATED", errors.ClientError),
    ("refuse-key", CLIENT_KEY, "err-403", 403, "PERMISSION_DENIED", errors.ClientError),
    ("rate-limit-me", CLIENT_KEY, "err-429", 429, "RESOURCE_EXHAUSTED", errors.ClientError),
    ("overloaded", CLIENT_KEY, "err-503", 503, "UNAVAILABLE", errors.ServerError),
])
def test_sdk_error_classes(proxy, contents, key, model, code, status, kind):
    server, _ = proxy
    with pytest.raises(kind) as raised:
        sdk(server, key).models.generate_content(model=model, contents=contents)
    assert raised.value.code == code and raised.value.status == status
    assert CLIENT_KEY not in str(raised.value.details)
    with pytest.raises(errors.ClientError) as raised:  # 404: a model nothing serves
        sdk(server).models.generate_content(model="llama-unknown", contents="hi")
    assert raised.value.code == 404 and raised.value.status == "NOT_FOUND"


def test_sdk_stream_that_breaks_after_its_first_event_raises(proxy):
    server, upstream = proxy
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["Hel", "lo", " there"])), drop_after=2)
    try:
        with pytest.raises(errors.ServerError) as raised:  # the connection dropped: 503 UNAVAILABLE, retried
            for _ in sdk(server).models.generate_content_stream(model="gemini-2.5-pro", contents="x"):
                pass
        assert raised.value.code == 503 and raised.value.status == "UNAVAILABLE"
        raw = requests.post(f"{server.url}/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                         params={"key": CLIENT_KEY}, json={"contents": [{"parts": [{"text": "x"}]}]}, timeout=20)
        checked = check_stream(raw.content, broken=True)
        assert checked.text == "Hel" and checked.error["status"] == "UNAVAILABLE"  # what came before the break
    finally:
        upstream.handler = answer


def test_image_bytes_reach_the_upstream_as_a_data_url(proxy):
    server, upstream = proxy
    sdk(server).models.generate_content(model="gemini-2.5-pro",
                                        contents=[types.Part.from_bytes(data=PNG, mime_type="image/png")])
    part = sent(upstream)["messages"][-1]["content"][0]
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert part == {"type": "image_url", "image_url": {"url": url}}
