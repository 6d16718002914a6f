"""Tenant identity (issue 21, findings 1 and 14): every per-key record is keyed by a keyed hash of the key.

Two unnamed keys that end in the same four characters used to be one tenant
(their label was ``...7777``): they shared stored conversations, limit windows
and usage rows, and ``/metrics`` showed those four characters to anyone.
"""
from __future__ import annotations

import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from proxy import create_app
from proxy.config.load import build_settings
from proxy.config.model import SettingsError
from tests.conftest import make_app, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.redis_util import RedisServer
from tests.test_responses_bridge import TEXT, answer
from tests.test_routes import metric_value
from tests.test_usage import MGMT, SECRET, get_usage, wait_for_usage

ALICE, BOB = "sk-alice-secret-7777", "sk-bob-other-7777"  # unnamed: the old label of both was "...7777"


def doc_for(upstream, keys: list, **top) -> dict:
    return settings_doc(provider(upstream, **{"native-apis": ["chat"]}),
                        **{"api-keys": keys, "remote-management": {"secret-key": SECRET}, **top})


def respond(url: str, key: str, text: str, previous: str | None = None) -> requests.Response:
    body = {"model": "m", "input": text, **({"previous_response_id": previous} if previous else {})}
    return requests.post(url + "/v1/responses", json=body, timeout=20,
                         headers={"Authorization": f"Bearer {key}", "Connection": "close"})


def history_sent(upstream) -> str:
    return " ".join(str(m.get("content")) for m in upstream.requests[-1].body["messages"])


def test_two_unnamed_keys_with_the_same_last_four_share_no_stored_response_limit_or_usage(upstream, serve):
    upstream.handler = answer(*TEXT)
    live = serve(make_app(doc_for(upstream, [{"key": ALICE, "rpm": 2}, {"key": BOB, "rpm": 4}])))
    first = respond(live.url, ALICE, "alice's secret plan")
    assert first.status_code == 200
    calls = len(upstream.requests)
    stolen = respond(live.url, BOB, "and then?", first.json()["id"])
    unknown = respond(live.url, BOB, "and then?", "resp_never_existed")
    # Bob gets exactly what an unknown id gets, and the upstream never saw Alice's history for him
    assert stolen.status_code == unknown.status_code == 400
    assert stolen.json()["error"]["code"] == unknown.json()["error"]["code"] == "previous_response_not_found"
    assert len(upstream.requests) == calls
    assert respond(live.url, ALICE, "and then?", first.json()["id"]).status_code == 200
    assert "alice's secret plan" in history_sent(upstream)
    # Alice's 2 requests a minute are spent; Bob's two refused continuations counted against his own 4
    assert respond(live.url, ALICE, "more").status_code == 429
    assert [respond(live.url, BOB, "hi").status_code for _ in range(2)] == [200, 200]
    usage = wait_for_usage(live.url, 7, **{"group-by": "client"})["data"]
    assert len(usage) == 2 and sorted(row["requests"] for row in usage) == [3, 4]
    assert all(row["client"].startswith("key-") and "7777" not in row["client"] for row in usage)
    # the operator can tell which configured key each row is: /config says how each key is shown
    config = requests.get(live.url + "/v0/management/config", headers=MGMT, timeout=10).json()
    assert {k["shown-as"] for k in config["api-keys"]} == {row["client"] for row in usage}
    # the operator's metrics (per client with the management secret) show no character of either key
    metrics = requests.get(live.url + "/metrics", headers=MGMT, timeout=10).text
    clients = {line.split('client="')[1].split('"')[0] for line in metrics.splitlines() if 'client="' in line}
    assert {row["client"] for row in usage} <= clients
    assert not any("7777" in client for client in clients) and "sk-" not in metrics  # (timestamps may hold 7777)


def test_two_keys_with_the_same_name_are_refused_at_load_and_a_reload_keeps_the_running_config(
        upstream, serve, tmp_path):
    twins = [{"key": ALICE, "name": "team"}, {"key": BOB, "name": "team"}]
    with pytest.raises(SettingsError) as refused:
        build_settings(doc_for(upstream, twins), {})
    assert refused.value.problems == ["api-keys[1].name: duplicate client key name 'team' (also api-keys[0].name); "
                                      "give each key its own name"]
    with pytest.raises(SettingsError) as again:
        build_settings(doc_for(upstream, [ALICE, {"key": ALICE, "name": "alice"}]), {})
    assert again.value.problems == ["api-keys[1]: the same key is listed again (first at api-keys[0])"]
    assert ALICE not in str(again.value)
    upstream.handler = answer(*TEXT)
    path = write_settings(tmp_path / "s.yaml", doc_for(upstream, [{"key": ALICE, "name": "alice"}]))
    live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
    write_settings(path, doc_for(upstream, twins))
    time.sleep(1.3)  # the next request checks the file (at most once a second)
    assert respond(live.url, BOB, "hi").status_code == 401  # the new file was not taken
    assert respond(live.url, ALICE, "hi").status_code == 200
    overview = requests.get(live.url + "/v0/management/overview", headers=MGMT, timeout=10).json()
    assert "duplicate client key name 'team'" in overview["reload-error"]["message"]


def test_usage_rows_written_under_labels_before_identities_stay_readable(upstream, serve):
    """The migration decision: rows keyed by a label are kept as they are and shown under that label."""
    upstream.handler = answer(*TEXT)
    app = make_app(doc_for(upstream, [{"key": ALICE, "name": "team-a"}, BOB]))
    live = serve(app)
    assert respond(live.url, ALICE, "hi").status_code == 200  # creates the file and its schema
    day = time.strftime("%Y-%m-%d", time.gmtime())
    with sqlite3.connect(app.extensions["streamfold.state"].path) as db:  # what an older version wrote
        db.execute("INSERT INTO usage VALUES (?, 'team-a', 'm', 'up', 5, 1, 50, 20, 0, 0)", (day,))
        db.execute("INSERT INTO usage VALUES (?, '...7777', 'm', 'up', 2, 0, 10, 4, 0, 0)", (day,))
    rows = {row["client"]: row for row in wait_for_usage(live.url, 8, **{"group-by": "client"})["data"]}
    assert rows["team-a"]["requests"] == 6 and rows["team-a"]["prompt_tokens"] == 62  # 5 old + 1 new
    assert rows["...7777"]["requests"] == 2  # an ambiguous old label cannot be split between keys: kept
    assert respond(live.url, BOB, "hi").status_code == 200
    bob = app.extensions["streamfold.identity"].of(BOB)
    rows = {row["client"]: row for row in wait_for_usage(live.url, 9, **{"group-by": "client"})["data"]}
    assert rows[f"key-{bob[:8]}"]["requests"] == 1 and rows["...7777"]["requests"] == 2


def test_gunicorn_workers_share_one_identity_secret_in_the_state_file(upstream, tmp_path):
    """A chain of stored responses continued on whichever worker, and one usage row per key."""
    upstream.handler = answer(*TEXT)
    path = write_settings(tmp_path / "g.yaml", doc_for(upstream, [ALICE, BOB]))
    server = Gunicorn(path, workers=3, threads=8)
    try:
        with ThreadPoolExecutor(4) as pool:  # concurrent first requests: every worker races to create it
            firsts = list(pool.map(lambda i: respond(server.url, (ALICE, BOB)[i % 2], f"turn {i}"), range(12)))
        assert [r.status_code for r in firsts] == [200] * 12
        previous = firsts[0].json()["id"]
        for turn in range(6):  # each a new connection: spread over the workers
            answered = respond(server.url, ALICE, f"again {turn}", previous)
            assert answered.status_code == 200, answered.text
            previous = answered.json()["id"]
        assert respond(server.url, BOB, "mine?", previous).status_code == 400
        pids = {line.split("[")[1].split("]")[0] for line in server.output().splitlines() if "route=/v1/responses" in line}
        assert len(pids) >= 2
        usage = wait_for_usage(server.url, 19, **{"group-by": "client"})["data"]
        assert sorted(row["requests"] for row in usage) == [7, 12]  # Alice 6 + 6 turns, Bob 6 + 1 refused
    finally:
        server.stop()


def test_two_instances_sharing_redis_agree_on_identities_with_separate_state_files(upstream, tmp_path):
    upstream.handler = answer(*TEXT)
    redis_server = RedisServer()
    instances = []
    try:
        for name in ("a", "b"):
            doc = doc_for(upstream, [ALICE, BOB], **{"redis-url": redis_server.url})
            instances.append(Gunicorn(write_settings(tmp_path / f"{name}.yaml", doc), workers=2, threads=8))
        first = respond(instances[0].url, ALICE, "alice's secret plan")
        assert first.status_code == 200
        assert respond(instances[1].url, BOB, "then?", first.json()["id"]).status_code == 400
        assert respond(instances[1].url, ALICE, "then?", first.json()["id"]).status_code == 200
        assert "alice's secret plan" in history_sent(upstream)
        stored = redis.Redis.from_url(redis_server.url).get("streamfold:identity-secret")
        assert stored is not None and len(stored) == 32
        assert not (tmp_path / "a.state.db").exists() and not (tmp_path / "b.state.db").exists()
        usage = get_usage(instances[1].url, **{"group-by": "client"})
        deadline = time.monotonic() + 10
        while usage["total"]["requests"] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            usage = get_usage(instances[1].url, **{"group-by": "client"})
        assert sorted(row["requests"] for row in usage["data"]) == [1, 2]
    finally:
        for instance in instances:
            instance.stop()
        redis_server.stop()


def test_metrics_show_no_character_of_an_unnamed_key(upstream, serve):
    """Finding 14: /metrics labelled an unnamed key's tokens and refusals with its last four characters."""
    upstream.handler = answer(*TEXT)
    key = "sk-short-9z9z"
    app = make_app(doc_for(upstream, [{"key": key, "models": ["m"], "rpm": 2}]))
    live = serve(app)
    assert respond(live.url, key, "hi").status_code == 200  # tokens
    assert respond(live.url, key, "hi").status_code == 200
    assert respond(live.url, key, "hi").status_code == 429  # refused by rpm: counted per client
    metrics = requests.get(live.url + "/metrics", headers=MGMT, timeout=10).text  # per client: the operator's
    assert "9z9z" not in metrics and "sk-short" not in metrics
    shown = "key-" + app.extensions["streamfold.identity"].of(key)[:8]
    assert f'streamfold_tokens_total{{client="{shown}",kind="prompt"}}' in metrics
    assert f'streamfold_client_limited_total{{client="{shown}",reason="rpm"}} 1.0' in metrics


def test_metrics_name_tenants_only_to_a_scrape_with_the_management_secret(upstream, serve):
    """Red team of issue 21: the unauthenticated /metrics named every tenant and how many tokens it used (and
    was refused). Anyone still gets the sums over clients; the operator, with the management secret, each
    client's; a wrong secret is refused (and counted toward the lockout) as on the management API."""
    upstream.handler = answer(*TEXT)
    keys = [{"key": ALICE, "name": "tenant-alice", "rpm": 1}, {"key": BOB, "name": "tenant-bob"}]
    live = serve(make_app(doc_for(upstream, keys)))
    assert [respond(live.url, key, "hi").status_code for key in (ALICE, ALICE, BOB)] == [200, 429, 200]
    anyone = requests.get(live.url + "/metrics", timeout=10)
    assert anyone.status_code == 200 and "tenant-" not in anyone.text and 'client="' not in anyone.text
    operator = requests.get(live.url + "/metrics", headers=MGMT, timeout=10).text
    per_client = [metric_value(operator, "streamfold_tokens_total", client=name, kind="prompt")
                  for name in ("tenant-alice", "tenant-bob")]
    assert all(tokens > 0 for tokens in per_client)
    # the sums hold every client's (this process's registry also holds other tests' counts)
    assert metric_value(anyone.text, "streamfold_tokens_total", kind="prompt") >= sum(per_client)
    assert metric_value(anyone.text, "streamfold_client_limited_total", reason="rpm") >= \
        metric_value(operator, "streamfold_client_limited_total", client="tenant-alice", reason="rpm") == 1
    wrong = requests.get(live.url + "/metrics", headers={"X-Management-Key": "not-it"}, timeout=10)
    assert wrong.status_code == 401 and "tenant-" not in wrong.text


def wait_for(check, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_the_identity_secret_is_put_back_when_redis_comes_back_empty(upstream, serve, tmp_path):
    upstream.handler = answer(*TEXT)
    redis_server = RedisServer()
    try:
        path = write_settings(tmp_path / "r.yaml", doc_for(upstream, [ALICE], **{"redis-url": redis_server.url}))
        app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
        live = serve(app)
        assert respond(live.url, ALICE, "hi").status_code == 200
        client = redis.Redis.from_url(redis_server.url)
        before = client.get("streamfold:identity-secret")
        identity = app.extensions["streamfold.identity"].of(ALICE)
        redis_server.stop()
        redis_server = RedisServer(redis_server.port)  # restarted without persistence: empty
        client = redis.Redis.from_url(redis_server.url)
        # every worker that knows the secret stores it again on its next ticks (before any new one is made)
        assert wait_for(lambda: client.get("streamfold:identity-secret")) == before
        assert app.extensions["streamfold.identity"].of(ALICE) == identity
        client.close()
    finally:
        redis_server.stop()


def test_the_identity_secret_is_put_back_into_a_deleted_state_file(upstream, serve):
    upstream.handler = answer(*TEXT)
    app = make_app(doc_for(upstream, [ALICE]))
    live = serve(app)
    assert respond(live.url, ALICE, "hi").status_code == 200
    path = app.extensions["streamfold.state"].path

    def stored() -> bytes | None:
        try:
            with sqlite3.connect(path) as db:
                row = db.execute("SELECT v FROM meta WHERE k = 'identity-secret'").fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else bytes(row[0])

    before = stored()
    assert before is not None and len(before) == 32
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    assert wait_for(stored) == before
    assert respond(live.url, ALICE, "again").status_code == 200
    usage = wait_for_usage(live.url, 1, **{"group-by": "client"})["data"]
    assert [row["client"] for row in usage] == ["key-" + app.extensions["streamfold.identity"].of(ALICE)[:8]]


def test_usage_counted_while_the_store_was_down_from_the_start_lands_under_the_real_identity(upstream, serve,
                                                                                              tmp_path):
    upstream.handler = answer(*TEXT)
    path = tmp_path / "state.db"
    path.mkdir()  # the store cannot be opened: no secret can be read yet
    app = make_app(doc_for(upstream, [ALICE], **{"state-path": str(path)}))
    live = serve(app)
    assert [respond(live.url, ALICE, "hi").status_code for _ in range(2)] == [200, 200]  # requests go on
    provisional = app.extensions["streamfold.identity"].of(ALICE)
    path.rmdir()  # the store can be created now: the tick finds it, stores a secret, writes the usage
    usage = wait_for_usage(live.url, 2, **{"group-by": "client"})["data"]
    real = app.extensions["streamfold.identity"].of(ALICE)
    assert real != provisional
    assert usage == [dict(usage[0], client=f"key-{real[:8]}", requests=2)]
