"""The dashboards (GET /dashboard, GET /ops) in a real headless browser against a live gateway: a
real uvicorn on 127.0.0.1 in front of real Redis and Postgres, the sync worker draining into the
ledger. Debian's chromium through its chromedriver (scripts/system-deps.sh installs both); nothing
is downloaded when the tests run, and the browser tests skip when the binaries are absent.

Also, without a browser: signed dashboard links read one org and nothing else, and the routes the
pages read (activity, burn, pricing's thresholds) answer their shapes. Screenshots go to
test-output/pages/.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import secrets
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis as syncredis

from conftest import ADMIN_TOKEN, RUN, test_config_data
from client_support import Gateway
from quota_gw import config as config_mod
from quota_gw import links
from quota_gw.app import create_app
from quota_gw.layout import Layout

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "src" / "quota_gw" / "web"
SHOTS = ROOT / "test-output" / "pages"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHART_JS_SHA256 = "87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WAIT_S = 30


# --- a live gateway, its worker, and a browser -------------------------------------------------

@pytest.fixture(scope="module")
def cfg() -> config_mod.Config:
    return config_mod.parse(test_config_data(), "tests/test_pages.py")


@pytest.fixture(scope="module")
def gw(cfg, redis_url, database_url) -> Iterator[Gateway]:
    from sync_worker.worker import Worker

    layout = Layout(f"pg{RUN}", cfg.shards)
    g = Gateway(create_app(cfg, redis_url, database_url, layout.prefix)).start()
    worker = Worker(redis_url, database_url, layout, consumer=f"pages-{RUN}", block_ms=100)

    async def run() -> Any:
        return asyncio.get_running_loop().create_task(worker.run())

    task = g.call(run)
    yield g
    worker.stop()

    async def join() -> None:
        await task

    g.call(join)
    g.stop()
    r = syncredis.Redis.from_url(redis_url)
    for k in r.scan_iter(match=f"{layout.prefix}:*", count=1000):
        r.delete(k)
    r.close()


@pytest.fixture(scope="module")
def http(gw: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


@pytest.fixture
def org(http: httpx.Client) -> Callable[..., tuple[str, str]]:
    """Makes an org on `plan` with a consume+read key; returns (org_id, key)."""

    def make(plan: str = "bulk") -> tuple[str, str]:
        org_id = f"pg-{secrets.token_hex(5)}"
        assert http.post("/v1/admin/orgs", json={"org_id": org_id, "name": f"Org {org_id}", "plan": plan},
                         headers=ADMIN).status_code == 201
        r = http.post(f"/v1/admin/orgs/{org_id}/keys", json={"scopes": ["consume", "read"]}, headers=ADMIN)
        assert r.status_code == 201, r.text
        return org_id, r.json()["key"]

    return make


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def consume(http: httpx.Client, key: str, feature: str, units: int = 1, status: int = 200) -> httpx.Response:
    r = http.post("/v1/consume", json={"feature": feature, "units": units}, headers=bearer(key))
    assert r.status_code == status, r.text
    return r


def drained(http: httpx.Client, key: str, n: int, kind: str = "consume") -> None:
    """Waits until the worker has written `n` of the org's `kind` events into the ledger (counting
    by kind: a period's first call also writes a `reset`)."""
    deadline = time.monotonic() + WAIT_S
    while len(http.get("/v1/usage", params={"limit": 1000, "kind": kind}, headers=bearer(key)).json()["events"]) < n:
        assert time.monotonic() < deadline, "the worker did not drain the events"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser_factory() -> Iterator[Callable[[], Any]]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium and chromedriver are not installed (scripts/system-deps.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    made: list[Any] = []
    dirs: list[str] = []

    def make() -> Any:
        profile = tempfile.mkdtemp(prefix="qgw-chromium-")
        dirs.append(profile)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1360,1500", f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        d.set_page_load_timeout(WAIT_S)
        made.append(d)
        return d

    yield make
    for d in made:
        d.quit()
    for p in dirs:
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def browser(browser_factory: Callable[[], Any]) -> Any:
    """A fresh browser (its own profile, so its own sessionStorage) for each test."""
    return browser_factory()


def wait_for(driver: Any, predicate: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(predicate, message=f"timed out: {what}")


def loaded(driver: Any) -> None:
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.loaded === 'true'"), "the page to load")


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def off_origin(driver: Any, base: str) -> list[str]:
    """Every resource the page loaded that did not come from the gateway itself."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [u for u in urls if not u.startswith(base + "/")]


def shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def sign_in(driver: Any, base: str, page: str, field: str, secret: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/{page}")
    wait_for(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the login form")
    box = driver.find_element(By.ID, field)
    box.send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    loaded(driver)


# Reads are one script each: a refresh re-renders the page, so a read in several steps could see
# an element replaced between them.
def meter_field(driver: Any, meter: str, field: str) -> tuple[str | None, str | None]:
    """(data-value, the text shown) of one number on a meter card."""
    return tuple(driver.execute_script(
        "const e = document.querySelector(`[data-meter='${arguments[0]}'] [data-field='${arguments[1]}']`);"
        "return e ? [e.dataset.value, e.innerText] : [null, null];", meter, field))


def rows(driver: Any, table: str, selector: str = "") -> list[dict[str, str]]:
    """The data attributes and cell texts of a table's body rows."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tbody tr${arguments[1]}`)]"
        ".map(r => ({...r.dataset, cells: [...r.cells].map(c => c.innerText)}));", table, selector)


def mint(http: httpx.Client, org_id: str, ttl_s: int | None = None) -> dict[str, Any]:
    r = http.post(f"/v1/admin/orgs/{org_id}/dashboard-links", json={} if ttl_s is None else {"ttl_s": ttl_s},
                  headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


# --- the token dashboard ----------------------------------------------------------------------

def test_token_dashboard_numbers_equal_the_balance_api(gw, http, org, browser):
    from selenium.webdriver.common.by import By

    org_id, key = org()
    assert http.post(f"/v1/admin/orgs/{org_id}/grants", json={"meter": "general", "amount": 40, "reason": "test"},
                     headers=ADMIN).status_code == 201
    consume(http, key, "generate_insight", 7)
    consume(http, key, "generate_goal", 2)
    consume(http, key, "chat", 130)
    drained(http, key, 3)
    drained(http, key, 1, "grant")
    sign_in(browser, gw.url, "dashboard", "key", key)
    api = http.get("/v1/balance", headers=bearer(key)).json()
    assert api["org_id"] == org_id
    for name, m in api["meters"].items():
        card = browser.find_element(By.CSS_SELECTOR, f'[data-meter="{name}"]')
        if not m["available"]:  # bulk allocates none of it and nothing was bought
            assert card.get_attribute("data-state") == "unavailable" and "not in plan" in card.text.lower()
            continue
        for field in ("used", "purchased", "allocated", "held", "balance"):
            if m["unlimited"] and field != "used":
                continue
            value, text = meter_field(browser, name, field)
            assert int(value) == m[field], (name, field)
            assert int(text.replace(",", "")) == m[field], (name, field, text)
    assert api["meters"]["general"]["purchased"] == 40 and api["meters"]["general"]["used"] == 7
    assert browser.find_element(By.ID, "org").text == org_id
    kinds = [r["kind"] for r in rows(browser, "events")]
    assert kinds.count("consume") == 3 and "grant" in kinds
    charted = dict(browser.execute_script(
        "return Chart.getChart(document.getElementById('usage-chart')).data.datasets.map(d => [d.label, d.data])"))
    a = http.get("/v1/analytics", params={"days": 30}, headers=bearer(key)).json()
    assert charted == {f["feature"]: [d["features"].get(f["feature"], 0) for d in a["by_day"]] for f in a["by_feature"]}
    assert {f: sum(v) for f, v in charted.items()} == {"generate_insight": 7, "generate_goal": 6, "chat": 130}
    assert console_errors(browser) == []
    assert off_origin(browser, gw.url) == []
    assert not browser.find_element(By.ID, "buy").is_displayed()  # purchases are not served yet
    shot(browser, "dashboard")
    browser.set_window_size(420, 1500)  # a phone's width: one column, nothing cut off
    wait_for(browser, lambda d: d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"),
             "the page to fit a narrow window")
    shot(browser, "dashboard-narrow")


def test_bar_turns_amber_below_25_percent_and_red_below_10(gw, http, org, browser):
    from selenium.webdriver.common.by import By

    org_id, key = org()  # bulk: general 100
    browser.get(mint(http, org_id)["url"])
    loaded(browser)

    def bar_state() -> tuple[str, str]:
        return tuple(browser.execute_script(
            "const c = document.querySelector('[data-meter=general]');"
            "return [c.dataset.state, c.querySelector('.bar').className];"))

    def fill_colour() -> str:  # what the eye sees: the computed colour of the bar's fill
        return browser.execute_script(
            "return getComputedStyle(document.querySelector('[data-meter=general] .alloc')).backgroundColor")

    def reload_until(value: int) -> None:
        browser.find_element(By.ID, "refresh").click()
        wait_for(browser, lambda d: meter_field(d, "general", "balance")[0] == str(value), f"balance {value}")

    assert bar_state() == ("ok", "bar")
    green = fill_colour()
    consume(http, key, "generate_insight", 75)  # 25 left: not below 25 %
    reload_until(25)
    assert bar_state() == ("ok", "bar")
    consume(http, key, "generate_insight", 1)  # 24 left
    reload_until(24)
    assert bar_state() == ("warn", "bar warn")
    amber = fill_colour()
    shot(browser, "dashboard-amber")
    consume(http, key, "generate_insight", 14)  # 10 left: not below 10 %
    reload_until(10)
    assert bar_state() == ("warn", "bar warn")
    consume(http, key, "generate_insight", 1)  # 9 left
    reload_until(9)
    assert bar_state() == ("crit", "bar crit")
    red = fill_colour()
    assert len({green, amber, red}) == 3 and "rgba(0, 0, 0, 0)" not in (green, amber, red)
    assert console_errors(browser) == []
    shot(browser, "dashboard-red")


def test_expired_or_tampered_link_gets_the_login_form_not_data(gw, http, org, browser):
    from selenium.webdriver.common.by import By

    org_id, key = org()
    consume(http, key, "generate_insight", 3)
    good = mint(http, org_id)["url"]
    token = good.split("#t=", 1)[1]
    payload, mac = token[len(links.PREFIX):].split(".")
    other_org = links._b64(b'{"o":"someone-else","e":9999999999}')
    expired = links.mint(org_id, int(time.time()) - 1)
    cases = {
        "expired": f"{gw.url}/dashboard#t={expired}",
        "tampered-signature": f"{gw.url}/dashboard#t={links.PREFIX}{payload}.{mac[:-2]}{'BB' if mac[-2:] == 'AA' else 'AA'}",
        "tampered-org": f"{gw.url}/dashboard#t={links.PREFIX}{other_org}.{mac}",
    }
    b = browser
    for name, url in cases.items():
        b.get("about:blank")  # a full page load each time, not a same-document hash change
        b.get(url)
        wait_for(b, lambda d: d.find_element(By.ID, "login").is_displayed(), f"the login form ({name})")
        assert not b.find_element(By.ID, "app").is_displayed()
        assert b.find_elements(By.CSS_SELECTOR, "[data-meter]") == []
        assert "expired or is not valid" in b.find_element(By.ID, "login-error").text
        assert org_id not in b.find_element(By.TAG_NAME, "body").text
        assert b.execute_script("return sessionStorage.length") == 0  # the bad token is not kept
        assert "#t=" not in b.current_url
        shot(b, f"dashboard-link-{name}")
    b.get_log("browser")  # read out: the refused links' 401s are expected there
    b.get("about:blank")  # and the untouched link opens the dashboard
    b.get(good)
    loaded(b)
    assert meter_field(b, "general", "balance")[0] == "97"
    assert "#t=" not in b.current_url  # the token left the address bar
    assert console_errors(b) == []


# --- the ops dashboard ------------------------------------------------------------------------

def test_ops_page_lists_the_top_spender_the_api_lists(gw, http, org, browser):
    from selenium.webdriver.common.by import By

    big, big_key = org()
    small, small_key = org()
    consume(http, big_key, "chat", 900)
    consume(http, big_key, "generate_insight", 96)  # general: 4 of 100 left, near zero
    consume(http, small_key, "chat", 5)
    consume(http, small_key, "generate_insight", 101, status=402)  # a refusal for the 402 series
    drained(http, big_key, 2)
    drained(http, small_key, 1)
    drained(http, small_key, 1, "denied")
    sign_in(browser, gw.url, "ops", "token", ADMIN_TOKEN)
    top = http.get("/v1/admin/top", params={"days": 30, "limit": 10}, headers=ADMIN).json()["orgs"]
    shown = rows(browser, "top")
    assert [r["org"] for r in shown] == [o["org_id"] for o in top]
    assert [int(r["cells"][3].replace(",", "")) for r in shown] == [o["tokens"] for o in top]
    assert big in [o["org_id"] for o in top]
    low = rows(browser, "low", f'[data-org="{big}"][data-meter="general"]')
    assert len(low) == 1 and low[0]["cells"][2] == "4"
    assert rows(browser, "burn", f'[data-org="{big}"]')
    assert browser.execute_script("return !!Chart.getChart(document.getElementById('decisions-chart'))")
    refused = browser.find_element(By.CSS_SELECTOR, "#kpi-refused .sub").text
    activity = http.get("/v1/admin/activity", params={"minutes": 60}, headers=ADMIN).json()
    assert f"402: {activity['totals']['decisions']['402']:,}" in refused
    assert not browser.find_element(By.ID, "purchases").is_displayed()
    assert console_errors(browser) == []
    assert off_origin(browser, gw.url) == []
    shot(browser, "ops")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    browser.refresh()  # the token is still in this tab's sessionStorage
    loaded(browser)
    assert browser.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(13, 15, 22)"
    assert console_errors(browser) == []
    shot(browser, "ops-dark")


def test_wrong_admin_token_gets_the_login_form_again(gw, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{gw.url}/ops")
    wait_for(browser, lambda d: d.find_element(By.ID, "login").is_displayed(), "the login form")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "login-error").is_displayed(), "the error")
    assert "not accepted" in browser.find_element(By.ID, "login-error").text
    assert not browser.find_element(By.ID, "app").is_displayed()


# --- signed links and the routes the pages read, without a browser -----------------------------

def test_a_minted_link_keeps_its_token_out_of_what_the_server_sees(http, org):
    org_id, _ = org()
    before = time.time()
    link = mint(http, org_id, ttl_s=120)
    url = urlsplit(link["url"])
    assert url.path == "/dashboard" and url.query == "" and url.fragment.startswith("t=" + links.PREFIX)
    expires = time.mktime(time.strptime(link["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before + 119 <= expires <= time.time() + 121
    assert links.verify(url.fragment[2:]) == org_id


def test_a_link_reads_its_org_and_can_neither_consume_nor_administer(http, org):
    org_id, key = org()
    consume(http, key, "generate_insight", 2)
    token = urlsplit(mint(http, org_id)["url"]).fragment[2:]
    h = bearer(token)
    assert http.get("/v1/balance", headers=h).json()["org_id"] == org_id
    for path in ("/v1/usage", "/v1/analytics", "/v1/pricing"):
        assert http.get(path, headers=h).status_code == 200, path
    r = http.post("/v1/consume", json={"feature": "generate_insight"}, headers=h)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert http.post("/v1/refunds", json={"event_id": "0" * 32}, headers=h).status_code == 403
    assert http.get("/v1/admin/top", headers=h).status_code == 401
    assert http.post(f"/v1/admin/orgs/{org_id}/dashboard-links", json={}, headers=h).status_code == 401
    assert http.get("/v1/balance", headers=bearer(key)).json()["meters"]["general"]["used"] == 2  # nothing charged


def test_an_expired_or_altered_link_is_refused_by_the_read_routes(http, org):
    org_id, _ = org()
    expired = links.mint(org_id, int(time.time()) - 1)
    good = links.mint(org_id, int(time.time()) + 60)
    altered = good[:-3] + ("x" if good[-3] != "x" else "y") + good[-2:]
    foreign = links.mint("no-such-org", int(time.time()) + 60)
    for token in (expired, altered, foreign, links.PREFIX + "garbage", links.PREFIX + "a.b"):
        r = http.get("/v1/balance", headers=bearer(token))
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", token


def test_dashboard_link_ttl_and_org_are_checked(http, org):
    org_id, _ = org()
    r = http.post(f"/v1/admin/orgs/{org_id}/dashboard-links", json={"ttl_s": 10}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["field"] == "ttl_s"
    r = http.post("/v1/admin/orgs/nobody-here/dashboard-links", json={}, headers=ADMIN)
    assert r.status_code == 404
    assert http.post(f"/v1/admin/orgs/{org_id}/dashboard-links").status_code == 401


def test_pricing_says_purchases_are_unavailable_and_gives_the_thresholds(http, org):
    _, key = org()
    p = http.get("/v1/pricing", headers=bearer(key)).json()
    assert p["purchases_available"] is False
    assert p["balance_thresholds"] == {"warn_percent": 25, "critical_percent": 10}


def test_alert_thresholds_from_the_config_reach_the_pages():
    from quota_gw import display

    cfg = config_mod.parse(test_config_data(), "t")
    assert display.thresholds(cfg) == {"warn_percent": 25, "critical_percent": 10}

    class Alerts:
        thresholds = [0, 10, 40]

    cfg.__dict__["alerts"] = Alerts()  # what an `alerts:` block will hold
    assert display.thresholds(cfg) == {"warn_percent": 40, "critical_percent": 10}


def test_activity_counts_decisions_and_tokens_per_minute_by_outcome(http, org):
    _, key = org()
    before = http.get("/v1/admin/activity", params={"minutes": 5}, headers=ADMIN).json()["totals"]
    consume(http, key, "generate_insight", 3)
    consume(http, key, "generate_insight", 500, status=402)
    drained(http, key, 1)
    drained(http, key, 1, "denied")
    a = http.get("/v1/admin/activity", params={"minutes": 5}, headers=ADMIN).json()
    assert a["minutes"] == 5 and len(a["by_minute"]) == 5 and a["outcomes"] == ["ok", "402", "403", "429"]
    assert a["totals"]["decisions"]["ok"] - before["decisions"]["ok"] >= 1
    assert a["totals"]["decisions"]["402"] - before["decisions"]["402"] >= 1
    assert a["totals"]["tokens"]["402"] - before["tokens"]["402"] >= 500
    assert sum(m["decisions"]["402"] for m in a["by_minute"]) == a["totals"]["decisions"]["402"]
    assert http.get("/v1/admin/activity", params={"minutes": 0}, headers=ADMIN).status_code == 422
    assert http.get("/v1/admin/activity", headers=bearer(key)).status_code == 401


def test_burn_projects_exhaustion_from_the_weeks_spend_and_the_live_balance(http, org):
    org_id, key = org()
    consume(http, key, "generate_insight", 70)
    drained(http, key, 1)
    rows = http.get("/v1/admin/burn", params={"days": 7, "limit": 200}, headers=ADMIN).json()["orgs"]
    (row,) = [r for r in rows if r["org_id"] == org_id and r["meter"] == "general"]
    assert row["tokens"] == 70 and row["burn_per_day"] == 10.0 and row["balance"] == 30
    assert row["projected_exhaustion"] is not None


def test_pages_are_served_with_a_strict_content_security_policy(http):
    for path in ("/dashboard", "/ops"):
        r = http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "http://" not in r.text.replace("http://www.w3.org", "") and "https://" not in r.text
    assert http.get("/dashboard/static/vendor/chart.umd.min.js").status_code == 200


def test_the_vendored_chart_library_is_the_recorded_release():
    assert hashlib.sha256((WEB / "vendor" / "chart.umd.min.js").read_bytes()).hexdigest() == CHART_JS_SHA256
    assert "4.6.1" in (WEB / "vendor" / "README.md").read_text()


def test_package_data_ships_every_page_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["quota_gw"]
    pkg = ROOT / "src" / "quota_gw"
    shipped = {p for g in globs for p in pkg.glob(g)}
    files = {p for p in WEB.rglob("*") if p.is_file()}
    assert files and files <= shipped, sorted(str(p) for p in files - shipped)
