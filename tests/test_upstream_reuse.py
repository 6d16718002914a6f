"""Upstream connections are reused after a complete answer, whatever stops reading at ``[DONE]``.

The fold and both bridges stop at ``[DONE]``; a chunked upstream body (vLLM, llama.cpp, Ollama, TGI)
still has its last chunk to come then, and closing the response before it dropped the connection: every
forced or bridged request opened a new TCP connection (``upstream.finish`` reads that last chunk first).
The bench's nginx serves files with a Content-Length, so it never showed.
"""
from __future__ import annotations

import ssl
import subprocess
import time

import pytest
import requests

from proxy import upstream as proxy_upstream
from tests.conftest import CLIENT_KEY, make_app, provider, settings_doc
from tests.upstream import FakeUpstream, Reply, sse, text_chunks

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
REQUESTS = {
    "chat stream (relayed)": ("/v1/chat/completions", dict(CHAT, stream=True)),
    "chat forced fold": ("/v1/chat/completions", CHAT),
    "responses stream (bridged)": ("/v1/responses", {"model": "m", "input": "hi", "stream": True}),
    "responses forced fold (bridged)": ("/v1/responses", {"model": "m", "input": "hi"}),
    "messages stream (bridged)": ("/v1/messages", dict(CHAT, max_tokens=10, stream=True)),
    "messages forced fold (bridged)": ("/v1/messages", dict(CHAT, max_tokens=10)),
}


def bridged_app(upstream):
    return make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"], "force-upstream-stream": True})))


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_a_complete_answer_leaves_its_upstream_connection_in_the_pool(upstream, serve, name):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["Hel", "lo"], usage=USAGE)))  # chunked
    server = serve(bridged_app(upstream))
    path, body = REQUESTS[name]
    with requests.Session() as client:
        for _ in range(4):
            answer = client.post(server.url + path, json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
            assert answer.status_code == 200, answer.text
            assert "Hello" in answer.text or "Hel" in answer.text
    assert len(upstream.requests) == 4
    assert upstream.connections == 1


def test_an_upstream_that_goes_quiet_after_its_done_costs_its_connection_not_the_answer(upstream, serve):
    # [DONE], then nothing for 5 s before the body's end: the answer must not wait for it
    events = [*sse(*text_chunks(["Hel", "lo"], usage=USAGE)), b": late\n\n"]
    upstream.handler = lambda rec: Reply(events=events, delays={len(events) - 1: 5.0})
    server = serve(bridged_app(upstream))
    started = time.monotonic()
    answer = requests.post(server.url + "/v1/chat/completions", json=CHAT,
                           headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Hello"
    assert time.monotonic() - started < 3  # the upstream's quiet 5 s were not waited out
    answer = requests.post(server.url + "/v1/chat/completions", json=CHAT,
                           headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10)
    assert answer.status_code == 200
    assert upstream.connections == 2  # the unfinished connection was dropped, not handed to this request


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl, from tests/system-deps.sh)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("name", ["chat forced fold", "responses stream (bridged)", "messages stream (bridged)"])
def test_a_tls_upstream_connection_is_kept_too(serve, certificate, name):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    upstream = FakeUpstream(tls=context)
    try:
        upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["Hel", "lo"], usage=USAGE)))
        server = serve(make_app(settings_doc(provider(upstream, **{
            "native-apis": ["chat"], "force-upstream-stream": True, "ca-bundle": cert}))))
        path, body = REQUESTS[name]
        with requests.Session() as client:
            for _ in range(4):
                answer = client.post(server.url + path, json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
                assert answer.status_code == 200, answer.text
        assert len(upstream.requests) == 4 and upstream.connections == 1
    finally:
        upstream.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_last_chunk_that_comes_a_little_after_the_done_is_waited_for(serve, certificate, monkeypatch, tls):
    # the body's end 0.1 s after [DONE], within a FINISH_WAIT raised for the test: on a TLS connection nothing
    # is decrypted yet when the proxy first looks, which must mean "wait", not "give up"
    monkeypatch.setattr(proxy_upstream, "FINISH_WAIT", 2.0)
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
    upstream = FakeUpstream(tls=context)
    try:
        upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["Hel", "lo"], usage=USAGE)), end_delay=0.1)
        extra = {"ca-bundle": certificate[0]} if tls else {}
        server = serve(make_app(settings_doc(provider(upstream, **{
            "native-apis": ["chat"], "force-upstream-stream": True, **extra}))))
        path, body = REQUESTS["responses stream (bridged)"]
        with requests.Session() as client:
            for _ in range(3):
                answer = client.post(server.url + path, json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
                assert answer.status_code == 200, answer.text
        assert upstream.connections == 1
    finally:
        upstream.stop()
