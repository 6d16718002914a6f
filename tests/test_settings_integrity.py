"""Issue 21, settings integrity: a worker gunicorn (re)boots goes through the hot reload's guards.

One gunicorn with 2 workers for the module. For each way settings.yaml can go
wrong while the proxy runs (not YAML, not valid, valid without ``api-keys``,
being rewritten truncate-then-write) one worker is SIGKILLed, as the OOM
killer would, and then the master gets HUP: gunicorn keeps serving, and every
answer, from the respawned worker and from the workers HUP started, still
requires a valid key.
"""
from __future__ import annotations

import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from proxy import create_app
from proxy.config.load import build_settings
from proxy.config.model import SettingsError
from tests.conftest import AUTH, CHAT, CLIENT_KEY, PROVIDER_KEY, provider, settings_doc
from tests.gunicorn_util import ROOT, Gunicorn, write_settings
from tests.test_upstream_reuse import certificate  # noqa: F401 (a fixture)
from tests.upstream import FakeUpstream, Reply, free_port, sse, text_chunks

SECRET = "mgmt-secret-value-3434"
MGMT = {"Authorization": f"Bearer {SECRET}"}


def settings_text(upstream_url: str, state: Path) -> bytes:
    """Providers first and api-keys last, so the file cut short still validates, with auth off."""
    doc = {"openai-compatibility": [{"name": "up", "base-url": upstream_url,
                                     "api-key-entries": [{"api-key": PROVIDER_KEY}],
                                     "models": [{"name": "upstream-model", "alias": "m"}]}],
           "timeouts": {"connect": 2, "read": 10}, "state-path": str(state),
           "remote-management": {"secret-key": SECRET}, "api-keys": [CLIENT_KEY]}
    return yaml.safe_dump(doc, sort_keys=False).encode()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    upstream = FakeUpstream()
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fine"])))
    path = Path(tmp_path_factory.mktemp("integrity")) / "settings.yaml"
    path.write_bytes(settings_text(upstream.url, path.with_suffix(".state.db")))
    # the run directory named, so a test can delete the last good copy kept in it
    server = Gunicorn(path, workers=2, threads=4, env={"PROMETHEUS_MULTIPROC_DIR": str(path.parent / "run")})
    yield server, path
    server.stop()
    upstream.stop()


def without_api_keys(good: bytes) -> bytes:
    return good[:good.index(b"api-keys:")]


BROKEN = {
    "not-yaml": lambda good: good + b"timeouts: {connect: [\n",
    "invalid": lambda good: good.replace(b"read: 10", b"read: soon") + b"bogus-key: 1\n",
    "no-api-keys": without_api_keys,
    "bad-redis-namespace": lambda good: good + b"redis-namespace: 'prod:*'\n",  # would reach into other keys
}


REWRITE = """
import sys, time
path, good, cut = sys.argv[1], open(sys.argv[2], "rb").read(), int(sys.argv[3])
while True:
    with open(path, "wb") as fh:
        fh.write(good[:cut])
        fh.flush()
        time.sleep(0.03)
        fh.write(good[cut:])
    time.sleep(0.005)
"""


class Rewriter:
    """Rewrites the file in place again and again as cp and > do: truncate, then write, here in two parts
    with the cut (providers, no api-keys) on disk for most of the time. A process of its own, so a busy
    test process cannot pause it."""

    def __init__(self, path: Path, good: bytes) -> None:
        source = path.with_suffix(".good")
        source.write_bytes(good)
        self.proc = subprocess.Popen([sys.executable, "-c", REWRITE, str(path), str(source),
                                      str(len(without_api_keys(good)))])

    def finish(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def assert_closed_and_serving(server: Gunicorn) -> None:
    """Every answer needs the key (a new connection per request, so both workers answer), and the key works."""
    statuses = [requests.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code
                for _ in range(30)]
    assert statuses.count(200) == 0, f"{statuses.count(200)} requests without a key were served"
    assert set(statuses) == {401}
    models = requests.get(server.url + "/v1/models", timeout=10)
    assert models.status_code == 401
    answer = requests.post(server.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "fine"


@pytest.mark.parametrize("broken", [*BROKEN, "half-written", "no-api-keys-and-no-copy"])
def test_a_respawned_or_hup_booted_worker_never_serves_a_broken_open_or_half_written_file(deployed, broken):
    server, path = deployed
    good = path.read_bytes()
    booted = server.output().count("streamfold ready")
    rewriter = None
    if broken == "half-written":
        rewriter = Rewriter(path, good)
    elif broken == "no-api-keys-and-no-copy":  # a /tmp cleaner took the copy: the start's config stands in
        (path.parent / "run" / "settings.last-good.yaml").unlink()
        path.write_bytes(without_api_keys(good))
    else:
        path.write_bytes(BROKEN[broken](good))
    try:
        os.kill(server.worker_pids()[0], signal.SIGKILL)  # what the OOM killer does
        server.wait_ready(booted + 1)
        assert_closed_and_serving(server)
        before = set(server.worker_pids())
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_ready(booted + 3)
        deadline = time.monotonic() + 30
        while set(server.worker_pids()) & before and time.monotonic() < deadline:  # the old workers leave
            time.sleep(0.05)
        assert not set(server.worker_pids()) & before
        assert_closed_and_serving(server)
    finally:
        if rewriter is not None:
            rewriter.finish()
        path.write_bytes(good)
    assert server.proc.poll() is None
    assert "Worker failed to boot" not in server.output()
    if broken != "half-written":
        assert "keeping the running config" in server.output()
    if broken == "no-api-keys-and-no-copy":
        assert "starting from the config the instance started with" in server.output()


def test_a_worker_booted_from_a_copy_whose_ca_bundle_was_deleted_serves_it_and_fails_only_that_provider(
        deployed, certificate, tmp_path):  # noqa: F811 - the fixture imported above
    """Red team of issue 21: the last good copy names a ca-bundle deleted since, so it no longer validates; every
    worker gunicorn booted from it failed ("Worker failed to boot"), which halts gunicorn. Now the worker boots
    from the copy (its keys still required), logs why, and only that provider's requests fail, with a 502."""
    server, path = deployed
    good = path.read_bytes()
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certificate[0]).read_bytes())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    secure = FakeUpstream(tls=context)
    secure.handler = lambda rec: Reply(events=sse(*text_chunks(["secure"])))
    doc = yaml.safe_load(good)
    doc["openai-compatibility"].append({"name": "tls", "base-url": secure.url, "ca-bundle": str(bundle),
                                        "api-key-entries": [{"api-key": PROVIDER_KEY}], "models": [{"name": "t"}]})
    copy = path.parent / "run" / "settings.last-good.yaml"
    try:
        path.write_bytes(yaml.safe_dump(doc, sort_keys=False).encode())
        deadline = time.monotonic() + 10
        # a worker took it: the copy (none yet under load) names the bundle
        while not copy.is_file() or str(bundle).encode() not in copy.read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bundle.unlink()
        booted = server.output().count("streamfold ready")
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        server.wait_ready(booted + 1)
        os.kill(server.proc.pid, signal.SIGHUP)  # both workers now boot from the copy
        server.wait_ready(booted + 3)
        assert_closed_and_serving(server)
        for _ in range(6):  # both workers: the provider whose bundle is gone is a clear 502, never a 500
            failed = requests.post(server.url + "/v1/chat/completions", headers={**AUTH, "Connection": "close"},
                                   json=dict(CHAT, model="t"), timeout=10)
            assert failed.status_code == 502 and "ca-bundle" in failed.json()["error"]["message"]
    finally:
        path.write_bytes(good)
        secure.stop()
    assert server.proc.poll() is None
    assert "Worker failed to boot" not in server.output()
    assert f"the last good settings no longer validate: openai-compatibility[1].ca-bundle: file not found: " \
           f"{bundle}; booting from them anyway" in server.output()


def test_a_fresh_start_never_takes_a_file_that_is_being_rewritten(tmp_path, upstream):
    """No last good config yet: the master waits for the file to read the same twice, and gives up clearly."""
    path = tmp_path / "settings.yaml"
    good = settings_text(upstream.url, tmp_path / "s.db")
    path.write_bytes(good)
    rewriter = Rewriter(path, good)
    try:
        started = subprocess.run([sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{free_port()}"],
                                 cwd=ROOT, env=dict(os.environ, PROXY_SETTINGS=str(path)), capture_output=True,
                                 text=True, timeout=60)
    finally:
        rewriter.finish()
    assert started.returncode == 1 and "Traceback" not in started.stderr
    assert "the file kept changing for 10 s; start again once it is written" in started.stderr


# -- finding 11: numbers the store cannot hold, settings that need a restart --------------------------------



@pytest.fixture
def managed(tmp_path, upstream, serve):
    """The proxy on a settings file, with management on and a named client key."""
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fine"])))
    doc = settings_doc(provider(upstream), **{"api-keys": [{"key": CLIENT_KEY, "name": "team"}],
                                              "remote-management": {"secret-key": SECRET}})
    path = write_settings(tmp_path / "settings.yaml", doc)
    return path, serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))


@pytest.mark.parametrize("field", ["rpm", "tpm", "max-concurrent"])
def test_a_limit_past_what_the_store_holds_is_refused_and_the_key_keeps_working(managed, field):
    path, live = managed
    response = requests.patch(live.url + "/v0/management/api-keys", headers=MGMT, timeout=10,
                              json={"name": "team", "value": {field: 2**63}})
    assert response.status_code == 400
    assert f"api-keys[0].{field}: must be <= {2**53 - 1}" in response.json()["error"]["problems"]
    assert field not in yaml.safe_load(path.read_text())["api-keys"][0]
    answer = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "fine"


def test_seconds_that_are_infinite_nan_or_past_any_sensible_time_are_refused_by_path():
    with pytest.raises(SettingsError) as caught:
        build_settings({"client-timeout": float("inf"), "max-cooldown": 1e12,
                        "timeouts": {"connect": float("nan"), "read": 10**400}}, {})
    assert caught.value.problems == [f"{path}: must be a number of seconds <= 1000000000" for path in (
        "timeouts.connect", "timeouts.read", "client-timeout", "max-cooldown")]


@pytest.mark.parametrize("key, value", [("state-path", "elsewhere.db"), ("redis-url", "redis://127.0.0.1:1/0"),
                                        ("redis-namespace", "staging")])
def test_a_state_path_or_redis_url_edit_is_reported_as_needing_a_restart_and_not_shown_as_in_effect(
        managed, caplog, key, value):
    path, live = managed
    running = requests.get(live.url + "/v0/management/config", headers=MGMT, timeout=10).json()[key]
    doc = yaml.safe_load(path.read_text())
    doc[key] = str(path.parent / value) if key == "state-path" else value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = requests.get(live.url + "/v0/management/config", headers=MGMT, timeout=10).json()
    assert config[key] == running
    assert any(f"{key} changed: NEEDS A RESTART" in r.getMessage() for r in caplog.records)
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200


def test_a_redis_namespace_that_does_not_validate_is_refused_by_the_reload_and_the_running_config_kept(managed):
    path, live = managed
    good = path.read_text()
    path.write_text(good + "redis-namespace: 'prod:*'\nrequest-retry: 0\n")
    deadline = time.monotonic() + 10
    while (error := requests.get(live.url + "/v0/management/overview", headers=MGMT, timeout=10)
           .json()["reload-error"]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "redis-namespace: use only a-z, 0-9, '-' and '_', at most 64 characters" in error["message"]
    config = requests.get(live.url + "/v0/management/config", headers=MGMT, timeout=10).json()
    assert config["redis-namespace"] == "" and config["request-retry"] == 2  # nothing of that file was taken
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200


def test_a_redis_namespace_that_does_not_validate_stops_a_start_naming_it(tmp_path, upstream):
    path = tmp_path / "settings.yaml"
    path.write_bytes(settings_text(upstream.url, tmp_path / "s.db") + b"redis-namespace: 'prod eu'\n")
    started = subprocess.run([sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{free_port()}"],
                             cwd=ROOT, env=dict(os.environ, PROXY_SETTINGS=str(path)), capture_output=True,
                             text=True, timeout=30)
    assert started.returncode == 1 and "Traceback" not in started.stderr
    assert "redis-namespace: use only a-z, 0-9, '-' and '_', at most 64 characters" in started.stderr


# -- finding 15: the published development key never serves a public address ----------------------------

@pytest.mark.parametrize("command", [[sys.executable, "-m", "gunicorn", "app:app"], [sys.executable, "app.py"]],
                         ids=["gunicorn", "python-app"])
def test_port_set_with_the_published_development_key_refuses_to_start_naming_the_fix(tmp_path, command):
    """PORT set binds 0.0.0.0 (Heroku's convention); the shipped file's fallback key is in the README."""
    path = tmp_path / "settings.yaml"
    path.write_bytes((ROOT / "settings.yaml").read_bytes() + f"\nstate-path: {tmp_path / 's.db'}\n".encode())
    env = dict(os.environ, PROXY_SETTINGS=str(path), PORT=str(free_port()), STREAMFOLD_CLIENT_KEY="")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("it started serving 0.0.0.0 with the published development key") from None
    assert proc.returncode == 1 and "Traceback" not in stderr
    assert "0.0.0.0" in stderr and "sk-streamfold-local" in stderr and "STREAMFOLD_CLIENT_KEY" in stderr


# -- finding 13: secrets in management views ------------------------------------------------------------

LITERALS = {"client": "sk-Vd8qLw2Xr5Tn9101", "secret": "Zq8mgmtQv7Lw3434", "provider": "sk-Hp4Jk8Ws2Yx6aaaa",
            "base-url password": "Bp7Kx2Qw9191", "proxy password": "Px3Nv8Rt8282", "header": "Hd5Mz1Lq7373",
            "replica token": "Rt6Wq3Zp1414"}
FROM_ENV = {"TEAM_KEY": "sk-Ev9Fr3Tg6Hy1e5555", "GPU_KEY": "sk-Gk2Jd7Lp4Nq8e6666"}
ROTATED = {"Authorization": f"Bearer {LITERALS['secret']}"}


@pytest.fixture
def secretive(tmp_path, upstream, serve):
    """Literal secrets everywhere the file can hold one, and ${VAR} references beside them."""
    host = upstream.url.split("://", 1)[1]
    doc = {"api-keys": [LITERALS["client"], "${TEAM_KEY}"],
           "remote-management": {"secret-key": LITERALS["secret"]},
           "openai-compatibility": [{
               "name": "up", "base-url": f"http://ops:{LITERALS['base-url password']}@{host}",
               "api-key-entries": [{"api-key": LITERALS["provider"],
                                    "proxy-url": f"http://px:{LITERALS['proxy password']}@127.0.0.1:9"},
                                   {"api-key": "${GPU_KEY}"}],
               "headers": {"X-Api-Token": LITERALS["header"], "X-Team": "ml"},
               "models": [{"name": "upstream-model", "alias": "m"}]},
               {"name": "replicas", "base-urls": [f"http://ops:{LITERALS['base-url password']}@{host}",
                                                 f"http://{LITERALS['replica token']}@127.0.0.1:9"],
                "models": [{"name": "other-model"}]}]}
    path = write_settings(tmp_path / "settings.yaml", doc)
    return path, serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": FROM_ENV}))


def shows_no_more_than_the_last_4(text: str) -> None:
    """No secret's 5 characters in a row: at most its last 4 (after "...") are shown."""
    for secret in [*LITERALS.values(), *FROM_ENV.values()]:
        for start in range(len(secret) - 4):
            assert secret[start:start + 5] not in text, f"{secret[start:start + 5]!r} of a secret is shown"


def test_every_management_view_shows_at_most_the_last_4_characters_of_a_secret_and_no_url_credentials(secretive):
    path, live = secretive
    views = {}
    for view in ("config", "openai-compatibility", "keys", "overview"):
        response = requests.get(f"{live.url}/v0/management/{view}", headers=ROTATED, timeout=10)
        assert response.status_code == 200
        views[view] = response.text
        shows_no_more_than_the_last_4(response.text)
    config = requests.get(live.url + "/v0/management/config", headers=ROTATED, timeout=10).json()
    assert config["remote-management"]["secret-key"] == "...3434"
    assert config["openai-compatibility"][0]["base-url"].startswith("http://ops:***@127.0.0.1:")
    assert config["openai-compatibility"][0]["api-key-entries"][0]["proxy-url"] == "http://px:***@127.0.0.1:9"
    assert config["openai-compatibility"][1]["base-urls"][1] == "http://***@127.0.0.1:9"
    tested = requests.post(live.url + "/v0/management/test-connection", headers=ROTATED, json={"name": "up"},
                           timeout=30)
    shows_no_more_than_the_last_4(tested.text)


def test_the_yaml_download_redacts_literal_secrets_and_keeps_variable_references(secretive):
    path, live = secretive
    download = requests.get(live.url + "/v0/management/config.yaml", headers=ROTATED, timeout=10)
    assert download.status_code == 200
    shows_no_more_than_the_last_4(download.text)
    doc = yaml.safe_load(download.text)
    assert doc["api-keys"] == ["sk-...9101", "${TEAM_KEY}"]
    entries = doc["openai-compatibility"][0]["api-key-entries"]
    assert entries[1] == {"api-key": "${GPU_KEY}"} and entries[0]["api-key"] == "sk-...aaaa"
    assert doc["openai-compatibility"][0]["headers"]["X-Team"] == "ml"


def test_url_credentials_stay_out_of_the_reload_log_and_survive_a_round_trip_of_the_redacted_list(
        secretive, caplog):
    path, live = secretive
    listed = requests.get(live.url + "/v0/management/openai-compatibility", headers=ROTATED, timeout=10).json()
    before = yaml.safe_load(path.read_text())["openai-compatibility"][0]
    put = requests.put(live.url + "/v0/management/openai-compatibility", headers=ROTATED, timeout=10,
                       json=[{**{k: v for k, v in p.items() if not (k == "base-url" and "base-urls" in p)},
                              "disabled": True} for p in listed["openai-compatibility"]])
    assert put.status_code == 200, put.text
    after = yaml.safe_load(path.read_text())["openai-compatibility"][0]
    assert after["base-url"] == before["base-url"]  # sent back redacted: the stored URL is kept
    assert after["api-key-entries"][0] == before["api-key-entries"][0]
    assert after["api-key-entries"][1]["api-key"] == "${GPU_KEY}" and after["headers"] == before["headers"]
    replicas = yaml.safe_load(path.read_text())["openai-compatibility"][1]["base-urls"]
    assert replicas[1] == f"http://{LITERALS['replica token']}@127.0.0.1:9"
    doc = yaml.safe_load(path.read_text())
    doc["openai-compatibility"][0]["base-url"] = doc["openai-compatibility"][0]["base-url"].replace("ops:", "ops2:")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    requests.get(live.url + "/v0/management/config", headers=ROTATED, timeout=10)  # checks the file first
    assert any("base-url: http://ops:***@" in r.getMessage() for r in caplog.records)
    shows_no_more_than_the_last_4("\n".join(r.getMessage() for r in caplog.records))


def from_address(live, address: str, headers: dict) -> http.client.HTTPResponse:
    """GET /v0/management/config from this loopback source address (all of 127/8 is this host's)."""
    host, port = live.url.split("://", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(address, 0))
    try:
        connection.request("GET", "/v0/management/config", headers=headers)
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


@pytest.mark.parametrize("served", ["managed", "deployed"], ids=["werkzeug", "gunicorn"])
def test_rotating_loopback_addresses_get_twenty_wrong_secrets_then_every_address_is_locked_out(request, served):
    """Under gunicorn the 2 workers count the failures together (the instance's activity files)."""
    live = request.getfixturevalue(served)[{"managed": 1, "deployed": 0}[served]]  # the server in each fixture
    answers = [from_address(live, f"127.0.{i // 200}.{i % 200 + 2}", {"Authorization": "Bearer wrong-guess"})
               for i in range(40)]  # four tries from none of them: the per-address lockout never trips
    assert [a.status for a in answers[:20]] == [401] * 20
    assert {a.status for a in answers[20:]} == {429}
    assert all(0 < int(a.getheader("Retry-After")) <= 61 for a in answers[20:])
    fresh = from_address(live, "127.0.9.9", MGMT)  # a new address, even with the right secret, waits too
    assert fresh.status == 429
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200


def test_a_reload_that_brings_in_the_development_key_on_a_public_address_is_refused(tmp_path, upstream, serve,
                                                                                    caplog):
    """What the gunicorn master records at start when it binds 0.0.0.0 (PORT set) reaches every worker's reload."""
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fine"])))
    path = write_settings(tmp_path / "settings.yaml", settings_doc(provider(upstream)))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {"STREAMFOLD_EXPOSED_BINDS": "0.0.0.0:5000"}})
    live = serve(app)
    doc = yaml.safe_load(path.read_text())
    doc["api-keys"] = [CLIENT_KEY, "sk-streamfold-local"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    app.extensions["streamfold"].check_file()
    published = {"Authorization": "Bearer sk-streamfold-local"}
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=published, timeout=10).status_code == 401
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200
    assert any("published development key" in r.getMessage() and "RELOAD REFUSED" in r.getMessage()
               for r in caplog.records)
