"""Replica sets (base-urls, providers sharing a name) and their balancing, through the HTTP surface.

Each replica is its own loopback upstream, so which one answered is which one
recorded the request (and the chat answers name it too).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from proxy import create_app
from proxy.balance import remote
from proxy.config.load import build_settings
from proxy.config.model import SettingsError
from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.redis_util import RedisServer
from tests.test_routes import EMBEDDING, TEXT_COMPLETION, fixture_events, responses_json
from tests.upstream import FakeUpstream, Reply, completion, sse, text_chunks

SECRET = "mgmt-secret-fleet-7777"
MGMT = {"Authorization": f"Bearer {SECRET}"}
POLICIES = ("round-robin", "least-busy", "cache-aware")


def answer_as(name: str):
    """A vLLM-like replica that answers every route, naming itself in chat answers."""
    def handler(rec) -> Reply:
        stream = bool(rec.body and rec.body.get("stream"))
        if rec.path.endswith("/embeddings"):
            return Reply(body=json.dumps(EMBEDDING).encode())
        if rec.path.endswith("/completions") and not rec.path.endswith("/chat/completions"):
            return Reply(events=fixture_events("vllm-completions-logprobs.sse")) if stream \
                else Reply(body=json.dumps(TEXT_COMPLETION).encode())
        if rec.path.endswith("/responses"):
            return Reply(events=fixture_events("openai-responses-completed.sse")) if stream \
                else Reply(body=responses_json())
        if stream:
            return Reply(events=sse(*text_chunks([name], usage={"prompt_tokens": 3, "completion_tokens": 1,
                                                                 "total_tokens": 4})))
        return Reply(body=json.dumps(completion(name)).encode())
    return handler


@pytest.fixture
def replicas():
    fakes = [FakeUpstream() for _ in range(4)]
    for number, fake in enumerate(fakes):
        fake.handler = answer_as(f"replica-{number}")
    yield fakes
    for fake in fakes:
        fake.stop()


def fleet_doc(replicas, balance: str = "cache-aware", **extra) -> dict:
    """One provider whose base-urls are the replicas."""
    entry = provider(replicas[0], name="gpu", balance=balance, **extra)
    del entry["base-url"]
    entry["base-urls"] = [r.url for r in replicas]
    return settings_doc(entry)


def turn(session: str, number: int) -> dict:
    """Turn ``number`` of an agent session: a shared system prompt and a history that only grows."""
    messages = [{"role": "system", "content": "You are a coding agent. " * 200}]
    for i in range(number):
        messages += [{"role": "user", "content": f"{session} step {i}: " + "tool output line\n" * 60},
                     {"role": "assistant", "content": f"done {session} {i}"}]
    messages.append({"role": "user", "content": f"{session} step {number}"})
    return {"model": "m", "messages": messages}


def served_by(replicas, header: str = "x-claude-code-session-id") -> dict[str, set[int]]:
    """Session id -> the replicas that received its requests."""
    found: dict[str, set[int]] = {}
    for number, fake in enumerate(replicas):
        for rec in fake.requests:
            found.setdefault(rec.headers.get(header, "-"), set()).add(number)
    return found


# -- settings ------------------------------------------------------------------------


def test_base_urls_and_balance_are_validated():
    bad = {"name": "gpu", "base-url": "http://a/v1", "base-urls": ["ftp://b", "http://c/v1", "http://c/v1"],
           "balance": "random", "models": [{"name": "m"}]}
    with pytest.raises(SettingsError) as info:
        build_settings({"openai-compatibility": [bad], "fleet": {"balance": "fastest", "cache-threshold": 3,
                                                                "aliases": {"m": "nope"}, "max-sessions": 1}}, {})
    assert info.value.problems == [
        "openai-compatibility[0].base-urls: use base-url (one address) or base-urls (replicas), not both",
        "openai-compatibility[0].base-urls[0]: must be an http:// or https:// URL",
        "openai-compatibility[0].base-urls[2]: listed twice",
        "openai-compatibility[0].balance: must be one of cache-aware, least-busy, round-robin",
        "fleet.aliases.m: must be one of cache-aware, least-busy, round-robin",
        "fleet.balance: must be one of cache-aware, least-busy, round-robin",
        "fleet.cache-threshold: must be between 0 and 1",
        "fleet.max-sessions: must be >= 64",
    ]


def test_fleet_settings_are_in_the_config_export(replicas):
    doc = fleet_doc(replicas[:2], "least-busy", **{})
    doc["remote-management"] = {"secret-key": SECRET}
    body = make_app(doc).test_client().get("/v0/management/openai-compatibility", headers=MGMT).get_json()
    entry = body["openai-compatibility"][0]
    assert entry["base-urls"] == [replicas[0].url, replicas[1].url] and entry["balance"] == "least-busy"
    assert "base-url" not in entry  # the file takes one or the other


def test_a_provider_with_replicas_goes_back_as_get_shows_it(replicas, tmp_path):
    """GET -> PUT of the provider list is accepted as is (a disabled replica and URL credentials included),
    and the file keeps what GET redacted."""
    doc = fleet_doc(replicas[:3])
    secret_url = replicas[2].url.replace("http://", "http://ops:pw-7777@")
    doc["openai-compatibility"][0]["base-urls"][1:] = [{"url": replicas[1].url, "disabled": True}, secret_url]
    path = write_settings(tmp_path / "s.yaml", {**doc, "remote-management": {"secret-key": SECRET}})
    client = create_app({"PROXY_SETTINGS": str(path)}).test_client()
    listed = client.get("/v0/management/openai-compatibility", headers=MGMT).get_json()["openai-compatibility"]
    assert listed[0]["base-urls"] == [replicas[0].url, {"url": replicas[1].url, "disabled": True},
                                      secret_url.replace("pw-7777", "***")]
    response = client.put("/v0/management/openai-compatibility", headers=MGMT, json=listed)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert client.get("/v0/management/openai-compatibility", headers=MGMT).get_json()["openai-compatibility"] \
        == listed
    assert "pw-7777" in path.read_text()  # the credentials sent back redacted were kept
    for number in range(6):  # the disabled replica gets nothing
        assert client.post("/v1/chat/completions", json=turn(f"s{number}", 0),
                           headers={**AUTH, "x-claude-code-session-id": f"s{number}"}).status_code == 200
    assert not replicas[1].requests and replicas[0].requests and replicas[2].requests


def test_the_replica_switch_refuses_what_it_cannot_do(replicas, tmp_path):
    path = write_settings(tmp_path / "s.yaml", {**fleet_doc(replicas[:2]), "remote-management": {"secret-key": SECRET}})
    client = create_app({"PROXY_SETTINGS": str(path)}).test_client()
    for body, status in (({"replica": "gpu#1"}, 400), ({"replica": "gpu", "disabled": True}, 400),
                         ({"replica": "gpu#x", "disabled": True}, 400), ([1], 400),
                         ({"replica": "gpu#99999", "disabled": True}, 400),
                         ({"replica": "gpu#3", "disabled": True}, 404), ({"replica": "gpu#0", "disabled": True}, 404),
                         ({"replica": "other#1", "disabled": True}, 404)):
        response = client.patch("/v0/management/fleet/replica", headers=MGMT, json=body)
        assert response.status_code == status and response.get_json()["error"]["message"], body
    client.patch("/v0/management/fleet/replica", headers=MGMT, json={"replica": "gpu#1", "disabled": True})
    response = client.patch("/v0/management/fleet/replica", headers=MGMT, json={"replica": "gpu#2", "disabled": True})
    assert response.status_code == 400
    assert response.get_json()["error"]["problems"] == [
        "openai-compatibility[0].base-urls: every replica is disabled; disable the provider instead"]
    assert client.post("/v1/chat/completions", json=turn("s", 0), headers=AUTH).status_code == 200


# -- policies ----------------------------------------------------------------------------


def test_cache_aware_keeps_each_session_on_one_replica_and_spreads_new_ones(replicas):
    client = make_app(fleet_doc(replicas)).test_client()
    for number in range(4):
        for session in ("s1", "s2", "s3", "s4"):
            response = client.post("/v1/chat/completions", json=turn(session, number),
                                   headers={**AUTH, "x-claude-code-session-id": session})
            assert response.status_code == 200
    placed = served_by(replicas)
    assert all(len(placed[s]) == 1 for s in ("s1", "s2", "s3", "s4"))
    assert len(set().union(*placed.values())) == 4  # four new sessions on four idle replicas


@pytest.mark.parametrize("hint", [
    {"headers": {"x-session-affinity": "h"}},
    {"body": {"user": "alice"}},
    {"body": {"safety_identifier": "alice"}},
    {"body": {"prompt_cache_key": "thread-1"}},
    {"body": {}},  # no hint: the prefix index
])
def test_each_session_hint_and_the_prefix_index_keep_a_conversation_on_its_replica(replicas, hint):
    client = make_app(fleet_doc(replicas)).test_client()
    for number in range(4):
        for other in range(3):  # unrelated one-off requests between the turns
            client.post("/v1/chat/completions", json=turn(f"noise{number}{other}", 0), headers=AUTH)
        body = {**turn("conv", number), **hint.get("body", {})}
        assert client.post("/v1/chat/completions", json=body,
                           headers={**AUTH, **hint.get("headers", {})}).status_code == 200
    holders = [n for n, fake in enumerate(replicas) if any("conv step 0" in json.dumps(r.body) for r in fake.requests)]
    assert len(holders) == 1


def hold_slow_requests(pair) -> threading.Event:
    """The replicas answer at once, except a request that mentions "slow": held until the event is set."""
    release = threading.Event()
    for number, fake in enumerate(pair):
        quick = answer_as(f"replica-{number}")
        fake.handler = lambda rec, quick=quick: (release.wait(10), quick(rec))[1] \
            if "slow" in json.dumps(rec.body) else quick(rec)
    return release


def test_least_busy_sends_the_next_request_to_the_idle_replica(replicas, serve):
    pair = replicas[:2]
    release = hold_slow_requests(pair)
    server = serve(make_app(fleet_doc(pair, "least-busy")))
    pool = ThreadPoolExecutor(1)
    slow = pool.submit(requests.post, server.url + "/v1/chat/completions", json=turn("slow", 0), headers=AUTH,
                       timeout=15)
    try:
        deadline = time.monotonic() + 5
        while not any(fake.requests for fake in pair) and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = 0 if pair[0].requests else 1
        for _ in range(3):  # while one replica holds a request, every new one goes to the other
            response = requests.post(server.url + "/v1/chat/completions", json=turn("b", 0), headers=AUTH,
                                     timeout=10)
            assert response.json()["choices"][0]["message"]["content"] == f"replica-{1 - busy}"
    finally:
        release.set()
        assert slow.result().status_code == 200
        pool.shutdown()
    # idle again: it takes new requests
    answers = {requests.post(server.url + "/v1/chat/completions", json=turn("c", 0), headers=AUTH,
                             timeout=10).json()["choices"][0]["message"]["content"] for _ in range(4)}
    assert answers == {"replica-0", "replica-1"}


def test_a_turn_sent_elsewhere_for_imbalance_leaves_its_session_on_the_replica_holding_its_history(replicas, serve):
    pair = replicas[:2]
    for number, fake in enumerate(pair):  # a stream that mentions "slow" stays in flight for about 1.5 s
        quick = answer_as(f"replica-{number}")
        fake.handler = lambda rec, quick=quick: (
            Reply(events=sse(*text_chunks(["a", "b", "c"])), delay=0.5) if "slow" in json.dumps(rec.body)
            else quick(rec))
    doc = fleet_doc(pair)
    doc["fleet"] = {"balance-abs-threshold": 1}
    server = serve(make_app(doc))
    hint = {**AUTH, "x-claude-code-session-id": "h"}

    def ask(body: dict) -> str:
        response = requests.post(server.url + "/v1/chat/completions", json=body, headers=hint, timeout=15)
        assert response.status_code == 200, response.text
        return response.text if body.get("stream") else response.json()["choices"][0]["message"]["content"]

    home = ask(turn("h", 0))
    slow = [requests.post(server.url + "/v1/chat/completions", json={**turn("h-slow", 1), "stream": True},
                          headers=hint, timeout=15, stream=True) for _ in range(2)]
    lines = [response.iter_lines() for response in slow]
    try:
        for read in lines:  # each relays its first event: the proxy has placed it (on the session's replica)
            assert next(line for line in read if line.startswith(b"data:"))
        slow_at = [sum("slow" in json.dumps(r.body) for r in fake.requests) for fake in pair]
        assert slow_at == ([2, 0] if home == "replica-0" else [0, 2])
        away = ask(turn("h", 2))  # its replica has two in flight, the other none: this turn goes there
        assert away != home
    finally:
        for read in lines:  # to their end: nothing in flight any more
            assert b"data: [DONE]" in list(read)
    assert ask(turn("h", 3)) == home  # the session's history is still where it was (it moved before)


def test_round_robin_takes_turns(replicas):
    client = make_app(fleet_doc(replicas[:2], "round-robin")).test_client()
    answers = [client.post("/v1/chat/completions", json=turn("s", 2),
                           headers={**AUTH, "x-claude-code-session-id": "s"}).get_json()["choices"][0]["message"]
               ["content"] for _ in range(4)]
    assert answers in (["replica-0", "replica-1"] * 2, ["replica-1", "replica-0"] * 2)


def test_one_alias_on_several_providers_is_a_replica_set_with_the_alias_policy(replicas):
    doc = settings_doc(*(provider(fake, name=f"p{n}") for n, fake in enumerate(replicas[:3])),
                       fleet={"balance": "round-robin", "aliases": {"m": "cache-aware"}})
    client = make_app(doc).test_client()
    for number in range(3):
        for session in ("x", "y", "z"):
            assert client.post("/v1/chat/completions", json=turn(session, number),
                               headers={**AUTH, "x-session-affinity": session}).status_code == 200
    placed = served_by(replicas[:3], "x-session-affinity")
    assert all(len(placed[s]) == 1 for s in "xyz") and len(set().union(*placed.values())) == 3


# -- failover ---------------------------------------------------------------------------------


def _session_replica(replicas, session: str) -> int:
    (only,) = served_by(replicas)[session]
    return only


@pytest.mark.parametrize("failure", ["error", "down", "cooling", "disabled", "replica-disabled"])
def test_a_replica_that_fails_loses_its_sessions_without_an_error_and_gets_new_ones_when_back(replicas, failure,
                                                                                            tmp_path):
    pair = [FakeUpstream(), FakeUpstream()] if failure == "down" else replicas[:2]
    if failure == "down":
        for number, fake in enumerate(pair):
            fake.handler = answer_as(f"replica-{number}")
    if failure == "disabled":  # two providers sharing the alias; the page's toggle disables one
        path = write_settings(tmp_path / "s.yaml", settings_doc(
            provider(pair[0], name="p0"), provider(pair[1], name="p1"),
            **{"remote-management": {"secret-key": SECRET}}))
        client = create_app({"PROXY_SETTINGS": str(path)}).test_client()
    elif failure == "replica-disabled":  # one provider's base-urls; the management API disables one of them
        path = write_settings(tmp_path / "s.yaml", {**fleet_doc(pair), "remote-management": {"secret-key": SECRET}})
        client = create_app({"PROXY_SETTINGS": str(path)}).test_client()
    else:
        client = make_app(fleet_doc(pair)).test_client()

    def ask(session: str, number: int) -> int:
        response = client.post("/v1/chat/completions", json=turn(session, number),
                               headers={**AUTH, "x-claude-code-session-id": session})
        assert response.status_code == 200, response.get_data(as_text=True)
        return int(response.get_json()["choices"][0]["message"]["content"].rsplit("-", 1)[1])

    first = ask("s", 0)
    assert ask("s", 1) == first
    broken, healthy = pair[first], pair[1 - first]
    handler = broken.handler
    if failure == "error":
        broken.handler = lambda rec: Reply(status=503, body=b'{"error": {"message": "overloaded"}}')
    elif failure == "down":  # pooled connections to it are cut, new ones refused
        broken.handler = lambda rec: Reply(events=[b"data: x\n\n"], drop_after=0)
        broken.stop()
    elif failure == "cooling":
        broken.handler = lambda rec: Reply(status=429, headers={"Retry-After": "1"}, body=b"{}")
    elif failure == "replica-disabled":
        assert client.patch("/v0/management/fleet/replica", headers=MGMT,
                            json={"replica": f"gpu#{first + 1}", "disabled": True}).status_code == 200
    else:
        assert client.patch("/v0/management/openai-compatibility", headers=MGMT,
                            json={"name": f"p{first}", "value": {"disabled": True}}).status_code == 200
    for number in range(2, 5):  # the session moved, and stays where it moved
        assert ask("s", number) == 1 - first
    assert healthy.requests[-1].headers["x-claude-code-session-id"] == "s"
    # back: new sessions use it again
    if failure == "down":
        revived = FakeUpstream.__new__(FakeUpstream)
        _restart_on_port(revived, broken.port, handler)
        pair[first] = revived
        time.sleep(1.1)  # the connect back-off starts at 1 s
    elif failure == "cooling":
        broken.handler = handler
        time.sleep(1.1)
    elif failure == "error":
        broken.handler = handler
    elif failure == "replica-disabled":
        replicas_shown = client.get("/v0/management/fleet", headers=MGMT).get_json()["providers"]["gpu"]["replicas"]
        assert [row["disabled"] for row in replicas_shown] == [n == first for n in range(2)]
        assert client.patch("/v0/management/fleet/replica", headers=MGMT,
                            json={"replica": f"gpu#{first + 1}", "disabled": False}).status_code == 200
    else:
        assert client.patch("/v0/management/openai-compatibility", headers=MGMT,
                            json={"name": f"p{first}", "value": {"disabled": False}}).status_code == 200
    fresh = {ask(f"new{n}", 0) for n in range(4)}
    assert fresh == {0, 1}
    assert ask("s", 5) == 1 - first  # the moved session stays on its new replica
    if failure == "down":
        for fake in pair:
            fake.stop()


def _restart_on_port(fake: FakeUpstream, port: int, handler) -> None:
    """A replica that comes back at the address it had."""
    from tests import upstream as module

    original = module._QuietServer.__init__

    def bind_port(self, address, handler_class):
        original(self, ("127.0.0.1", port), handler_class)

    module._QuietServer.__init__ = bind_port
    try:
        FakeUpstream.__init__(fake)
    finally:
        module._QuietServer.__init__ = original
    fake.handler = handler


# -- every route, every policy, forced or not ----------------------------------------------------

ROUTES = {
    "chat": ("/v1/chat/completions", lambda s, n: turn(s, n)),
    "chat-stream": ("/v1/chat/completions", lambda s, n: {**turn(s, n), "stream": True}),
    "completions": ("/v1/completions", lambda s, n: {"model": "m", "prompt": f"{s} " * 50 * (n + 1)}),
    "responses": ("/v1/responses", lambda s, n: {"model": "m", "input": f"{s} " * 50 * (n + 1)}),
    "responses-bridged": ("/v1/responses", lambda s, n: {"model": "m", "input": f"{s} " * 50 * (n + 1),
                                                          "store": False}),
    "messages": ("/v1/messages", lambda s, n: {"model": "m", "max_tokens": 64,
                                               "messages": turn(s, n)["messages"][1:],
                                               "system": "You are a coding agent."}),
    "messages-stream": ("/v1/messages", lambda s, n: {"model": "m", "max_tokens": 64, "stream": True,
                                                      "messages": turn(s, n)["messages"][1:]}),
    "embeddings": ("/v1/embeddings", lambda s, n: {"model": "m", "input": f"{s} text"}),
}


@pytest.mark.parametrize("forced", [False, True], ids=["plain", "forced"])
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_on_every_route(replicas, policy, route, forced):
    pair = replicas[:2]
    apis = ["chat", "completions", "embeddings"] + ([] if route == "responses-bridged" else ["responses"])
    client = make_app(fleet_doc(pair, policy, **{"force-upstream-stream": forced,
                                                 "native-apis": apis})).test_client()
    path, build = ROUTES[route]
    for number in range(4):
        response = client.post(path, json=build("conv", number), headers={**AUTH, "x-session-affinity": "conv"})
        assert response.status_code == 200, response.get_data(as_text=True)
        if route.endswith("stream"):
            assert response.get_data().rstrip().endswith((b"[DONE]", b'{"type":"message_stop"}'))
    used = {n for n, fake in enumerate(pair) if fake.requests}
    assert all(rec.headers["x-session-affinity"] == "conv" for fake in pair for rec in fake.requests)
    if policy == "cache-aware":
        assert len(used) == 1
    else:
        assert used == {0, 1}


# -- across workers and instances --------------------------------------------------------------------


def _run_sessions(urls: list[str], sessions: int, turns: int) -> None:
    """Each session's turns in order (turn n goes to ``urls[n % len(urls)]``), the sessions at once."""
    def one(session: str) -> None:
        for number in range(turns):
            response = requests.post(urls[number % len(urls)] + "/v1/chat/completions", json=turn(session, number),
                                     headers={**AUTH, "x-claude-code-session-id": session, "Connection": "close"},
                                     timeout=20)
            assert response.status_code == 200, response.text

    with ThreadPoolExecutor(sessions) as pool:
        for done in [pool.submit(one, f"s{n}") for n in range(sessions)]:
            done.result()


def test_affinity_and_counts_hold_across_three_gunicorn_workers(replicas, tmp_path):
    server = Gunicorn(write_settings(tmp_path / "fleet.yaml", fleet_doc(replicas)), workers=3, threads=8)
    try:
        _run_sessions([server.url], sessions=12, turns=5)
        workers = {line.split("[", 1)[1].split("]", 1)[0] for line in server.output().splitlines()
                   if "route=/v1/chat/completions" in line}
        metrics = requests.get(server.url + "/metrics", timeout=5).text
    finally:
        server.stop()
    placed = served_by(replicas)
    assert len(workers) >= 2  # the turns really were answered by different workers
    assert all(len(placed[f"s{n}"]) == 1 for n in range(12)), placed
    assert len(set().union(*placed.values())) >= 3  # new sessions were spread
    assert 'streamfold_routing_decisions_total{policy="cache-aware",reason="affinity",set="m"}' in metrics
    assert 'streamfold_replica_in_flight{provider="gpu",replica="gpu#1"} 0.0' in metrics


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def test_affinity_holds_across_two_instances_sharing_redis_and_each_goes_on_alone_without_it(
        replicas, redis_server, tmp_path):
    instances = [Gunicorn(write_settings(tmp_path / f"{name}.yaml", {**fleet_doc(replicas),
                                                                     "redis-url": redis_server.url}),
                          workers=2, threads=8) for name in ("a", "b")]
    try:
        _run_sessions([i.url for i in instances], sessions=8, turns=6)  # turns alternate between instances
        placed = served_by(replicas)
        assert all(len(placed[f"s{n}"]) == 1 for n in range(8)), placed
        # in-flight counts too: three requests held at instance a fill three replicas; new sessions at b
        # then go to the fourth (by chance: (1/4)^3 that all three would)
        release = hold_slow_requests(replicas)
        time.sleep(remote.INTERVAL * 3)  # the counts each instance reported while the sessions ran are gone
        pool = ThreadPoolExecutor(3)
        held = []
        try:
            for n in range(3):  # one at a time, each counted before the next is chosen
                held.append(pool.submit(requests.post, instances[0].url + "/v1/chat/completions",
                                        json=turn("slow", 0), timeout=20, headers={
                                            **AUTH, "x-claude-code-session-id": f"slow{n}", "Connection": "close"}))
                deadline = time.monotonic() + 10
                while sum("slow" in json.dumps(r.body) for fake in replicas for r in fake.requests) <= n:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            busy = {n for n, fake in enumerate(replicas) if any("slow" in json.dumps(r.body) for r in fake.requests)}
            assert len(busy) == 3
            time.sleep(remote.INTERVAL * 3)  # each worker reports its counts every INTERVAL
            answers = {requests.post(instances[1].url + "/v1/chat/completions", json=turn(f"probe{n}", 0),
                                     headers={**AUTH, "x-claude-code-session-id": f"probe{n}", "Connection": "close"},
                                     timeout=20).json()["choices"][0]["message"]["content"] for n in range(3)}
            (idle,) = set(range(4)) - busy
            assert answers == {f"replica-{idle}"}
        finally:
            release.set()
            assert [h.result().status_code for h in held] == [200] * 3
            pool.shutdown()
        for fake in replicas:
            fake.requests.clear()
        redis_server.stop()
        _run_sessions([i.url for i in instances], sessions=4, turns=2)  # Redis down: still answered
    finally:
        for instance in instances:
            instance.stop()


def test_the_prefix_index_keys_the_blocks_of_the_body_as_the_client_sent_it():
    """A block's key is the CRC-32 of its bytes of the body as received, with its position, whichever order the
    search asks for them in; the trailing partial block is not keyed."""
    import random
    import zlib

    from proxy.balance import hints

    rng = random.Random(7)
    for _ in range(300):
        raw, size = rng.randbytes(rng.choice([0, 1, 15, 64, 1000, 5000])), rng.choice([1, 16, 64, 2048])
        blocks = hints.Blocks(raw, size)
        assert blocks.length == len(raw) and blocks.count == min(len(raw) // size, hints.MAX_BLOCKS)
        wanted = [zlib.crc32(raw[i * size:(i + 1) * size]) | (i + 1) << 32 for i in range(blocks.count)]
        probes = rng.sample(range(blocks.count), min(blocks.count, rng.randint(0, 6)))
        assert [blocks.key(i) for i in probes] == [wanted[i] for i in probes]
        start = rng.randint(0, blocks.count)
        assert [blocks.key(i) for i in range(start)] + blocks.keys_from(start) == wanted


def test_hintless_anthropic_sdk_conversations_keep_their_replicas_though_system_prompt_and_tools_follow_the_history(
        replicas, serve):
    """The Anthropic SDK sends ``system`` and ``tools`` after ``messages``, so every body ends with the same 24 KB,
    and ``max_tokens`` before them. The prefix index cuts only the history: a next turn's share of it is what its
    last turn sent, and a conversation whose history is as long as another's is not taken for it because their
    bodies end alike. Cutting the whole body instead, the turns' shares are under ``cache-threshold`` and
    they spread, and the second and third conversations follow the first to its replica."""
    import anthropic

    server = serve(make_app(fleet_doc(replicas)))
    system = "You are a coding agent working in a repository. " * 80
    tools = [{"name": f"tool_{n}", "description": "Runs a thing in the workspace and returns its output. " * 30,
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}} for n in range(12)]
    names = ("conv-a", "conv-b", "conv-c")  # three a round over four replicas: ties do not repeat a replica
    with anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0, timeout=20) as client:
        histories = {name: [{"role": "user", "content": f"{name}: fix the bug in this file\n"
                             + "".join(f"{name} = {n}\n" for n in range(300))}] for name in names}
        for number in range(5):
            for name, history in histories.items():
                answer = client.messages.create(model="m", max_tokens=64 + number, messages=history,
                                                system=system, tools=tools)
                history += [{"role": "assistant", "content": answer.content[0].text},
                            {"role": "user", "content": f"{name} step {number}: " + "output line\n" * 40}]
    holders = [{n for n, fake in enumerate(replicas) if any(f"{name}: fix" in json.dumps(r.body) for r in fake.requests)}
               for name in names]
    assert all(len(found) == 1 for found in holders) and len(set().union(*holders)) == 3, holders


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_field_after_the_history_nested_too_deep_to_serialise_again_is_answered_as_without_the_prefix_index(
        replicas, path):
    """The history's end is found from the length of the fields after it serialised again: a field orjson reads
    (1,024 levels) but will not write (254) leaves the history running to the end of the body, and the request
    is answered as round-robin answers it (the chat route's 400 for a body it cannot forward, the Anthropic
    route's answer), not with a 500."""
    history = json.dumps([{"role": "user", "content": "the same long question\n" * 400}])
    raw = '{"model":"m","max_tokens":16,"messages":%s,"metadata":{"deep":%s}}' % (history, "[" * 300 + "]" * 300)
    answers = []
    for policy in ("round-robin", "cache-aware"):
        client = make_app(fleet_doc(replicas[:2], policy)).test_client()
        response = client.post(path, data=raw, headers={**AUTH, "Content-Type": "application/json"})
        body = response.get_json()
        answers.append((response.status_code, body.get("error"), body.get("content")))
    assert answers[0][0] < 500 and answers[1] == answers[0]


def four_replicas():
    """A cache-aware replica set of four (addresses never reached) for the balancer's own tests."""
    from proxy.config.model import Model, Provider
    from proxy.routing import Replicas, Target

    urls = tuple(f"http://10.0.0.{n}/v1" for n in range(4))
    gpu = Provider(name="gpu", base_url=urls[0], base_urls=urls)
    targets = Replicas(Target(gpu, "m", Model("m"), url, f"gpu#{n + 1}") for n, url in enumerate(urls))
    targets.name, targets.policy = "m", "cache-aware"
    return targets


def test_a_body_routed_without_its_bytes_is_serialised_and_one_too_deep_for_that_goes_least_busy():
    """The routes hand the balancer the body as received; a caller that does not gets it serialised again, and a
    body nested past orjson's 254 levels (its parser reads 1,024) is routed least-busy instead of raising."""
    from proxy.balance.balancer import Balancer
    from proxy.config.model import Fleet
    from proxy.keys import KeyPool

    fleet, keys, targets = Fleet(), KeyPool(), four_replicas()
    balancer = Balancer(None, fleet)
    deep: list = []
    for _ in range(300):
        deep = [deep]
    body = {"messages": [{"role": "user", "content": "x" * 5000, "extra": deep}]}
    assert balancer.route(targets, body, {}, keys, fleet).reason == "least-busy"
    plain = {"messages": [{"role": "user", "content": "".join(f"line {n}\n" for n in range(1000))}]}
    choice = balancer.route(targets, plain, {}, keys, fleet)
    balancer.served(choice, choice.targets[0], fleet)
    again = balancer.route(targets, {"messages": plain["messages"] + [{"role": "user", "content": "more"}]}, {},
                           keys, fleet)
    assert again.reason == "prefix" and again.targets[0] is choice.targets[0]


def test_memory_is_bounded_by_the_settings_with_100k_distinct_sessions():
    from proxy.balance.balancer import Balancer
    from proxy.config.model import Fleet
    from proxy.keys import KeyPool

    fleet = Fleet(max_sessions=4096, max_prefix_blocks=4096)
    targets = four_replicas()
    balancer, keys = Balancer(None, fleet), KeyPool()
    size = len(balancer.table.buffer)
    for number in range(100_000):
        headers = {"x-session-affinity": f"session-{number}"}
        body = {"messages": [{"role": "user", "content": f"prompt {number} " * 300}]}  # indexed blocks too
        choice = balancer.route(targets, body, headers, keys, fleet)
        balancer.served(choice, choice.targets[0], fleet)
        choice = balancer.route(targets, {"messages": body["messages"]}, {}, keys, fleet)
        balancer.served(choice, choice.targets[0], fleet)
    assert len(balancer.table.buffer) == size  # fixed when the table was made: 24 bytes an entry
    assert size < (4096 + 4096) * 24 + 2_000_000
    recent = [n for n in range(99_900, 100_000)
              if balancer.route(targets, {}, {"x-session-affinity": f"session-{n}"}, keys, fleet).reason == "affinity"]
    assert len(recent) >= 90  # the newest sessions are kept ...
    old = [n for n in range(1000)
           if balancer.route(targets, {}, {"x-session-affinity": f"session-{n}"}, keys, fleet).reason == "affinity"]
    assert len(old) < 50  # ... the oldest were evicted to stay within max-sessions


def test_prompts_waiting_for_the_index_thread_are_bounded_and_the_next_request_finds_them_all():
    """Entering a prompt's blocks is left to the index thread while the bodies waiting for it come to at most the
    bound ``served`` is given (the executor gives ``max-request-bytes``); past it the request enters its own, and
    a request routed by the index first enters whatever still waits."""
    from proxy.balance.balancer import Balancer
    from proxy.config.model import Fleet
    from proxy.keys import KeyPool

    fleet, keys = Fleet(), KeyPool()
    targets = four_replicas()
    balancer = Balancer(None, fleet)
    bodies = [{"messages": [{"role": "user", "content": "".join(f"conversation {n} line {i}\n" for i in range(1200))}]}
              for n in range(12)]
    choices = [balancer.route(targets, body, {}, keys, fleet) for body in bodies]
    placed = [choice.targets[0] for choice in choices]
    with balancer._entering:  # the index thread is held: nothing it was given is entered yet
        for choice in choices:
            balancer.served(choice, choice.targets[0], fleet, 70_000)
            assert balancer._waiting_bytes <= 70_000
        assert len(balancer._waiting) == 2  # two 30 KB bodies fit in 70 KB; the other ten were entered at once
    for number, body in enumerate(bodies):
        choice = balancer.route(targets, {"messages": body["messages"] + [{"role": "user", "content": "more"}]},
                                {}, keys, fleet)
        assert choice.reason == "prefix" and choice.targets[0] is placed[number]
    assert not balancer._waiting and balancer._waiting_bytes == 0


def test_prompts_waiting_for_the_index_thread_hold_at_most_the_bound_of_request_bodies():
    """A waiting prompt's blocks are a view of the whole body as received: what follows the history (the
    Anthropic SDK's system and tools, any padding a client adds) is held until the index thread gets to it, so
    the bound counts the bodies, not the histories in them."""
    from proxy.balance import hints
    from proxy.balance.balancer import Balancer
    from proxy.config.model import Fleet
    from proxy.keys import KeyPool

    fleet, keys = Fleet(), KeyPool()
    targets = four_replicas()
    balancer = Balancer(None, fleet)

    def held() -> int:  # the bodies the waiting prompts keep alive
        found, todo = 0, list(balancer._waiting)
        while todo:
            item = todo.pop()
            if isinstance(item, tuple):
                todo += item
            elif isinstance(item, hints.Blocks):
                found += len(item.data)
        return found

    bodies = [{"messages": [{"role": "user", "content": f"conversation {n} " * 600}], "system": "x" * 100_000}
              for n in range(12)]
    choices = [balancer.route(targets, body, {}, keys, fleet) for body in bodies]
    with balancer._entering:  # the index thread is held
        for choice in choices:
            balancer.served(choice, choice.targets[0], fleet, 250_000)
            assert held() <= 250_000
        assert balancer._waiting  # two 110 KB bodies fit
    balancer.settle()
    assert not balancer._waiting and balancer._waiting_bytes == 0


def test_operator_api_shows_each_replicas_load_and_the_routing_decisions(replicas, serve):
    pair = replicas[:2]
    release = hold_slow_requests(pair)
    doc = fleet_doc(pair)
    doc["remote-management"] = {"secret-key": SECRET}
    server = serve(make_app(doc))
    # the decision counters are this test process's metrics, shared by every app it made: count what this adds
    before = requests.get(server.url + "/v0/management/fleet", headers=MGMT, timeout=5).json()["sets"][0]["decisions"]
    for number in range(3):
        assert requests.post(server.url + "/v1/chat/completions", json=turn("a", number), timeout=10,
                             headers={**AUTH, "x-claude-code-session-id": "a"}).status_code == 200
    pool = ThreadPoolExecutor(1)
    slow = pool.submit(requests.post, server.url + "/v1/chat/completions", json=turn("slow", 0), headers=AUTH,
                       timeout=15)
    try:
        deadline = time.monotonic() + 5
        while not any("slow" in json.dumps(r.body) for fake in pair for r in fake.requests):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = next(n for n, fake in enumerate(pair) if any("slow" in json.dumps(r.body) for r in fake.requests))
        state = requests.get(server.url + "/v0/management/fleet", headers=MGMT, timeout=5).json()
    finally:
        release.set()
        slow.result()
        pool.shutdown()
    rows = state["providers"]["gpu"]["replicas"]
    assert [row["replica"] for row in rows] == ["gpu#1", "gpu#2"]
    assert [row["in-flight"] for row in rows] == [1 if n == busy else 0 for n in range(2)]
    assert rows[0]["url"] == pair[0].url and state["providers"]["gpu"]["balance"] == "cache-aware"
    (only,) = state["sets"]
    assert only["name"] == "m" and only["policy"] == "cache-aware" and only["replicas"] == ["gpu#1", "gpu#2"]
    added = {reason: count - before.get(reason, 0) for reason, count in only["decisions"].items()}
    assert {reason: count for reason, count in added.items() if count} == {"affinity": 2, "least-busy": 2}
    after = requests.get(server.url + "/v0/management/fleet", headers=MGMT, timeout=5).json()
    assert [row["in-flight"] for row in after["providers"]["gpu"]["replicas"]] == [0, 0]


@pytest.mark.timeout(120)
def test_the_fleet_bench_and_the_decision_bench_run_end_to_end_in_smoke_mode():
    """No figure asserted (speed is the bench's business): the harness runs and says what it measured."""
    root = Path(__file__).resolve().parent.parent
    for command, needles in (
            (["bench/fleet/run.py", "--smoke"], ["round-robin", "least-busy", "cache-aware (flood)", "oracle",
                                                  "cache-aware TTFT p50 / round-robin's", "goal"]),
            (["bench/fleet/decision.py", "--seconds", "0.1", "--prompt-kb", "8"], ["with session hint", "32"])):
        bench = subprocess.Popen([sys.executable, *command], cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            stdout, _ = bench.communicate(timeout=100)
        finally:
            if bench.poll() is None:  # its gunicorn too
                os.killpg(bench.pid, signal.SIGKILL)
                bench.wait(5)
        assert bench.returncode == 0, stdout
        assert all(needle in stdout for needle in needles), stdout


def test_history_ends_remembered_for_hostile_field_names_stay_bounded(replicas, serve):
    """The end of a body's history is remembered by its last bytes and the name of the field after it; that name
    is the client's. Bodies (each under max-request-bytes) whose field after the history has a 200 KB name, each
    ending differently, must not each leave their name in memory (1,024 of them: 10 GB at 10 MiB bodies)."""
    from proxy.balance import hints

    server = serve(make_app(fleet_doc(replicas[:2])))
    history = [{"role": "user", "content": "a long question\n" * 400}]
    for number in range(40):
        raw = json.dumps({"model": "m", "messages": history, f"{number:04d}" + "x" * 200_000: number})
        answer = requests.post(f"{server.url}/v1/chat/completions", data=raw, timeout=20,
                               headers={**AUTH, "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
    kept = sum(len(raw_tail) + len(name) for raw_tail, name in hints._ENDS)
    assert kept <= len(hints._ENDS) * 2 * 256


def test_the_remembered_end_of_a_history_is_where_serialising_the_fields_after_it_finds_it():
    """Where a body's history ends is found by serialising the fields after it the first time a client's body ends
    in some bytes, and taken from memory for later bodies ending alike (checked in place). Random clients (the
    OpenAI SDK's order: tools and sampling fields after the messages, sometimes indented), turn after turn, and
    clients whose bodies end in the same bytes with other fields before them: the remembered span is always the one
    found afresh."""
    import random

    from proxy.balance import hints

    rng = random.Random(11)
    words = ["tools", "model", "stream", "x", '"quoted"', "\u00e9t\u00e9", "{[", "\\"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    for client in range(60):
        tools = [{"type": "function", "function": {"name": f"t{n}", "description": text(rng.randint(0, 40))}}
                 for n in range(rng.randint(0, 6))]
        tail = {"temperature": 0.2} if rng.random() < 0.5 else {}
        indent = rng.choice([None, 2])
        history = [{"role": "system", "content": text(30)}]
        for turn in range(6):
            history += [{"role": "user", "content": text(rng.randint(1, 60))}]
            body = {"messages": history, "model": "m", **({"tools": tools} if tools else {}), **tail}
            raw = json.dumps(body, indent=indent).encode()
            remembered = hints.history_span(body, raw)
            hints._ENDS.clear()
            assert remembered == hints.history_span(body, raw), (client, turn)
            if rng.random() < 0.3:  # another client's body ending in the same bytes, another field before them
                other = {"messages": history, "model": "m", "n": 1, **({"tools": tools} if tools else {}), **tail}
                raw = json.dumps(other, indent=indent).encode()
                hints.history_span(body, json.dumps(body, indent=indent).encode())  # remembered again
                remembered = hints.history_span(other, raw)
                hints._ENDS.clear()
                assert remembered == hints.history_span(other, raw), (client, turn, "other")


def test_replicas_of_one_set_keep_their_own_bits_however_the_table_numbered_them():
    """A prefix entry names its holders by a bit each. It was the replica's column in the instance's table modulo
    56, so two replicas of one set whose names the table first saw 56 apart (others in between: other sets'
    replicas, a replica added later) shared a bit, and a conversation placed on one was sent on to the other.
    Each replica's bit is now its place in its set."""
    from proxy.balance.balancer import Balancer
    from proxy.config.model import Fleet
    from proxy.keys import KeyPool

    fleet, keys = Fleet(), KeyPool()
    balancer = Balancer(None, fleet)
    balancer.table.column("gpu#1")
    for number in range(55):  # another set's replicas, seen before the rest of this one
        balancer.table.column(f"other#{number}")
    targets = four_replicas()
    placed, moved = {}, []
    for conversation in range(16):
        first = "".join(f"conversation {conversation} line {i}\n" for i in range(600))
        for turn_number in range(3):
            messages = [{"role": "user", "content": first}] + [{"role": "assistant", "content": "ok"},
                                                               {"role": "user", "content": "more"}] * turn_number
            choice = balancer.route(targets, {"model": "m", "messages": messages}, {}, keys, fleet)
            where = choice.targets[0].replica_name
            balancer.served(choice, choice.targets[0], fleet)
            if placed.setdefault(conversation, where) != where:
                moved.append((conversation, placed[conversation], where))
    assert not moved, moved


def test_two_tenants_sending_one_session_hint_or_one_conversation_are_routed_apart(replicas):
    """A tenant is its key's identity: a session hint or a prompt another client key sent does not steer this
    key's requests (both would pin them to the replica the other tenant's requests went to: a tenant could
    choose where another's sessions go, and read from its own answers' timing what another sent)."""
    pair = replicas[:2]
    other_key = "sk-client-test-0002"
    doc = fleet_doc(pair)
    doc["api-keys"] = [CLIENT_KEY, other_key]
    client = make_app(doc).test_client()
    tenants = {"a": AUTH, "b": {"Authorization": f"Bearer {other_key}"}}

    def send(tenant: str, body: dict, **headers) -> str:
        response = client.post("/v1/chat/completions", json=body, headers={**tenants[tenant], **headers})
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["choices"][0]["message"]["content"]

    # one session hint: each tenant's session stays where its own first turn went, and the two went apart
    hinted = {tenant: [send(tenant, turn("s", n), **{"x-session-affinity": "same"}) for n in range(3)]
              for tenant in ("a", "b")}
    assert len(set(hinted["a"])) == 1 and len(set(hinted["b"])) == 1 and hinted["a"][0] != hinted["b"][0]
    # one conversation, no hint: tenant b's copy of a's conversation is new to the index, not a's next turn
    first = send("a", turn("c", 2))
    assert send("b", turn("c", 2)) != first
    assert send("a", turn("c", 3)) == first
