"""The built-in demo upstream: the README's first-run lines on the shipped settings, off by default, bad input."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import time

import openai
import pytest
import requests

from proxy import create_app
from proxy.hop import DEMO_HEADER, demo_secret
from tests.conftest import make_app, provider, settings_doc
from tests.gunicorn_util import ROOT, Gunicorn, write_settings
from tests.test_management import force_reload_check
from tests.upstream import free_port

README = (ROOT / "README.md").read_text()
SHIPPED_KEY = "sk-streamfold-local"  # the shipped settings' default client key, as the README uses it
DEMO_TEXT = "This is streamfold's demo upstream, not a model."
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# What the demo provider sends (this process's instance secret); tests that call /demo directly send it too.
DEMO = {DEMO_HEADER: demo_secret()}


def readme_curl_lines() -> list[str]:
    """The README's copy-paste curl lines to model ``demo``, in order (so the README cannot drift)."""
    return [line for line in README.splitlines()
            if line.startswith("curl ") and "/v1/chat/completions" in line and '"model": "demo"' in line]


def readme_bridge_lines() -> dict[str, str]:
    """The README's curl lines for the bridged APIs (``/v1/messages``, ``/v1/responses``) to model ``demo``."""
    return {route: line for line in README.splitlines() for route in ("/v1/messages", "/v1/responses")
            if line.startswith("curl ") and f"{route} " in line and '"model": "demo"' in line}


def readme_sdk_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    return next(block for block in blocks if 'model="demo"' in block)


def on_port(text: str, port: int) -> str:
    """A README line pointed at the test server instead of the default 8317."""
    return text.replace("localhost:8317", f"127.0.0.1:{port}").replace("127.0.0.1:8317", f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The repo's settings.yaml, byte for byte, under gunicorn with 2 workers on a fresh machine's environment.

    It is copied so gunicorn's log lands in a temp dir, not the repo. PORT is the
    port gunicorn binds, as on Heroku, so the demo provider calls back into it.
    STREAMFOLD_CLIENT_KEY="" takes the default key even if the developer set one.
    """
    path = tmp_path_factory.mktemp("shipped") / "settings.yaml"
    shutil.copyfile(ROOT / "settings.yaml", path)
    server = Gunicorn(path, env={"PORT": str(free_port()), "STREAMFOLD_CLIENT_KEY": ""})
    yield server
    server.stop()


def test_readme_has_the_three_first_run_lines():
    lines = readme_curl_lines()
    assert len(lines) == 2 and '"stream": true' not in lines[0] and '"stream": true' in lines[1]
    assert f"Bearer {SHIPPED_KEY}" in lines[0] and "OpenAI(" in readme_sdk_snippet()
    # they come right after the two commands, before the rest of the README
    assert README.index(lines[0]) < README.index("## Contents")


def test_readme_curl_folds_a_nonstream_request_into_one_chat_completion(shipped):
    done = subprocess.run(shlex.split(on_port(readme_curl_lines()[0], shipped.port)),
                          capture_output=True, timeout=20, check=True)
    answer = json.loads(done.stdout)
    assert answer.get("object") == "chat.completion" and answer["model"] == "streamfold-demo", answer
    message = answer["choices"][0]["message"]
    assert message["content"].startswith(DEMO_TEXT) and 'You said "hi".' in message["content"]
    assert message["reasoning_content"].startswith('The user wrote "hi".')
    assert answer["choices"][0]["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_readme_bridge_curls_answer_in_their_own_protocols(shipped):
    lines = readme_bridge_lines()
    assert set(lines) == {"/v1/messages", "/v1/responses"}
    assert README.index(lines["/v1/messages"]) < README.index("## Contents")
    answers = {}
    for route, line in lines.items():
        done = subprocess.run(shlex.split(on_port(line, shipped.port)), capture_output=True, timeout=30, check=True)
        answers[route] = json.loads(done.stdout)
    message = answers["/v1/messages"]
    assert message["type"] == "message" and message["model"] == "demo" and message["stop_reason"] == "end_turn"
    assert [block["type"] for block in message["content"]] == ["thinking", "text"]
    assert "demo" in message["content"][1]["text"] and message["usage"]["output_tokens"] > 0
    response = answers["/v1/responses"]
    assert response["object"] == "response" and response["status"] == "completed"
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"]
    assert "demo" in response["output"][1]["content"][0]["text"] and response["usage"]["total_tokens"] > 0


def test_readme_stream_curl_is_relayed_live_event_by_event(shipped):
    arrivals: list[tuple[float, bytes]] = []
    with subprocess.Popen(shlex.split(on_port(readme_curl_lines()[1], shipped.port)),
                          stdout=subprocess.PIPE) as curl:
        for line in curl.stdout:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic(), line[6:].strip()))
        curl.wait(20)
    assert curl.returncode == 0 and arrivals[-1][1] == b"[DONE]"
    chunks = [json.loads(data) for _, data in arrivals[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith(DEMO_TEXT)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # Live, not one blob: the demo paces its words, and they reach curl spread out.
    assert len({round(at, 2) for at, _ in arrivals}) >= 5
    assert arrivals[-1][0] - arrivals[0][0] > 0.2  # the demo sleeps 20 ms between ~40 events


def test_readme_openai_snippet_prints_content_reasoning_and_usage(shipped):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(on_port(readme_sdk_snippet(), shipped.port), {})  # the README's own snippet, pointed at this server
    printed = out.getvalue()
    assert DEMO_TEXT in printed and 'The user wrote "hi".' in printed and "prompt_tokens=" in printed


def test_demo_stream_alias_is_folded_by_sniffing_and_tools_give_a_tool_call(shipped):
    client = openai.OpenAI(base_url=shipped.url + "/v1", api_key=SHIPPED_KEY, max_retries=0, timeout=20)
    tools = [{"type": "function", "function": {"name": "lookup_weather", "parameters": {"type": "object"}}}]
    reply = client.chat.completions.create(model="demo-stream", tools=tools,
                                           messages=[{"role": "user", "content": "weather in Oslo?"}])
    choice = reply.choices[0]
    assert choice.message.content.startswith(DEMO_TEXT) and reply.usage is None  # not forced: nobody asked
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "lookup_weather"
    assert json.loads(call.function.arguments) == {"text": "weather in Oslo?"}
    assert {m.id for m in client.models.list()} >= {"qwen", "demo", "demo-stream"}


def test_each_demo_request_is_logged_and_counted_once_and_no_key_reaches_the_log(shipped):
    """The loopback hop to /demo is not a request of its own: one log line, one metric, per client request."""
    before = shipped.output().count("\n")
    answer = requests.post(shipped.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {SHIPPED_KEY}"},
                           json={"model": "demo", "messages": [{"role": "user", "content": "count me"}]}, timeout=30)
    assert answer.status_code == 200
    time.sleep(0.5)  # the worker's log line lands
    output = shipped.output()
    lines = [line for line in output.splitlines()[before:] if "request_id=" in line]
    assert len(lines) == 1 and "route=/v1/chat/completions model=demo provider=demo " in lines[0], lines
    assert "route=/demo" not in output
    metrics = requests.get(shipped.url + "/metrics", timeout=10).text
    assert 'route="/demo' not in metrics
    assert SHIPPED_KEY not in output


@pytest.fixture
def unpaced(monkeypatch):
    """No pause between the demo's events: these tests read whole answers; the shipped tests see it pace."""
    monkeypatch.setattr("proxy.routes.demo.WORD_DELAY", 0.0)


def test_demo_answers_sse_even_for_stream_false_and_the_same_bytes_every_time(serve, unpaced):
    live = serve(make_app(settings_doc(**{"demo-upstream": True})))
    body = {"model": "streamfold-demo", "stream": False, "messages": [{"role": "user", "content": "hello"}]}
    first = requests.post(live.url + "/demo/v1/chat/completions", json=body, timeout=10, headers=DEMO)
    again = requests.post(live.url + "/demo/v1/chat/completions", json=body, timeout=10,
                          headers={"Authorization": "Bearer any-upstream-key", **DEMO})
    assert first.status_code == again.status_code == 200
    assert first.headers["Content-Type"] == "text/event-stream"
    assert first.content == again.content and first.content.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in first.content  # only when stream_options.include_usage asks
    with_usage = requests.post(live.url + "/demo/v1/chat/completions", timeout=10, headers=DEMO,
                               json=dict(body, stream_options={"include_usage": True}))
    last = json.loads(with_usage.content.split(b"\n\n")[-3][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    models = requests.get(live.url + "/demo/v1/models", timeout=10, headers=DEMO).json()
    assert [m["id"] for m in models["data"]] == ["streamfold-demo"]


@pytest.mark.parametrize("path", ["/demo/v1/chat/completions", "/demo/v1/models", "/demo", "/demo/",
                                  "/demo/v1", "/demo/v1/completions"])
def test_demo_is_an_ordinary_404_for_every_method_when_off(serve, upstream, path):
    live = serve(make_app(settings_doc(provider(upstream))))  # demo-upstream absent: off
    unknown = requests.post(live.url + "/no/such/path", timeout=10)
    for method in METHODS:
        response = requests.request(method, live.url + path, data=b'{"model": "demo", "messages": []}',
                                    timeout=10)
        assert response.status_code == 404, method
        assert response.headers["Content-Type"] == "application/json"
        if method != "HEAD":
            assert response.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    # Counted as an unknown URL, like any other probe (the registry is per process: other tests count too).
    metrics = requests.get(live.url + "/metrics", timeout=10).text.splitlines()
    assert not [line for line in metrics if 'route="/demo' in line and 'status="404"' in line]


@pytest.mark.parametrize("on", [False, True])
def test_methods_no_demo_route_lists_are_a_json_404_while_the_demo_does_not_answer(serve, upstream, on):
    live = serve(make_app(settings_doc(provider(upstream), **{"demo-upstream": on})))
    for method in ("TRACE", "PROPFIND", "MKCOL", "BREW"):
        for path in ("/demo/v1/models", "/demo/v1/chat/completions"):
            response = requests.request(method, live.url + path, timeout=10)
            assert response.status_code == 404, (method, path)
            assert response.headers["Content-Type"] == "application/json" and "Allow" not in response.headers
            assert response.json()["error"]["code"] == "not_found"
    if on:  # the proxy itself, with a method the route does not take: told so
        response = requests.request("TRACE", live.url + "/demo/v1/models", headers=DEMO, timeout=10)
        assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_demo_when_on_answers_only_the_proxy_itself(serve, unpaced):
    app = make_app(settings_doc(**{"demo-upstream": True}))
    live = serve(app)
    assert requests.get(live.url + "/demo/v1/models", timeout=10, headers=DEMO).status_code == 200
    for forwarded in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Real-IP": "203.0.113.9"},
                      {"Forwarded": "for=203.0.113.9"}):
        response = requests.get(live.url + "/demo/v1/models", headers={**forwarded, **DEMO}, timeout=10)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    # A same-host TCP forwarder adds no forwarding header: its callers are loopback peers without the secret.
    for wrong in ({}, {DEMO_HEADER: "guess"}, {DEMO_HEADER: demo_secret()[:-1]}):
        response = requests.post(live.url + "/demo/v1/chat/completions", headers=wrong, timeout=10,
                                 json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    remote = app.test_client().post("/demo/v1/chat/completions", environ_base={"REMOTE_ADDR": "198.51.100.7"},
                                    headers=DEMO, json={"messages": [{"role": "user", "content": "hi"}]})
    assert remote.status_code == 404 and remote.get_json()["error"]["code"] == "not_found"


def test_hot_reload_turns_the_demo_on_and_off(tmp_path, upstream, unpaced):
    doc = settings_doc(provider(upstream))
    path = write_settings(tmp_path / "settings.yaml", doc)
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}, "TESTING": True})
    client = app.test_client()
    body = {"model": "streamfold-demo", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/demo/v1/chat/completions", json=body, headers=DEMO).status_code == 404
    write_settings(path, dict(doc, **{"demo-upstream": True}))
    force_reload_check(app)
    answer = client.post("/demo/v1/chat/completions", json=body, headers=DEMO)
    assert answer.status_code == 200 and answer.mimetype == "text/event-stream"
    assert answer.data.endswith(b"data: [DONE]\n\n")
    assert client.get("/demo/v1/chat/completions", headers=DEMO).status_code == 405  # on: a wrong method says so
    write_settings(path, doc)
    force_reload_check(app)
    assert client.post("/demo/v1/chat/completions", json=body, headers=DEMO).status_code == 404


BAD_BODIES = [
    (b"this is not json", None),
    (b'{"model": "streamfold-demo", "messages": [', None),
    (b'["a", "list"]', None),
    (b'{"model": "streamfold-demo"}', "messages"),
    (b'{"model": "streamfold-demo", "messages": []}', "messages"),
    (b'{"model": "streamfold-demo", "messages": "hi"}', "messages"),
    (b'{"model": "streamfold-demo", "messages": [{"role": "user", "content": "hi"}], "tools": {}}', "tools"),
    (b'{"model": "streamfold-demo", "messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}',
     "tools"),
]


def test_bad_input_to_the_demo_is_a_400_json_error_and_the_server_stays_healthy(serve, unpaced):
    live = serve(make_app(settings_doc(**{"demo-upstream": True})))
    for raw, param in BAD_BODIES:
        response = requests.post(live.url + "/demo/v1/chat/completions", data=raw, timeout=10,
                                 headers={"Content-Type": "application/json", **DEMO})
        assert response.status_code == 400, raw
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, raw
    healthy = requests.post(live.url + "/demo/v1/chat/completions", timeout=10, headers=DEMO,
                            json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert healthy.status_code == 200 and b'\\"hi\\"' in healthy.content
