"""The core proxy through its HTTP surface: relay, auth, routing and every error row."""
from __future__ import annotations

import json
import socket

import pytest
import requests

from tests.conftest import AUTH, CHAT, CLIENT_KEY, PROVIDER_KEY, make_app, provider, settings_doc
from tests.upstream import Reply, completion, free_port, sse, text_chunks


def error_of(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_json_answer_is_relayed_byte_for_byte(client, upstream):
    odd = b'{ "id":"x",  "object":"chat.completion", "choices":[], "extra": 1.50 }'
    upstream.handler = lambda rec: Reply(body=odd)
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    assert response.data == odd


def test_upstream_gets_its_model_id_and_provider_key_but_not_client_credentials(upstream):
    app = make_app(settings_doc(provider(upstream, headers={"X-Team": "ml"})))
    response = app.test_client().post(
        "/v1/chat/completions", json=dict(CHAT, temperature=0.2),
        headers={**AUTH, "Cookie": "session=abc", "Connection": "keep-alive", "X-Custom": "kept",
                 "X-Request-Id": "req-42"})
    assert response.status_code == 200
    rec = upstream.requests[0]
    assert rec.path == "/v1/chat/completions"
    assert rec.body == {"model": "upstream-model", "messages": CHAT["messages"], "temperature": 0.2}
    assert rec.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert CLIENT_KEY not in json.dumps(rec.headers)
    assert "cookie" not in rec.headers
    assert rec.headers["x-team"] == "ml"
    assert rec.headers["x-custom"] == "kept"
    assert rec.headers["x-request-id"] == "req-42"
    assert response.headers["X-Request-Id"] == "req-42"


def test_request_id_is_generated_when_absent(client):
    response = client.get("/healthz")
    assert len(response.headers["X-Request-Id"]) >= 16


def test_x_api_key_header_authenticates(client):
    response = client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": CLIENT_KEY})
    assert response.status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                                     {"Authorization": CLIENT_KEY}])
def test_missing_or_wrong_client_key_is_401(client, upstream, headers):
    response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 401
    err = error_of(response)
    assert err["code"] == "invalid_api_key"
    assert "wrong" not in err["message"]
    assert upstream.requests == []


def test_open_proxy_without_api_keys(upstream):
    app = make_app(settings_doc(provider(upstream), **{"api-keys": []}))
    assert app.test_client().post("/v1/chat/completions", json=CHAT).status_code == 200


def test_healthz_needs_no_key(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_models_lists_what_clients_may_ask_for(upstream):
    other = provider(upstream, name="other", prefix="team",
                     models=[{"name": "llama-3"}, {"name": "qwen-72b", "alias": "qwen"}])
    off = provider(upstream, name="off", disabled=True, models=[{"name": "hidden"}])
    app = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}), other, off))
    body = app.test_client().get("/v1/models", headers=AUTH).get_json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["m", "team/llama-3", "team/qwen"]
    assert body["data"][0]["force_upstream_stream"] is True
    assert all(m["object"] == "model" for m in body["data"])


def test_models_needs_a_key(client):
    assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize("asked", ["m", "upstream-model", "up/upstream-model", "up/m"])
def test_alias_name_and_provider_forms_route_to_the_upstream_id(client, upstream, asked):
    response = client.post("/v1/chat/completions", json=dict(CHAT, model=asked), headers=AUTH)
    assert response.status_code == 200
    assert upstream.requests[-1].body["model"] == "upstream-model"


def test_prefixed_provider_is_reached_only_with_its_prefix(upstream):
    app = make_app(settings_doc(provider(upstream, prefix="lab")))
    client = app.test_client()
    assert client.post("/v1/chat/completions", json=dict(CHAT, model="lab/m"), headers=AUTH).status_code == 200
    assert client.post("/v1/chat/completions", json=dict(CHAT, model="m"), headers=AUTH).status_code == 404


def test_one_alias_on_two_providers_goes_round_robin(upstream):
    app = make_app(settings_doc(provider(upstream, name="a"),
                                provider(upstream, name="b", **{"api-key-entries": [{"api-key": "sk-b-key-0000"}]}),
                                fleet={"balance": "round-robin"}))
    client = app.test_client()
    for _ in range(4):
        assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    keys = [rec.key for rec in upstream.requests]
    assert keys == [PROVIDER_KEY, "sk-b-key-0000", PROVIDER_KEY, "sk-b-key-0000"]


def test_listing_models_and_counting_tokens_take_no_round_robin_turn(upstream):
    # Claude Code and Gemini CLI count tokens between turns: each count took a turn, so every turn of theirs
    # went to the same replica of a set of two
    app = make_app(settings_doc(provider(upstream, name="a"),
                                provider(upstream, name="b", **{"api-key-entries": [{"api-key": "sk-b-key-0000"}]}),
                                fleet={"balance": "round-robin"}))
    client = app.test_client()
    gemini = {"x-goog-api-key": CLIENT_KEY}
    for turn in range(4):
        assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        assert client.get("/v1beta/models", headers=gemini).get_json()["models"][0]["name"] == "models/m"
        assert client.get("/v1beta/models/m", headers=gemini).status_code == 200
        assert client.get("/v1/models/m", headers=gemini).status_code == 200
        assert client.get("/v1/models", headers=AUTH).status_code == 200
        if turn % 2:  # one count between two turns (two would hide a turn each takes)
            counted = client.post("/v1/messages/count_tokens", headers=AUTH, json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}]})
        else:
            counted = client.post("/v1beta/models/m:countTokens", headers=gemini, json={
                "contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        assert counted.status_code == 200
    keys = [rec.key for rec in upstream.requests]
    assert keys == [PROVIDER_KEY, "sk-b-key-0000", PROVIDER_KEY, "sk-b-key-0000"]


def test_unknown_model_is_404_and_names_no_keys(client, upstream):
    response = client.post("/v1/chat/completions", json=dict(CHAT, model="gpt-9"), headers=AUTH)
    assert response.status_code == 404
    err = error_of(response)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    assert PROVIDER_KEY not in err["message"] and CLIENT_KEY not in err["message"]
    assert upstream.requests == []


def test_disabled_provider_routes_nothing(upstream):
    app = make_app(settings_doc(provider(upstream, disabled=True)))
    assert app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 404


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"", None),
    (b"[1, 2]", None),
    (b'"just a string"', None),
    (json.dumps({"messages": CHAT["messages"]}).encode(), "model"),
    (json.dumps(dict(CHAT, model=42)).encode(), "model"),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (json.dumps(dict(CHAT, messages="hi")).encode(), "messages"),
    (json.dumps(dict(CHAT, stream="yes")).encode(), "stream"),
    (b"\xff\xfe garbage", None),
])
def test_bad_request_bodies_are_400(client, upstream, body, param):
    response = client.post("/v1/chat/completions", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    err = error_of(response)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert upstream.requests == []
    # the worker is still healthy
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200


def test_body_over_max_request_bytes_is_413(upstream):
    app = make_app(settings_doc(provider(upstream), **{"max-request-bytes": 1000}))
    big = dict(CHAT, messages=[{"role": "user", "content": "x" * 2000}])
    response = app.test_client().post("/v1/chat/completions", json=big, headers=AUTH)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert upstream.requests == []


def test_unknown_route_is_404_json(client):
    response = client.get("/v1/nothing-here", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["type"] == "invalid_request_error"


def test_wrong_method_is_405_json(client):
    response = client.get("/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    error_of(response)


MANAGED = {"remote-management": {"secret-key": "mgmt-secret-core-42"}}
ODD_PATHS = ["/v1//models", "//v1/models", "/v0//management/config", "/v0/management//openai-compatibility",
             "/v1/models/", "/v1/messages//count_tokens", "/static/manage.js", "/static/../x", "/nothing"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PROPFIND"])
def test_every_answer_for_odd_paths_and_methods_is_json_never_a_redirect(upstream, serve, method):
    # Issue 21, newcomer friction: /v1//models and /v0//management/... were 308 text/html redirects.
    live = serve(make_app(settings_doc(provider(upstream), **MANAGED)))
    for path in ODD_PATHS + ["/v1/models", "/v1/chat/completions", "/v0/management/config", "/healthz"]:
        response = requests.request(method, live.url + path, headers=AUTH, timeout=10, allow_redirects=False)
        assert response.status_code < 300 or response.status_code >= 400, (method, path, response.status_code)
        assert response.headers["Content-Type"] == "application/json", (method, path, response.text[:100])
        response.json()
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200


def test_a_doubled_slash_is_a_404_that_names_the_path_meant_in_the_routes_shape(upstream, serve):
    live = serve(make_app(settings_doc(provider(upstream), **MANAGED)))
    models = requests.get(live.url + "/v1//models", headers=AUTH, timeout=10)
    assert models.status_code == 404 and "Did you mean /v1/models?" in models.json()["error"]["message"]
    messages = requests.post(live.url + "/v1//messages", headers=AUTH, json={}, timeout=10)
    assert messages.status_code == 404 and messages.json()["type"] == "error"
    assert "Did you mean /v1/messages?" in messages.json()["error"]["message"]


@pytest.mark.parametrize("request_line, status", [
    (b"POST /v1/messages HTTP/9.9\r\n\r\n", 505),
    (b"POST /v1/messages?" + b"q" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /v1/messages/count_tokens HTTP/1.1 extra\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/9.9\r\n\r\n", 505),
])
def test_the_development_servers_own_errors_are_json_in_the_routes_shape(live, request_line, status):
    # python app.py: werkzeug answered these with an HTML page.
    with socket.create_connection(("127.0.0.1", live.server.server_port), timeout=10) as sock:
        sock.sendall(request_line)
        answer = b""
        while more := sock.recv(65536):
            answer += more
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode() and b"Content-Type: application/json" in head
    error = json.loads(body)
    if b"/v1/messages" in request_line:
        assert error["type"] == "error" and error["error"]["message"]
    else:
        assert error["error"]["message"] and error["error"]["code"]
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200


def test_options_lists_the_allowed_methods_as_json(client):
    response = client.options("/v1/chat/completions")
    assert response.status_code == 200 and response.json == {"allow": ["OPTIONS", "POST"]}
    assert response.headers["Allow"] == "OPTIONS, POST"


def test_upstream_connect_failure_is_502(upstream):
    app = make_app(settings_doc(provider(f"http://127.0.0.1:{free_port()}/v1")))
    response = app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 502
    assert error_of(response)["type"] == "upstream_error"


def test_unreachable_upstream_names_provider_host_and_setting_to_client_and_log_never_credentials(serve, caplog):
    # Issue 21, newcomer friction: the message was "could not connect to upstream 'up': NewConnectionError";
    # its acceptance: connection errors name the provider and the host (and the setting to fix).
    port = free_port()
    live = serve(make_app(settings_doc(provider(f"http://admin:hunter2@127.0.0.1:{port}/v1", name="local"),
                                       **{"request-retry": 0})))
    expected = f"could not connect to provider 'local' at 127.0.0.1:{port} (base-url): connection refused"
    chat = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert chat.status_code == 502 and chat.json()["error"]["message"] == expected
    messages = requests.post(live.url + "/v1/messages", headers=AUTH, timeout=10, json={
        "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 529 and messages.json()["error"]["message"] == expected
    gemini = requests.post(live.url + "/v1beta/models/m:generateContent", headers=AUTH, timeout=10,
                           json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert gemini.status_code == 503 and gemini.json()["error"]["message"] == expected
    answers = chat.text + messages.text + gemini.text
    assert "hunter2" not in answers and "admin" not in answers
    logged = [r.getMessage() for r in caplog.records if r.name == "proxy.executor"]
    assert len(logged) == 3 and all(line.endswith(f"attempt=1 {expected}") for line in logged)


def test_upstream_timeout_is_504_naming_the_provider_its_host_and_the_setting(upstream, caplog):
    upstream.handler = lambda rec: Reply(hang=5)
    app = make_app(settings_doc(provider(upstream), timeouts={"connect": 1, "read": 0.3}, **{"request-retry": 0}))
    response = app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 504
    assert error_of(response)["code"] == "upstream_timeout"
    expected = f"provider 'up' at 127.0.0.1:{upstream.port} (base-url) sent no answer within timeouts.read (0.3 s)"
    assert error_of(response)["message"] == expected
    assert [r.getMessage().split(" ", 2)[2] for r in caplog.records if r.name == "proxy.executor"] == [expected]


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_upstream_client_errors_pass_through_at_once(client, upstream, status):
    body = json.dumps({"error": {"message": "bad thing", "type": "invalid_request_error",
                                 "param": None, "code": None}}).encode()
    upstream.handler = lambda rec: Reply(status=status, body=body)
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == status
    assert response.data == body
    assert len(upstream.requests) == 1


def test_upstream_5xx_passes_through_with_its_body(client, upstream):
    body = b'{"error": {"message": "engine overloaded", "type": "server_error", "param": null, "code": null}}'
    upstream.handler = lambda rec: Reply(status=503, body=body)
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 503
    assert response.data == body


def test_upstream_html_error_page_becomes_openai_error(client, upstream):
    upstream.handler = lambda rec: Reply(status=500, body=b"<html>oops</html>", content_type="text/html")
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 500
    assert "oops" in error_of(response)["message"]


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_refusing_the_provider_key_is_502_naming_the_provider(client, upstream, status):
    upstream.handler = lambda rec: Reply(status=status, body=b'{"error": {"message": "bad key"}}')
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 502
    err = error_of(response)
    assert "'up'" in err["message"] and PROVIDER_KEY not in err["message"]


def test_stream_request_is_relayed_with_sse_headers(client, upstream):
    events = sse(*text_chunks(["Hel", "lo"]))
    upstream.handler = lambda rec: Reply(events=events)
    response = client.post("/v1/chat/completions", json=dict(CHAT, stream=True), headers=AUTH)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.data == b"".join(events)
    assert upstream.requests[0].body["stream"] is True


def test_log_line_has_route_model_provider_status_and_no_content(client, upstream, caplog):
    secret_text = "my private message 12345"
    client.post("/v1/chat/completions", json=dict(CHAT, messages=[{"role": "user", "content": secret_text}]),
                headers=AUTH)
    lines = [r.getMessage() for r in caplog.records if r.name == "streamfold.access"]
    assert len(lines) == 1
    line = lines[0]
    for part in ("route=/v1/chat/completions", "model=m", "provider=up", "status=200", "forced_stream=no"):
        assert part in line
    assert secret_text not in "\n".join(r.getMessage() for r in caplog.records)


def test_upstream_answer_json_via_completion_helper(client, upstream):
    upstream.handler = lambda rec: Reply(body=json.dumps(completion("hey")).encode())
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).get_json()["choices"][0][
        "message"]["content"] == "hey"


def test_client_strings_cannot_forge_log_lines(client, caplog):
    forged = "m\nrequest_id=fake route=/admin status=200"
    response = client.post("/v1/chat/completions", json=dict(CHAT, model=forged), headers=AUTH)
    assert response.status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "streamfold.access"]
    assert len(lines) == 1 and "\n" not in lines[0]
    huge_id = "r" * 5000
    response = client.get("/healthz", headers={"X-Request-Id": huge_id})
    assert response.headers["X-Request-Id"] != huge_id and len(response.headers["X-Request-Id"]) <= 128


def test_glob_alias_routes_after_exact_names(upstream):
    upstream.handler = lambda rec: Reply(body=json.dumps(completion(model=rec.body["model"])).encode())
    doc = settings_doc(provider(upstream, models=[{"name": "small", "alias": "claude-*haiku*"},
                                                  {"name": "big", "alias": "claude-*"},
                                                  {"name": "exact", "alias": "claude-special"}]))
    client = make_app(doc).test_client()
    for asked, routed in (("claude-3-5-haiku-20241022", "small"), ("claude-sonnet-4-5", "big"),
                          ("claude-special", "exact")):
        response = client.post("/v1/chat/completions", headers=AUTH, json={**CHAT, "model": asked})
        assert response.status_code == 200 and upstream.requests[-1].body["model"] == routed
    assert client.post("/v1/chat/completions", headers=AUTH, json={**CHAT, "model": "gpt-4"}).status_code == 404
    listed = [m["id"] for m in client.get("/v1/models", headers=AUTH).get_json()["data"]]
    assert "small" in listed and "big" in listed and not any("*" in m for m in listed)


def test_a_body_nested_deeper_than_can_be_forwarded_is_a_400_and_the_upstream_never_sees_it(client, upstream):
    deep = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {}}
    node = deep["metadata"]
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    response = client.post("/v1/chat/completions", headers=AUTH, json=deep)
    assert response.status_code == 400 and "nests JSON too deeply" in response.get_json()["error"]["message"]
    assert upstream.requests == []
    assert client.post("/v1/chat/completions", headers=AUTH, json=CHAT).status_code == 200
