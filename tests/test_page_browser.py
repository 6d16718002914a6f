"""The operator page in a real headless browser (Debian's chromium + chromedriver, Selenium) against the
proxy under gunicorn with 2 workers and a real loopback upstream.

One gunicorn instance and one browser session for the whole module (the suite must stay fast). The tests
run in file order and build on each other's state only where said; the lockout test is last because it
locks 127.0.0.1 out of management for a minute. A missing browser is a failure, never a skip.

Changes made through the page reach the other worker within about a second (each worker checks the
settings file at most once a second: ``runtime.CHECK_INTERVAL``); tests that then send traffic wait out
that interval first, which is the documented contract, not a speed assertion.
"""
from __future__ import annotations

import datetime
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from proxy.config.live import CHECK_INTERVAL
from tests.conftest import AUTH, CLIENT_KEY, PROVIDER_KEY, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import FakeUpstream, Reply, completion, sse, text_chunks

SECRET = "mgmt-page-secret-4242"
LIMITED_KEY = "sk-limited-provider-7777"
XSS = "<img src=x onerror=alert(1)>"
DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HUMAN = ["Hello", " from", " the", " folded", " stream."]


def _answer(rec) -> Reply:
    body = rec.body or {}
    if rec.path.endswith("/models"):
        return Reply(body=orjson.dumps({"object": "list", "data": [
            {"id": "upstream-model", "object": "model", "created": 0, "owned_by": "vllm"},
            {"id": "count-model", "object": "model", "created": 0, "owned_by": "vllm"}]}))
    if body.get("model") == "limited-model":
        return Reply(status=429, headers={"Retry-After": "120"}, body=orjson.dumps({"error": {
            "message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}))
    if body.get("stream"):
        return Reply(events=sse(*text_chunks(HUMAN, usage={"prompt_tokens": 9, "completion_tokens": 5,
                                                            "total_tokens": 14})), delay=0.02)
    return Reply(body=orjson.dumps(completion("Plain JSON answer.")), hang=0.05)


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream()
    fake.handler = _answer
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream):
    doc = settings_doc(
        {"name": "alpha", "base-url": upstream.url, "api-key-entries": [{"api-key": PROVIDER_KEY}],
         "models": [{"name": "upstream-model", "alias": "m"}, {"name": "count-model", "alias": "counted"}]},
        {"name": "limited", "base-url": upstream.url, "api-key-entries": [{"api-key": LIMITED_KEY}],
         "models": [{"name": "limited-model", "alias": "lim"}]},
        **{"remote-management": {"secret-key": SECRET}})
    path = write_settings(tmp_path_factory.mktemp("page") / "settings.yaml", doc)
    # 4 threads and connections per worker: a burst of 8+ concurrent requests needs both workers.
    proxy = Gunicorn(path, workers=2, threads=4)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def driver(server):  # depends on it so the browser (and its keep-alive connections) goes first
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "the browser tests need Debian's chromium and chromium-driver: run tests/system-deps.sh"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never go online (the driver path is given anyway)
    os.environ["SE_AVOID_STATS"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


# -- helpers ---------------------------------------------------------------------------------------------
def wait(driver, condition, timeout: float = 10):
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def console_errors(driver, allowed_statuses: tuple[int, ...] = ()) -> list[str]:
    """Console errors since the last call; a failed fetch with an expected status is not one."""
    out = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        text = entry["message"]
        if any(f"status of {status} " in text for status in allowed_statuses):
            continue
        out.append(text)
    return out


def sign_in(driver, server, secret: str = SECRET) -> None:
    driver.get(server.url + "/manage")
    field = wait(driver, lambda d: d.find_element(By.NAME, "secret"))
    field.clear()
    field.send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    wait(driver, lambda d: d.find_element(By.ID, "nav").is_displayed())


def open_panel(driver, name: str) -> None:
    """Show a panel and wait until it has (re)loaded its data."""
    panel = driver.find_element(By.ID, f"panel-{name}")
    before = panel.get_attribute("data-loaded")
    if panel.is_displayed():
        panel.find_element(By.CSS_SELECTOR, ".refresh").click()
    else:
        driver.find_element(By.CSS_SELECTOR, f'#nav button[data-panel="{name}"]').click()
    wait(driver, lambda d: d.find_element(By.ID, f"panel-{name}").get_attribute("data-loaded") not in (None, before))


def row(driver, provider: str):
    return driver.find_element(By.CSS_SELECTOR, f'#providers tr[data-provider="{provider}"]')


def chat(server, model: str, **extra) -> requests.Response:
    # A fresh connection per request, so the workers share them out.
    return requests.post(server.url + "/v1/chat/completions", headers={**AUTH, "Connection": "close"}, timeout=15,
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def model_ids(server) -> list[set[str]]:
    """/v1/models as each of several fresh connections sees it (so both workers answer)."""
    def ask(_):
        response = requests.get(server.url + "/v1/models", headers={**AUTH, "Connection": "close"}, timeout=10)
        return {m["id"] for m in response.json()["data"]}
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, range(8)))


def screenshot(driver, name: str) -> None:
    """The README's pictures, taken from the page as the tests leave it."""
    DOCS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0); document.getElementById('notice').hidden = true")  # an old notice
    driver.save_screenshot(str(DOCS / name))


def management_calls(server) -> int:
    return server.output().count("route=/v0/management/")


# -- tests -----------------------------------------------------------------------------------------------
def test_every_panel_loads_without_console_errors(driver, server):
    sign_in(driver, server)
    for name in ("overview", "providers", "traffic", "requests", "usage", "config"):
        open_panel(driver, name)
        assert driver.find_element(By.ID, f"panel-{name}").is_displayed()
    assert "\"...4242\"" in driver.find_element(By.ID, "config").text  # config export: the last 4 characters only
    open_panel(driver, "usage")
    wait(driver, lambda d: d.find_element(By.ID, "usage-source").text.startswith("From the usage store, today"))
    assert SECRET not in driver.page_source and PROVIDER_KEY not in driver.page_source
    open_panel(driver, "overview")
    workers = driver.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
    assert len(workers) == 2  # both gunicorn workers are listed, whichever answered
    assert console_errors(driver) == []


def test_toggling_force_upstream_stream_folds_the_next_request_on_every_worker(driver, server, upstream):
    open_panel(driver, "providers")
    box = row(driver, "alpha").find_element(By.NAME, "force-upstream-stream")
    assert not box.is_selected()
    box.click()
    wait(driver, lambda d: "force-upstream-stream is now on" in d.find_element(By.ID, "notice").text)
    wait(driver, lambda d: row(d, "alpha").find_element(By.NAME, "force-upstream-stream").is_selected())
    assert "force-upstream-stream: true" in server.settings_path.read_text()
    time.sleep(CHECK_INTERVAL + 0.3)  # the other worker's file check (see the module docstring)
    seen = len(upstream.requests)
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: chat(server, "m"), range(10)))
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.json()["choices"][0]["message"]["content"] for a in answers} == {"".join(HUMAN)}
    sent = [r.body for r in upstream.requests[seen:]]
    assert len(sent) == 10 and all(b["stream"] is True for b in sent)
    recent = requests.get(server.url + "/v0/management/recent?provider=alpha",
                          headers={"Authorization": f"Bearer {SECRET}"}, timeout=10).json()["records"][:10]
    assert all(r["folded"] for r in recent)
    assert len({r["worker"] for r in recent}) == 2  # both workers served, and both folded
    assert console_errors(driver) == []


def test_an_invalid_edit_shows_the_validator_message_inline_and_changes_nothing(driver, server):
    before = server.settings_path.read_bytes()
    open_panel(driver, "providers")
    row(driver, "alpha").find_element(By.XPATH, ".//button[text()='Edit']").click()
    form = wait(driver, lambda d: d.find_element(By.ID, "provider-form"))
    field = form.find_element(By.NAME, "base-url")
    field.clear()
    field.send_keys("ftp://files.example/v1")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    problem = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '.problem[data-for="base-url"]').text or None)
    assert problem == "must be an http:// or https:// URL"
    assert field.get_attribute("aria-invalid") == "true"
    time.sleep(CHECK_INTERVAL + 0.1)
    assert server.settings_path.read_bytes() == before
    assert console_errors(driver, allowed_statuses=(400,)) == []
    form.find_element(By.ID, "provider-cancel").click()


def test_adding_and_deleting_a_provider_agree_with_v1_models(driver, server, upstream):
    open_panel(driver, "providers")
    driver.find_element(By.ID, "add-provider").click()
    form = driver.find_element(By.ID, "provider-form")
    form.find_element(By.NAME, "name").send_keys("gamma")
    form.find_element(By.NAME, "base-url").send_keys(upstream.url)
    form.find_element(By.NAME, "api-key-entries").send_keys("sk-gamma-provider-5678")
    form.find_element(By.NAME, "models").send_keys("gamma-upstream = gamma")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    gamma = wait(driver, lambda d: row(d, "gamma"))
    assert "gamma → gamma-upstream" in gamma.text and "sk-...5678" in gamma.text
    time.sleep(CHECK_INTERVAL + 0.3)
    page = {r.get_attribute("data-provider") for r in driver.find_elements(By.CSS_SELECTOR, "#providers tbody tr")}
    assert page == {"alpha", "limited", "gamma"}
    assert all("gamma" in ids for ids in model_ids(server))

    gamma.find_element(By.XPATH, ".//button[text()='Delete']").click()
    wait(driver, expected_conditions.alert_is_present()).accept()
    wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, '#providers tr[data-provider="gamma"]'))
    time.sleep(CHECK_INTERVAL + 0.3)
    page = {r.get_attribute("data-provider") for r in driver.find_elements(By.CSS_SELECTOR, "#providers tbody tr")}
    assert page == {"alpha", "limited"}
    assert all("gamma" not in ids and "m" in ids for ids in model_ids(server))
    assert console_errors(driver) == []


def test_test_connection_asks_the_upstream_models_from_the_server(driver, server, upstream):
    open_panel(driver, "providers")
    seen = len(upstream.requests)
    row(driver, "alpha").find_element(By.CSS_SELECTOR, "button.test").click()
    result = wait(driver, lambda d: row(d, "alpha").find_element(By.CSS_SELECTOR, ".test-result .ok"))
    assert result.text.startswith("sk-...aaaa: ok, 2 models")
    probe = [r for r in upstream.requests[seen:] if r.path.endswith("/models")]
    assert probe and probe[0].key == PROVIDER_KEY  # the provider's key, sent by the proxy, not the browser
    assert console_errors(driver) == []


def test_an_upstream_429_shows_the_key_cooling_with_its_end_time(driver, server):
    asked = time.time()
    assert chat(server, "lim").status_code == 429
    open_panel(driver, "providers")
    state = wait(driver, lambda d: row(d, "limited").find_element(By.CSS_SELECTOR, "li.key-cooling"))
    assert state.text.startswith("sk-...7777 cooling until ")
    shown = datetime.datetime.strptime(state.text.rsplit(" ", 1)[1], "%H:%M:%S").time()
    expected = datetime.datetime.fromtimestamp(asked + 120)
    gap = abs((datetime.datetime.combine(expected.date(), shown) - expected).total_seconds())
    assert min(gap, 86400 - gap) < 10  # Retry-After: 120 from when it was asked
    assert row(driver, "alpha").find_element(By.CSS_SELECTOR, "li.key-ok").text == "sk-...aaaa ok"
    screenshot(driver, "manage-providers.png")
    assert console_errors(driver) == []


def test_thirty_requests_through_both_workers_show_in_traffic_and_recent(driver, server):
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: chat(server, "counted"), range(30)))
    assert [a.status_code for a in answers] == [200] * 30
    open_panel(driver, "traffic")
    for seconds in (300, 3600):
        window = driver.find_element(By.CSS_SELECTOR, f'.traffic-window[data-window="{seconds}"]')
        counted = window.find_element(By.CSS_SELECTOR, 'tr[data-provider="alpha"][data-model="counted"]')
        assert counted.find_element(By.CSS_SELECTOR, "td.requests").text == "30"
    screenshot(driver, "manage-traffic.png")
    open_panel(driver, "requests")
    rows = [r.find_elements(By.TAG_NAME, "td") for r in driver.find_elements(By.CSS_SELECTOR, "#recent tbody tr")]
    counted = [cells for cells in rows if cells[3].text == "counted"]
    assert len(counted) == 30 and {cells[5].text for cells in counted} == {"200"}
    assert len({cells[1].text for cells in counted}) == 2  # served by both workers, shown together
    assert console_errors(driver) == []


def test_the_recent_requests_filter_narrows_by_status_provider_and_client(driver, server):
    open_panel(driver, "requests")
    form = driver.find_element(By.ID, "recent-filter")
    form.find_element(By.NAME, "status").send_keys("429")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(driver, lambda d: {r.get_attribute("data-status")
                            for r in d.find_elements(By.CSS_SELECTOR, "#recent tbody tr")} == {"429"})
    form.find_element(By.NAME, "status").clear()
    form.find_element(By.NAME, "status").send_keys("teapot")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    message = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '#recent-filter .problem').text or None)
    assert "status must be" in message
    form.find_element(By.NAME, "status").clear()
    form.find_element(By.NAME, "client").send_keys("nobody")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(driver, lambda d: d.find_element(By.ID, "recent-summary").text.startswith("0 shown of 0"))
    form.find_element(By.NAME, "client").clear()
    assert console_errors(driver, allowed_statuses=(400,)) == []


def test_markup_in_a_model_alias_and_a_model_name_renders_as_text(driver, server):
    mgmt = {"Authorization": f"Bearer {SECRET}"}
    patched = requests.patch(server.url + "/v0/management/openai-compatibility", headers=mgmt, timeout=10, json={
        "name": "limited", "value": {"models": [{"name": "limited-model", "alias": "lim"},
                                                {"name": "xss-model", "alias": XSS}]}})
    assert patched.status_code == 200
    assert chat(server, XSS + "-unknown").status_code == 404  # lands in recent requests as the model asked for
    open_panel(driver, "providers")
    assert f"{XSS} → xss-model" in row(driver, "limited").text
    open_panel(driver, "requests")
    assert driver.find_element(By.XPATH, f"//table[@id='recent']//td[text()='{XSS}-unknown']")
    assert driver.find_elements(By.TAG_NAME, "img") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert() ran
    assert console_errors(driver) == []


def test_an_edit_and_the_disabled_toggle_reach_v1_models(driver, server):
    open_panel(driver, "providers")
    row(driver, "limited").find_element(By.XPATH, ".//button[text()='Edit']").click()
    models = driver.find_element(By.ID, "provider-form").find_element(By.NAME, "models")
    models.send_keys("\nspare-model = spare")
    driver.find_element(By.CSS_SELECTOR, "#provider-form button[type=submit]").click()
    wait(driver, lambda d: "spare → spare-model" in row(d, "limited").text)
    written = server.settings_path.read_text()
    assert "alias: spare" in written and LIMITED_KEY in written  # the redacted key sent back kept the real one
    box = row(driver, "limited").find_element(By.NAME, "disabled")
    box.click()
    wait(driver, lambda d: row(d, "limited").find_element(By.NAME, "disabled").is_selected())
    time.sleep(CHECK_INTERVAL + 0.3)
    assert all("spare" not in ids and "lim" not in ids and "m" in ids for ids in model_ids(server))
    row(driver, "limited").find_element(By.NAME, "disabled").click()
    wait(driver, lambda d: not row(d, "limited").find_element(By.NAME, "disabled").is_selected())
    time.sleep(CHECK_INTERVAL + 0.3)
    assert all({"spare", "lim"} <= ids for ids in model_ids(server))
    assert console_errors(driver) == []


def test_signing_out_stops_the_page_management_calls_until_signed_in_again(driver, server):
    open_panel(driver, "overview")
    driver.find_element(By.ID, "sign-out").click()
    wait(driver, lambda d: d.find_element(By.NAME, "secret").is_displayed())
    assert driver.execute_script("return sessionStorage.getItem('streamfold.secret')") is None
    assert driver.find_elements(By.CSS_SELECTOR, "#providers tbody tr") == []  # what was shown is gone too
    calls = management_calls(server)
    driver.get(server.url + "/manage#providers")  # straight to a panel ...
    driver.refresh()  # ... in a fresh page
    wait(driver, lambda d: d.find_element(By.NAME, "secret").is_displayed())
    assert not driver.find_element(By.ID, "nav").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, "#providers tbody tr") == []
    time.sleep(0.3)
    assert management_calls(server) == calls  # the page made no management call without the secret
    sign_in(driver, server)
    open_panel(driver, "providers")
    assert row(driver, "alpha")
    assert console_errors(driver) == []


def test_a_replica_set_shows_each_replica_and_why_requests_went_where_they_did(driver, server, upstream):
    second = FakeUpstream()
    second.handler = _answer
    mgmt = {"Authorization": f"Bearer {SECRET}"}
    try:
        added = requests.post(server.url + "/v0/management/openai-compatibility", headers=mgmt, timeout=10, json={
            "value": {"name": "fleet", "base-urls": [upstream.url, second.url], "balance": "cache-aware",
                      "api-key-entries": [{"api-key": PROVIDER_KEY}],
                      "models": [{"name": "upstream-model", "alias": "fm"}]}})
        assert added.status_code == 200, added.text
        time.sleep(CHECK_INTERVAL + 0.3)  # every worker has the new provider
        for _ in range(3):
            answer = requests.post(server.url + "/v1/chat/completions", timeout=15, json={
                "model": "fm", "messages": [{"role": "user", "content": "hi"}]},
                headers={**AUTH, "Connection": "close", "x-claude-code-session-id": "page-session"})
            assert answer.status_code == 200
        open_panel(driver, "providers")
        fleet = row(driver, "fleet")
        listed = [li.text for li in fleet.find_elements(By.CSS_SELECTOR, "li[data-replica]")]
        assert listed == [f"fleet#1 {upstream.url} · 0 in flight disabled",
                          f"fleet#2 {second.url} · 0 in flight disabled"]  # the last word labels a checkbox
        decisions = driver.find_element(By.CSS_SELECTOR, '#replica-sets tr[data-set="fm"]').text
        assert "cache-aware" in decisions and "fleet#1, fleet#2" in decisions
        assert "least-busy 1" in decisions and "affinity 2" in decisions  # counted over both workers
        # the checkbox takes one replica out of the set (the settings file says so) and the set shows it
        fleet.find_element(By.CSS_SELECTOR, 'input[aria-label="disabled fleet#2"]').click()
        wait(driver, lambda d: row(d, "fleet").find_element(
            By.CSS_SELECTOR, 'li[data-replica="fleet#2"]').text.endswith("· disabled disabled"))
        shown = requests.get(server.url + "/v0/management/openai-compatibility", headers=mgmt, timeout=10).json()
        (entry,) = [p for p in shown["openai-compatibility"] if p["name"] == "fleet"]
        assert entry["base-urls"] == [upstream.url, {"url": second.url, "disabled": True}]
        assert console_errors(driver) == []
    finally:
        requests.delete(server.url + "/v0/management/openai-compatibility?name=fleet", headers=mgmt, timeout=10)
        second.stop()


def test_a_wrong_secret_shows_an_error_and_five_lock_the_address_out(driver, server):
    """Last in the module: it locks 127.0.0.1 out of management for a minute."""
    driver.find_element(By.ID, "sign-out").click()
    for _ in range(5):
        sign_in_attempt(driver, "not-the-secret")
        error = wait(driver, lambda d: d.find_element(By.ID, "sign-in-error").text or None)
        assert error == "Sign-in failed: missing or wrong management key."
    sign_in_attempt(driver, SECRET)  # even the right secret, now
    error = wait(driver, lambda d: d.find_element(By.ID, "sign-in-error").text.startswith("Locked out") or None)
    assert error
    assert not driver.find_element(By.ID, "nav").is_displayed()
    # The whole instance refuses, whichever worker answers.
    statuses = {requests.get(server.url + "/v0/management/overview", timeout=10,
                             headers={"Authorization": f"Bearer {SECRET}", "Connection": "close"}).status_code
                for _ in range(6)}
    assert statuses == {429}
    assert console_errors(driver, allowed_statuses=(401, 429)) == []
    log = server.output()  # the whole module's gunicorn log: no secret, no key, however the page was used
    for secret in (SECRET, PROVIDER_KEY, LIMITED_KEY, CLIENT_KEY, "sk-gamma-provider-5678"):
        assert secret not in log


def sign_in_attempt(driver, secret: str) -> None:
    field = wait(driver, lambda d: d.find_element(By.NAME, "secret"))
    driver.execute_script("document.getElementById('sign-in-error').textContent = ''")
    field.clear()
    field.send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()

