"""Several instances sharing runtime provider changes and cooldowns through a real redis-server."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis
import requests
import yaml

from proxy import create_app
from proxy.config.load import build_settings
from proxy.config.model import SettingsError
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


@pytest.mark.parametrize("stored", ["version-not-a-number", "not-a-hash"])
def test_a_management_write_over_a_provider_list_redis_cannot_count_on_is_a_clear_409_and_the_store_stays_up(
        upstream, tmp_path, redis_server, serve, caplog, stored):
    """A version that is no number (a hand edit) or a key of another type where the list goes: the write was a 503
    "redis is unreachable", marked the whole store down until the next probe (usage to memory, limits per worker)
    and, for the version, still wrote the list and its revision beside it (MULTI/EXEC does not roll back). Now
    nothing is written, the answer says what is wrong and how to fix it, and Redis stays up."""
    upstream.handler = fold_or_json
    client = redis.Redis.from_url(redis_server.url)
    if stored == "not-a-hash":
        client.set("streamfold:providers", b"not a hash")
    else:
        client.hset("streamfold:providers", mapping={"providers": b"[]", "version": b"three", "revision": b"hand"})
    before = client.dump("streamfold:providers")
    app = create_app({"PROXY_SETTINGS": str(write_settings(tmp_path / "s.yaml", shared_doc(upstream,
                                                                                             redis_server.url))),
                      "ENVIRON": {}})
    try:
        live = serve(app)

        def patch() -> requests.Response:
            return requests.patch(live.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                                  json={"name": "up", "value": {"force-upstream-stream": True}})
        refused = patch()
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]["message"]
        assert "streamfold:providers" in message and "nothing was changed" in message and "DEL" in message
        assert client.dump("streamfold:providers") == before  # nothing written beside what was there
        assert app.extensions["streamfold.state"].up and app.extensions["streamfold"].shared.up
        assert "UNAVAILABLE" not in caplog.text
        assert chat(live).status_code == 200 and not upstream.requests[-1].body.get("stream")
        client.delete("streamfold:providers")  # what the answer says to do
        assert patch().status_code == 200
        wait_until(lambda: chat(live).status_code == 200 and upstream.requests[-1].body.get("stream") is True, 3.0)
    finally:
        app.extensions["streamfold"].shared.stop()


def test_deployments_on_one_redis_with_other_namespaces_share_nothing_and_one_namespace_shares_everything(
        upstream, tmp_path, redis_server, serve):
    """Red team: two deployments (staging and prod) on one Redis shared the runtime provider list, the management
    lockout, cooldowns, client limits, the instance list and the fleet's keys. With redis-namespace each keeps
    its own; two instances of one deployment (same namespace) still share all of it."""
    limited = "sk-limited-client-7777"
    apps = {}
    for name, namespace in (("prod-a", "prod"), ("prod-b", "prod"), ("staging", "staging")):
        doc = shared_doc(upstream, redis_server.url)
        doc["api-keys"] = [*doc["api-keys"], {"key": limited, "name": "limited", "rpm": 2}]
        doc["redis-namespace"] = namespace
        path = write_settings(tmp_path / f"{name}.yaml", doc)
        apps[name] = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    try:
        prod_a, prod_b, staging = (serve(app) for app in apps.values())
        upstream.handler = fold_or_json
        # runtime providers: staging removes "extra", prod folds "up"; each deployment sees its own change only
        deleted = requests.delete(staging.url + "/v0/management/openai-compatibility?name=extra", headers=MGMT,
                                  timeout=10)
        assert deleted.status_code == 200
        patched = requests.patch(prod_a.url + "/v0/management/openai-compatibility", headers=MGMT, timeout=10,
                                 json={"name": "up", "value": {"force-upstream-stream": True}})
        assert patched.status_code == 200
        wait_until(lambda: all_folded_via(prod_b, upstream), 3.0)  # prod-b follows prod-a
        assert chat(staging, "x").status_code == 404
        assert chat(prod_a, "x").status_code == 200 and chat(prod_b, "x").status_code == 200
        first = len(upstream.requests)
        assert chat(staging).status_code == 200 and not upstream.requests[first].body.get("stream")
        config = requests.get(prod_b.url + "/v0/management/config", headers=MGMT, timeout=10).json()
        assert config["provider-sources"] == {"up": "runtime", "extra": "file"}
        assert config["redis-namespace"] == "prod"
        overview = requests.get(staging.url + "/v0/management/overview", headers=MGMT, timeout=10).json()
        assert overview["redis"]["namespace"] == "staging"
        # client limits: the key's 2 a minute spent at prod-a are spent at prod-b, not at staging
        limited_auth = {"Authorization": f"Bearer {limited}", "Connection": "close"}

        def limited_chat(instance) -> int:
            return requests.post(instance.url + "/v1/chat/completions", json=CHAT, headers=limited_auth,
                                 timeout=10).status_code
        assert [limited_chat(prod_a) for _ in range(2)] == [200, 200]
        assert limited_chat(prod_b) == 429
        assert [limited_chat(staging) for _ in range(2)] == [200, 200]
        # cooldowns: a key refused with a 429 at staging is skipped by staging only
        upstream.handler = lambda rec: (Reply(status=429, body=b'{"error":{"message":"slow"}}',
                                              headers={"Retry-After": "30"}) if rec.key == KEYS[0]
                                        else fold_or_json(rec))
        for _ in range(2):  # round-robin: one of these starts on key 1, gets the 429 and fails over
            assert chat(staging).status_code == 200
        upstream.handler = fold_or_json
        time.sleep(0.3)  # an announcement would travel through pub/sub meanwhile
        first = len(upstream.requests)
        for _ in range(4):
            assert chat(prod_b).status_code == 200
        assert KEYS[0] in {rec.key for rec in upstream.requests[first:]}
        # the management lockout: five wrong secrets at staging lock that address out of staging only
        wrong = {"Authorization": "Bearer not-the-secret"}
        assert [from_address(staging, "127.0.4.4", wrong).status for _ in range(5)] == [401] * 5
        assert from_address(staging, "127.0.4.4", MGMT).status == 429
        assert from_address(prod_a, "127.0.4.4", MGMT).status == 200
        # and nothing of either deployment's (usage, instances, the fleet's, ...) is left outside its namespace,
        # the events channel included
        client = redis.Redis.from_url(redis_server.url)
        keys = {key.decode() for key in client.scan_iter(count=1000)}
        assert {key.split(":", 1)[0] for key in keys} == {"prod", "staging"}
        assert {key.split(":", 2)[1] for key in keys} == {"streamfold"}
        assert any(key.startswith("prod:streamfold:providers") for key in keys)
        assert any(key.startswith("staging:streamfold:cool:") for key in keys)
        assert {c.decode() for c in client.pubsub_channels()} == {"prod:streamfold:events",
                                                                  "staging:streamfold:events"}
    finally:
        for app in apps.values():
            app.extensions["streamfold"].shared.stop()


def test_workers_booted_after_a_namespace_edit_stay_on_the_store_the_instance_started_with(
        upstream, tmp_path, redis_server):
    """Changing redis-namespace (like redis-url or state-path) needs a restart: the running workers keep their
    store. A worker gunicorn booted since (one died, a HUP) took the edited file's from the last good copy, so
    one instance kept its limits, usage and provider list in two places."""
    upstream.handler = fold_or_json
    doc = {**shared_doc(upstream, redis_server.url), "redis-namespace": "prod"}
    path = write_settings(tmp_path / "s.yaml", doc)
    server = Gunicorn(path, workers=2, threads=4)
    try:
        path.write_text(yaml.safe_dump({**doc, "redis-namespace": "staging"}, sort_keys=False))
        wait_until(lambda: server.output().count("redis-namespace changed: NEEDS A RESTART") == 2, 5.0)
        booted = server.output().count("streamfold ready")
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        server.wait_ready(booted + 1)
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_ready(booted + 3)
        assert all(chat(server).status_code == 200 for _ in range(6))
        client = redis.Redis.from_url(redis_server.url)
        time.sleep(0.5)  # each worker announces itself at boot and its in-flight counts every 0.25 s
        assert not list(client.scan_iter(match="staging:*"))
        assert any(client.scan_iter(match="prod:streamfold:instance:*"))
        assert "redis-namespace changed since the instance started: NEEDS A RESTART" in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize("namespace", ["prod:eu", "prod*", "Prod", "x" * 65, 7],
                         ids=["colon", "glob", "upper-case", "too-long", "not-a-string"])
def test_a_redis_namespace_that_is_no_short_safe_token_is_refused_by_name(namespace):
    with pytest.raises(SettingsError) as caught:
        build_settings({"redis-namespace": namespace}, {})
    expected = ("must be a string, not an integer" if namespace == 7
                else "use only a-z, 0-9, '-' and '_', at most 64 characters")
    assert caught.value.problems == [f"redis-namespace: {expected}"]


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
