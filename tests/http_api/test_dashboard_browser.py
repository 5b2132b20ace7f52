"""The dashboard in a real browser (headless Chromium through chromedriver) against a real
server under real traffic: its charts have data, its numbers agree with /status, the
console stays clean, and with a token it shows nothing until it gets the token.

Chromium and chromedriver are Debian's `chromium` and `chromium-driver` (./dev.sh setup
installs them); the test skips only where they are missing. Set LMCACHE_RS_SCREENSHOT=PATH to
save the screenshot taken under traffic there (docs/dashboard.png is made that way)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait
from traffic import traffic

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed (./dev.sh setup installs chromium and chromium-driver)",
)

TOKEN = "dashboard-test-token-0123456789"
#: Every number the page shows with data-metric, as [metric, value, attributes].
READ_NUMBERS = """
return [...document.querySelectorAll('[data-metric]')].map(e => [e.dataset.metric, e.dataset.value ?? null,
    {tier: e.dataset.tier, salt: e.dataset.salt, code: e.dataset.code}]);
"""
CHART_POINTS = """
const out = {};
document.querySelectorAll('figure.chart').forEach(f => {
  out[f.id || f.dataset.chart] = Number(f.dataset.points || 0);
});
return out;
"""


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def save_full_page(driver, path: str) -> None:
    """A PNG of the whole page, however long (Chrome DevTools: capture beyond the viewport)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    Path(path).write_bytes(base64.b64decode(shot["data"]))


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def page_numbers(driver) -> dict[tuple[str, str | None], str | None]:
    out = {}
    for metric, value, attrs in driver.execute_script(READ_NUMBERS):
        key = attrs.get("tier") or attrs.get("salt") or attrs.get("code")
        if metric == "worker-instance":
            key = value
        out[(metric, key)] = value
    return out


def status_numbers(st: dict) -> dict[tuple[str, str | None], str]:
    """What the page must show, computed from /status."""
    sm = st["storage_manager"]
    l1 = sm["l1_manager"]
    want = {
        ("healthy", None): json.dumps(st["is_healthy"]),
        ("tier-used-bytes", "L1"): str(l1["memory_used_bytes"]),
        ("tier-capacity-bytes", "L1"): str(l1["memory_total_bytes"]),
        ("tier-objects", "L1"): str(l1["total_object_count"]),
        ("requests-total", None): str(st["request_server"]["requests_total"]),
        ("errors-total", None): str(sum(st["request_server"]["errors"].values())),
    }
    for code, n in st["request_server"]["errors"].items():
        want[("errors", code)] = str(n)
    for a in sm["l2_adapters"]:
        want[("tier-used-bytes", a["name"])] = str(a["total_bytes_used"])
        want[("tier-objects", a["name"])] = str(a["total_objects"])
    for s in sm["cache_salts"]:
        want[("tenant-l1-bytes", s["cache_salt"] or "_default")] = str(s["bytes"])
    for gid in st["registered_gpu_ids"]:
        want[("worker-instance", str(gid))] = str(gid)
    return want


def test_dashboard_under_traffic(server_factory, browser, tmp_path) -> None:
    l2 = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "max_capacity_gb": 0.03})
    server = server_factory(
        "--stats-history-interval-seconds",
        "0.5",
        "--eviction-policy",
        "IsolatedLRU",
        "--quota",
        "alice=0.03",
        "--quota",
        "bob=0.01",
        "--l2-adapter",
        l2,
    )
    api = httpx.Client(base_url=server.http, timeout=30)
    with traffic(server.url) as failures:
        browser.get(server.http + "/dashboard")
        # Curves from traffic: lookups, throughput, L1 and L2 use, a latency chart per op.
        WebDriverWait(browser, 30, poll_frequency=0.2).until(
            lambda d: (
                (p := d.execute_script(CHART_POINTS)).get("chart-lookups", 0) >= 4
                and p.get("chart-throughput", 0) >= 4
                and p.get("tier-L1", 0) >= 4
                and p.get("latency-lookup", 0) >= 4
                and p.get("latency-store", 0) >= 4
            )
        )
        points = browser.execute_script(CHART_POINTS)
        assert all(points[k] > 0 for k in ("chart-hit-ratio", "chart-requests", "chart-errors")), points
        assert any(k.startswith("tier-fs") and v > 0 for k, v in points.items()), points
        shot = os.environ.get("LMCACHE_RS_SCREENSHOT")
        if shot:  # docs/dashboard.png: let the curves grow first
            time.sleep(float(os.environ.get("LMCACHE_RS_SCREENSHOT_AFTER", "0")))
        shot = shot or str(tmp_path / "dashboard.png")
        save_full_page(browser, shot)
        assert Path(shot).stat().st_size > 10_000
    assert failures == []
    # Traffic stopped: the page's numbers converge to /status (L1 settles after a quota cycle).
    mismatch: list[object] = []

    def agrees(d) -> bool:
        want = status_numbers(api.get("/status").json())
        got = page_numbers(d)
        mismatch[:] = [(k, v, got.get(k)) for k, v in want.items() if got.get(k) != v]
        return not mismatch

    try:
        WebDriverWait(browser, 20, poll_frequency=0.5).until(agrees)
    except Exception:
        pytest.fail(f"page numbers differ from /status: {mismatch}")
    numbers = page_numbers(browser)
    assert numbers[("healthy", None)] == "true"
    assert len([k for k in numbers if k[0] == "worker-instance"]) == 2
    assert int(numbers[("errors", "unknown_instance")]) >= 1
    text = browser.find_element("tag name", "body").text
    for expected in ("demo-model-0", "alice", "l1-eviction-cycle", "lmcache_driven", "stats-history"):
        assert expected in text
    assert console_errors(browser) == []
    api.close()


def test_dashboard_with_a_token(server_factory, browser, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = server_factory(
        "--http-auth-token-file", str(token_file), "--stats-history-interval-seconds", "0.5"
    )
    with server.client() as c:
        from kvsim import Worker  # noqa: PLC0415

        w = Worker(c, model="secret-model-name")
        # Without the token: a token form and nothing of the server's state.
        browser.get(server.http + "/dashboard")
        WebDriverWait(browser, 20).until(lambda d: d.find_element("id", "login").is_displayed())
        assert not browser.find_element("id", "main").is_displayed()
        assert "secret-model-name" not in browser.page_source
        assert all(v is None for _, v, _ in browser.execute_script(READ_NUMBERS))
        # A wrong token is refused and said so.
        box = browser.find_element("id", "token-input")
        box.send_keys("wrong-token-wrong-token")
        box.submit()
        WebDriverWait(browser, 20).until(lambda d: "refused" in d.find_element("id", "login-error").text)
        assert not browser.find_element("id", "main").is_displayed()
        # The token in the URL fragment: the page works, and the token leaves the address bar.
        browser.get(server.http + f"/dashboard#token={TOKEN}")
        WebDriverWait(browser, 20).until(lambda d: d.find_element("id", "main").is_displayed())
        WebDriverWait(browser, 20).until(
            lambda d: "secret-model-name" in d.find_element("id", "workers").text
        )
        assert "token" not in browser.current_url
        numbers = page_numbers(browser)
        assert numbers[("worker-instance", str(w.instance_id))] == str(w.instance_id)
        # The browser's only errors are the two 401 answers the token check produced.
        errors = console_errors(browser)
        assert all("401" in e for e in errors), errors
        w.close()
