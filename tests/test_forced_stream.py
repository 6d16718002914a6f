"""force-upstream-stream and SSE-answering upstreams, end to end through a real server and the SDK."""
from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import AUTH, CHAT, CLIENT_KEY, make_app, provider, settings_doc
from tests.upstream import Reply, completion, sse

HEAD = {"id": "chatcmpl-f01d", "object": "chat.completion.chunk", "created": 1764200000, "model": "upstream-model"}
USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
         "completion_tokens_details": {"reasoning_tokens": 4}}


def chunk(delta=None, finish=None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return dict(HEAD, choices=choices, **extra)


REASONING_TOOL_STREAM = sse(
    chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
    chunk({"reasoning_content": "User wants"}),
    chunk({"reasoning_content": " the weather."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_w1", "type": "function", "function": {"name": "get_weather"}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_t2", "type": "function",
                           "function": {"name": "get_time", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Oslo\"}"}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
    chunk({}, finish="tool_calls"),
    chunk(None, usage=USAGE),
)


@pytest.fixture
def forced_app(upstream):
    return make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True})))


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def check_weather_completion(result) -> None:
    assert result.object == "chat.completion"
    assert result.id == "chatcmpl-f01d"
    message = result.choices[0].message
    assert message.content is None
    assert message.model_extra["reasoning_content"] == "User wants the weather."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("call_w1", "get_weather", {"city": "Oslo"}), ("call_t2", "get_time", {})]
    assert result.choices[0].finish_reason == "tool_calls"
    assert result.usage.total_tokens == 29
    assert result.usage.completion_tokens_details.reasoning_tokens == 4


def test_sdk_non_stream_request_to_forced_provider_is_folded(forced_app, upstream, serve):
    upstream.handler = lambda rec: Reply(events=REASONING_TOOL_STREAM)
    result = sdk(serve(forced_app)).chat.completions.create(model="m", messages=CHAT["messages"])
    check_weather_completion(result)
    sent = upstream.requests[0].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_sdk_non_forced_provider_answering_sse_anyway_is_folded(app, upstream, serve):
    upstream.handler = lambda rec: Reply(events=REASONING_TOOL_STREAM)  # text/event-stream
    check_weather_completion(sdk(serve(app)).chat.completions.create(model="m", messages=CHAT["messages"]))
    assert "stream" not in upstream.requests[0].body


def test_sse_body_labelled_as_json_is_folded(client, upstream):
    body = b"".join(REASONING_TOOL_STREAM)
    upstream.handler = lambda rec: Reply(body=body, content_type="application/json")
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    assert response.get_json()["choices"][0]["finish_reason"] == "tool_calls"


def test_folded_answer_is_json_with_the_fold_in_the_log(forced_app, upstream, caplog):
    upstream.handler = lambda rec: Reply(events=REASONING_TOOL_STREAM)
    response = forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    line = [r.getMessage() for r in caplog.records if r.name == "streamfold.access"][0]
    assert "forced_stream=yes" in line and "folded=yes" in line


def test_client_stream_options_are_kept_and_usage_added(forced_app, upstream):
    upstream.handler = lambda rec: Reply(events=REASONING_TOOL_STREAM)
    body = dict(CHAT, stream=False, stream_options={"continuous_usage_stats": True, "include_usage": False})
    assert forced_app.test_client().post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    sent = upstream.requests[0].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


def test_streaming_client_request_is_relayed_never_folded(forced_app, upstream):
    upstream.handler = lambda rec: Reply(events=REASONING_TOOL_STREAM)
    # The client asks for usage itself, so the stream (usage chunk included) comes back byte for byte.
    response = forced_app.test_client().post("/v1/chat/completions", headers=AUTH,
                                             json=dict(CHAT, stream=True, stream_options={"include_usage": True}))
    assert response.data == b"".join(REASONING_TOOL_STREAM)
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}


def test_forced_provider_that_answers_json_anyway_is_relayed(forced_app, upstream):
    body = json.dumps(completion("plain")).encode()
    upstream.handler = lambda rec: Reply(body=body)
    response = forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.data == body


def test_rate_limit_inside_the_stream_stays_429(forced_app, upstream):
    upstream.handler = lambda rec: Reply(events=sse(chunk({"role": "assistant", "content": "x"}),
                                                    {"error": {"message": "slow down", "code": 429}}, done=False))
    response = forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 429
    assert response.get_json()["error"]["message"] == "slow down"


def test_stream_cut_off_is_502_never_a_fake_stop(forced_app, upstream):
    upstream.handler = lambda rec: Reply(events=sse(chunk({"role": "assistant", "content": "half an ans"}),
                                                    done=False))
    response = forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 502
    assert response.get_json()["error"]["message"] == "upstream stream ended early"


def test_non_json_line_in_a_forced_stream_is_502(forced_app, upstream):
    upstream.handler = lambda rec: Reply(events=[b"data: {\"id\": \"x\", \"choices\": [\n\n", b"data: [DONE]\n\n"])
    response = forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 502
    assert "not JSON" in response.get_json()["error"]["message"]
    # the worker is fine afterwards
    upstream.handler = lambda rec: Reply(events=REASONING_TOOL_STREAM)
    assert forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200


def test_fold_over_max_aggregate_bytes_is_502(upstream):
    app = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}),
                                **{"max-aggregate-bytes": 5000}))
    upstream.handler = lambda rec: Reply(events=sse(*[chunk({"content": "y" * 1000}) for _ in range(10)],
                                                    chunk({}, finish="stop")))
    response = app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 502
    assert "max-aggregate-bytes" in response.get_json()["error"]["message"]


@pytest.mark.parametrize("arguments", [{"city": "Oslo"}, {}], ids=["object", "empty-object"])
def test_tool_arguments_sent_as_an_object_are_folded_into_their_json_text(forced_app, upstream, serve, arguments):
    # Some servers send function.arguments as a JSON object; the bridges always took its JSON text, the fold
    # answered 502. One assembler (fold/tool_calls.py) now reads it the same way for both. An empty object (a
    # tool without parameters) is "{}" too: it was dropped as if no arguments came, and the client read "".
    upstream.handler = lambda rec: Reply(events=sse(
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_o1", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": arguments}}]}),
        chunk({}, finish="tool_calls")))
    result = sdk(serve(forced_app)).chat.completions.create(model="m", messages=CHAT["messages"])
    call = result.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_o1", "get_weather",
                                                                                 arguments)


def test_a_tool_name_that_is_not_a_string_in_a_forced_stream_is_502(forced_app, upstream):
    # A JSON answer with such a name is refused (translate/completion.check_relayed), and so were the bridges'
    # streams; the fold passed {"name": 7} on to the client as the tool's name.
    upstream.handler = lambda rec: Reply(events=sse(
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_n1", "type": "function",
                                                    "function": {"name": 7, "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls")))
    response = forced_app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 502
    assert response.get_json()["error"]["message"] == ("upstream sent a chunk of the wrong shape: "
                                                        "choices[0].delta.tool_calls[0].function.name is a number, "
                                                        "not a string")


SECOND_FINISH = {
    # a layer that ends every stream with its own stop after the real reason (RayBytes/ChatMock#114)
    "tool_calls then stop": (chunk({"role": "assistant", "content": "Let me look."}),
                             chunk({"tool_calls": [{"index": 0, "id": "call_s1", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": "{}"}}]}),
                             chunk({}, finish="tool_calls"), chunk({}, finish="stop")),
    "length then stop": (chunk({"role": "assistant", "content": "cut sh"}), chunk({}, finish="length"),
                         chunk({}, finish="stop", usage=USAGE)),
}


@pytest.mark.parametrize("name", SECOND_FINISH)
def test_a_second_finish_reason_replaces_the_first(forced_app, upstream, serve, name):
    # SPEC: the upstream's last explicit value, what the openai SDK's accumulator gives for the same stream (and
    # what the bridges end with: fold/base.kept_finish is every reader's rule)
    events = sse(*SECOND_FINISH[name])
    upstream.handler = lambda rec: Reply(events=events)
    result = sdk(serve(forced_app)).chat.completions.create(model="m", messages=CHAT["messages"])
    assert result.choices[0].finish_reason == name.split()[-1]
