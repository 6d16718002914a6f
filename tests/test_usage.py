"""Usage recording: every proxied request counted per day, client, model and provider, kept across restarts.

The upstream here answers like OpenAI: a streamed chat answer carries a
``choices: []`` usage chunk only when ``stream_options.include_usage`` is set,
and its token counts depend on the request, so the expected sums are known.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest
import requests
import yaml

from proxy import create_app
from tests.conftest import CHAT, STATE_DIR, make_app, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.redis_util import RedisServer
from tests.upstream import Reply, sse, text_chunks

SECRET = "mgmt-secret-usage-7777"
MGMT = {"Authorization": f"Bearer {SECRET}"}
KEY_A, KEY_B = "sk-team-a-usage-0001", "sk-team-b-usage-0002"
TEAMS = [{"key": KEY_A, "name": "team-a"}, {"key": KEY_B, "name": "team-b"}]
MODELS = [{"name": "qwen2.5-72b-instruct", "alias": "qwen"}, {"name": "llama-3.1-8b", "alias": "llama"}]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def usage_for(body: dict) -> dict:
    """What this upstream reports for a request: prompt = characters of the first message, and so on."""
    prompt = len(str(body["messages"][0]["content"])) if "messages" in body else 4
    completion = 7 if "qwen" in body.get("model", "") else 5
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 1, "audio_tokens": 0}}


def openai_like(rec) -> Reply:
    body = rec.body or {}
    usage = usage_for(body)
    if body.get("stream"):
        wants = (body.get("stream_options") or {}).get("include_usage") is True
        return Reply(events=sse(*text_chunks(["Hel", "lo"], model=body["model"], usage=usage if wants else None)))
    answer = {"id": "chatcmpl-usage1", "object": "chat.completion", "created": 1764000000, "model": body["model"],
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                           "logprobs": None, "finish_reason": "stop"}], "usage": usage}
    return Reply(body=json.dumps(answer).encode())


def usage_doc(upstream, **top) -> dict:
    return settings_doc(provider(upstream, name="gpu", models=MODELS),
                        **{"api-keys": TEAMS, "remote-management": {"secret-key": SECRET}, **top})


def get_usage(url: str, **params) -> dict:
    response = requests.get(url + "/v0/management/usage", params=params, headers=MGMT, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_usage(url: str, requests_expected: int, seconds: float = 10, **params) -> dict:
    """The usage answer once it counts ``requests_expected`` requests (workers flush about once a second)."""
    deadline = time.monotonic() + seconds
    while True:
        response = requests.get(url + "/v0/management/usage", params=params, headers=MGMT, timeout=10)
        if response.status_code != 503 or time.monotonic() > deadline:  # 503: the store is not back yet
            body = get_usage(url, **params)
            if body["total"]["requests"] == requests_expected or time.monotonic() > deadline:
                return body
        time.sleep(0.1)


def chat(url: str, key: str, model: str, content: str = "hi", **extra) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", headers={**auth(key), "Connection": "close"}, timeout=20,
                         json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


@pytest.fixture
def usage_live(upstream, serve):
    upstream.handler = openai_like
    app = make_app(usage_doc(upstream))
    return serve(app), app


def test_stream_without_include_usage_gets_no_usage_chunk_but_its_usage_is_recorded(usage_live, upstream):
    live, _ = usage_live
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY_A, max_retries=0, timeout=10)
    chunks = list(sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "count me"}],
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert all(c.usage is None and c.choices for c in chunks)  # no extra choices: [] chunk
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}  # asked on its behalf
    sdk.close()
    with requests.post(live.url + "/v1/chat/completions", headers=auth(KEY_A), timeout=10, stream=True,
                       json={"model": "qwen", "messages": [{"role": "user", "content": "count me"}],
                             "stream": True}) as raw:
        body = raw.content
    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n")
    row = wait_for_usage(live.url, 2, **{"group-by": "client,model,provider"})["data"]
    assert row == [{"client": "team-a", "model": "qwen", "provider": "gpu", "requests": 2, "errors": 0,
                    "prompt_tokens": 16, "completion_tokens": 14, "cached_tokens": 4, "reasoning_tokens": 2}]


def test_stream_that_asked_for_usage_gets_the_upstream_bytes_unchanged(usage_live, upstream):
    live, _ = usage_live
    body = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    got = requests.post(live.url + "/v1/chat/completions", headers=auth(KEY_A), json=body, timeout=10).content
    expected = b"".join(sse(*text_chunks(["Hel", "lo"], model="qwen2.5-72b-instruct", usage=usage_for(
        {"model": "qwen2.5-72b-instruct", "messages": body["messages"]}))))
    assert got == expected
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY_A, max_retries=0, timeout=10)
    last = list(sdk.chat.completions.create(model="qwen", messages=body["messages"], stream=True,
                                            stream_options={"include_usage": True}))[-1]
    assert last.choices == [] and last.usage.prompt_tokens == 2
    sdk.close()


def test_usage_on_the_finish_chunk_is_removed_for_a_client_that_did_not_ask(usage_live, upstream):
    """llama.cpp and DeepSeek report usage on the finish chunk itself: the chunk stays, its usage goes."""
    live, _ = usage_live
    with open("tests/fixtures/real/llamacpp-final-timings.sse", "rb") as fh:
        finish = fh.read()
    head = {"id": "chatcmpl-l1", "object": "chat.completion.chunk", "created": 1754524122, "model": "gpt-oss:20b"}
    first = json.dumps(dict(head, choices=[{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]))
    upstream.handler = lambda rec: Reply(events=[f"data: {first}\n\n".encode(), finish, b"data: [DONE]\n\n"])
    response = requests.post(live.url + "/v1/chat/completions", headers=auth(KEY_B), timeout=10,
                             json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "stream": True})
    events = [e for e in response.content.split(b"\n\n") if e]
    assert len(events) == 3 and events[-1] == b"data: [DONE]"
    finish_chunk = json.loads(events[1][6:])
    assert "usage" not in finish_chunk and finish_chunk["choices"][0]["finish_reason"] == "stop"
    assert finish_chunk["timings"]["prompt_n"] == 1085  # everything else of the chunk is kept
    row = wait_for_usage(live.url, 1, **{"group-by": "client"})["data"][0]
    assert (row["client"], row["prompt_tokens"], row["completion_tokens"]) == ("team-b", 1085, 247)


def test_usage_chunk_split_across_reads_is_still_removed(usage_live, upstream):
    live, _ = usage_live
    events = sse(*text_chunks(["a", "b"], usage=usage_for({"model": "q", "messages": [{"content": "xyz"}]})))
    usage_event = events[-2]
    cut = usage_event.index(b'"usage"') - 3
    pieces = events[:-2] + [usage_event[:cut], usage_event[cut:], events[-1]]
    upstream.handler = lambda rec: Reply(events=pieces, delay=0.05)  # separate reads on the proxy's side
    body = requests.post(live.url + "/v1/chat/completions", headers=auth(KEY_A), timeout=10,
                         json={"model": "qwen", "messages": [{"role": "user", "content": "xyz"}],
                               "stream": True}).content
    assert body == b"".join(events[:-2]) + events[-1]
    row = wait_for_usage(live.url, 1)["data"][0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 5)


def test_provider_with_stream_usage_off_is_not_asked_for_usage(upstream, serve):
    upstream.handler = openai_like
    live = serve(make_app(settings_doc(provider(upstream, name="gpu", models=MODELS, **{"stream-usage": False}),
                                       **{"api-keys": TEAMS, "remote-management": {"secret-key": SECRET}})))
    assert chat(live.url, KEY_A, "qwen", stream=True).status_code == 200
    assert "stream_options" not in upstream.requests[0].body
    assert wait_for_usage(live.url, 1)["total"]["requests"] == 1  # counted, without tokens


def test_errors_count_per_client_and_unknown_models_do_not_become_rows(usage_live, upstream):
    live, _ = usage_live
    assert chat(live.url, KEY_A, "qwen").status_code == 200
    upstream.handler = lambda rec: Reply(status=400, body=b'{"error": {"message": "bad temperature"}}')
    assert chat(live.url, KEY_A, "qwen").status_code == 400
    assert chat(live.url, KEY_A, "no-such-model-xyz").status_code == 404
    bad = requests.post(live.url + "/v1/chat/completions", headers=auth(KEY_B), data=b"{not json", timeout=10)
    assert bad.status_code == 400
    assert requests.post(live.url + "/v1/chat/completions", headers=auth("sk-wrong-key-9999"), json=CHAT,
                         timeout=10).status_code == 401  # no client: not counted
    assert requests.get(live.url + "/v1/models", headers=auth(KEY_A), timeout=10).status_code == 200  # not a call
    rows = wait_for_usage(live.url, 4, **{"group-by": "client,model"})["data"]
    assert rows == [
        {"client": "team-a", "model": "-", "requests": 1, "errors": 1, "prompt_tokens": 0,
         "completion_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0},
        {"client": "team-a", "model": "qwen", "requests": 2, "errors": 1, "prompt_tokens": 2,
         "completion_tokens": 7, "cached_tokens": 2, "reasoning_tokens": 1},
        {"client": "team-b", "model": "-", "requests": 1, "errors": 1, "prompt_tokens": 0,
         "completion_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0}]


def test_usage_endpoint_groups_filters_by_day_and_serves_csv(usage_live, upstream):
    live, _ = usage_live
    for key, model in ((KEY_A, "qwen"), (KEY_A, "llama"), (KEY_B, "qwen")):
        assert chat(live.url, key, model, content="abcd").status_code == 200
    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_model = wait_for_usage(live.url, 3, **{"group-by": "model", "from": today, "to": today})
    assert by_model["from"] == by_model["to"] == today and by_model["store"] == "sqlite"
    assert [(r["model"], r["requests"], r["completion_tokens"]) for r in by_model["data"]] == \
        [("llama", 1, 5), ("qwen", 2, 14)]
    assert get_usage(live.url, **{"group-by": "provider"})["data"][0]["provider"] == "gpu"
    assert get_usage(live.url, **{"from": "2020-01-01", "to": "2020-01-31"})["data"] == []
    detail = get_usage(live.url)["data"]
    assert {(r["day"], r["client"], r["model"], r["provider"]) for r in detail} == {
        (today, "team-a", "qwen", "gpu"), (today, "team-a", "llama", "gpu"), (today, "team-b", "qwen", "gpu")}
    response = requests.get(live.url + "/v0/management/usage", headers=MGMT, timeout=10,
                            params={"group-by": "client", "format": "csv"})
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    table = list(csv.reader(io.StringIO(response.text)))
    assert table[0] == ["client", "requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens",
                        "reasoning_tokens"]
    assert table[1:] == [["team-a", "2", "0", "8", "12", "4", "2"], ["team-b", "1", "0", "4", "7", "2", "1"]]


@pytest.mark.parametrize("params, param", [
    ({"from": "2026-13-01"}, "from"), ({"to": "yesterday"}, "to"), ({"from": "2026-11-26", "to": "2026-11-01"}, "from"),
    ({"from": "2020-01-01", "to": "2026-01-01"}, "from"), ({"group-by": "team"}, "group-by"),
    ({"group-by": "client,client"}, "group-by"), ({"format": "xml"}, "format")])
def test_usage_endpoint_refuses_bad_queries_with_a_clear_400(usage_live, params, param):
    live, _ = usage_live
    response = requests.get(live.url + "/v0/management/usage", params=params, headers=MGMT, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200


def test_usage_endpoint_needs_the_management_secret(usage_live):
    live, _ = usage_live
    response = requests.get(live.url + "/v0/management/usage", headers=auth(KEY_A), timeout=10)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_management_key"


def test_sqlite_file_deleted_then_unwritable_requests_succeed_and_usage_lands_when_it_is_back(
        usage_live, upstream, caplog):
    """As root a chmod does not stop writes, so "unwritable" is a directory where the file was."""
    live, app = usage_live
    path = app.extensions["streamfold.state"].path
    assert chat(live.url, KEY_A, "qwen").status_code == 200
    wait_for_usage(live.url, 1)
    recorder = app.extensions["streamfold.usage"]
    os.unlink(path)
    os.mkdir(path)  # nothing can open or create the state file now
    statuses = [chat(live.url, KEY_A, "qwen", content="during").status_code for _ in range(5)]
    deadline = time.monotonic() + 5
    while "UNAVAILABLE" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    statuses += [chat(live.url, KEY_B, "llama").status_code for _ in range(3)]
    assert statuses == [200] * 8
    down = requests.get(live.url + "/v0/management/usage", headers=MGMT, timeout=10)
    assert down.status_code == 503 and down.json()["error"]["code"] == "state_store_unavailable"
    time.sleep(1.2)  # several ticks while it is down: still one line
    assert caplog.text.count("THE SQLITE STORE AT") == 1
    assert recorder.pending() == 8
    shutil.rmtree(path)  # the operator fixes it
    body = wait_for_usage(live.url, 8, **{"group-by": "client"})
    assert [(r["client"], r["requests"], r["prompt_tokens"]) for r in body["data"]] == \
        [("team-a", 5, 30), ("team-b", 3, 6)]
    assert "available again" in caplog.text


def test_redis_killed_requests_succeed_and_usage_lands_when_it_returns(upstream, serve, caplog, tmp_path):
    redis_server = RedisServer()
    try:
        upstream.handler = openai_like
        path = write_settings(tmp_path / "r.yaml", usage_doc(upstream, **{"redis-url": redis_server.url}))
        app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
        live = serve(app)
        assert chat(live.url, KEY_A, "qwen").status_code == 200
        assert wait_for_usage(live.url, 1)["store"] == "redis"
        redis_server.stop()
        assert [chat(live.url, KEY_A, "llama").status_code for _ in range(4)] == [200] * 4
        deadline = time.monotonic() + 5
        while "THE REDIS STORE" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [chat(live.url, KEY_B, "qwen").status_code for _ in range(2)] == [200] * 2
        assert caplog.text.count("THE REDIS STORE") == 1
        redis_server = RedisServer(port=redis_server.port)  # back, empty (no persistence)
        body = wait_for_usage(live.url, 6, **{"group-by": "client,model"})
        assert [(r["client"], r["model"], r["requests"]) for r in body["data"]] == \
            [("team-a", "llama", 4), ("team-b", "qwen", 2)]
    finally:
        redis_server.stop()


def test_usage_fields_in_redis_this_proxy_did_not_write_are_left_out_of_the_report(upstream, serve, tmp_path):
    """Another deployment on the same Redis, or a hand edit, may leave fields in a day's usage hash that are no
    [client, model, provider, counter] JSON or no count: the report leaves them out instead of answering 500."""
    import datetime

    import redis
    redis_server = RedisServer()
    try:
        upstream.handler = openai_like
        path = write_settings(tmp_path / "r.yaml", usage_doc(upstream, **{"redis-url": redis_server.url}))
        live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        redis.Redis.from_url(redis_server.url).hset(f"streamfold:usage:{today}", mapping={
            b"{not json": 1, b'["team-a", "qwen"]': 1, b'[["team-a"], "qwen", "gpu", "requests"]': 1,
            b'["team-a", "qwen", "gpu", "requests"]': b"many"})
        assert chat(live.url, KEY_A, "qwen").status_code == 200
        body = wait_for_usage(live.url, 1, **{"group-by": "client,model"})
        assert [(r["client"], r["model"], r["requests"]) for r in body["data"]] == [("team-a", "qwen", 1)]
    finally:
        redis_server.stop()


def test_gunicorn_three_workers_300_requests_survive_a_restart_exactly(upstream, tmp_path):
    upstream.handler = openai_like
    path = write_settings(tmp_path / "usage.yaml", usage_doc(upstream))
    plan = [(KEY_A if i % 3 else KEY_B, "qwen" if i % 2 else "llama", "x" * (i % 7 + 1), i % 4 == 0)
            for i in range(300)]
    expected: dict[tuple[str, str], list[int]] = {}
    for key, model, content, _ in plan:
        usage = usage_for({"model": model, "messages": [{"content": content}]})
        row = expected.setdefault(("team-a" if key == KEY_A else "team-b", model), [0, 0, 0])
        row[0] += 1
        row[1] += usage["prompt_tokens"]
        row[2] += usage["completion_tokens"]
    server = Gunicorn(path, workers=3, threads=8)
    try:
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda p: chat(server.url, p[0], p[1], p[2], stream=p[3]).status_code, plan))
        assert statuses == [200] * 300
        pids = {line.split("[")[1].split("]")[0] for line in server.output().splitlines() if "client=team-" in line}
        assert len(pids) == 3  # every worker served some
        server.proc.send_signal(signal.SIGTERM)  # graceful stop: whatever was not flushed yet is written
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    server = Gunicorn(path, workers=3, threads=8)
    try:
        body = get_usage(server.url, **{"group-by": "client,model"})
    finally:
        server.stop()
    got = {(r["client"], r["model"]): [r["requests"], r["prompt_tokens"], r["completion_tokens"]]
           for r in body["data"]}
    assert got == expected
    assert body["total"]["requests"] == 300 and body["total"]["errors"] == 0


def test_every_test_app_gets_its_own_state_file_outside_the_checkout(tmp_path):
    first, second = settings_doc()["state-path"], settings_doc()["state-path"]
    assert first != second and first.startswith(STATE_DIR) and second.startswith(STATE_DIR)
    written = yaml.safe_load(write_settings(tmp_path / "s.yaml", {"api-keys": []}).read_text())
    assert written["state-path"] == str(tmp_path / "s.state.db")  # gunicorn tests: beside their settings file
    app = make_app({"openai-compatibility": []})
    assert app.extensions["streamfold.state"].path.startswith(STATE_DIR)


def _events(raw: bytes) -> list[bytes]:
    """The data payloads of an SSE body (comments dropped), line endings normalised."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    out = []
    for block in text.split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))
    return out


@pytest.mark.parametrize("fixture, prompt, completion", [
    ("crafted/tgi-crlf-nospace-n2-logprobs.sse", 9, 6),       # CRLF, "data:" without a space
    ("real/nim-vllm-usage-every-chunk.sse", 226, 20),          # usage on every chunk
    ("real/deepseek-reasoning-tool-call.sse", 339, 83),        # usage: null on each chunk, then a usage chunk
])
def test_recorded_fixture_streams_lose_only_the_usage_the_client_did_not_ask_for(usage_live, upstream, fixture,
                                                                                  prompt, completion):
    live, _ = usage_live
    with open(f"tests/fixtures/{fixture}", "rb") as fh:
        raw = fh.read()
    upstream.handler = lambda rec: Reply(events=[raw[i:i + 500] for i in range(0, len(raw), 500)], delay=0.01)
    got = requests.post(live.url + "/v1/chat/completions", headers=auth(KEY_A), timeout=10,
                        json={"model": "qwen", "messages": [{"role": "user", "content": "x"}], "stream": True}).content
    expected = []
    for payload in _events(raw):
        chunk = json.loads(payload) if payload != b"[DONE]" else None
        if chunk is not None and chunk.get("usage") is not None:
            if chunk.get("choices") == []:
                continue  # the usage-only chunk the client did not ask for
            del chunk["usage"]
        expected.append(chunk)
    assert [json.loads(p) if p != b"[DONE]" else None for p in _events(got)] == expected
    row = wait_for_usage(live.url, 1)["data"][0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)


def test_usage_rows_name_the_glob_alias_so_made_up_names_cannot_grow_the_table(upstream, serve):
    upstream.handler = openai_like
    doc = settings_doc(provider(upstream, name="gpu", models=[{"name": "qwen3-coder", "alias": "claude-*"}]),
                       **{"api-keys": TEAMS, "remote-management": {"secret-key": SECRET}})
    live = serve(make_app(doc))
    for asked in ("claude-sonnet-4-5", "claude-3-5-haiku-latest", "claude-made-up-name-123"):
        assert chat(live.url, KEY_A, asked).status_code == 200
    rows = wait_for_usage(live.url, 3, **{"group-by": "model"})["data"]
    assert [(row["model"], row["requests"]) for row in rows] == [("claude-*", 3)]


def _native_answers(rec) -> Reply:
    """A provider serving /v1/responses and /v1/messages itself; it echoes the request's ``metadata`` after its
    ``usage``, as OpenAI does. Responses: 40 in, 9 out; Messages: 50000 in besides 6 read from the cache and
    300 written to it, 10 out."""
    body = rec.body or {}
    if rec.path.endswith("/messages"):
        usage = {"input_tokens": 50000, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 6}
        if not body.get("stream"):
            return Reply(body=json.dumps({
                "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {**usage, "output_tokens": 10}}).encode())
        start = {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "usage": {**usage, "output_tokens": 1}}}
        events = [start, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
                  {"type": "content_block_stop", "index": 0},
                  {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 10}},
                  {"type": "message_stop"}]
        raw = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
        cut = raw[0].index(b"ut_tokens")  # message_start's usage split over two reads
        return Reply(events=[raw[0][:cut], raw[0][cut:], *raw[1:]], content_type="text/event-stream", delay=0.05)
    response = {"id": "resp_1", "object": "response", "status": "completed", "model": body["model"],
                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
                "usage": {"input_tokens": 40, "output_tokens": 9, "total_tokens": 49},
                "metadata": body.get("metadata") or {}}
    if not body.get("stream"):
        return Reply(body=json.dumps(response).encode())
    done = {"type": "response.completed", "sequence_number": 1, "response": response}
    return Reply(events=[f"event: response.completed\ndata: {json.dumps(done)}\n\n".encode()],
                 content_type="text/event-stream")


@pytest.mark.parametrize("stream", [False, True])
def test_native_responses_usage_is_the_answers_own_not_a_usage_the_client_had_echoed(upstream, serve, stream):
    """The upstream echoes metadata {"usage": ...} after the real usage: the real one is charged (a search for
    the last "usage" in the bytes charged 0 tokens)."""
    upstream.handler = _native_answers
    doc = usage_doc(upstream)
    doc["openai-compatibility"][0]["native-apis"] = ["chat", "responses"]
    live = serve(make_app(doc))
    for metadata in ({"usage": "x"}, {"usage": '{"input_tokens": 0}', "note": "output_tokens\": 0"}):
        answer = requests.post(live.url + "/v1/responses", headers=auth(KEY_A), timeout=10,
                               json={"model": "qwen", "input": "hi", "metadata": metadata, "stream": stream})
        assert answer.status_code == 200 and b"resp_1" in answer.content
    total = wait_for_usage(live.url, 2)["total"]
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"]) == (2, 80, 18)


@pytest.mark.parametrize("stream", [False, True])
def test_native_anthropic_answer_is_charged_its_input_with_the_cache_reads_and_writes(upstream, serve, stream):
    """Input (and the cache counts) arrive in message_start, output in message_delta: both are counted (keeping
    only the last read with token counts charged 0 input tokens), also when an event comes in two reads.
    Anthropic's input_tokens leave out the prompt read from and written to its cache: the prompt charged to
    usage and tpm is all three (only input_tokens were, so a cached prompt was nearly free)."""
    upstream.handler = _native_answers
    doc = usage_doc(upstream)
    doc["openai-compatibility"][0]["native-apis"] = ["messages"]
    doc["api-keys"] = [dict(TEAMS[0], tpm=50_100), TEAMS[1]]  # over it with the cache counts, under it without
    live = serve(make_app(doc))
    sdk = anthropic.Anthropic(base_url=live.url, api_key=KEY_A, max_retries=0, timeout=10)
    message = {"model": "qwen", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with sdk.messages.stream(**message) as answer:
            assert answer.get_final_text() == "hi"
    else:
        assert sdk.messages.create(**message).content[0].text == "hi"
    total = wait_for_usage(live.url, 1)["total"]
    assert (total["prompt_tokens"], total["completion_tokens"], total["cached_tokens"]) == (50306, 10, 6)
    with pytest.raises(anthropic.RateLimitError):
        sdk.messages.create(**message)
    sdk.close()
