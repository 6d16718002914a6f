"""Issue 12, data half, through HTTP: the proxy under werkzeug, a real misbehaving loopback upstream.

Reload guards, untrusted upstream numbers, wrong-shaped JSON, unforgeable logs
and metric labels, what the fold keeps (against the openai SDK's accumulator),
and management input. The deployment-level claims (a rewrite loop under
gunicorn, worker RSS) are in ``test_hardening_data.py``.
"""
from __future__ import annotations

import email.utils
import json
import logging
import re
import time

import openai
import pytest
import redis
import requests
import yaml
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from proxy import create_app
from proxy.keys import key_id
from tests.conftest import AUTH, CHAT, CLIENT_KEY, PROVIDER_KEY, make_app, provider, settings_doc
from tests.gunicorn_util import write_settings
from tests.redis_util import RedisServer
from tests.test_routes import metric_value
from tests.upstream import Reply, completion, sse, text_chunks

SECRET = "mgmt-secret-value-1212"
MGMT = {"Authorization": f"Bearer {SECRET}"}
HEAD = {"id": "chatcmpl-h1", "object": "chat.completion.chunk", "created": 1764000001, "model": "upstream-model"}
# logfmt: key=bare or key="quoted with \" escapes"
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')
ACCESS_KEYS = ["request_id", "route", "model", "provider", "status", "upstream_ms", "forced_stream", "folded",
               "attempts", "keys", "client", "result"]


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "streamfold.access"]


def fields_of(line: str) -> list[tuple[str, str]]:
    """The line's key=value pairs; the whole line must be made of them (nothing forged between)."""
    pairs = LOGFMT.findall(line)
    assert "".join(f"{k}={v} " for k, v in pairs).strip() == line
    return pairs


def chat(url: str, body: dict | None = None, headers: dict | None = None) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", json=body or CHAT, headers=AUTH if headers is None else headers,
                         timeout=10)


def forced(upstream, serve, **top):
    return serve(make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}), **top)))


# -- requirement 2: a reload never opens or empties the proxy ---------------------------------------------

@pytest.fixture
def from_file(tmp_path, upstream, serve):
    path = write_settings(tmp_path / "settings.yaml", settings_doc(provider(upstream)))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    holder = app.extensions["streamfold"]

    def check() -> None:
        holder.check_file()  # now, not within CHECK_INTERVAL
    return path, serve(app), check


@pytest.mark.parametrize("change, reason", [
    (lambda doc: doc.pop("api-keys"), "would turn client authentication off"),
    (lambda doc: doc.update({"api-keys": []}), "would turn client authentication off"),
    (lambda doc: doc.update({"openai-compatibility": []}), "would remove every provider"),
    (None, "the file is empty"),
])
def test_a_reload_that_would_open_or_empty_the_proxy_is_refused_loudly(from_file, upstream, caplog, change,
                                                                       reason):
    path, live, check = from_file
    doc = yaml.safe_load(path.read_text())
    if change is None:
        path.write_text("")
    else:
        change(doc)
        write_settings(path, doc)
    check()
    assert chat(live.url, headers={}).status_code == 401  # still closed
    assert chat(live.url).status_code == 200              # and still routed
    refused = [r for r in caplog.records if r.levelno == logging.ERROR and reason in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    check()
    chat(live.url)
    assert len([r for r in caplog.records if reason in r.getMessage()]) == 1  # logged once, not per check


def test_an_unreadable_settings_file_is_logged_once_and_its_return_noticed(from_file, caplog):
    path, live, check = from_file
    content = path.read_bytes()
    path.unlink()
    path.mkdir()  # open() fails even for root, unlike a chmod
    for _ in range(3):
        check()
        assert chat(live.url).status_code == 200
    unreadable = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(unreadable) == 1 and unreadable[0].levelno == logging.ERROR
    path.rmdir()
    path.write_bytes(content)
    check()
    assert chat(live.url).status_code == 200
    assert any("readable again" in r.getMessage() for r in caplog.records)


# -- requirement 4: upstream numbers are untrusted ---------------------------------------------------------

FAR = email.utils.formatdate(time.time() + 200 * 365 * 86400, usegmt=True)


@pytest.mark.parametrize("header, cooled", [
    ("inf", 120), ("1e400", 120), ("999999999", 120), (FAR, 120),  # capped by max-cooldown
    ("nan", 30), ("soon", 30),                                      # not numbers: as if absent
    ("-5", 0),                                                      # negative: no cooldown
])
def test_retry_after_from_an_upstream_gives_a_finite_cooldown_capped_by_max_cooldown(upstream, serve, header,
                                                                                     cooled):
    live = serve(make_app(settings_doc(provider(upstream), **{"max-cooldown": 120})))
    upstream.handler = lambda rec: Reply(status=429, body=b'{"error":{"message":"slow down"}}',
                                         headers={"Retry-After": header})
    first = chat(live.url)
    assert first.status_code == 429
    assert 0 <= int(first.headers["Retry-After"]) <= 120
    asked = len(upstream.requests)
    second = chat(live.url)
    assert second.status_code == 429
    if cooled:
        assert second.json()["error"]["type"] == "rate_limit_error"
        assert len(upstream.requests) == asked  # the key sits out; no upstream call
        assert cooled - 5 <= int(second.headers["Retry-After"]) <= cooled
    else:
        assert len(upstream.requests) == asked + 1


def test_a_remote_cooldown_is_capped_and_a_garbage_one_ignored(upstream, tmp_path, serve):
    server = RedisServer()
    try:
        doc = settings_doc(provider(upstream), **{"max-cooldown": 90, "redis-url": server.url})
        live = serve(create_app({"PROXY_SETTINGS": str(write_settings(tmp_path / "s.yaml", doc)), "ENVIRON": {}}))
        assert chat(live.url).status_code == 200
        client = redis.Redis.from_url(server.url)
        ident = key_id(PROVIDER_KEY)
        for message in (b'{"kind": "key", "provider": "up", "key": "%s", "until": "whenever"}' % ident.encode(),
                        b'["not", "an", "object"]',
                        b'{"kind": "key", "provider": "up", "key": "%s", "until": 1e300}' % ident.encode()):
            client.publish("streamfold:events", message)
        deadline = time.monotonic() + 5
        while (answer := chat(live.url)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answer.status_code == 429  # the listener survived the garbage and took the last one
        assert 80 <= int(answer.headers["Retry-After"]) <= 90
    finally:
        server.stop()


HUGE = "9" * 400


def test_a_400_digit_usage_number_breaks_neither_the_answer_nor_the_metrics(upstream, serve):
    live = forced(upstream, serve)
    usage = '{"prompt_tokens": %s, "completion_tokens": 2, "total_tokens": %s}' % (HUGE, HUGE)
    events = sse(*text_chunks(["still", " here"]))[:-1] + [
        b'data: {"id":"chatcmpl-stream1","choices":[],"usage":' + usage.encode() + b"}\n\n", b"data: [DONE]\n\n"]
    upstream.handler = lambda rec: Reply(events=events)
    answer = chat(live.url)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "still here"
    assert answer.json()["usage"] == {"prompt_tokens": None, "completion_tokens": 2, "total_tokens": None}
    relayed = serve(make_app(settings_doc(provider(upstream))))
    body = json.dumps(completion("plain")).replace('"prompt_tokens": 5', f'"prompt_tokens": {HUGE}').encode()
    upstream.handler = lambda rec: Reply(body=body)
    answer = chat(relayed.url)
    assert answer.status_code == 200 and answer.content == body
    for server in (live, relayed):
        metrics = requests.get(server.url + "/metrics", timeout=10)
        assert metrics.status_code == 200 and HUGE not in metrics.text


# -- requirement 5: valid JSON of the wrong shape is a 502 naming the problem -------------------------------

DEEP = b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"


@pytest.mark.parametrize("event, named", [
    (sse(dict(HEAD, choices=[1]), done=False)[0], "choices[0] is a number, not an object"),
    (sse(dict(HEAD, choices=[{"index": 0, "delta": ["a"]}]), done=False)[0], "choices[0].delta is an array"),
    (sse(dict(HEAD, choices=[{"index": {"i": 0}, "delta": {}}]), done=False)[0], "choices[0].index is an object"),
    (sse(dict(HEAD, choices=[{"index": 0, "delta": {"content": 7}}]), done=False)[0],
     "choices[0].delta.content is a number"),
    (sse(dict(HEAD, choices=[{"index": 0, "delta": {"content": ["a"]}}]), done=False)[0], "not a string"),
    (sse(dict(HEAD, choices=[{"index": 0, "delta": {"tool_calls": [{"index": "0"}]}}]), done=False)[0],
     "tool call index is '0'"),
    (DEEP, "nested"),
    (b'data: {"choices": "' + b"[" * 300 + b'"}\n\n', "choices is a string"),
])
def test_valid_json_of_the_wrong_shape_is_a_502_naming_the_problem(upstream, serve, event, named):
    live = forced(upstream, serve)
    upstream.handler = lambda rec: Reply(events=[event, *sse(*text_chunks(["x"]))])
    answer = chat(live.url)
    assert answer.status_code == 502, answer.text[:200]
    error = answer.json()["error"]
    assert named in error["message"] and error["type"] == "upstream_error"
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["healthy"])))
    assert chat(live.url).json()["choices"][0]["message"]["content"] == "healthy"


WRONG_SHAPES = [{"choices": []}, {"choices": [1]}, {"choices": [{}]}, {"choices": [{"message": 5}]},
                {"choices": [{"message": {"content": 5}}]}, {"choices": [{"message": {"tool_calls": 5}}]},
                {"choices": [{"message": {"tool_calls": [5]}}]},
                {"choices": [{"message": {"content": "hi"}, "finish_reason": 7}]}, {"object": "list"}]


@pytest.mark.parametrize("shape", WRONG_SHAPES, ids=lambda s: json.dumps(s)[:40])
@pytest.mark.parametrize("stream", [False, True])
def test_bridges_answer_valid_json_of_the_wrong_shape_with_a_502_naming_it(upstream, serve, shape, stream):
    # Issue 21, finding 10: the non-stream bridges sent an empty 200 (or a 500) for these.
    live = serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"]}))))
    upstream.handler = lambda rec: Reply(body=json.dumps(shape).encode())
    messages = requests.post(live.url + "/v1/messages", headers=AUTH, timeout=10, json={
        "model": "m", "max_tokens": 10, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    responses = requests.post(live.url + "/v1/responses", headers=AUTH, timeout=10,
                              json={"model": "m", "input": "hi", "stream": stream})
    if stream:  # Responses streams commit before the upstream's JSON is read whole: they end in an error event
        assert responses.status_code == 200 and b"not a chat completion" in responses.content
        assert b"response.completed" not in responses.content
    else:
        assert responses.status_code == 502, responses.text[:200]
        assert responses.json()["error"]["code"] == "upstream_bad_answer"
        assert "not a chat completion" in responses.json()["error"]["message"]
    assert messages.status_code == 502, messages.text[:200]
    assert messages.json()["type"] == "error" and "not a chat completion" in messages.json()["error"]["message"]


@pytest.mark.parametrize("shape", [s for s in WRONG_SHAPES if s != {"choices": []}] + [[1], "text", None],
                         ids=lambda s: json.dumps(s)[:40])
def test_the_chat_route_answers_a_relayed_answer_of_the_wrong_shape_with_a_502(upstream, live, shape):
    # Issue 21, finding 10, on every route: a JSON answer relayed byte for byte is checked to be a completion.
    upstream.handler = lambda rec: Reply(body=json.dumps(shape).encode())
    answer = chat(live.url)
    assert answer.status_code == 502, answer.text[:200]
    assert answer.json()["error"]["code"] == "upstream_bad_answer"
    upstream.handler = lambda rec: Reply(body=json.dumps(completion("fine")).encode())
    assert chat(live.url).json()["choices"][0]["message"]["content"] == "fine"


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/completions", {"model": "m", "prompt": "Once"}, {"choices": [{"text": 5}]}),
    ("/v1/completions", {"model": "m", "prompt": "Once"}, {"object": "text_completion"}),
    ("/v1/embeddings", {"model": "m", "input": "hi"}, {"data": [{"embedding": {"a": 1}}]}),
    ("/v1/embeddings", {"model": "m", "input": "hi"}, [0.25, 0.5]),
], ids=["completion-text-number", "completion-no-choices", "embedding-object", "embeddings-bare-list"])
def test_completions_and_embeddings_answer_a_relayed_answer_of_the_wrong_shape_with_a_502(upstream, live, path,
                                                                                          body, shape):
    upstream.handler = lambda rec: Reply(body=json.dumps(shape).encode())
    answer = requests.post(live.url + path, json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_bad_answer", answer.text[:200]


@pytest.mark.parametrize("shape", [{"choices": [{"message": {"content": "hi"}}]}, {"type": "message"}, [1]],
                         ids=["a-chat-completion", "no-content", "a-list"])
def test_native_passthroughs_answer_json_of_the_wrong_shape_with_a_502(upstream, serve, shape):
    live = serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat", "messages", "responses"]}))))
    upstream.handler = lambda rec: Reply(body=json.dumps(shape).encode())
    messages = requests.post(live.url + "/v1/messages", headers=AUTH, timeout=10, json={
        "model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 502 and messages.json()["type"] == "error", messages.text[:200]
    assert "not a message of the Anthropic API" in messages.json()["error"]["message"]
    responses = requests.post(live.url + "/v1/responses", headers=AUTH, timeout=10, json={"model": "m", "input": "hi"})
    assert responses.status_code == 502 and responses.json()["error"]["code"] == "upstream_bad_answer"
    compact = requests.post(live.url + "/v1/responses/compact", headers=AUTH, timeout=10,
                            json={"model": "m", "input": "hi"})
    assert compact.status_code == 502 and compact.json()["error"]["code"] == "upstream_bad_answer", compact.text[:200]


def test_json_nested_deeper_than_the_answer_can_be_written_is_a_502(upstream, serve):
    live = forced(upstream, serve)
    deep = "[" * 400 + "]" * 400  # orjson reads 1,024 levels but writes 255
    chunk = json.dumps(dict(HEAD, choices=[], x_deep="@")).replace('"@"', deep)
    upstream.handler = lambda rec: Reply(events=[b"data: " + chunk.encode() + b"\n\n", *sse(*text_chunks(["x"]))])
    answer = chat(live.url)
    assert answer.status_code == 502 and "cannot be written as JSON" in answer.json()["error"]["message"]


def test_an_emoji_split_into_surrogate_halves_across_chunks_is_joined_and_lone_halves_replaced(upstream, serve):
    live = forced(upstream, serve)
    pieces = ['{"index":0,"delta":{"content":"smile \\ud83d"}}', '{"index":0,"delta":{"content":"\\ude00!"}}',
              '{"index":0,"delta":{"content":" lone \\ud83d."},"finish_reason":"stop"}']
    events = [b'data: {"id":"c1","created":1,"model":"m","choices":[%s]}\n\n' % p.encode() for p in pieces]
    upstream.handler = lambda rec: Reply(events=[*events, b"data: [DONE]\n\n"])
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
    answer = client.chat.completions.create(model="m", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "smile \U0001F600! lone \ufffd."


# -- requirement 7: logs and metrics cannot be forged -------------------------------------------------------

def test_a_forged_path_and_request_id_stay_inside_their_quoted_log_values(live, caplog):
    response = requests.get(live.url + "/v1/x%0Arequest_id=FORGED%1B[31m status=200", timeout=10,
                            headers={"X-Request-Id": 'abc" status=201 x="'})
    assert response.status_code == 404
    [line] = access_lines(caplog)
    assert "\n" not in line and "\x1b" not in line
    pairs = fields_of(line)
    assert [k for k, _ in pairs] == ACCESS_KEYS  # each field once, none added
    assert dict(pairs)["status"] == "404"
    assert dict(pairs)["route"] == r'"/v1/x\nrequest_id=FORGED\x1b[31m status=200"'
    assert 'route="unmatched"' in requests.get(live.url + "/metrics", timeout=10).text


def test_an_upstream_error_code_cannot_forge_a_log_line_or_grow_metric_labels(upstream, serve, caplog):
    live = forced(upstream, serve)
    before = requests.get(live.url + "/metrics", timeout=10).text
    codes = iter(f"quota\nstatus=200 request_id=forged{i}" for i in range(100))
    upstream.handler = lambda rec: Reply(events=[b"data: " + json.dumps(
        {"error": {"message": "upstream says no", "code": next(codes)}}).encode() + b"\n\n"])
    for _ in range(3):
        assert chat(live.url).status_code == 502
    for line in access_lines(caplog):
        assert [k for k, _ in fields_of(line)] == ACCESS_KEYS
    metrics = requests.get(live.url + "/metrics", timeout=10).text
    assert metric_value(metrics, "streamfold_retries_total", reason="other") - \
        metric_value(before, "streamfold_retries_total", reason="other") == 3  # one key: one attempt each
    assert "forged" not in metrics and "quota" not in metrics


def test_a_long_client_value_is_cut_in_the_log(live, caplog):
    assert requests.get(live.url + "/v1/" + "p" * 5000, timeout=10).status_code == 404
    [line] = access_lines(caplog)
    assert len(line) < 800 and dict(fields_of(line))["route"].endswith('..."')


# -- requirement 8: the fold keeps what the schema and the SDK keep ------------------------------------------

def test_audio_refusal_and_empty_logprobs_fold_as_the_openai_sdk_accumulates_them(upstream, serve):
    live = forced(upstream, serve)
    chunks = [dict(HEAD, choices=[{"index": 0, "delta": {"role": "assistant", "audio": {"id": "audio_1",
                                                         "transcript": "Hel"}},
                                   "logprobs": {"content": []}, "finish_reason": None}]),
              dict(HEAD, choices=[{"index": 0, "delta": {"audio": {"data": "AAAA", "transcript": "lo"}},
                                   "finish_reason": None}]),
              dict(HEAD, choices=[{"index": 0, "delta": {"audio": {"data": "BBBB", "expires_at": 1764000999}},
                                   "finish_reason": "stop"}])]
    upstream.handler = lambda rec: Reply(events=sse(*chunks))
    folded = chat(live.url).json()["choices"][0]
    sdk = ChatCompletionStreamState()
    for chunk in chunks:
        sdk.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    expected = sdk.get_final_completion().choices[0].to_dict()
    assert folded["message"]["audio"] == expected["message"]["audio"] == {
        "id": "audio_1", "data": "AAAABBBB", "transcript": "Hello", "expires_at": 1764000999}
    assert "refusal" in folded["message"] and folded["message"]["refusal"] is None
    assert folded["logprobs"]["content"] == expected["logprobs"]["content"] == []


# -- requirement 12: management input to the letter ---------------------------------------------------------

@pytest.fixture
def managed(tmp_path, upstream, serve):
    doc = settings_doc(provider(upstream), **{"remote-management": {"secret-key": SECRET},
                                              "max-request-bytes": 64 * 1024})
    path = write_settings(tmp_path / "m.yaml", doc)
    return path, serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))


def management(live, method: str, headers: dict | None = None, **kwargs) -> requests.Response:
    return requests.request(method, live.url + "/v0/management/openai-compatibility", timeout=30,
                            headers={**MGMT, **(headers or {})}, **kwargs)


@pytest.mark.parametrize("name", ["raw\n", "", " up2", "UP"])
def test_a_provider_name_that_is_not_exactly_valid_is_a_400(managed, upstream, name):
    _, live = managed
    answer = management(live, "put", json=[provider(upstream), provider(upstream, name=name)])
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_settings"
    assert management(live, "get").json()["openai-compatibility"][0]["name"] == "up"


@pytest.mark.parametrize("index", ["²", "-1", "1e3", "٣", "0x1", "9" * 40])
def test_delete_with_an_index_that_is_not_ascii_digits_is_a_400(managed, index):
    _, live = managed
    answer = management(live, "delete", params={"index": index})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "index must be a non-negative integer"


def test_a_chunked_management_body_over_the_limit_is_a_413(managed, upstream):
    path, live = managed
    before = path.read_bytes()
    filler = [provider(upstream, name=f"p{i}", headers={"X-Pad": "x" * 1000}) for i in range(100)]
    data = json.dumps(filler).encode()
    answer = management(live, "put", data=(data[i:i + 4096] for i in range(0, len(data), 4096)),
                        headers={"Content-Type": "application/json"})  # a generator: chunked, no length
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert path.read_bytes() == before
    assert management(live, "get").status_code == 200


def test_a_write_that_would_remove_every_provider_is_refused(managed):
    path, live = managed
    before = path.read_bytes()
    answer = management(live, "put", json=[])
    assert answer.status_code == 400 and "every provider" in answer.json()["error"]["message"]
    assert path.read_bytes() == before


def test_a_1001_provider_write_is_refused_and_the_log_line_of_a_1000_provider_one_is_bounded(
        tmp_path, upstream, serve, caplog):
    doc = settings_doc(provider(upstream), **{"remote-management": {"secret-key": SECRET}})
    path = write_settings(tmp_path / "big.yaml", doc)
    live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
    many = [{"name": f"provider-with-a-long-name-{i}", "base-url": upstream.url, "models": [{"name": "x"}]}
            for i in range(1001)]
    answer = management(live, "put", json=many)  # ~110 KB: well under max-request-bytes
    assert answer.status_code == 400 and "at most 1000" in answer.json()["error"]["message"]
    assert "provider-with-a-long-name" not in path.read_text()
    assert management(live, "put", json=many[:1000]).status_code == 200
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settings reloaded")]
    assert len(line) < 2200 and "more characters" in line


def test_a_management_write_on_top_of_a_refused_file_cannot_turn_auth_off(managed, upstream, caplog):
    path, live = managed
    doc = yaml.safe_load(path.read_text())
    doc.pop("api-keys")
    write_settings(path, doc)  # a hand edit the reload guard refuses
    deadline = time.monotonic() + 5
    while not any("RELOAD REFUSED" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        chat(live.url)
        time.sleep(0.2)
    answer = management(live, "patch", json={"name": "up", "value": {"force-upstream-stream": True}})
    assert answer.status_code == 400 and "client authentication off" in answer.json()["error"]["message"]
    assert chat(live.url, headers={}).status_code == 401


def test_a_client_key_write_on_top_of_a_refused_file_cannot_empty_the_proxy(tmp_path, upstream, serve, caplog):
    doc = settings_doc(provider(upstream), **{"api-keys": [{"key": CLIENT_KEY, "name": "team"}],
                                              "remote-management": {"secret-key": SECRET}})
    path = write_settings(tmp_path / "k.yaml", doc)
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    live = serve(app)
    doc["openai-compatibility"] = []
    write_settings(path, doc)  # a hand edit the reload guard refuses
    app.extensions["streamfold"].check_file()
    assert any("would remove every provider" in r.getMessage() for r in caplog.records)
    answer = requests.patch(live.url + "/v0/management/api-keys", headers=MGMT, timeout=30,
                            json={"name": "team", "value": {"rpm": 100}})
    assert answer.status_code == 400 and "would remove every provider" in answer.json()["error"]["message"]
    assert answer.json()["error"]["code"] == "invalid_settings"
    assert chat(live.url).status_code == 200  # still routed by the running config
