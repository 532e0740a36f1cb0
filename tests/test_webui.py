"""The web view at /ui/, driven in a real headless Chromium (Debian's) through Selenium.

The page runs against the real kwollect-api and database: a running job's power is drawn
per node with one point per stored sample, it grows while the job runs (live), the job's
energy per node is shown, downloads and errors work, and the console stays clean. A
screenshot is written in the test's temporary directory.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import pytest

from tests.sqlapi import load, load_job, series, settle_rollup

JOB = 9301
STEP_S = 5
pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian's chromium and chromium-driver are not installed (scripts/bootstrap.sh "
           "installs them when run as root)")


async def load_settled(kwdb, rows) -> None:
    """Writes rows as the collectors do, then brings the summaries and the rollup up to date."""
    writer, admin = await kwdb.connect("kwuser"), await kwdb.connect("admin")
    try:
        await load(writer, rows)
        await settle_rollup(admin)
    finally:
        await writer.close()
        await admin.close()


@pytest.fixture(scope="module")
async def ui_data(kwdb):
    """Job 9301 on ui-1 and ui-2 since 10 minutes ago, still running; power every 5 s."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(minutes=10)
    count = 10 * 60 // STEP_S
    rows = series("ui-1", "bmc_node_power_watt", start, count, STEP_S, value=lambda i: 100.0)
    rows += series("ui-2", "bmc_node_power_watt", start, count, STEP_S,
                   value=lambda i: 150.0 + 10 * (i % 2))
    rows += series("ui-1", "temp_celsius", start, count, STEP_S, value=lambda i: 40.0)
    await load_job(kwdb, rows, JOB, ["ui-1", "ui-2"], start)
    return {"start": start, "count": count}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    home = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={home / 'profile'}", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver",
                      log_output=str(home / "chromedriver.log"),
                      env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    driver = webdriver.Chrome(service=service, options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                            "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def traces(driver) -> dict[str, dict[str, int]]:
    """metric -> trace name -> number of points, read from plotly's own graph objects."""
    return driver.execute_script("""
        const out = {};
        for (const div of document.querySelectorAll('#charts .chart')) {
            out[div.dataset.metric] = Object.fromEntries(
                (div.data || []).map(t => [t.name, t.x.length]));
        }
        return out;""")


def severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_a_running_jobs_power_is_drawn_live_with_energy(gateway, kwdb, ui_data, browser,
                                                        tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{gateway.url}/ui/?job={JOB}&metrics=bmc_node_power_watt&range=job")
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.endswith("live"))
    drawn = traces(browser)
    assert list(drawn) == ["bmc_node_power_watt"]
    assert set(drawn["bmc_node_power_watt"]) == {"ui-1", "ui-2"}
    points = drawn["bmc_node_power_watt"]["ui-1"]
    assert points >= ui_data["count"]
    # the chart is really drawn: one SVG line path per node
    assert len(browser.find_elements(By.CSS_SELECTOR, "#charts .scatterlayer .trace")) == 2
    # energy per node, from get_job_metrics
    wait_for(browser, lambda d: d.find_element(By.ID, "energy").is_displayed())
    cells = {row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
             for row in browser.find_elements(By.CSS_SELECTOR, "#energy-table tbody tr")}
    assert sorted(cells) == ["ui-1", "ui-2"]
    assert float(cells["ui-1"]) > 0
    # live: a sample stored now appears without touching the page
    import asyncio

    async def add() -> None:
        writer = await kwdb.connect("kwuser")
        await load(writer, [(datetime.now(UTC), "ui-1", "bmc_node_power_watt", 100.0, None)])
        await writer.close()

    asyncio.run(add())
    wait_for(browser, lambda d: traces(d)["bmc_node_power_watt"]["ui-1"] > points, timeout=20)
    browser.save_screenshot(str(tmp_path / "kwollect-ui.png"))
    assert (tmp_path / "kwollect-ui.png").stat().st_size > 10_000
    assert severe(browser) == []


def test_devices_and_metric_choices_and_downloads(gateway, ui_data, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{gateway.url}/ui/?live=0")
    browser.find_element(By.ID, "devices").send_keys("ui-1")
    browser.find_element(By.ID, "job").click()   # leaves the field: metric choices reload
    wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "metrics")).options) == 2)
    choices = Select(browser.find_element(By.ID, "metrics"))
    assert [o.text for o in choices.options] == ["bmc_node_power_watt", "temp_celsius"]
    choices.select_by_visible_text("temp_celsius")
    Select(browser.find_element(By.ID, "range")).select_by_value("900")
    browser.find_element(By.ID, "show").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.endswith("1 metrics"))
    assert set(traces(browser)) == {"temp_celsius"}
    assert not browser.find_element(By.ID, "energy").is_displayed()
    csv = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('../rpc/get_metrics?devices=ui-1&metrics=temp_celsius',
              {headers: {Accept: 'text/csv'}}).then(r => r.text()).then(done);""")
    assert csv.startswith("timestamp,device_id,metric_id,value,labels")
    assert browser.find_element(By.ID, "csv").is_displayed()
    assert severe(browser) == []


@pytest.fixture(scope="module")
async def ui_hours(kwdb):
    """ui-h: power every 30 s for the 3 whole hours that started 3 days ago, summarized and
    rolled up; the first hour."""
    first = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    await load_settled(kwdb, series("ui-h", "bmc_node_power_watt", first, 3 * 120, 30,
                                    value=lambda i: 100.0 + 20 * (i // 120)))
    return first


@pytest.mark.parametrize(("range_s", "level", "points"), [
    (604800, "5-minute summaries", 36), (2592000, "1-hour rollups", 3),
    (7776000, "1-hour rollups", 3)])
def test_long_ranges_read_the_summaries_and_the_1h_rollup(gateway, ui_hours, browser, range_s,
                                                          level, points):
    """Up to 7 days the 5-minute summaries, beyond the 1-hour rollup (as Grafana), said in
    the status line; one point per bucket."""
    from selenium.webdriver.common.by import By

    browser.get(f"{gateway.url}/ui/?devices=ui-h&metrics=bmc_node_power_watt"
                f"&range={range_s}&live=0")
    status = wait_for(browser, lambda d: "rows" in d.find_element(By.ID, "status").text
                      and d.find_element(By.ID, "status"))
    assert status.text == f"{points} rows, 1 series, 1 metrics ({level})"
    assert traces(browser) == {"bmc_node_power_watt": {"ui-h": points}}
    if points == 3:
        drawn = browser.execute_script(
            "const t = document.querySelector('#charts .chart').data[0]; return [t.x, t.y];")
        assert [datetime.fromisoformat(x) for x in drawn[0]] == [
            ui_hours + timedelta(hours=h) for h in range(3)]
        assert drawn[1] == [100.0, 120.0, 140.0]
    assert severe(browser) == []


@pytest.fixture(scope="module")
async def ui_long(kwdb):
    """ui-long: power every 10 s for the 9 days that started 10 days ago (77,760 rows),
    summarized and rolled up; the first hour."""
    first = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=10)
    await load_settled(kwdb, series("ui-long", "bmc_node_power_watt", first, 9 * 8640, 10,
                                    value=lambda i: 100.0))
    return first


@pytest.mark.parametrize(("job", "hours", "status"), [
    (9311, 192, "193 rows, 1 series, 1 metrics (1-hour rollups)"),
    (9312, 72, "865 rows, 1 series, 1 metrics (5-minute summaries)"),
    (9313, 1 / 3, "121 rows, 1 series, 1 metrics")])
def test_the_job_window_reads_the_level_of_the_jobs_length(gateway, kwdb, ui_long, browser,
                                                            job, hours, status):
    """A job of 8 days (69,120 raw rows) or 3 days (25,920), over the gateway's row bound
    of 20,000, is drawn from the 1-hour rollup or the 5-minute summaries (buckets from the
    one it started in to the one it stopped in), as the fixed ranges and Grafana choose;
    a job of 20 minutes from its raw rows.  The job's energy (100 W all along) is shown
    for all three: the long ones' from the summaries (get_job_metrics' method 'summary',
    said under the title), the short one's from its raw rows."""
    import asyncio

    from selenium.webdriver.common.by import By

    start = ui_long + timedelta(hours=1)
    asyncio.run(load_job(kwdb, [], job, ["ui-long"], start, start + timedelta(hours=hours)))
    browser.get(f"{gateway.url}/ui/?job={job}&metrics=bmc_node_power_watt&range=job&live=0")
    shown = wait_for(browser, lambda d: ("rows" in d.find_element(By.ID, "status").text
                                         or "error" in d.find_element(By.ID, "status")
                                         .get_attribute("class"))
                     and d.find_element(By.ID, "status"))
    assert shown.text == status
    points = int(status.split()[0])
    assert traces(browser) == {"bmc_node_power_watt": {"ui-long": points}}
    drawn = browser.execute_script(
        "const t = document.querySelector('#charts .chart').data[0]; return [t.x[0], t.y];")
    assert datetime.fromisoformat(drawn[0]) == start
    assert set(drawn[1]) == {100.0}
    wait_for(browser, lambda d: d.find_element(By.ID, "energy").is_displayed())
    assert not browser.find_element(By.ID, "energy-error").is_displayed()
    total = float(browser.find_element(By.ID, "energy-total").text)
    assert total == pytest.approx(100.0 * hours, rel=1e-3)
    assert browser.find_element(By.ID, "energy-method").is_displayed() == (hours > 24)
    assert severe(browser) == []


def test_api_errors_are_shown_not_thrown(gateway, ui_data, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{gateway.url}/ui/?job=987654&range=job&live=0")
    status = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#status.error"))
    assert "987654" in status.text
    # the 404 of the failed call is logged by the browser as a network error, nothing else
    assert [m for m in severe(browser) if "404" not in m] == []


def test_ui_files_are_served_with_safe_headers(gateway):
    import urllib.request

    with urllib.request.urlopen(f"{gateway.url}/ui/") as response:  # noqa: S310
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    with urllib.request.urlopen(f"{gateway.url}/ui/plotly.min.js") as response:  # noqa: S310
        assert response.headers["Content-Type"] == "text/javascript"
        assert len(response.read()) > 1_000_000
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{gateway.url}/ui/..%2fapp.py")  # noqa: S310
    assert err.value.code == 404
    with urllib.request.urlopen(f"{gateway.url}/ui") as response:  # noqa: S310
        assert response.url == f"{gateway.url}/ui/" and response.status == 200
