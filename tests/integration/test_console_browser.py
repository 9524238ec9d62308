"""The web console in a real headless Chromium (Debian's, through its chromedriver) against the shared API
cluster (real etcd, real vLLM CPU engines): sign in (a wrong key is refused), see `chat` ready, load a
second model and watch its phases to ready and its engine's log lines live, chat with it in the playground and
see tokens stream, scale it to 2 and back, update its engine arguments (a rolling replace), unload it, drain
the only node (refused, the forced drain offered), pull a hub model (a path refused) and cancel it, create and
revoke a key, and a state change without the CSRF token refused.

Screenshots of each page go to $NEBULA_TEST_ARTEFACTS (or a temporary directory), printed at the end.
The cluster is left as found: the second model unloaded, and the keys this test made removed from etcd
(the API refuses to revoke the last admin key), so the gateway is open again for the tests after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select

from nebula.adapters.etcd import EtcdStore
from nebula.core import keys
from tests.integration.api_fixtures import CHAT_MODEL, MAX_MODEL_LEN, ApiCluster

MODEL = "console-tiny"
START_S = 420.0  # an engine start on a busy CPU machine


def _http(gateway: str, method: str, path: str, key: str | None, body: object = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(gateway + path, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _until(what: str, cond: Callable[[], object], timeout_s: float, every_s: float = 0.5, fail: bool = True) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = cond()
        except WebDriverException:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            if not fail:
                return None
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("NEBULA_TEST_ARTEFACTS") or tmp_path) / "console"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def admin_key(api_cluster: ApiCluster) -> Iterator[str]:
    """An admin key made through the (open) gateway's API; afterwards every key is deleted from etcd, which
    opens the gateway again."""
    status, made = _http(api_cluster.gateway_url, "POST", "/v1/admin/keys", None,
                         {"name": "console-test", "scopes": ["admin", "inference"]})
    assert status == 201, made
    try:
        yield made["key"]
    finally:
        async def drop_keys() -> None:
            store = EtcdStore(list(api_cluster.cluster.etcd.endpoints))
            try:
                await store.delete_prefix(keys.APIKEYS)
            finally:
                await store.close()
        asyncio.run(drop_keys())
        last: list[object] = []

        def open_again() -> bool:
            last[:] = [_http(api_cluster.gateway_url, "GET", "/v1/admin/models", None),
                       _http(api_cluster.gateway_url, "GET", "/healthz", None)]
            return bool(last[0][0] == 200)  # type: ignore[index]

        if not _until("the gateway to be open again", open_again, 60, 1.0, fail=False):
            pytest.fail(f"the gateway stayed closed after its keys were deleted: {last}")


class Page:
    def __init__(self, driver: WebDriver, base: str, shots: Path) -> None:
        self.d, self.base, self.shots = driver, base, shots

    def go(self, route: str) -> None:
        self.d.execute_script("location.hash = arguments[0]", route)
        _until(f"page {route}", lambda: self.d.execute_script("return location.hash") == route, 5)

    def el(self, css: str) -> WebElement:
        found: WebElement = _until(css, lambda: next(
            (e for e in self.d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None), 20, 0.2)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", found)
        return found

    def button(self, text: str) -> WebElement:
        found: WebElement = _until(f"button {text!r}", lambda: next(
            (b for b in self.d.find_elements(By.TAG_NAME, "button") if b.is_displayed() and b.text.strip() == text),
            None), 20, 0.2)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", found)
        return found

    def type(self, css: str, text: str) -> None:
        field = self.el(css)
        field.clear()
        field.send_keys(text)

    def shot(self, name: str) -> None:
        self.d.save_screenshot(str(self.shots / f"{name}.png"))

    def ready(self, css: str) -> str:
        found = self.d.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].get_attribute("data-ready")) if found else ""

    def phases(self) -> list[str]:
        return [e.text.split()[0] for e in self.d.find_elements(By.CSS_SELECTOR, "main .chip") if e.text.strip()]


def test_the_console_runs_the_fleet(api_cluster: ApiCluster, admin_key: str, browser: WebDriver, artefacts: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    try:
        _drive(api_cluster.gateway_url, admin_key, Page(browser, api_cluster.gateway_url, artefacts), capsys)
    finally:  # leave the cluster as found: the second model unloaded and its engines gone
        gw = api_cluster.gateway_url
        assert _http(gw, "DELETE", f"/v1/admin/models/{MODEL}", admin_key)[0] in (200, 404)
        _until(f"{MODEL}'s instances gone", lambda: not any(
            m["name"] == MODEL for m in _http(gw, "GET", "/v1/admin/models", admin_key)[1]["data"]), 180, 1.0)


def _drive(gw: str, admin_key: str, page: Page, capsys: pytest.CaptureFixture[str]) -> None:
    browser, artefacts = page.d, page.shots
    browser.get(gw + "/ui/")

    # --- sign in: a wrong key is refused, the admin key opens the fleet ---------------------------------
    page.el("#login-key").send_keys("nbk_not-a-key\n")
    assert "invalid API key" in _until("the refusal", lambda: page.el("#login-error").text, 10)
    page.shot("login-refused")
    page.type("#login-key", admin_key + "\n")
    _until("the live fleet", lambda: browser.execute_script("return document.body.dataset.fleet") == "live", 20)
    _until("chat ready", lambda: page.ready(f'tr[data-model="{CHAT_MODEL}"] .badge') == "1/1", 30)
    page.shot("fleet")
    # Loading it again, signed in: what a visit costs (nothing is cached: Cache-Control no-store).
    browser.get(gw + "/ui/")
    _until("the live fleet again", lambda: browser.execute_script("return document.body.dataset.fleet") == "live", 20)
    figures = browser.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource').filter(r => !r.name.includes('/ui/api/events'));
        return {bytes: nav.transferSize + res.reduce((n, r) => n + r.transferSize, 0),
                body_bytes: nav.decodedBodySize + res.reduce((n, r) => n + r.decodedBodySize, 0),
                files: res.length + 1, dom_ms: nav.domContentLoadedEventEnd,
                fleet_ms: performance.getEntriesByName('nebula-first-fleet')[0].startTime};""")

    # --- a state change without the CSRF token is refused (the cookie alone is not enough) --------------
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/v1/admin/keys', {method: 'POST', headers: {'Content-Type': 'application/json'},
              body: JSON.stringify({name: 'forged', scopes: ['admin']})}).then(r => done(r.status));""")
    assert status == 403
    assert browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/v1/admin/models').then(r => done(r.status));""") == 200  # reads need no token

    # --- load a second model and watch it through its phases to ready ------------------------------------
    page.go("#/load")
    page.type("#load-source", str(Path(os.environ["NEBULA_TEST_MODELS"]) / "tiny-llama"))
    page.type("#load-name", "Bad Name!")
    page.button("Review").click()
    assert "Letters, digits" in page.el("#load-name-error").text  # checked before anything is sent
    page.type("#load-name", MODEL)
    page.type("#load-max", str(MAX_MODEL_LEN))
    Select(page.el("#load-task")).select_by_value("generate")
    page.button("Review").click()
    page.shot("load-review")
    page.button("Load").click()
    assert f"Loading {MODEL}" in _until("the load's answer", lambda: page.el(".review .ok-text").text, 20)
    page.go(f"#/model/{MODEL}")
    seen: list[str] = []

    def watch(want: str) -> bool:
        for p in page.phases():
            if not seen or seen[-1] != p:
                seen.append(p)
        # Both: the ready count and the phase chips are separate parts of the page, updated by one event but
        # read here one after the other (a count read just after the chips could be ahead of them).
        return page.ready("#model-ready") == want and bool(seen) and seen[-1] == "ready"

    _until(f"{MODEL} ready", lambda: watch("1/1"), START_S, 0.3)
    assert seen[-1] == "ready" and len(seen) >= 2, seen  # it went through at least one phase before ready
    # The replica says how it got there (the agent's phase history): "starting 41 s → ready".
    path = _until("the phase history", lambda: page.el(f'tr[data-instance^="{MODEL}"] .phase-history').text, 10)
    assert re.fullmatch(r"(\w+ \d+ (s|min) → )+ready", path) and "starting" in path, path
    # Its engine's log, live from the node's agent (the lines `nebula logs` shows), tagged with node and replica.
    line = _until("an engine log line", lambda: next((e.text for e in page.d.find_elements(
        By.CSS_SELECTOR, "#model-logs li.log:not(.banner-line)") if e.text.strip()), None), 30)
    assert MODEL in line, line
    banners = [e.text for e in page.d.find_elements(By.CSS_SELECTOR, "#model-logs li.banner-line")]
    assert not banners, banners
    page.d.execute_script("document.getElementById('model-logs').scrollIntoView({block: 'center'})")
    page.shot("model-logs")  # the log panel itself, below the replicas


    # --- chat with it, streamed ---------------------------------------------------------------------------
    page.go("#/playground")
    _until(f"{MODEL} among the models",
           lambda: MODEL in [o.get_attribute("value") for o in Select(page.el("#play-model")).options], 20)
    Select(page.el("#play-model")).select_by_value(MODEL)
    page.type("#play-system", "You are terse.")
    page.type("#play-max", "48")
    page.type("#play-temp", "0.8")
    page.type("#play-prompt", "Tell me about the sea")
    # How much of the answer is on screen each time the page reads on in the stream. Counting DOM updates
    # instead depended on timing: a fast tiny engine's whole answer can arrive in one read (one update).
    browser.execute_script("""
        window.shownAtRead = [];
        const read = ReadableStreamDefaultReader.prototype.read;
        ReadableStreamDefaultReader.prototype.read = function () {
            const t = document.querySelector('.msg.assistant .text');
            window.shownAtRead.push(t ? t.textContent.length : 0);
            return read.call(this);
        };""")
    page.button("Send").click()
    _until("the answer to finish",
           lambda: browser.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"]'), 120)
    answer = page.el(".msg.assistant .text").text
    whole = browser.execute_script("return document.querySelector('.msg.assistant .text').textContent.length")
    shown = browser.execute_script("return window.shownAtRead")
    # Shown as it came: all of it was on screen before the read that found the stream's end, never only after.
    assert answer and len(shown) >= 2 and shown == sorted(shown) and shown[-1] == whole, (answer, shown, whole)
    assert MODEL in page.el(".snippets").text and "Authorization: Bearer" in page.el(".snippets").text
    page.shot("playground")

    # --- a lapsed session: the sign-in form comes over the page, what was typed stays and is sent -----------
    page.type("#play-prompt", "Still there?")
    browser.delete_cookie("nebula_console")
    page.button("Send").click()
    page.el("#login-key").send_keys(admin_key + "\n")
    _until("the second answer", lambda: len(browser.find_elements(
        By.CSS_SELECTOR, '.msg.assistant[data-done="true"]')) == 2, 120)
    assert "Still there?" in page.el("#transcript").text

    # --- scale to 2 and back ------------------------------------------------------------------------------
    page.go(f"#/model/{MODEL}")
    page.type("#scale-replicas", "99")
    page.button("Scale").click()
    assert "0 to 64" in page.el("#scale-replicas-error").text
    page.type("#scale-replicas", "2")
    page.button("Scale").click()
    _until(f"{MODEL} at 2 ready", lambda: page.ready("#model-ready") == "2/2", START_S, 1.0)
    _until("charts with figures", lambda: page.el(".charts polyline").get_attribute("points"), 30)
    page.shot("model-scaled")
    page.type("#scale-replicas", "1")
    page.button("Scale").click()
    _until(f"{MODEL} back at 1", lambda: page.ready("#model-ready") == "1/1" and len(page.phases()) == 1, 120)

    # --- update: nothing to change is said before anything is sent; a real change rolls the replica over -----
    page.button("Update").click()
    assert "Nothing to change" in page.el('form.update > p[role="alert"]').text
    page.type("#update-args", "--max-num-seqs 8")
    page.button("Update").click()
    assert "Updating (engine_args" in _until("the update's answer", lambda: page.el("form.update .ok-text").text, 20)
    _until("the update done", lambda: "done 1/1" in browser.find_element(By.ID, "model-rollout").text
           and page.ready("#model-ready") == "1/1", START_S, 1.0)
    spec = next(m for m in _http(gw, "GET", "/v1/admin/models", admin_key)[1]["data"] if m["name"] == MODEL)["spec"]
    assert spec["engine_args"] == ["--max-num-seqs", "8"], spec
    page.shot("model-updated")

    # --- unload -------------------------------------------------------------------------------------------
    page.button("Unload…").click()
    page.button(f"Yes, unload {MODEL}").click()
    _until("the unload", lambda: "Unloading" in page.el(".unload .ok-text").text, 20)
    page.go("#/fleet")
    _until(f"{MODEL} gone from the fleet",
           lambda: not browser.find_elements(By.CSS_SELECTOR, f'tr[data-model="{MODEL}"]'), 120)

    # --- drain the only node: refused with the reason, and the forced drain offered (not taken here) ----------
    node = _until("a node to choose", lambda: next((o.get_attribute("value") for o in Select(
        page.el("#drain-node")).options if o.get_attribute("value")), None), 20)
    Select(page.el("#drain-node")).select_by_value(node)
    page.button("Drain…").click()
    page.button(f"Yes, drain {node}").click()
    refusal = _until("the drain refused", lambda: page.el('form[aria-label="Node maintenance"] .error').text, 20)
    assert "drain with --force" in refusal, refusal
    assert page.button("Drain anyway (stops them)").is_displayed()
    assert page.el(f'tr[data-node="{node}"] .badge').text == "alive"
    page.shot("fleet-drain-refused")

    # --- pre-fetch weights: a local path is refused by the API, a hub id is pulled and can be cancelled -----------
    page.go("#/load")
    page.type("#pull-source", "/models/local")
    page.button("Pull").click()
    assert "only hub sources" in _until("the pull refused", lambda: page.el("#pull-source-error").text, 20)
    page.type("#pull-source", "nebula-test/never-published")
    page.button("Pull").click()
    answer = _until("the pull's answer", lambda: page.el('form[aria-label="Pre-fetch weights"] .ok-text').text, 20)
    assert f"onto {node}" in answer, answer
    row = page.el("tr[data-pull]")
    assert "nebula-test/never-published" in row.text and f"{node}:" in row.text, row.text
    page.shot("load-pull")
    pull_id = row.get_attribute("data-pull")
    row.find_element(By.CSS_SELECTOR, "button").click()
    _until("the pull cancelled", lambda: not browser.find_elements(By.CSS_SELECTOR, f'tr[data-pull="{pull_id}"]'), 20)
    assert _http(gw, "GET", f"/v1/admin/pulls/{pull_id}", admin_key)[0] == 404

    # --- API keys: create (shown once), revoke -------------------------------------------------------------
    page.go("#/keys")
    page.type("#key-name", "console-ci")
    page.button("Create key").click()
    secret = page.el("#new-key").get_attribute("value") or ""
    assert secret.startswith("nbk_")
    assert _http(gw, "GET", "/v1/models", secret)[0] == 200
    page.shot("keys")
    row = _until("the new key listed", lambda: next(
        (r for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-key]") if r.text.startswith("console-ci")),
        None), 20)
    key_id = row.get_attribute("data-key")
    row.find_element(By.CSS_SELECTOR, "button.ghost").click()
    page.button("Confirm revoke").click()
    _until("the key gone", lambda: not browser.find_elements(By.CSS_SELECTOR, f'tr[data-key="{key_id}"]'), 20)
    _until("the secret refused", lambda: _http(gw, "GET", "/v1/models", secret)[0] == 401, 10)

    # --- a phone's width ------------------------------------------------------------------------------------
    browser.set_window_size(390, 844)
    page.go("#/fleet")
    time.sleep(0.5)
    page.shot("fleet-phone")
    with capsys.disabled():
        print(f"\nconsole: {figures['files']} files, {figures['bytes']} bytes transferred "
              f"({figures['body_bytes']} uncompressed), DOM ready {figures['dom_ms']:.0f} ms, "
              f"fleet drawn {figures['fleet_ms']:.0f} ms after navigation, "
              f"phases seen {seen}; screenshots in {artefacts}")
