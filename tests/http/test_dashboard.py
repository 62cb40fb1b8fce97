"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, through
Selenium) against the real daemon: an invocation the test made, its logs, replay, a dead letter
redriven with its button, the live tail, and the token's sign-in cookie.

Set LAMBDAEMON_SCREENSHOTS=docs/screenshots to save the pages the README shows (1280x860).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.daemon_proc import Daemon, running_daemon, shared_folder, write_config

FUNCS = Path(__file__).resolve().parents[1] / "functions"
WAIT_S = 15
SCREENSHOTS = os.environ.get("LAMBDAEMON_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,860")
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def functions(tmp_path: Path) -> str:
    code = tmp_path / "code"
    code.mkdir()
    flag = shared_folder(tmp_path) / "fixed"
    # `picky` fails until the flag file exists: its dead letter succeeds once redriven.
    (code / "app.py").write_text(
        "import os\n"
        "def chatty(event, context):\n"
        "    print(f'hello from {context.aws_request_id}')\n"
        "    return {'seen': event}\n"
        "def picky(event, context):\n"
        f"    if not os.path.exists({str(flag)!r}):\n"
        "        raise RuntimeError('not fixed yet')\n"
        "    print('fixed now')\n"
        "    return 'ok'\n"
    )
    return (
        f'[functions.chatty]\nhandler = "app.chatty"\ncode = "{code}"\n\n'
        f'[functions.picky]\nhandler = "app.picky"\ncode = "{code}"\nretries = 0\n\n'
        f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n\n'
        # a cron trigger firing every second: its health and last fire on the functions view
        f'[functions.ticker]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
        'triggers = [{ type = "cron", schedule = "* * * * * *" }]\n'
    )


@pytest.fixture
async def daemon(tmp_path: Path):
    async with running_daemon(tmp_path, functions(tmp_path)) as d:
        yield d


def wait(browser: WebDriver, condition, message: str):
    def tolerant(driver: WebDriver):
        try:
            return condition(driver)
        except (NoSuchElementException, StaleElementReferenceException):
            return False  # the page is redrawing: try again
        except WebDriverException as e:
            # chromedriver reports an element replaced between its lookup and the
            # question about it this way too, not always as a stale reference
            if "does not belong to the document" in str(e):
                return False
            raise

    return WebDriverWait(browser, WAIT_S).until(tolerant, message)


def text_of(browser: WebDriver, css: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, css).text


def visible(browser: WebDriver, section: str) -> bool:
    return browser.find_element(By.ID, section).is_displayed()


def listed(browser: WebDriver) -> list[str | None]:
    """The ids in the invocation list, top to bottom."""
    links = browser.find_elements(By.CSS_SELECTOR, "#invocation-list a[data-id]")
    return [a.get_attribute("data-id") for a in links]


def screenshot(browser: WebDriver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))


async def invoke(daemon: Daemon, name: str, event: object) -> str:
    status, headers, body = await daemon.invoke(name, event)
    assert status == 200, body
    return headers["x-amzn-RequestId"]


async def test_dashboard_shows_functions_an_invocation_its_logs_and_replays_it(
    browser: WebDriver, daemon: Daemon
):
    invocation_id = await invoke(daemon, "chatty", {"n": 1})
    await invoke(daemon, "echo", {})

    async def ticked() -> bool:  # polled: the cron source reports its fires when asked
        stats = await daemon.get("/v1/stats?function=ticker")
        fired = [s for s in stats["sources"] if s["labels"].get("trigger") == "ticker#0"]
        return bool(fired) and stats["functions"]["ticker"]["invocations"] > 0

    await daemon.wait_for(ticked)
    browser.get(f"{daemon.base}/")
    row = wait(
        browser,
        lambda b: b.find_element(By.CSS_SELECTOR, "#functions tr[data-function=chatty]"),
        "the functions table lists chatty",
    )
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "warm"  # its worker stays up after the call
    assert cells[2] == "1 idle, 0 busy"
    assert "succeeded" in cells[7]
    assert cells[5].endswith("ms") and cells[6].endswith("ms")  # p50 and p95
    assert cells[8] == "API only"
    ticker = text_of(browser, "li[data-trigger='ticker#0']")
    assert ticker.startswith("cron * * * * * * ok") and "last fire" in ticker
    # both charts are drawn by the vendored uPlot
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".charts canvas")) == 2, "charts")
    screenshot(browser, "functions")

    browser.get(f"{daemon.base}/ui#/invocations?function=chatty")
    link = wait(
        browser,
        lambda b: b.find_element(By.CSS_SELECTOR, f"#invocation-list a[data-id='{invocation_id}']"),
        "the invocation list shows the test's invocation",
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#invocation-list tbody tr")) == 1
    screenshot(browser, "invocations")
    link.click()
    wait(browser, lambda b: f"hello from {invocation_id}" in text_of(b, "#inv-logs"), "its logs")
    assert json.loads(text_of(browser, "#inv-event")) == {"n": 1}
    assert json.loads(text_of(browser, "#inv-result")) == {"seen": {"n": 1}}
    assert "succeeded" in text_of(browser, "#inv-attempts tbody")
    screenshot(browser, "invocation")

    # paged by the API's `next` cursor: two a page, the Older button fetches the rest
    second = await invoke(daemon, "chatty", {"n": 2})
    third = await invoke(daemon, "chatty", {"n": 3})
    browser.get(f"{daemon.base}/ui#/invocations?function=chatty&limit=2")
    older = wait(browser, lambda b: b.find_element(By.ID, "older"), "a next page")
    wait(browser, lambda b: older.is_displayed(), "the Older button")
    assert listed(browser) == [third, second]
    older.click()
    wait(browser, lambda b: listed(b) == [third, second, invocation_id], "the older page")
    wait(browser, lambda b: not older.is_displayed(), "no page after the last")
    browser.get(f"{daemon.base}/ui#/invocations?function=chatty&status=failed")
    wait(browser, lambda b: "No invocation matches." in text_of(b, "#invocation-list"), "none")
    browser.get(f"{daemon.base}/ui#/invocations?since=garbage")
    wait(browser, lambda b: "since" in text_of(b, "#invocations-error"), "the API's reason")

    browser.get(f"{daemon.base}/ui#/invocation/{invocation_id}")
    wait(browser, lambda b: text_of(b, "#inv-id") == invocation_id, "its page again")
    browser.find_element(By.ID, "replay").click()
    replay = wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#replayed a"), "replayed")
    replay_id = replay.get_attribute("data-id")
    record = await daemon.finished(replay_id, status="succeeded")
    assert record["parent_id"] == invocation_id


async def test_dashboard_redrives_a_dead_letter_with_its_button(
    browser: WebDriver, daemon: Daemon, tmp_path: Path
):
    status, headers, _ = await daemon.invoke("picky", {"order": 7}, kind="Event")
    assert status == 202
    dead_id = headers["x-amzn-RequestId"]
    await daemon.finished(dead_id, status="failed")

    async def dead_lettered() -> bool:  # polled: the dead letter is written with the outcome
        return bool((await daemon.get(f"/v1/dead-letters/{dead_id}")).get("dead_letter_reason"))

    await daemon.wait_for(dead_lettered)
    browser.get(f"{daemon.base}/ui#/dead-letters")
    button = wait(
        browser,
        lambda b: b.find_element(By.CSS_SELECTOR, f"button.redrive[data-id='{dead_id}']"),
        "the dead letter has a Redrive button",
    )
    screenshot(browser, "dead-letters")
    (shared_folder(tmp_path) / "fixed").touch()
    button.click()
    wait(browser, lambda b: text_of(b, "#redriven") == "Redriven: 1", "the page says redriven")
    await daemon.finished(dead_id, status="succeeded")
    browser.get(f"{daemon.base}/ui#/invocation/{dead_id}")
    wait(browser, lambda b: text_of(b, "#inv-logs") == "fixed now", "the redriven run's output")
    attempts = browser.find_elements(By.CSS_SELECTOR, "#inv-attempts tbody tr")
    statuses = [tr.find_element(By.CSS_SELECTOR, ".status").text for tr in attempts[::2]]
    assert "failed" in statuses and statuses[-1] == "succeeded"


async def test_dashboard_live_tail_shows_a_new_invocations_lines(
    browser: WebDriver, daemon: Daemon
):
    browser.get(f"{daemon.base}/ui#/tail?function=chatty")
    wait(browser, lambda b: text_of(b, "#tail-state") == "following", "the tail is connected")
    invocation_id = await invoke(daemon, "chatty", {"live": True})
    wait(
        browser,
        lambda b: f"hello from {invocation_id}" in text_of(b, "#tail-lines"),
        "the new invocation's output appears in the tail",
    )
    lines = text_of(browser, "#tail-lines").splitlines()
    assert any(f"END RequestId: {invocation_id}" in line for line in lines)
    await invoke(daemon, "echo", {})  # another function's lines stay out of this tail
    second = await invoke(daemon, "chatty", {})
    wait(browser, lambda b: f"hello from {second}" in text_of(b, "#tail-lines"), "the next one")
    assert "echo" not in text_of(browser, "#tail-lines")
    screenshot(browser, "tail")


async def test_dashboard_token_sign_in_sets_a_strict_http_only_cookie_and_refuses_cross_site(
    browser: WebDriver, tmp_path: Path
):
    (tmp_path / "api.token").write_text("s3cret-token\n")
    config = write_config(tmp_path, functions(tmp_path))
    token_line = f'[api]\ntoken_file = "{tmp_path / "api.token"}"\n'
    config.write_text(config.read_text().replace("[api]\n", token_line))
    d = Daemon(config)
    await d.start()
    try:
        browser.delete_all_cookies()
        browser.get(f"{d.base}/ui")
        wait(browser, lambda b: visible(b, "login"), "the page asks for the token")
        screenshot(browser, "sign-in")
        browser.find_element(By.ID, "token").send_keys("wrong")
        browser.find_element(By.ID, "sign-in").click()
        wait(browser, lambda b: visible(b, "login-failed"), "a wrong token is refused")
        assert browser.get_cookie("lambdaemon_session") is None
        browser.find_element(By.ID, "token").send_keys("s3cret-token")
        browser.find_element(By.ID, "sign-in").click()
        wait(browser, lambda b: visible(b, "overview"), "signed in, the functions show")
        wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "tr[data-function=chatty]"), "rows")
        cookie = browser.get_cookie("lambdaemon_session")
        assert cookie is not None
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert cookie["value"] != "s3cret-token"  # an HMAC of it, not the token
        assert browser.execute_script("return document.cookie") == ""  # no script reads it

        session = {"Cookie": f"lambdaemon_session={cookie['value']}"}
        redrive = f"{d.base}/v1/dead-letters/redrive"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{d.base}/v1/functions", headers=session) as resp:
                assert resp.status == 200  # the API takes the cookie as it takes the header
            async with http.get(f"{d.base}/v1/functions") as resp:
                assert resp.status == 401
            wrong = {"Cookie": "lambdaemon_session=" + "0" * 64}
            async with http.get(f"{d.base}/v1/functions", headers=wrong) as resp:
                assert resp.status == 401
            for started_elsewhere in (
                {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
                {"Origin": "http://127.0.0.1:1"},  # same site, another port: not this origin
                {"Sec-Fetch-Site": "same-site"},
                {"Origin": "null"},
            ):
                headers = session | started_elsewhere
                async with http.post(redrive, json={"all": True}, headers=headers) as resp:
                    assert resp.status == 403, started_elsewhere
                    assert "cross-site request refused" in (await resp.json())["message"]
            own = session | {"Origin": d.base, "Sec-Fetch-Site": "same-origin"}
            async with http.post(redrive, json={"all": True}, headers=own) as resp:
                assert resp.status == 200

        browser.find_element(By.CSS_SELECTOR, "#logout button").click()
        wait(browser, lambda b: visible(b, "login"), "signed out, the page asks again")
        assert browser.get_cookie("lambdaemon_session") is None
    finally:
        await d.close()


async def test_stats_and_page_answer_bad_input_with_the_reason(daemon: Daemon):
    await invoke(daemon, "echo", {})
    assert daemon.session is not None
    base = daemon.base
    cases = [
        ("/v1/stats?window=2y", 400, "window: '2y' is not a duration like 15m, 1h or 1d"),
        ("/v1/stats?window=30s", 400, "window: '30s' is not a duration like 15m, 1h or 1d"),
        ("/v1/stats?window=8d", 400, "window: '8d' is outside 1m to 7d"),
        ("/v1/stats?limit=3", 400, "unknown parameter 'limit' (known: function, window)"),
        ("/v1/stats?function=nope", 404, "no function 'nope'"),
        ("/ui/static/nope.js", 404, "no file 'nope.js' in the dashboard"),
    ]
    for path, status, error in cases:
        async with daemon.session.get(base + path) as resp:
            assert resp.status == status, path
            assert (await resp.json())["error"] == error
    stats = await daemon.get("/v1/stats?window=1d&function=echo")
    assert list(stats["functions"]) == ["echo"] and stats["window_s"] == 86_400
    assert stats["functions"]["echo"]["invocations"] == 1
    async with daemon.session.get(f"{base}/") as resp:
        assert resp.status == 200 and resp.headers["X-Frame-Options"] == "DENY"
        assert "script-src" not in resp.headers["Content-Security-Policy"]  # 'self' only
        etag = resp.headers["ETag"]
    async with daemon.session.get(f"{base}/ui", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
