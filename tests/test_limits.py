"""Client key policy: allowed models, rpm, tpm and max-concurrent, per instance and across instances."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import yaml

from proxy import create_app
from tests.conftest import make_app, provider, settings_doc
from tests.gunicorn_util import ROOT, Gunicorn, write_settings
from tests.redis_util import RedisServer
from tests.test_usage import KEY_A, KEY_B, MGMT, MODELS, SECRET, chat, openai_like, wait_for_usage
from tests.upstream import Reply


def policy_doc(upstream, team_a: dict | None = None, team_b: dict | None = None, **top) -> dict:
    keys = [{"key": KEY_A, "name": "team-a", **(team_a or {})}, {"key": KEY_B, "name": "team-b", **(team_b or {})}]
    return settings_doc(provider(upstream, name="gpu", models=MODELS),
                        **{"api-keys": keys, "remote-management": {"secret-key": SECRET}, **top})


def limited(response: requests.Response) -> bool:
    """A 429 from the client's own policy, with everything a client needs to back off."""
    if response.status_code != 429:
        return False
    error = response.json()["error"]
    assert error["code"] == "client_rate_limited" and error["type"] == "rate_limit_error"
    assert int(response.headers["Retry-After"]) >= 1
    return True


def test_models_globs_refuse_other_models_as_unknown_and_hide_them_from_the_listing(upstream, serve):
    upstream.handler = openai_like
    live = serve(make_app(policy_doc(upstream, team_a={"models": ["qwen*"]})))
    counter = 'streamfold_client_limited_total{client="team-a",reason="model"} '
    before = _metric(live.url, counter)  # this process's metrics outlive each test's app
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY_A, max_retries=0, timeout=10)
    assert [m.id for m in sdk.models.list()] == ["qwen"]
    assert sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}]).usage
    with pytest.raises(openai.NotFoundError) as refused:  # as for a model that does not exist: /v1/models hides it
        sdk.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 404 and refused.value.body["code"] == "model_not_found"
    assert refused.value.body["param"] == "model"
    assert len(upstream.requests) == 1  # the refused request never went upstream
    other = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY_B, max_retries=0, timeout=10)
    assert sorted(m.id for m in other.models.list()) == ["llama", "qwen"]  # no models: everything
    sdk.close()
    other.close()
    assert _metric(live.url, counter) == before + 1


def _metric(url: str, prefix: str) -> float:
    """The value of the line starting with ``prefix`` in the operator's /metrics (per client: the secret)."""
    text = requests.get(url + "/metrics", headers=MGMT, timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


def test_rpm_60_across_three_gunicorn_workers_admits_60_give_or_take_the_workers(upstream, tmp_path):
    upstream.handler = openai_like
    path = write_settings(tmp_path / "rpm.yaml", policy_doc(upstream, team_a={"rpm": 60}))
    server = Gunicorn(path, workers=3, threads=16)
    try:
        with ThreadPoolExecutor(24) as pool:
            team_a = [pool.submit(chat, server.url, KEY_A, "qwen") for _ in range(200)]
            team_b = [pool.submit(chat, server.url, KEY_B, "qwen") for _ in range(200)]
            a = [f.result() for f in team_a]
            b = [f.result() for f in team_b]
        ok = sum(r.status_code == 200 for r in a)
        assert 60 <= ok <= 63, [(r.status_code, r.text[:100]) for r in a if r.status_code not in (200, 429)][:3]
        assert sum(limited(r) for r in a) == 200 - ok
        assert [r.status_code for r in b] == [200] * 200  # the other key is not limited at all
        pids = {line.split("[")[1].split("]")[0] for line in server.output().splitlines() if "client=team-a" in line}
        assert len(pids) == 3  # the limit held across all three workers
        text = requests.get(server.url + "/metrics", headers=MGMT, timeout=10).text
        assert f'streamfold_client_limited_total{{client="team-a",reason="rpm"}} {200 - ok}.0' in text
    finally:
        server.stop()


def test_rpm_is_global_across_two_instances_sharing_redis(upstream, tmp_path):
    upstream.handler = openai_like
    redis_server = RedisServer()
    instances = []
    try:
        for name in ("a", "b"):
            doc = policy_doc(upstream, team_a={"rpm": 60}, **{"redis-url": redis_server.url})
            instances.append(Gunicorn(write_settings(tmp_path / f"{name}.yaml", doc), workers=2, threads=16))
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda i: chat(instances[i % 2].url, KEY_A, "qwen"), range(200)))
        per_instance = [sum(r.status_code == 200 for r in results[i::2]) for i in range(2)]
        assert 60 <= sum(per_instance) <= 64, (per_instance, [(r.status_code, r.text[:100]) for r in results
                                                              if r.status_code not in (200, 429)][:3])
        assert all(per_instance)  # both instances admitted some: one budget, shared
        assert sum(limited(r) for r in results) == 200 - sum(per_instance)
    finally:
        for instance in instances:
            instance.stop()
        redis_server.stop()


def test_tpm_counts_real_usage_and_refuses_once_the_minute_is_spent(upstream, serve):
    upstream.handler = openai_like  # 2 prompt + 7 completion tokens per "hi" to qwen
    live = serve(make_app(policy_doc(upstream, team_a={"tpm": 30})))
    statuses = []
    for _ in range(6):
        response = chat(live.url, KEY_A, "qwen")
        statuses.append(429 if limited(response) else response.status_code)
    assert statuses == [200, 200, 200, 200, 429, 429]  # 0, 9, 18, 27 tokens spent before each: 36 > 30
    refused = chat(live.url, KEY_A, "qwen").json()["error"]
    assert "30 tokens per minute" in refused["message"]
    assert chat(live.url, KEY_B, "qwen").status_code == 200


def all_at_once(upstream, n: int, send, answer=openai_like) -> list[requests.Response]:
    """``n`` calls of ``send`` at once; the upstream (answering with ``answer``) holds every request it
    gets until each call was either refused or has reached it, so the admitted ones are all in flight."""
    release = threading.Event()

    def held(rec):
        release.wait(10)
        return answer(rec)

    upstream.handler = held
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(send) for _ in range(n)]
        deadline = time.monotonic() + 10
        while sum(f.done() for f in futures) + len(upstream.requests) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        return [f.result() for f in futures]


def test_tpm_reserves_each_requests_estimate_so_parallel_requests_cannot_overrun_it(upstream, serve):
    """8 requests at once, each asking for up to 30 tokens, against 100 tokens per minute: only those whose
    reservation fits are sent (tpm was checked at cost 0 and charged at the end, so all 8 passed); once they
    are done their real usage (9 tokens each) replaces the reservation, and the key may go on."""
    live = serve(make_app(policy_doc(upstream, team_a={"tpm": 100})))
    answers = all_at_once(upstream, 8, lambda: chat(live.url, KEY_A, "qwen", max_tokens=30))
    refused = [a for a in answers if limited(a)]
    assert all("100 tokens per minute" in a.json()["error"]["message"] for a in refused)
    admitted = [a for a in answers if a.status_code == 200]
    assert len(admitted) + len(refused) == 8 and 1 <= len(admitted) <= 3 and len(upstream.requests) == len(admitted)
    assert chat(live.url, KEY_A, "qwen", max_tokens=30).status_code == 200  # 9 per answer spent, not 30+


def test_an_embeddings_request_reserves_its_input_only(upstream, serve):
    """Embeddings have no output: 3 at once fit 2000 tokens per minute (reserving 1024 for an answer each
    refused the third)."""
    live = serve(make_app(policy_doc(upstream, team_a={"tpm": 2000})))
    answers = all_at_once(upstream, 3, lambda: requests.post(
        live.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=20,
        json={"model": "qwen", "input": "hi"}), lambda rec: Reply(body=json.dumps({
            "object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": "qwen2.5-72b-instruct", "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode()))
    assert [a.status_code for a in answers] == [200] * 3 and len(upstream.requests) == 3


def test_max_concurrent_2_lets_exactly_two_slow_streams_in_across_workers(upstream, tmp_path):
    release = threading.Event()

    def slow(rec):
        if rec.body.get("messages", [{}])[0].get("content") == "slow":
            release.wait(30)  # the upstream thinks for a long time: the proxy's request is in flight
        return openai_like(rec)

    upstream.handler = slow
    path = write_settings(tmp_path / "conc.yaml", policy_doc(upstream, team_a={"max-concurrent": 2}))
    server = Gunicorn(path, workers=3, threads=8)
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(chat, server.url, KEY_A, "qwen", "slow", stream=True) for _ in range(2)]
            deadline = time.monotonic() + 10
            while len(upstream.requests) < 2:  # both are in, each holding a slot
                assert time.monotonic() < deadline
                time.sleep(0.02)
            more = [chat(server.url, KEY_A, "qwen", stream=True) for _ in range(3)]  # whichever worker
            assert all(limited(r) for r in more)
            assert "2 requests in flight" in more[0].json()["error"]["message"]
            assert chat(server.url, KEY_B, "qwen", stream=True).status_code == 200  # other keys unaffected
            release.set()
            for future in held:
                answer = future.result()
                assert answer.status_code == 200 and answer.content.endswith(b"data: [DONE]\n\n")
        assert len(upstream.requests) == 3
        deadline = time.monotonic() + 10
        while chat(server.url, KEY_A, "qwen").status_code != 200:  # the slots are back once the streams ended
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        release.set()
        server.stop()


def test_limits_fall_back_to_per_worker_counting_while_the_store_is_down(upstream, serve, caplog):
    upstream.handler = openai_like
    app = make_app(policy_doc(upstream, team_a={"rpm": 3}))
    live = serve(app)
    path = app.extensions["streamfold.state"].path
    assert chat(live.url, KEY_A, "qwen").status_code == 200
    os.unlink(path)
    os.mkdir(path)  # the store cannot be opened any more
    app.extensions["streamfold.state"].tick()  # what the background thread notices within a second
    statuses = [chat(live.url, KEY_A, "qwen").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]  # counted in this worker's memory meanwhile
    assert caplog.text.count("client limits count per worker") == 1
    os.rmdir(path)


@pytest.mark.parametrize("value, problem", [
    ({"rpm": -1}, "api-keys[1].rpm: must be >= 0"),
    ({"models": "qwen*"}, "api-keys[1].models: must be a list"),
    ({"max-concurrent": "2"}, "api-keys[1].max-concurrent: must be an integer, not a string"),
    ({"models": [""]}, "api-keys[1].models[0]: must be a non-empty string (a model name or glob)"),
])
def test_management_api_refuses_a_bad_policy_with_the_key_path_and_keeps_the_file(upstream, serve, tmp_path,
                                                                                value, problem):
    path = write_settings(tmp_path / "p.yaml", policy_doc(upstream))
    before = path.read_bytes()
    live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
    response = requests.patch(live.url + "/v0/management/api-keys", headers=MGMT, timeout=10,
                              json={"name": "team-b", "value": value})
    assert response.status_code == 400
    assert problem in response.json()["error"]["problems"]
    assert path.read_bytes() == before
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200


def test_management_api_changes_a_policy_live_and_refuses_unknown_fields(upstream, serve, tmp_path):
    upstream.handler = openai_like
    path = write_settings(tmp_path / "p.yaml", policy_doc(upstream))
    live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
    patch = requests.patch(live.url + "/v0/management/api-keys", headers=MGMT, timeout=10,
                           json={"name": "team-b", "value": {"models": ["llama"], "rpm": 100}})
    assert patch.status_code == 200
    assert patch.json()["api-keys"][1] == {"key": "sk-...0002", "name": "team-b", "models": ["llama"], "rpm": 100}
    assert yaml.safe_load(path.read_text())["api-keys"][1]["models"] == ["llama"]
    assert chat(live.url, KEY_B, "qwen").status_code == 404
    for body, status in (({"name": "team-b", "value": {"key": "sk-stolen"}}, 400),
                         ({"name": "nobody", "value": {"rpm": 1}}, 404), ({"value": {}}, 400)):
        response = requests.patch(live.url + "/v0/management/api-keys", headers=MGMT, json=body, timeout=10)
        assert response.status_code == status and "error" in response.json()
    garbled = requests.patch(live.url + "/v0/management/api-keys", headers=MGMT, data=b"{not json", timeout=10)
    assert garbled.status_code == 400 and garbled.json()["error"]["type"] == "invalid_request_error"
    assert KEY_B in path.read_text()  # the key itself never changed
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200


def test_bad_policy_in_the_file_stops_startup_with_one_line_per_problem(tmp_path):
    doc = {"api-keys": [{"key": "sk-x-1234", "rpm": -5, "models": "qwen*", "team": "a"}]}
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(doc))
    result = subprocess.run([sys.executable, "-c", "from proxy.config.load import load_or_exit; load_or_exit()"],
                            cwd=ROOT, env=dict(os.environ, PROXY_SETTINGS=str(path)), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for line in ("api-keys[0].rpm: must be >= 0", "api-keys[0].models: must be a list",
                 "api-keys[0].team: unknown key"):
        assert line in result.stderr


def test_the_bridges_apply_the_same_policy_in_their_own_error_shapes_and_record_usage(upstream, serve):
    """/v1/messages answers Anthropic-shaped errors, /v1/responses OpenAI-shaped; both count like chat."""
    upstream.handler = openai_like
    doc = policy_doc(upstream, team_a={"models": ["qwen*"], "rpm": 2})
    doc["openai-compatibility"][0]["native-apis"] = ["chat"]
    live = serve(make_app(doc))
    before = limited_count(live.url, "rpm")
    headers = {"x-api-key": KEY_A, "anthropic-version": "2023-06-01"}
    message = {"model": "qwen", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    refused = requests.post(live.url + "/v1/messages", headers=headers, json={**message, "model": "llama"}, timeout=10)
    assert refused.status_code == 404
    assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "not_found_error"
    assert requests.post(live.url + "/v1/messages", headers=headers, json=message, timeout=10).status_code == 200
    answer = requests.post(live.url + "/v1/responses", headers=auth_header(KEY_A), timeout=10,
                           json={"model": "qwen", "input": "hi"})
    assert answer.status_code == 200 and answer.json()["status"] == "completed"
    third = requests.post(live.url + "/v1/messages", headers=headers, json=message, timeout=10)
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    assert int(third.headers["Retry-After"]) >= 1
    fourth = requests.post(live.url + "/v1/responses", headers=auth_header(KEY_A), timeout=10,
                           json={"model": "qwen", "input": "hi"})
    assert limited(fourth)
    assert len(upstream.requests) == 2  # refused requests never went upstream
    assert limited_count(live.url, "rpm") == before + 2  # (this process's metrics outlive each test's app)
    usage = wait_for_usage(live.url, 5, **{"group-by": "client"})  # 2 answered, 3 refused: every request counts
    total = usage["total"]
    assert (total["requests"], total["errors"]) == (5, 3) and total["prompt_tokens"] and total["completion_tokens"]


def limited_count(url: str, reason: str) -> float:
    return _metric(url, f'streamfold_client_limited_total{{client="team-a",reason="{reason}"}} ')


def auth_header(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_chunked_policy_patch_over_max_request_bytes_is_a_413(upstream, serve, tmp_path):
    path = write_settings(tmp_path / "s.yaml", policy_doc(upstream, **{"max-request-bytes": 2048}))
    live = serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))
    before = path.read_bytes()

    def chunks():  # no Content-Length: only a capped read can refuse it
        yield b'{"name": "team-a", "value": {"models": ["'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"]}}'

    response = requests.patch(live.url + "/v0/management/api-keys", data=chunks(), timeout=10,
                              headers={**MGMT, "Content-Type": "application/json"})
    assert response.status_code == 413 and path.read_bytes() == before
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200
