"""``native-apis: [gemini]``: a provider speaking the Gemini API itself gets the request as the client sent it, at
``<base-url>/models/<its model>:<method>``, with its key as ``x-goog-api-key`` only, and its answers (JSON, the
stream, its errors) come back as they are."""
from __future__ import annotations

import json

import requests

from tests.conftest import CLIENT_KEY, PROVIDER_KEY, make_app, provider, settings_doc
from tests.gemini_invariants import check_stream
from tests.test_usage import MGMT, wait_for_usage
from tests.upstream import Reply, completion

KEY = {"x-goog-api-key": CLIENT_KEY}
BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generation_config": {"max_output_tokens": 64}, "safetySettings": [], "cachedContent_unknown": 1}
ANSWER = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi from Gemini"}]},
                          "finishReason": "STOP", "index": 0}],
          "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
          "modelVersion": "gemini-2.5-flash", "responseId": "upstream-1"}


def native_client(upstream):
    models = [{"name": "gemini-2.5-flash", "alias": "gem"}]
    return make_app(settings_doc(provider(upstream, models=models, **{"native-apis": ["gemini"]}),
                                 **{"request-retry": 0})).test_client()


def test_generate_content_passes_through_with_the_key_as_x_goog_api_key_only(upstream):
    upstream.handler = lambda rec: Reply(body=json.dumps(ANSWER).encode())
    response = native_client(upstream).post("/v1beta/models/gem:generateContent", json=BODY, headers=KEY)
    assert response.status_code == 200 and response.get_json() == ANSWER
    (sent,) = upstream.requests
    assert sent.path == "/v1/models/gemini-2.5-flash:generateContent"
    assert sent.body == BODY  # as the client sent it: its spellings, fields the bridge would not know
    assert sent.headers["x-goog-api-key"] == PROVIDER_KEY and "authorization" not in sent.headers
    assert CLIENT_KEY not in json.dumps(sent.headers)


def test_stream_passes_through_byte_for_byte_in_the_clients_framing(upstream):
    events = [b"data: " + json.dumps(ANSWER).encode() + b"\r\n\r\n"]
    upstream.handler = lambda rec: Reply(events=events, content_type="text/event-stream")
    response = native_client(upstream).post("/v1beta/models/gem:streamGenerateContent?alt=sse&key=" + CLIENT_KEY,
                                            json=BODY)
    assert response.status_code == 200 and response.data == b"".join(events)
    check_stream(response.data)
    assert upstream.requests[-1].path == "/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert CLIENT_KEY not in upstream.requests[-1].path


def test_native_errors_come_back_as_the_provider_said_and_a_wrong_shape_is_a_502(upstream):
    client = native_client(upstream)
    error = {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}
    upstream.handler = lambda rec: Reply(status=400, body=json.dumps(error).encode())
    response = client.post("/v1beta/models/gem:generateContent", json=BODY, headers=KEY)
    assert response.status_code == 400 and response.get_json() == error
    upstream.handler = lambda rec: Reply(body=b'{"choices": []}')
    response = client.post("/v1beta/models/gem:generateContent", json=BODY, headers=KEY)
    assert response.status_code == 502 and response.get_json()["error"]["status"] == "UNAVAILABLE"


def test_usage_is_counted_translated_and_native_json_and_stream(upstream, serve):
    """Translated answers count the chat upstream's usage; native ones their usageMetadata (thoughts are
    reasoning tokens, counted in the completion), streams included."""
    chat = [{"name": "qwen3", "alias": "chat-gem"}]
    native = [{"name": "gemini-2.5-flash", "alias": "gem"}]
    doc = settings_doc(provider(upstream, name="chat", models=chat),
                       provider(upstream, name="native", models=native, **{"native-apis": ["gemini"]}),
                       **{"remote-management": {"secret-key": MGMT["Authorization"][7:]}, "request-retry": 0})
    live = serve(make_app(doc))
    usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    metadata = {"promptTokenCount": 3, "candidatesTokenCount": 4, "thoughtsTokenCount": 2, "totalTokenCount": 9}

    def answer(rec):
        if rec.path.endswith("/chat/completions"):
            if rec.body.get("stream"):
                return Reply(events=[b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}'
                                     b"\n\n", b'data: {"choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n",
                                     b"data: [DONE]\n\n"])
            return Reply(body=json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                                       "finish_reason": "stop"}], "usage": usage}).encode())
        record = dict(ANSWER, usageMetadata=metadata)
        if "alt=sse" in rec.path:
            first = dict(ANSWER, usageMetadata=None)
            return Reply(events=[b"data: " + json.dumps(first).encode() + b"\r\n\r\n",
                                 b"data: " + json.dumps(record).encode() + b"\r\n\r\n"],
                         content_type="text/event-stream")
        return Reply(body=json.dumps(record).encode())

    upstream.handler = answer
    for model in ("chat-gem", "gem"):
        for method in ("generateContent", "streamGenerateContent?alt=sse"):
            response = requests.post(f"{live.url}/v1beta/models/{model}:{method}", headers=KEY, json=BODY, timeout=10)
            assert response.status_code == 200, response.text
    rows = wait_for_usage(live.url, 4, **{"group-by": "provider"})["data"]
    tokens = {row["provider"]: (row["requests"], row["prompt_tokens"], row["completion_tokens"],
                                row["reasoning_tokens"]) for row in rows}
    assert tokens == {"chat": (2, 22, 10, 0), "native": (2, 6, 12, 4)}


def test_a_native_stream_that_is_not_in_the_framing_asked_is_a_502_before_the_200(upstream):
    """A provider listed as ``native-apis: [gemini]`` that answers a stream with a chat completion, an HTML page
    or SSE to a JSON-array request: a Gemini 502 (``google-genai`` read the chat completion as an empty answer, a
    clean finish); a real Gemini stream in either framing still passes."""
    client = native_client(upstream)
    record = json.dumps(ANSWER).encode()
    for method, reply in (
            ("streamGenerateContent?alt=sse", Reply(body=json.dumps(completion()).encode())),
            ("streamGenerateContent?alt=sse", Reply(body=b"<html>not here</html>", content_type="text/html")),
            ("streamGenerateContent", Reply(events=[b"data: " + record + b"\r\n\r\n"],
                                            content_type="text/event-stream"))):
        upstream.handler = lambda rec, reply=reply: reply
        response = client.post(f"/v1beta/models/gem:{method}", json=BODY, headers=KEY)
        assert response.status_code == 502, (method, response.data[:200])
        assert response.get_json()["error"]["status"] == "UNAVAILABLE"
    for method, reply in (("streamGenerateContent?alt=sse", Reply(events=[b"data: " + record + b"\r\n\r\n"],
                                                                  content_type="text/event-stream")),
                          ("streamGenerateContent", Reply(body=b"[" + record + b"]"))):
        upstream.handler = lambda rec, reply=reply: reply
        response = client.post(f"/v1beta/models/gem:{method}", json=BODY, headers=KEY)
        assert response.status_code == 200 and response.data == (reply.body or b"".join(reply.events)), method


def test_a_native_stream_whose_usage_nests_too_deep_to_read_is_still_relayed_whole(upstream):
    """The relay's usage reader must not raise for what the provider sent: a usageMetadata nested past Python's
    recursion limit stopped the relay mid-stream (RecursionError; the client got a cut stream); now it is
    relayed byte for byte."""
    record = b"data: " + json.dumps(ANSWER).encode() + b"\r\n\r\n"
    deep = b'data: {"usageMetadata":' + b'{"a":' * 5000 + b"1" + b"}" * 5001 + b"\r\n\r\n"
    events = [record, deep, record]
    upstream.handler = lambda rec: Reply(events=events, content_type="text/event-stream")
    response = native_client(upstream).post("/v1beta/models/gem:streamGenerateContent?alt=sse", json=BODY,
                                            headers=KEY)
    assert response.status_code == 200 and response.data == b"".join(events)
