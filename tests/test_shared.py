"""Several instances sharing runtime provider changes and cooldowns through a real redis-server."""
from __future__ import annotations

import json
import time

import pytest
import redis
import requests

from proxy import create_app
from tests.conftest import AUTH, CHAT, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.redis_util import RedisServer
from tests.test_settings_integrity import from_address
from tests.upstream import Reply, completion, sse, text_chunks

SECRET = "mgmt-secret-shared-5555"
MGMT = {"Authorization": f"Bearer {SECRET}"}
KEYS = ["sk-shared-key-1111", "sk-shared-key-2222"]
OK = json.dumps(completion("plain")).encode()


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def shared_doc(upstream, redis_url: str) -> dict:
    entries = {"api-key-entries": [{"api-key": k} for k in KEYS]}
    return settings_doc(provider(upstream, **entries),
                        provider(upstream, name="extra", models=[{"name": "extra-model", "alias": "x"}]),
                        **{"remote-management": {"secret-key": SECRET}, "redis-url": redis_url})


@pytest.fixture
def two_instances(upstream, redis_server, tmp_path):
    instances = []
    for name in ("a", "b"):  # one settings file copy each, like two machines
        path = write_settings(tmp_path / f"{name}.yaml", shared_doc(upstream, redis_server.url))
        instances.append(Gunicorn(path, workers=2, threads=8))
    yield instances
    for instance in instances:
        instance.stop()


def fold_or_json(rec):
    return Reply(events=sse(*text_chunks(["folded"]))) if rec.body and rec.body.get("stream") else Reply(body=OK)


def chat(instance, model="m") -> requests.Response:
    return requests.post(instance.url + "/v1/chat/completions", json=dict(CHAT, model=model),
                         headers={**AUTH, "Connection": "close"}, timeout=10)


def wait_until(check, seconds: float) -> float:
    """Seconds it took for ``check()`` to hold; fails after ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not true within {seconds} s")


def all_folded_via(instance, upstream, n=8) -> bool:
    first = len(upstream.requests)
    for _ in range(n):
        if chat(instance).status_code != 200:
            return False
    return all(rec.body.get("stream") is True for rec in upstream.requests[first:])


def test_patch_on_one_instance_reaches_the_other_and_delete_back(two_instances, upstream):
    a, b = two_instances
    upstream.handler = fold_or_json
    assert chat(b).json()["choices"][0]["message"]["content"] == "plain"
    patched = requests.patch(a.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                             json={"name": "up", "value": {"force-upstream-stream": True}})
    assert patched.status_code == 200
    assert wait_until(lambda: all_folded_via(b, upstream), 2.0) < 2.0
    assert chat(a, "x").status_code == 200
    deleted = requests.delete(b.url + "/v0/management/openai-compatibility?name=extra", headers=MGMT, timeout=10)
    assert deleted.status_code == 200
    wait_until(lambda: all(chat(a, "x").status_code == 404 for _ in range(6)), 2.0)
    config = requests.get(a.url + "/v0/management/config", headers=MGMT, timeout=10).json()
    assert config["provider-sources"] == {"up": "runtime"}
    assert "redis up" in config["shared-state"]
    exported = requests.get(a.url + "/v0/management/config.yaml", headers=MGMT, timeout=10).text
    assert "force-upstream-stream: true" in exported and "extra" not in exported


def test_rate_limit_seen_by_one_instance_is_respected_by_the_other(two_instances, upstream):
    a, b = two_instances
    upstream.handler = lambda rec: (Reply(status=429, body=b'{"error":{"message":"slow"}}',
                                          headers={"Retry-After": "30"}) if rec.key == KEYS[0] else Reply(body=OK))
    for _ in range(2):  # round-robin: one of these two starts on key 1 and gets the 429
        assert chat(a).status_code == 200
    assert any(rec.key == KEYS[0] for rec in upstream.requests)
    time.sleep(0.3)  # the announcement travels through pub/sub
    first = len(upstream.requests)
    for _ in range(10):
        assert chat(b).status_code == 200
    assert [rec.key for rec in upstream.requests[first:]] == [KEYS[1]] * 10


def test_bad_management_secrets_count_across_instances(two_instances, redis_server):
    a, b = two_instances
    wrong = {"Authorization": "Bearer not-the-secret", "Connection": "close"}

    def overview(instance, headers) -> int:
        return requests.get(instance.url + "/v0/management/overview", headers=headers, timeout=10).status_code
    assert [overview(a, wrong) for _ in range(3)] == [401] * 3
    assert [overview(b, wrong) for _ in range(2)] == [401] * 2  # five in all, at two instances
    for instance in (a, b):  # locked out everywhere, even with the right secret
        answer = requests.get(instance.url + "/v0/management/overview", headers={**MGMT, "Connection": "close"},
                              timeout=10)
        assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 0
    # the record in Redis holds times and a random tag, not the secret that was tried
    stored = redis.Redis.from_url(redis_server.url).zrange("streamfold:auth:127.0.0.1", 0, -1)
    assert len(stored) == 5 and not any(b"not-the-secret" in member for member in stored)


def test_twenty_bad_secrets_from_rotating_addresses_at_two_instances_lock_everyone_out_at_both(
        two_instances, redis_server):
    a, b = two_instances
    wrong = {"Authorization": "Bearer not-the-secret"}
    answers = [from_address(instance, f"127.0.1.{i * 2 + k + 2}", wrong)
               for i in range(10) for k, instance in enumerate((a, b))]  # one try per address, 20 in all
    assert [answer.status for answer in answers] == [401] * 20
    for instance in (a, b):  # a fresh address, with the right secret, at either instance
        assert from_address(instance, "127.0.2.2", MGMT).status == 429
    assert len(redis.Redis.from_url(redis_server.url).zrange("streamfold:auth:*", 0, -1)) == 20


def test_losing_redis_never_fails_a_request_and_changes_flow_again_after_it_returns(
        two_instances, upstream, redis_server):
    a, b = two_instances
    upstream.handler = fold_or_json
    requests.patch(a.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                   json={"name": "up", "value": {"force-upstream-stream": True}})
    # every worker of both instances has applied it before Redis goes away
    wait_until(lambda: all(i.output().count("force-upstream-stream: false -> true") == 2 for i in (a, b)), 2.0)
    redis_server.stop()
    for instance in (a, b):
        for _ in range(10):
            assert chat(instance).status_code == 200  # last known config, still folding
    assert all_folded_via(a, upstream) and all_folded_via(b, upstream)
    refused = requests.patch(a.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                             json={"name": "up", "value": {"force-upstream-stream": False}})
    assert refused.status_code == 503  # not applied anywhere rather than applied on one instance only
    wrong = requests.get(a.url + "/v0/management/overview", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert wrong.status_code == 401  # the lockout counts locally while Redis is gone
    # each instance decides alone: five wrong secrets at A (its two workers count together) lock the address
    # out at A, and B, which saw none of them, still lets it in
    bad = {"Authorization": "Bearer wrong", "Connection": "close"}
    assert [from_address(a, "127.0.3.3", bad).status for _ in range(5)] == [401] * 5
    assert from_address(a, "127.0.3.3", MGMT).status == 429
    assert from_address(b, "127.0.3.3", MGMT).status == 200
    restarted = RedisServer(port=redis_server.port)
    try:
        def patch_lands():
            r = requests.patch(a.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                               json={"name": "up", "value": {"force-upstream-stream": False}})
            return r.status_code == 200
        wait_until(patch_lands, 10)

        def plain_via_b():
            first = len(upstream.requests)
            ok = all(chat(b).status_code == 200 for _ in range(6))
            return ok and all(not rec.body.get("stream") for rec in upstream.requests[first:])
        wait_until(plain_via_b, 35)  # B's listener retries with back-off, then catches up
        assert "REDIS IS UNREACHABLE" in a.output() or "lost redis" in a.output()
    finally:
        restarted.stop()


def test_unreachable_redis_at_startup_still_serves_from_the_file(upstream, tmp_path, caplog):
    from tests.upstream import free_port
    path = write_settings(tmp_path / "s.yaml", shared_doc(upstream, f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    try:
        assert app.test_client().post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert "REDIS IS UNREACHABLE" in messages
        assert "hunter2secret" not in messages  # the password never reaches the log
    finally:
        app.extensions["streamfold"].shared.stop()


def test_redis_url_from_the_environment(upstream, tmp_path, redis_server):
    path = write_settings(tmp_path / "s.yaml", settings_doc(provider(upstream)))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {"REDIS_URL": redis_server.url}})
    try:
        assert app.extensions["streamfold"].shared is not None
        assert app.extensions["streamfold"].shared.up
    finally:
        app.extensions["streamfold"].shared.stop()


@pytest.mark.parametrize("stored", [{"providers": b"{not json", "version": b"3"},
                                    {"providers": b"[" * 1100 + b"]" * 1100, "version": b"3"},
                                    {"providers": b"[]", "version": b"three"}],
                         ids=["not-json", "too-deep", "version-not-a-number"])
def test_an_unreadable_provider_list_in_redis_is_refused_at_boot_and_while_running_and_changes_still_flow(
        upstream, tmp_path, redis_server, caplog, stored):
    """Whatever sits in streamfold:providers (another deployment, a hand edit) is refused like a list that does
    not validate: the worker boots from the file and serves, one ERROR line says so, and the listener goes on
    to take the next good list another instance writes."""
    upstream.handler = fold_or_json
    client = redis.Redis.from_url(redis_server.url)
    client.hset("streamfold:providers", mapping={**stored, "revision": b"hand-edit-1"})
    path = write_settings(tmp_path / "s.yaml", shared_doc(upstream, redis_server.url))
    apps = [create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}) for _ in range(2)]
    try:
        a, b = (app.test_client() for app in apps)
        assert a.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
        assert "provider list in the state store is not readable" in caplog.text
        client.hset("streamfold:providers", mapping={**stored, "revision": b"hand-edit-2"})
        client.publish("streamfold:events", b'{"kind": "providers", "version": 4}')
        time.sleep(0.3)  # both listeners read it (and refuse it)
        client.hset("streamfold:providers", "version", b"3")  # a number again, so the next write can count on
        patched = b.patch("/v0/management/openai-compatibility", headers=MGMT,
                          json={"name": "up", "value": {"force-upstream-stream": True}})
        assert patched.status_code == 200, patched.get_data(as_text=True)
        wait_until(lambda: a.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
                   and upstream.requests[-1].body.get("stream") is True, 5.0)
    finally:
        for app in apps:
            app.extensions["streamfold"].shared.stop()


def test_a_provider_list_key_of_another_type_in_redis_is_refused_without_taking_the_store_down(
        upstream, tmp_path, redis_server, caplog):
    """streamfold:providers holding a string (another program on the same Redis) is an unreadable list, refused
    once like one that is no JSON: Redis answered, so the store stays up (it was marked down at every read, and
    came back at the next probe, about once a second: usage went to memory, limits counted per worker)."""
    upstream.handler = fold_or_json
    client = redis.Redis.from_url(redis_server.url)
    client.set("streamfold:providers", b"not a hash")
    path = write_settings(tmp_path / "s.yaml", shared_doc(upstream, redis_server.url))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    try:
        proxy = app.test_client()
        for _ in range(3):  # the listener polls the version once a second
            assert proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
            time.sleep(0.6)
        assert app.extensions["streamfold"].shared.up
        assert "UNAVAILABLE" not in caplog.text and "UNREACHABLE" not in caplog.text
        # said at start and when the listener subscribes (each reads the list whatever its revision), not per poll
        assert caplog.text.count("provider list in the state store is not readable") == 2
        client.delete("streamfold:providers")  # the operator moves the other program away: changes flow again
        patched = proxy.patch("/v0/management/openai-compatibility", headers=MGMT,
                              json={"name": "up", "value": {"force-upstream-stream": True}})
        assert patched.status_code == 200, patched.get_data(as_text=True)
    finally:
        app.extensions["streamfold"].shared.stop()
