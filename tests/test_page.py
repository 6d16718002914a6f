"""The operator page's security and its API, through the Flask test client and a real loopback upstream.

The browser drives the page in ``test_page_browser.py`` (gunicorn, 2 workers); here are the rules that need
no browser: when the page exists, who may load it, its headers, and the page API's answers to bad input.
"""
from __future__ import annotations

import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import orjson
import pytest

from proxy import activity, create_app
from tests.conftest import AUTH, CHAT, CLIENT_KEY, make_app, provider, settings_doc
from tests.gunicorn_util import write_settings
from tests.upstream import Reply, free_port

SECRET = "mgmt-page-test-secret-1111"
MGMT = {"Authorization": f"Bearer {SECRET}"}
REMOTE = {"REMOTE_ADDR": "203.0.113.7"}
STATIC = Path(__file__).resolve().parent.parent / "proxy" / "static"


def page_app(upstream, **management):
    return make_app(settings_doc(provider(upstream), **{"remote-management": {"secret-key": SECRET, **management}}))


@pytest.fixture
def pclient(upstream, monkeypatch):
    monkeypatch.setattr(activity, "_recorder", None)  # a fresh in-memory record: only this test's requests
    return page_app(upstream).test_client()


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Activity in files, as under gunicorn (a fresh recorder for this test, dropped after)."""
    monkeypatch.setenv("STREAMFOLD_ACTIVITY_DIR", str(tmp_path / "activity"))
    monkeypatch.setattr(activity, "_recorder", None)
    yield tmp_path / "activity"
    activity._recorder = None


# -- who may load the page ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/manage", "/manage/static/manage.js", "/manage/static/dom.js",
                                  "/manage/static/providers.js", "/manage/static/manage.css"])
def test_page_and_its_files_carry_a_strict_policy(pclient, path):
    response = pclient.get(path)
    response.close()
    assert response.status_code == 200
    policy = response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                      "base-uri 'none'", "form-action 'self'"):
        assert directive in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


def test_page_is_404_when_management_is_off(upstream, tmp_path):
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream)))
    client = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}).test_client()
    for url in ("/manage", "/manage/static/manage.js"):
        response = client.get(url)
        response.close()
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"
    assert client.get("/healthz").status_code == 200


def test_the_readme_says_in_one_line_how_to_turn_the_page_on_and_that_line_works(upstream, tmp_path):
    # Issue 21, newcomer friction: the Operator page section did not say how to turn the page on.
    section = (Path(__file__).resolve().parent.parent / "README.md").read_text().split("## Operator page\n", 1)[1]
    line = next(text for text in section.splitlines() if text.strip())
    command = re.search(r"`MANAGEMENT_SECRET=\$\(openssl rand -hex 24\) gunicorn app:app`", line)
    assert command and "/manage" in line, line
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream)))  # no remote-management
    secret = os.urandom(24).hex()  # what the line's $(openssl rand -hex 24) gives
    client = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {"MANAGEMENT_SECRET": secret}}).test_client()
    page = client.get("/manage")
    page.close()
    assert page.status_code == 200
    config = client.get("/v0/management/config", headers={"Authorization": f"Bearer {secret}"})
    assert config.status_code == 200


def test_page_refuses_a_remote_client_unless_allow_remote(upstream):
    refused = page_app(upstream).test_client().get("/manage", environ_base=REMOTE)
    assert refused.status_code == 403
    assert "allow-remote" in refused.get_json()["error"]["message"]
    allowed = page_app(upstream, **{"allow-remote": True}).test_client()
    assert allowed.get("/manage", environ_base=REMOTE).status_code == 200
    assert allowed.get("/v0/management/overview", headers=MGMT, environ_base=REMOTE).status_code == 200


def test_a_locked_out_address_gets_neither_the_api_nor_the_page(pclient):
    for _ in range(5):
        assert pclient.get("/v0/management/overview", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert pclient.get("/v0/management/overview", headers=MGMT).status_code == 429
    locked = pclient.get("/manage")
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert pclient.get("/manage", environ_base={"REMOTE_ADDR": "127.0.0.2"}).status_code == 200


def test_lockout_counts_failures_in_the_instance_files(upstream, files):
    client = page_app(upstream).test_client()
    for _ in range(5):
        assert client.get("/v0/management/keys", headers={"X-Management-Key": "guess"}).status_code == 401
    assert len(list(files.glob("*.auth"))) == 1
    # a second app on the same files (as a second worker would be) sees the lockout
    other = page_app(upstream).test_client()
    assert other.get("/v0/management/keys", headers=MGMT).status_code == 429


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        self.problems += [f"{name}= on <{tag}>" for name in names if name == "style" or name.startswith("on")]


def test_page_markup_needs_nothing_inline_and_the_script_never_writes_html(pclient):
    parser = _Markup()
    parser.feed(pclient.get("/manage").get_data(as_text=True))
    assert parser.problems == []
    script = "\n".join(path.read_text() for path in STATIC.glob("*.js"))
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)


def test_page_holds_the_stable_hooks(pclient):
    html = pclient.get("/manage").get_data(as_text=True)
    assert 'name="secret"' in html and 'type="password"' in html
    script = (STATIC / "providers.js").read_text()
    assert '"data-provider": p.name' in script and 'toggle("force-upstream-stream")' in script
    assert 'toggle("disabled")' in script


# -- the page API -----------------------------------------------------------------------------------
def test_recent_and_traffic_show_client_requests_not_operator_ones(pclient, upstream):
    for _ in range(3):
        assert pclient.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert pclient.post("/v1/chat/completions", json=dict(CHAT, model="nope"), headers=AUTH).status_code == 404
    pclient.get("/healthz")
    pclient.get("/manage")
    recent = pclient.get("/v0/management/recent", headers=MGMT).get_json()
    mine = [r for r in recent["records"] if r["client"] == _label(pclient)]
    assert [r["status"] for r in mine[:4]] == [404, 200, 200, 200]  # newest first
    assert not any(r["route"].startswith(("/manage", "/v0/", "/healthz")) for r in recent["records"])
    assert set(mine[0]) >= {"t", "worker", "id", "route", "model", "provider", "status", "ms", "folded", "client"}
    assert not any({"messages", "content", "input"} & set(r) for r in recent["records"])  # no content, ever
    errors = pclient.get("/v0/management/recent?status=4xx", headers=MGMT).get_json()["records"]
    assert errors and {r["status"] // 100 for r in errors} == {4}
    traffic = pclient.get("/v0/management/traffic", headers=MGMT).get_json()
    assert [w["seconds"] for w in traffic["windows"]] == [300, 3600]
    row = next(r for r in traffic["windows"][0]["rows"] if r["provider"] == "up" and r["model"] == "m")
    assert row["requests"] >= 3 and row["p95-ms"] >= row["p50-ms"] > 0


@pytest.mark.parametrize("query", ["status=teapot", "status=6xx", "status=20", "status=2%3Cimg%3E"])
def test_recent_refuses_a_bad_status_filter(pclient, query):
    response = pclient.get(f"/v0/management/recent?{query}", headers=MGMT)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "status"
    assert pclient.get("/v0/management/recent", headers=MGMT).status_code == 200


def test_files_rotate_and_traffic_says_what_it_covers(pclient_files):
    client, folder = pclient_files
    for _ in range(20):
        assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert sorted(p.name.split(".", 1)[1] for p in folder.glob("*.requests*")) == ["requests", "requests.1"]
    traffic = client.get("/v0/management/traffic", headers=MGMT).get_json()
    assert traffic["complete-since"] and not traffic["windows"][0]["complete"]
    recent = client.get("/v0/management/recent", headers=MGMT).get_json()
    assert 0 < recent["matching"] < 20 and recent["records"][0]["status"] == 200


@pytest.fixture
def pclient_files(upstream, files, monkeypatch):
    monkeypatch.setattr(activity, "SEGMENT_BYTES", 1500)  # a few records per segment
    return page_app(upstream).test_client(), files


def test_key_state_shows_a_refused_key(pclient, upstream):
    upstream.handler = lambda rec: Reply(status=401, body=b'{"error": {"message": "Incorrect API key provided"}}')
    assert pclient.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 502
    state = pclient.get("/v0/management/keys", headers=MGMT).get_json()["providers"]["up"]["keys"]
    assert state[0]["key"] == "sk-...aaaa" and state[0]["state"] == "refused" and state[0]["until"] > 0


def test_test_connection_reports_the_upstream_model_list(pclient, upstream):
    upstream.handler = lambda rec: Reply(body=b'{"object": "list", "data": [{"id": "a"}, {"id": "b"}]}')
    result = pclient.post("/v0/management/test-connection", json={"name": "up"}, headers=MGMT).get_json()
    assert result["results"][0] | {"ms": 0} == {"key": "sk-...aaaa", "ok": True, "status": 200, "models": ["a", "b"],
                                               "count": 2, "ms": 0}
    assert upstream.requests[-1].path == "/v1/models" and upstream.requests[-1].key == "sk-provider-secret-aaaa"


def test_test_connection_explains_a_refusal_and_an_unreachable_upstream(pclient, upstream):
    upstream.handler = lambda rec: Reply(status=401, body=b'{"error": {"message": "bad key"}}')
    refused = pclient.post("/v0/management/test-connection", json={"name": "up"}, headers=MGMT).get_json()
    assert refused["results"][0]["ok"] is False
    assert refused["results"][0]["error"].startswith("upstream answered HTTP 401")
    nothing = page_app(f"http://127.0.0.1:{free_port()}/v1").test_client()  # nobody listens there
    down = nothing.post("/v0/management/test-connection", json={"name": "up"}, headers=MGMT).get_json()
    error = down["results"][0]["error"]  # upstream.py's own words: which provider, which host, what the socket said
    assert error.startswith("could not connect to provider 'up' at 127.0.0.1:") and error.endswith("connection refused")


def test_test_connection_reads_at_most_a_mebibyte_of_the_answer(pclient, upstream):
    # 200 reads of 64 KiB (12.5 MiB): the test stops reading after the first MiB and drops the connection
    upstream.handler = lambda rec: Reply(events=[b"x" * 65536] * 200, delay=0.01)
    result = pclient.post("/v0/management/test-connection", json={"name": "up"}, headers=MGMT).get_json()
    assert result["results"][0]["error"] == "upstream answered HTTP 200 without an OpenAI model list"
    deadline = time.monotonic() + 30
    while upstream.requests[-1].disconnected_at is None:
        assert time.monotonic() < deadline, "the proxy read the whole answer"
        time.sleep(0.05)
    assert upstream.requests[-1].events_sent < 200


@pytest.mark.parametrize("body,status", [(b"{", 400), (b"[]", 400), (b'{"name": 3}', 400), (b'{"name": "x"}', 404)])
def test_test_connection_refuses_bad_bodies(pclient, body, status):
    response = pclient.post("/v0/management/test-connection", data=body, headers=MGMT)
    assert response.status_code == status
    assert response.get_json()["error"]["message"]
    assert pclient.get("/v0/management/overview", headers=MGMT).status_code == 200


def test_adding_a_provider_validates_like_the_file(upstream, tmp_path):
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream),
                                                            **{"remote-management": {"secret-key": SECRET}}))
    client = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}).test_client()
    before = path.read_bytes()
    bad = client.post("/v0/management/openai-compatibility", headers=MGMT,
                      json={"value": {"name": "Bad Name", "base-url": "ftp://x"}})
    assert bad.status_code == 400
    assert bad.get_json()["error"]["problems"] == [
        "openai-compatibility[1].name: use only a-z, 0-9, '-' and '_'",
        "openai-compatibility[1].base-url: must be an http:// or https:// URL"]
    assert client.post("/v0/management/openai-compatibility", headers=MGMT, json=[1]).status_code == 400
    assert path.read_bytes() == before
    good = client.post("/v0/management/openai-compatibility", headers=MGMT, json={"value": {
        "name": "second", "base-url": upstream.url, "models": [{"name": "other", "alias": "o"}]}})
    assert good.status_code == 200
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH).get_json()["data"]] == ["m", "o"]


def test_overview_names_the_settings_source_and_a_refused_reload(upstream, tmp_path):
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream),
                                                            **{"remote-management": {"secret-key": SECRET}}))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    client = app.test_client()
    first = client.get("/v0/management/overview", headers=MGMT).get_json()
    assert first["settings"] == str(path) and first["reload-error"] is None and first["redis"] == {"state": "off"}
    assert first["workers"][0]["alive"] is True
    path.write_text(path.read_text().replace("request-retry: 2", "request-retry: lots"))
    broken = client.get("/v0/management/overview", headers=MGMT).get_json()
    assert broken["reload-error"]["message"] == "does not validate: request-retry: must be an integer, not a string"


def _label(pclient) -> str:
    """How the test's unnamed client key is shown: key- and 8 digits of its identity, no key characters."""
    return "key-" + pclient.application.extensions["streamfold.identity"].of(CLIENT_KEY)[:8]


def test_client_usage_from_metrics_names_clients_not_keys(pclient, upstream):
    assert pclient.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    usage = pclient.get("/v0/management/client-usage", headers=MGMT).get_json()
    mine = next(c for c in usage["clients"] if c["client"] == _label(pclient))
    assert usage["source"] == "metrics" and mine["requests-last-hour"] >= 1 and mine["prompt-tokens"] >= 5
    assert "sk-client" not in orjson.dumps(usage).decode()


def test_an_unwritable_activity_file_never_fails_a_request(upstream, files, caplog):
    client = page_app(upstream).test_client()
    journal = activity.recorder().requests
    journal.fd = os.open(os.devnull, os.O_RDONLY)  # every write now fails (EBADF), as on a broken disk
    try:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    finally:
        os.close(journal.fd)
    failures = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(failures) == 1  # said once, not per request
    assert client.get("/v0/management/recent", headers=MGMT).status_code == 200


def test_an_unusable_activity_directory_falls_back_to_this_worker(upstream, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("STREAMFOLD_ACTIVITY_DIR", str(blocker / "activity"))
    monkeypatch.setattr(activity, "_recorder", None)
    try:
        client = page_app(upstream).test_client()
        assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        assert client.get("/v0/management/recent", headers=MGMT).get_json()["matching"] == 1
    finally:
        activity._recorder = None


def test_overview_lists_the_instances_sharing_redis(upstream, tmp_path):
    from proxy.instances import KEY_PREFIX, TTL, instance_id
    from tests.redis_util import RedisServer

    server = RedisServer()
    try:
        path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream), **{
            "remote-management": {"secret-key": SECRET}, "redis-url": server.url}))
        app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
        other = {"id": "gpu-host-2:4242", "host": "gpu-host-2", "started": 1.0, "seen": 2.0, "providers-version": 0}
        app.extensions["streamfold.state"].announce(KEY_PREFIX + other["id"], orjson.dumps(other), TTL)  # as it would
        found = app.test_client().get("/v0/management/overview", headers=MGMT).get_json()
        assert found["redis"]["state"] == "up"
        assert {i["id"]: i["this"] for i in found["instances"]} == {instance_id(): True, "gpu-host-2:4242": False}
        app.extensions["streamfold"].shared.stop()
        server.stop()
        gone = app.test_client().get("/v0/management/overview", headers=MGMT).get_json()
        assert gone["instances"] is None  # Redis is down: unknown, and the overview still answers
    finally:
        server.stop()
