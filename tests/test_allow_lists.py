"""Allow-lists decided on what serves, not on what was typed (issue 21, finding 2).

A key allowed ``["qwen*"]`` used to reach any model as ``qwen-pool/<model>``
(a provider whose name starts with qwen), ``/v1/models`` hid it, and
``/v1/messages/count_tokens`` skipped the allow-list and rpm while it could
still ask the upstream's tokenizer.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import tokenizer
from tests.conftest import make_app, settings_doc
from tests.upstream import FakeUpstream, Reply, completion

KEY = "sk-allow-list-test-0001"
HEADERS = {"Authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}


def providers(url: str) -> list[dict]:
    def one(name: str, models: list[dict], **extra) -> dict:
        return {"name": name, "base-url": url, "native-apis": ["chat"], "headers": {"x-which": name},
                "models": models, **extra}
    return [one("gpu", [{"name": "qwen3-coder", "alias": "claude-*"}, {"name": "llama-3.3-70b", "alias": "llama"},
                        {"name": "qwen2.5-72b", "alias": "qwen"}]),
            one("qwen-pool", [{"name": "mistral-large"}, {"name": "gemma-2", "alias": "tiny"}], tokenizer="vllm"),
            one("team", [{"name": "phi-4", "alias": "phi"}], prefix="tm"),
            # vLLM's usual ids hold a "/" of their own
            one("vllm", [{"name": "Qwen/Qwen2.5-7B-Instruct"}, {"name": "meta-llama/Llama-3.1-8B", "alias": "llama8"}])]


# Every spelling the router accepts, with the target it resolves to (provider, upstream model) and the
# name /v1/models lists for that target. "claude-*" is a glob alias: any name it matches is a spelling.
TARGETS = {
    ("gpu", "qwen3-coder"): ("qwen3-coder", ["qwen3-coder", "gpu/qwen3-coder", "claude-sonnet-4-5", "claude-x"]),
    ("gpu", "llama-3.3-70b"): ("llama", ["llama", "llama-3.3-70b", "gpu/llama-3.3-70b", "gpu/llama"]),
    ("gpu", "qwen2.5-72b"): ("qwen", ["qwen", "qwen2.5-72b", "gpu/qwen2.5-72b", "gpu/qwen"]),
    ("qwen-pool", "mistral-large"): ("mistral-large", ["mistral-large", "qwen-pool/mistral-large"]),
    ("qwen-pool", "gemma-2"): ("tiny", ["tiny", "gemma-2", "qwen-pool/gemma-2", "qwen-pool/tiny"]),
    ("team", "phi-4"): ("tm/phi", ["tm/phi", "tm/phi-4", "team/phi-4", "team/phi"]),
    ("vllm", "Qwen/Qwen2.5-7B-Instruct"): ("Qwen/Qwen2.5-7B-Instruct", ["Qwen/Qwen2.5-7B-Instruct",
                                                                      "vllm/Qwen/Qwen2.5-7B-Instruct"]),
    ("vllm", "meta-llama/Llama-3.1-8B"): ("llama8", ["llama8", "meta-llama/Llama-3.1-8B",
                                                     "vllm/meta-llama/Llama-3.1-8B", "vllm/llama8"]),
}
SPELLINGS = [(spelling, target) for target, (_, spellings) in TARGETS.items() for spelling in spellings]
PATTERNS = ["qwen*", "claude-*", "claude-opus*", "llama", "llama*", "*70b", "qwen-pool/*", "gpu/*", "tm/*",
            "team/phi*", "tiny", "gemma*", "mistral*", "phi*", "*", "qwen3-coder", "Qwen/*",
            "meta-llama/Llama-3.1*", "vllm/*", "*/Qwen2.5*", "Qwen/Qwen2.5-7B-Instruct", "llama8"]


def ask(client, route: str, model: str, whole: bool = False):
    """One request for ``model`` on ``route``: its status (the whole response with ``whole``)."""
    if route == "chat":
        body, path = {"model": model, "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"
    elif route == "responses":
        body, path = {"model": model, "input": "hi"}, "/v1/responses"
    else:
        body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        path = "/v1/messages/count_tokens" if route == "count_tokens" else "/v1/messages"
    response = client.post(path, json=body, headers=HEADERS)
    return response if whole else response.status_code


@pytest.fixture(scope="module")
def chat_upstream():
    fake = FakeUpstream()
    fake.handler = lambda rec: Reply(body=json.dumps(completion(model=rec.body.get("model", "?"))).encode()
                                     if rec.path.endswith("/chat/completions") else b'{"count": 3}')
    yield fake
    fake.stop()


def app_for(upstream, patterns: list[str] | None, **policy):
    key = {"key": KEY, "name": "tenant", **({"models": patterns} if patterns is not None else {}), **policy}
    return make_app(settings_doc(*providers(upstream.url), **{"api-keys": [key]}))


def listed(client) -> set[str]:
    return {m["id"] for m in client.get("/v1/models", headers=HEADERS).get_json()["data"]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3, unique=True), st.sampled_from(SPELLINGS),
       st.sampled_from(["chat", "messages", "responses", "count_tokens"]))
def test_every_spelling_of_a_model_gets_the_decision_of_the_target_it_resolves_to(chat_upstream, patterns, case,
                                                                                  route):
    spelling, (provider, model) = case
    canonical = TARGETS[(provider, model)][0]
    tokenizer._cache.clear()
    client = app_for(chat_upstream, patterns).test_client()
    before = len(chat_upstream.requests)
    status = ask(client, route, spelling)
    sent = chat_upstream.requests[before:]
    assert status in (200, 404)
    assert status == ask(client, route, canonical)  # the same decision as the target's own name
    assert (status == 200) == (canonical in listed(client))  # /v1/models lists exactly what may be called
    if status == 404:
        assert not sent  # a refused request reaches no upstream, not even a tokenizer
    elif route != "count_tokens":  # served by the target it resolves to, whatever the spelling
        assert [(r.headers["x-which"], r.body["model"]) for r in sent] == [(provider, model)]


def test_a_provider_named_like_an_allowed_model_does_not_open_its_other_models(chat_upstream):
    client = app_for(chat_upstream, ["qwen*"]).test_client()
    before = len(chat_upstream.requests)
    for route in ("chat", "messages", "responses", "count_tokens"):
        for spelling in ("qwen-pool/mistral-large", "mistral-large", "qwen-pool/tiny"):
            assert ask(client, route, spelling) == 404, (route, spelling)
    assert len(chat_upstream.requests) == before  # not even qwen-pool's tokenizer was asked
    assert listed(client) == {"qwen", "qwen3-coder"}  # qwen3-coder: the upstream name is qwen*
    assert ask(client, "chat", "claude-sonnet-4-5") == 200  # a glob alias served by qwen3-coder
    assert chat_upstream.requests[-1].body["model"] == "qwen3-coder"
    # a pattern with "/" names a provider (or prefix) namespace on purpose
    scoped = app_for(chat_upstream, ["qwen-pool/*", "tm/*"]).test_client()
    assert listed(scoped) == {"mistral-large", "tiny", "tm/phi"}
    assert [ask(scoped, "chat", m) for m in ("gemma-2", "team/phi-4", "qwen", "claude-x")] == [200, 200, 404, 404]


@pytest.mark.parametrize("route", ["chat", "responses", "messages", "count_tokens", "compact", "embeddings",
                                   "completions"])
def test_a_model_outside_the_allow_list_is_answered_exactly_like_one_that_does_not_exist(chat_upstream, route):
    client = app_for(chat_upstream, ["qwen*"]).test_client()
    before = len(chat_upstream.requests)
    if route in ("compact", "embeddings", "completions"):
        path = {"compact": "/v1/responses/compact", "embeddings": "/v1/embeddings", "completions": "/v1/completions"}
        body = {"model": "@", "input": "hi", "prompt": "hi"}

        def answer(model):
            return client.post(path[route], json=dict(body, model=model), headers=HEADERS)
    else:
        def answer(model):
            return ask(client, route, model, whole=True)
    for real in ("llama", "qwen-pool/mistral-large", "tm/phi"):
        refused, unknown = answer(real), answer("no-such-model")
        assert refused.status_code == unknown.status_code == 404, (real, refused.get_data(as_text=True))
        assert refused.get_json() == json.loads(unknown.get_data(as_text=True).replace("no-such-model", real))
    assert len(chat_upstream.requests) == before


def test_a_pattern_with_a_slash_matches_upstream_names_that_hold_one(chat_upstream):
    client = app_for(chat_upstream, ["Qwen/*", "meta-llama/Llama-3.1-8B"]).test_client()
    assert listed(client) == {"Qwen/Qwen2.5-7B-Instruct", "llama8"}
    for spelling in ("Qwen/Qwen2.5-7B-Instruct", "vllm/Qwen/Qwen2.5-7B-Instruct", "llama8", "vllm/llama8"):
        assert ask(client, "chat", spelling) == 200, spelling
        assert chat_upstream.requests[-1].headers["x-which"] == "vllm"
    assert ask(client, "chat", "qwen") == 404  # the provider/prefix forms still mean what they meant
    assert [ask(app_for(chat_upstream, ["vllm/*"]).test_client(), "chat", m) for m in ("llama8", "qwen")] == [200, 404]


def test_an_allow_list_pattern_that_matches_no_configured_model_is_logged_at_load(chat_upstream, caplog):
    app_for(chat_upstream, ["qwen*", "Qwen2.5/*", "nothing-like-it"])
    warned = [r.getMessage() for r in caplog.records if "matches no configured model" in r.getMessage()]
    assert warned == ["settings: api-keys[0].models: 'Qwen2.5/*' matches no configured model",
                      "settings: api-keys[0].models: 'nothing-like-it' matches no configured model"]


def test_count_tokens_counts_toward_rpm_and_is_refused_over_it_in_the_anthropic_shape(chat_upstream):
    client = app_for(chat_upstream, None, rpm=2).test_client()
    assert [ask(client, "count_tokens", "llama") for _ in range(2)] == [200, 200]
    refused = client.post("/v1/messages/count_tokens", headers=HEADERS,
                          json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["type"] == "error" and refused.get_json()["error"]["type"] == "rate_limit_error"
    assert ask(client, "chat", "llama") == 429  # one budget for every route
