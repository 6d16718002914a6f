"""The Gemini routes' errors: Gemini-shaped ``{"error": {"code", "message", "status"}}``, bad input a 4xx naming
the field and never a 500, the worker healthy after (issue 24, acceptance 4); the client key taken from
``x-goog-api-key`` or ``?key=``, never logged, never sent upstream, never in an error."""
from __future__ import annotations

import http.client
import json
import logging

import pytest
import requests

from tests.conftest import CLIENT_KEY, make_app, provider, settings_doc
from tests.gemini_invariants import check_stream
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import FakeUpstream, Reply, completion, sse, text_chunks

KEY = {"x-goog-api-key": CLIENT_KEY}
GENERATE = "/v1beta/models/m:generateContent"
BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json()
    assert list(body) == ["error"] and set(body["error"]) == {"code", "message", "status"}, body
    assert body["error"]["code"] == status and body["error"]["status"].isupper()
    assert CLIENT_KEY not in body["error"]["message"]
    return body["error"]


def healthy(client, upstream) -> None:
    """The worker still answers a good request after the bad one."""
    upstream.handler = lambda rec: Reply(body=json.dumps(completion()).encode())
    response = client.post(GENERATE, json=BODY, headers=KEY)
    assert response.status_code == 200, response.data
    assert response.get_json()["candidates"][0]["content"]["parts"] == [{"text": "Hello!"}]


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "JSON"),
    (b"[1, 2]", "object"),
    ({}, "contents"),
    ({"contents": []}, "contents"),
    ({"contents": "hi"}, "contents"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]}, "contents[0].role"),
    ({"contents": [{"role": 7, "parts": [{"text": "hi"}]}]}, "contents[0].role"),
    ({"contents": [{"role": "user"}]}, "contents[0].parts"),
    ({"contents": [{"role": "user", "parts": [{"text": ["a"]}]}]}, "contents[0].parts[0].text"),
    ({"contents": [{"role": "user", "parts": [{"hologram": {}}]}]}, "contents[0].parts[0]"),
    ({"contents": [{"role": "user", "parts": ["hi"]}]}, "contents[0].parts[0]"),
    ({"contents": [{"parts": [{"functionCall": {"name": 5}}]}]}, "functionCall.name"),
    ({"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": 1}}]}]}, "inlineData.data"),
    ({**BODY, "systemInstruction": {"parts": "be brief"}}, "systemInstruction.parts"),
    ({**BODY, "tools": {"functionDeclarations": []}}, "tools"),
    ({**BODY, "tools": [{"functionDeclarations": [{"name": "f", "parameters": "{}"}]}]}, "parameters"),
    ({**BODY, "toolConfig": {"functionCallingConfig": {"mode": "ALWAYS"}}}, "mode"),
    ({**BODY, "generationConfig": {"temperature": "warm"}}, "temperature"),
    ({**BODY, "generationConfig": {"maxOutputTokens": 1.5}}, "maxOutputTokens"),
    ({**BODY, "generationConfig": {"candidateCount": 3}}, "candidateCount"),
    ({**BODY, "generationConfig": {"thinkingConfig": {"thinkingBudget": "lots"}}}, "thinkingBudget"),
    ({**BODY, "generationConfig": {"stopSequences": "END"}}, "stopSequences"),
], ids=lambda value: None)
@pytest.mark.parametrize("method", ["generateContent", "streamGenerateContent", "countTokens"])
def test_bad_input_is_a_gemini_400_naming_the_field_and_the_worker_stays_healthy(client, upstream, body, needle,
                                                                                method):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(f"/v1beta/models/m:{method}?alt=sse", data=raw,
                           headers={**KEY, "Content-Type": "application/json"})
    error = error_of(response, 400)
    assert error["status"] == "INVALID_ARGUMENT" and needle in error["message"]
    assert upstream.requests == []
    healthy(client, upstream)


def test_json_nested_too_deep_to_forward_is_a_400_not_a_500(client, upstream):
    deep: dict = {}
    node = deep
    for _ in range(400):  # orjson reads 1024 levels but writes 255
        node["a"] = node = {}
    for part, where in (({"functionCall": {"name": "f", "args": deep}}, "functionCall.args"),
                        ({"functionResponse": {"name": "f", "response": deep}}, "functionResponse.response")):
        body = {"contents": [{"role": "model" if "functionCall" in part else "user", "parts": [part]},
                             {"role": "user", "parts": [{"text": "x"}]}]}
        for method in ("generateContent", "streamGenerateContent", "countTokens"):
            error = error_of(client.post(f"/v1beta/models/m:{method}", json=body, headers=KEY), 400)
            assert error["status"] == "INVALID_ARGUMENT" and where in error["message"]
    assert upstream.requests == []
    healthy(client, upstream)


def test_huge_body_is_a_gemini_413(upstream):
    client = make_app(settings_doc(provider(upstream), **{"max-request-bytes": 1000})).test_client()
    body = {"contents": [{"parts": [{"text": "x" * 5000}]}]}
    for method in ("generateContent", "streamGenerateContent", "countTokens"):
        assert error_of(client.post(f"/v1beta/models/m:{method}", json=body, headers=KEY), 413)["status"]
    healthy(client, upstream)


def test_bad_keys_are_401_unauthenticated_and_never_reach_the_upstream(client, upstream):
    for headers, query in (({"x-goog-api-key": "sk-wrong"}, ""), ({}, ""), ({}, "?key=sk-wrong"),
                           ({"Authorization": "Bearer nope"}, "")):
        for path in (GENERATE, "/v1beta/models/m:streamGenerateContent", "/v1beta/models/m:countTokens"):
            error = error_of(client.post(path + query, json=BODY, headers=headers), 401)
            assert error["status"] == "UNAUTHENTICATED"
        assert error_of(client.get("/v1beta/models" + query, headers=headers), 401)["status"] == "UNAUTHENTICATED"
    assert upstream.requests == []
    healthy(client, upstream)


def test_key_in_the_query_or_header_is_accepted_never_sent_upstream_nor_logged(upstream, serve, caplog):
    """werkzeug's own request log (``python app.py``) shows the path: the query's key is redacted there (the
    autouse fixture fails any test whose log holds the client key)."""
    live = serve(make_app(settings_doc(provider(upstream))))
    caplog.set_level(logging.INFO, logger="werkzeug")
    for params, headers in (({"key": CLIENT_KEY}, {}), ({}, KEY), ({"alt": "sse", "key": CLIENT_KEY}, {})):
        response = requests.post(live.url + GENERATE, params=params, headers=headers, json=BODY, timeout=10)
        assert response.status_code == 200, response.text
    sent = upstream.requests[-1]
    assert CLIENT_KEY not in json.dumps(sent.headers) and CLIENT_KEY not in sent.path
    assert "x-goog-api-key" not in sent.headers
    assert any("[redacted]" in r.getMessage() for r in caplog.records if r.name == "werkzeug")


def test_a_query_key_with_a_percent_encoded_name_is_redacted_from_the_dev_servers_log_too(upstream, serve, caplog):
    """werkzeug reads ``?k%65y=`` as ``key`` (so it authenticates) and logs the path decoded: the redaction must
    see the name as werkzeug does, or the key is in the log in clear (the autouse fixture fails the test then)."""
    live = serve(make_app(settings_doc(provider(upstream))))
    caplog.set_level(logging.INFO, logger="werkzeug")
    for name in ("k%65y", "%6B%65%79", "%6bey"):
        connection = http.client.HTTPConnection("127.0.0.1", int(live.url.rsplit(":", 1)[1]), timeout=10)
        connection.request("POST", f"{GENERATE}?alt=sse&{name}={CLIENT_KEY}", json.dumps(BODY).encode(),
                           {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        connection.close()
    assert sum("[redacted]" in r.getMessage() for r in caplog.records if r.name == "werkzeug") == 3


def test_unknown_model_is_404_not_found(client):
    error = error_of(client.post("/v1beta/models/nope:generateContent", json=BODY, headers=KEY), 404)
    assert error["status"] == "NOT_FOUND" and "nope" in error["message"]
    error = error_of(client.get("/v1beta/models/nope", headers=KEY), 404)
    assert error["status"] == "NOT_FOUND"


def test_unknown_method_path_and_wrong_http_method_are_gemini_shaped(client):
    assert error_of(client.post("/v1beta/models/m:embedContent", json=BODY, headers=KEY), 404)["status"] == "NOT_FOUND"
    assert error_of(client.post("/v1beta/cachedContents", json=BODY, headers=KEY), 404)["status"] == "NOT_FOUND"
    error_of(client.delete("/v1beta/models/m", headers=KEY), 405)


@pytest.mark.parametrize(("status", "message", "expected", "name"), [
    (400, "This model's maximum context length is 8192 tokens.", 400, "INVALID_ARGUMENT"),
    (400, "bad temperature", 400, "INVALID_ARGUMENT"),
    (429, "slow down", 429, "RESOURCE_EXHAUSTED"),
    (503, "overloaded", 503, "UNAVAILABLE"),
    (500, "boom", 500, "INTERNAL"),
    (401, "bad provider key", 403, "PERMISSION_DENIED"),
])
def test_upstream_errors_become_gemini_errors(upstream, status, message, expected, name):
    client = make_app(settings_doc(provider(upstream), **{"request-retry": 0})).test_client()
    upstream.handler = lambda rec: Reply(status=status, body=json.dumps({"error": {"message": message}}).encode())
    error = error_of(client.post(GENERATE, json=BODY, headers=KEY), expected)
    assert error["status"] == name
    if expected != 403:
        assert message in error["message"]


def test_connection_refused_is_503_unavailable():
    from tests.upstream import free_port

    client = make_app(settings_doc(provider(f"http://127.0.0.1:{free_port()}/v1"), **{"request-retry": 0})
                      ).test_client()
    assert error_of(client.post(GENERATE, json=BODY, headers=KEY), 503)["status"] == "UNAVAILABLE"


def test_stream_errors_before_the_first_event_are_ordinary_errors(client, upstream):
    upstream.handler = lambda rec: Reply(status=429, headers={"Retry-After": "1"},
                                         body=b'{"error":{"message":"slow"}}')
    response = client.post("/v1beta/models/m:streamGenerateContent?alt=sse", json=BODY, headers=KEY)
    assert error_of(response, 429)["status"] == "RESOURCE_EXHAUSTED"


def test_upstream_answer_that_is_not_a_chat_completion_is_a_gemini_502(client, upstream):
    upstream.handler = lambda rec: Reply(body=b'{"hello": "world"}')
    error_of(client.post(GENERATE, json=BODY, headers=KEY), 502)


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory):
    upstream = FakeUpstream()
    doc = settings_doc(provider(upstream), **{"request-retry": 0, "max-request-bytes": 200_000})
    server = Gunicorn(write_settings(tmp_path_factory.mktemp("gemini-errors") / "settings.yaml", doc), workers=2)
    yield server, upstream
    server.stop()
    upstream.stop()


def test_under_gunicorn_bad_input_huge_bodies_and_bad_keys_then_a_good_stream(gunicorn):
    server, upstream = gunicorn
    url = server.url + GENERATE
    for data, headers, status in (
            (b'{"contents": [{"role": "robot", "parts": [{"text": "x"}]}]}', KEY, 400),
            (b"\xff\xfe not json", KEY, 400),
            (json.dumps({"contents": [{"parts": [{"text": "x" * 300_000}]}]}).encode(), KEY, 413),
            (json.dumps(BODY).encode(), {"x-goog-api-key": "sk-wrong"}, 401)):
        response = requests.post(url, data=data, headers={**headers, "Content-Type": "application/json"}, timeout=10)
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body["error"]) == {"code", "message", "status"} and body["error"]["code"] == status
    for _ in range(4):  # both workers still answer, a stream included
        upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["Hi", " there"])))
        response = requests.post(server.url + "/v1beta/models/m:streamGenerateContent?alt=sse",
                                 params={"key": CLIENT_KEY}, json=BODY, timeout=10)
        assert response.status_code == 200 and check_stream(response.content).text == "Hi there"
    assert CLIENT_KEY.encode() not in server.log_path.read_bytes()


def test_an_openai_client_asking_get_v1_models_id_gets_the_openai_shape(client):
    """``GET /v1/models/{id}`` is Gemini's only for a Gemini client (its key as x-goog-api-key or ?key=): the OpenAI
    SDK's ``models.retrieve`` (a bearer key) gets the OpenAI 404 it got before the Gemini routes existed."""
    for name in ("m", "nope"):
        response = client.get(f"/v1/models/{name}", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        assert response.status_code == 404 and response.headers["Content-Type"] == "application/json"
        error = response.get_json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
    assert client.get("/v1/models/m", headers=KEY).get_json()["name"] == "models/m"  # a Gemini client's: Gemini's
