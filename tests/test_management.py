"""Management API and hot reload: auth, redaction, writes to the file, live routing, concurrency."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from proxy import create_app
from tests.conftest import AUTH, CHAT, CLIENT_KEY, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import Reply, sse, text_chunks

SECRET = "mgmt-secret-value-9999"
MGMT = {"Authorization": f"Bearer {SECRET}"}
ENV_KEY = "sk-from-environment-7777"
ENV = {"UPSTREAM_KEY": ENV_KEY}


def doc_for(upstream, **top) -> dict:
    entries = {"api-key-entries": [{"api-key": "${UPSTREAM_KEY}"}]}
    return settings_doc(provider(upstream, **entries),
                        provider(upstream, name="second", models=[{"name": "other-model", "alias": "o"}]),
                        **{"remote-management": {"secret-key": SECRET}, **top})


@pytest.fixture
def settings_file(tmp_path, upstream):
    return write_settings(tmp_path / "settings.yaml", doc_for(upstream))


@pytest.fixture
def mapp(settings_file):
    return create_app({"PROXY_SETTINGS": str(settings_file), "ENVIRON": ENV, "TESTING": True})


@pytest.fixture
def mclient(mapp):
    return mapp.test_client()


def file_doc(path) -> dict:
    return yaml.safe_load(path.read_text())


def force_reload_check(app) -> None:
    app.extensions["streamfold"].check_file()  # now, not within CHECK_INTERVAL


def test_management_is_absent_without_a_secret(upstream, tmp_path):
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream)))
    client = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}).test_client()
    for method in ("get", "put", "patch", "delete"):
        response = getattr(client, method)("/v0/management/openai-compatibility", headers=MGMT)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"


def test_secret_from_environment_enables_it(upstream, tmp_path):
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream)))
    client = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {"MANAGEMENT_SECRET": SECRET}}).test_client()
    assert client.get("/v0/management/config", headers=MGMT).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"X-Management-Key": "nope"},
                                     {"Authorization": f"Bearer {CLIENT_KEY}"}])
def test_missing_or_wrong_secret_is_401(mclient, headers):
    response = mclient.get("/v0/management/config", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "invalid_management_key"


def test_right_secret_in_either_header(mclient):
    assert mclient.get("/v0/management/config", headers=MGMT).status_code == 200
    assert mclient.get("/v0/management/config", headers={"X-Management-Key": SECRET}).status_code == 200


def test_remote_address_is_refused_unless_allowed(mclient, upstream, tmp_path):
    remote = {"REMOTE_ADDR": "203.0.113.7"}
    assert mclient.get("/v0/management/config", headers=MGMT, environ_base=remote).status_code == 403
    path = write_settings(tmp_path / "r.yaml", doc_for(upstream, **{
        "remote-management": {"secret-key": SECRET, "allow-remote": True}}))
    client = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": ENV}).test_client()
    assert client.get("/v0/management/config", headers=MGMT, environ_base=remote).status_code == 200


def test_five_bad_secrets_lock_the_address_out(mclient):
    for _ in range(5):
        assert mclient.get("/v0/management/config", headers={"X-Management-Key": "guess"}).status_code == 401
    locked = mclient.get("/v0/management/config", headers=MGMT)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    other = {"REMOTE_ADDR": "127.0.0.2"}
    assert mclient.get("/v0/management/config", headers=MGMT, environ_base=other).status_code == 200


def test_config_redacts_every_secret(mclient):
    response = mclient.get("/v0/management/config", headers=MGMT)
    text = response.get_data(as_text=True)
    for secret in (SECRET, CLIENT_KEY, ENV_KEY, "sk-provider-secret-aaaa"):
        assert secret not in text
    body = response.get_json()
    assert body["openai-compatibility"][0]["api-key-entries"][0]["api-key"] == "sk-...7777"
    assert body["remote-management"]["secret-key"] == "...9999"  # never more than the last 4 characters
    assert body["api-keys"][0]["key"] == "sk-...0001"


def test_patch_force_upstream_stream_changes_file_and_live_routing(mclient, upstream, settings_file):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["folded"])))
    response = mclient.patch("/v0/management/openai-compatibility", headers=MGMT,
                             json={"name": "up", "value": {"force-upstream-stream": True}})
    assert response.status_code == 200
    written = file_doc(settings_file)["openai-compatibility"][0]
    assert written["force-upstream-stream"] is True
    assert written["api-key-entries"] == [{"api-key": "${UPSTREAM_KEY}"}]  # reference kept, secret not on disk
    assert ENV_KEY not in settings_file.read_text()
    answer = mclient.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert answer.get_json()["choices"][0]["message"]["content"] == "folded"
    assert upstream.requests[-1].body["stream"] is True
    assert upstream.requests[-1].key == ENV_KEY


def test_patch_by_index_and_unknown_targets(mclient, settings_file):
    assert mclient.patch("/v0/management/openai-compatibility", headers=MGMT,
                         json={"index": 1, "value": {"prefix": "lab"}}).status_code == 200
    assert file_doc(settings_file)["openai-compatibility"][1]["prefix"] == "lab"
    assert mclient.patch("/v0/management/openai-compatibility", headers=MGMT,
                         json={"name": "ghost", "value": {"disabled": True}}).status_code == 404
    assert mclient.patch("/v0/management/openai-compatibility", headers=MGMT,
                         json={"index": 7, "value": {"disabled": True}}).status_code == 404


def test_put_replaces_the_list_and_redacted_keys_round_trip(mclient, upstream, settings_file):
    listed = mclient.get("/v0/management/openai-compatibility", headers=MGMT).get_json()["openai-compatibility"]
    first = listed[0]
    assert first["api-key-entries"][0]["api-key"] == "sk-...7777"
    first["models"].append({"name": "new-model", "alias": "fresh"})
    response = mclient.put("/v0/management/openai-compatibility", headers=MGMT, json=[first])
    assert response.status_code == 200
    written = file_doc(settings_file)["openai-compatibility"]
    assert [p["name"] for p in written] == ["up"]
    assert written[0]["api-key-entries"][0]["api-key"] == "${UPSTREAM_KEY}"
    assert mclient.post("/v1/chat/completions", json=dict(CHAT, model="fresh"), headers=AUTH).status_code == 200
    assert upstream.requests[-1].key == ENV_KEY
    assert mclient.post("/v1/chat/completions", json=dict(CHAT, model="o"), headers=AUTH).status_code == 404


def test_delete_removes_the_alias(mclient, settings_file):
    assert mclient.post("/v1/chat/completions", json=dict(CHAT, model="o"), headers=AUTH).status_code == 200
    assert mclient.delete("/v0/management/openai-compatibility?name=second", headers=MGMT).status_code == 200
    assert [p["name"] for p in file_doc(settings_file)["openai-compatibility"]] == ["up"]
    assert mclient.post("/v1/chat/completions", json=dict(CHAT, model="o"), headers=AUTH).status_code == 404
    assert mclient.delete("/v0/management/openai-compatibility", headers=MGMT).status_code == 400


@pytest.mark.parametrize("method, body, problem", [
    ("patch", {"name": "up", "value": {"force-upstream-stream": "yes"}},
     "openai-compatibility[0].force-upstream-stream: must be true or false, not a string"),
    ("patch", {"name": "up", "value": {"base-url": None}}, "openai-compatibility[0].base-url: required"),
    ("put", [{"name": "a", "base-url": "http://x"}, {"name": "a", "base-url": "http://y"}],
     "openai-compatibility[1].name: duplicate provider name 'a'"),
    ("put", [{"name": "a", "base-url": "http://x", "api-key-entries": [{"api-key": "${NOT_SET_ANYWHERE}"}]}],
     "openai-compatibility[0].api-key-entries[0].api-key: environment variable NOT_SET_ANYWHERE is not set"),
])
def test_invalid_change_is_refused_and_the_old_config_keeps_serving(mclient, settings_file, method, body, problem):
    before = settings_file.read_bytes()
    response = getattr(mclient, method)("/v0/management/openai-compatibility", headers=MGMT, json=body)
    assert response.status_code == 400
    assert problem in response.get_json()["error"]["problems"]
    assert settings_file.read_bytes() == before
    assert mclient.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200


@pytest.mark.parametrize("raw", [b"{nope", b'"a string"', b'{"value": 3}'])
def test_malformed_management_bodies_are_400(mclient, raw):
    response = mclient.patch("/v0/management/openai-compatibility",
                             headers={**MGMT, "Content-Type": "application/json"}, data=raw)
    assert response.status_code == 400


def test_reload_logs_what_changed_without_key_values(mclient, caplog):
    mclient.patch("/v0/management/openai-compatibility", headers=MGMT,
                  json={"name": "up", "value": {"force-upstream-stream": True,
                                                "models": [{"name": "a"}, {"name": "b"}],
                                                "api-key-entries": [{"api-key": "sk-new-key-1234"}]}})
    lines = [r.getMessage() for r in caplog.records if "settings reloaded" in r.getMessage()]
    assert len(lines) == 1
    assert "force-upstream-stream: false -> true" in lines[0]
    assert "models: +2 -1" in lines[0] and "api-key-entries: 1 -> 1 (changed)" in lines[0]
    assert "sk-new-key-1234" not in "\n".join(r.getMessage() for r in caplog.records)


def test_hand_edits_are_picked_up_and_broken_ones_ignored(mapp, settings_file, upstream, caplog):
    client = mapp.test_client()
    good = settings_file.read_text()
    settings_file.write_text(good + "\n  - {name: broken\n")  # invalid YAML
    force_reload_check(mapp)
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert any("not valid YAML" in r.getMessage() for r in caplog.records)
    doc = yaml.safe_load(good)
    doc["openai-compatibility"][0]["force-upstream-stream"] = "sometimes"  # wrong type
    settings_file.write_text(yaml.safe_dump(doc))
    force_reload_check(mapp)
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert any("force-upstream-stream: must be true or false" in r.getMessage() for r in caplog.records)
    assert "stream" not in upstream.requests[-1].body  # still the old, non-forced config
    doc["openai-compatibility"][0]["force-upstream-stream"] = True
    settings_file.write_text(yaml.safe_dump(doc))
    force_reload_check(mapp)
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["now folded"])))
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).get_json()["choices"][0]["message"][
        "content"] == "now folded"


def test_hand_edit_is_noticed_within_about_a_second(mapp, settings_file):
    client = mapp.test_client()
    doc = file_doc(settings_file)
    doc["openai-compatibility"][1]["models"].append({"name": "late-model", "alias": "late"})
    settings_file.write_text(yaml.safe_dump(doc))
    deadline = time.monotonic() + 3
    status = None
    while time.monotonic() < deadline:
        status = client.post("/v1/chat/completions", json=dict(CHAT, model="late"), headers=AUTH).status_code
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200


def test_ten_concurrent_patches_all_land_and_the_file_is_always_valid(upstream, tmp_path, serve):
    providers = [provider(upstream, name=f"p{i}", models=[{"name": f"m{i}"}]) for i in range(10)]
    doc = settings_doc(*providers, **{"remote-management": {"secret-key": SECRET}})
    path = write_settings(tmp_path / "c.yaml", doc)
    live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
    stop, bad_reads = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                assert isinstance(yaml.safe_load(path.read_text()), dict)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                bad_reads.append(exc)

    watcher = threading.Thread(target=reader)
    watcher.start()

    def patch(i):
        return requests.patch(live.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                              json={"name": f"p{i}", "value": {"force-upstream-stream": True}}).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(patch, range(10)))
    stop.set()
    watcher.join()
    assert statuses == [200] * 10
    assert bad_reads == []
    assert all(p["force-upstream-stream"] is True for p in file_doc(path)["openai-compatibility"])


def test_patch_under_gunicorn_reaches_every_worker(upstream, tmp_path):
    path = write_settings(tmp_path / "g.yaml", settings_doc(provider(upstream),
                                                            **{"remote-management": {"secret-key": SECRET}}))
    server = Gunicorn(path, workers=2, threads=4)
    try:
        upstream.handler = lambda rec: (Reply(events=sse(*text_chunks(["f", "g"])), delay=0.05)
                                        if rec.body.get("stream")
                                        else Reply(body=json.dumps({"id": "x", "object": "chat.completion",
                                                                    "choices": []}).encode()))
        patched = requests.patch(server.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                                 json={"name": "up", "value": {"force-upstream-stream": True}})
        assert patched.status_code == 200
        patched_at = time.monotonic()
        time.sleep(1.2)  # the other worker checks the file at most once a second
        first = len(upstream.requests)

        def one(_):
            # a fresh connection each, several at once, so both workers take some
            return requests.post(server.url + "/v1/chat/completions", json=CHAT,
                                 headers={**AUTH, "Connection": "close"}, timeout=10).status_code

        # 10 at once, each ~0.1 s, against 2 workers that accept 4 connections each: both must serve
        with ThreadPoolExecutor(10) as pool:
            assert list(pool.map(one, range(20))) == [200] * 20
        seen = upstream.requests[first:]
        assert len(seen) == 20 and all(rec.body["stream"] is True for rec in seen)
        assert seen[0].started - patched_at < 2
        output = server.output()
        assert output.count("settings reloaded") == 2  # the writing worker and the other one
        pids = {line.split("[")[1].split("]")[0] for line in output.splitlines()
                if "streamfold.access" in line and "forced_stream=yes" in line}
        assert len(pids) == 2, output  # the folded requests were served by both workers
    finally:
        server.stop()
