"""The dashboard in a real browser against a real hub with simulated agents.

Each test drives the page as a person would and waits with Playwright's auto-waiting `expect`
(bounded by the guard in conftest); none sleeps for a fixed time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import trio
from playwright.sync_api import expect

from tests.browser.conftest import Page
from tests.integration.conftest import ADMIN_PASSWORD, HubProcess
from tests.integration.edge_helpers import AgentProcess
from tests.integration.test_dashboard_link import device as raw_device

NewPage = Callable[..., Page]
Agents = Callable[..., AgentProcess]


def log_in(page: Page, hub: HubProcess, password: str = ADMIN_PASSWORD) -> None:
    page.page.goto(f"{hub.http}/")
    expect(page.page.locator("#login-form")).to_be_visible()
    page.page.fill("#username", "admin")
    page.page.fill("#password", password)
    page.page.click("#login-form button[type=submit]")
    expect(page.page.locator("#whoami")).to_have_text("admin (admin)")
    expect(page.page.locator("#live")).to_have_text("live")


def row(page: Page, device_id: str) -> Any:
    return page.page.locator(f'tr[data-device="{device_id}"]')


def test_log_in_and_see_a_device_go_online(
    hub: HubProcess, new_page: NewPage, agents: Agents
) -> None:
    token = hub.create_device("meter-1", name="Basement meter")
    page = new_page(phone=True)  # the fleet view at phone width
    page.page.goto(f"{hub.http}/")
    # A wrong password is refused on the page, the right one logs in.
    page.page.fill("#username", "admin")
    page.page.fill("#password", "not-the-password")
    page.page.click("#login-form button[type=submit]")
    expect(page.page.locator("#login-error")).to_have_text("Wrong username or password.")
    page.errors.clear()  # the 401 of that attempt is logged by the browser, as it should be
    log_in(page, hub)
    expect(row(page, "meter-1").locator(".status")).to_have_text("offline")
    expect(page.page.locator("#count-offline b")).to_have_text("1")
    agents(hub, "meter-1", token)
    expect(row(page, "meter-1").locator(".status")).to_have_text("online")
    expect(page.page.locator("#count-online b")).to_have_text("1")
    expect(page.page.locator("#count-offline b")).to_have_text("0")
    expect(row(page, "meter-1")).to_contain_text("Basement meter")
    page.screenshot()
    # The page fits a phone: nothing wider than the viewport.
    width = page.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    # Logging out ends the session: the page is back at the login form.
    page.page.click("#logout")
    expect(page.page.locator("#login-form")).to_be_visible()
    assert page.errors == []


def test_a_metric_value_changes_on_screen(
    hub: HubProcess, new_page: NewPage, agents: Agents
) -> None:
    token = hub.create_device("meter-1")
    agents(hub, "meter-1", token)
    page = new_page()
    log_in(page, hub)
    value = row(page, "meter-1").locator('[data-metric="voltage"] .v')
    expect(value).to_have_text(re.compile(r"^\d"))
    first = value.text_content()
    expect(value).not_to_have_text(first or "")  # a newer sample, pushed, no reload
    # The device view charts the same metric and updates its value live.
    page.page.click('a[href="#/device/meter-1"]')
    chart_value = page.page.locator('.chart[data-metric="voltage"] .value')
    expect(chart_value).to_have_text(re.compile(r"^\d"))
    before = chart_value.text_content()
    expect(chart_value).not_to_have_text(before or "")
    expect(page.page.locator('.chart[data-metric="voltage"] canvas')).to_be_visible()
    page.screenshot()
    assert page.errors == []


def test_send_ping_and_see_it_succeed(hub: HubProcess, new_page: NewPage, agents: Agents) -> None:
    token = hub.create_device("meter-1")
    agents(hub, "meter-1", token)
    page = new_page()
    log_in(page, hub)
    expect(row(page, "meter-1").locator(".status")).to_have_text("online")
    page.page.goto(f"{hub.http}/#/device/meter-1")
    expect(page.page.locator("#device-status")).to_have_text("online")
    page.page.fill("#command-name", "ping")
    page.page.click("#command-form button[type=submit]")
    status = page.page.locator("#commands li.command").first.locator(".command-status")
    expect(status).to_have_text("succeeded")
    page.screenshot()
    commands = hub.request("GET", "/api/devices/meter-1/commands").json()["commands"]
    assert [(c["name"], c["status"]) for c in commands] == [("ping", "succeeded")]
    assert page.errors == []


def test_a_low_battery_sample_shows_an_alert(hub: HubProcess, new_page: NewPage) -> None:
    token = hub.create_device("van-1")
    page = new_page()
    log_in(page, hub)
    page.page.goto(f"{hub.http}/#/device/van-1")
    expect(page.page.locator("#alerts")).to_contain_text("No alerts.")

    async def low_battery() -> None:
        now = int(time.time() * 1000)
        async with raw_device(hub, "van-1", token) as dev:
            await dev.telemetry([{"ts": now - 1_000, "data": {"batteryVoltage": 12.6}}])
            await dev.telemetry([{"ts": now, "data": {"batteryVoltage": 11.0}}])

    trio.run(low_battery)
    alert = page.page.locator("#alerts li.alert-item").first
    expect(alert).to_contain_text("LOW_BATTERY")
    expect(alert.locator(".lvl-warning")).to_have_text("LOW_BATTERY")
    page.page.click('a[href="#/"]')
    expect(page.page.locator("#count-alerting b")).to_have_text("1")
    expect(row(page, "van-1").locator(".badge.alerting")).to_be_visible()
    page.page.goto(f"{hub.http}/#/device/van-1")
    expect(page.page.locator("#alerts li.alert-item").first).to_contain_text("LOW_BATTERY")
    page.screenshot()
    assert page.errors == []


def test_create_a_device_and_see_its_token_once(hub: HubProcess, new_page: NewPage) -> None:
    page = new_page()
    log_in(page, hub)
    page.page.click("#nav-admin")
    page.page.fill("#new-device-id", "new-meter")
    page.page.fill("#new-device-name", "<b>not bold</b>")
    page.page.click("#create-device button[type=submit]")
    token_box = page.page.locator("#token-box")
    expect(token_box).to_contain_text("new-meter")
    token = page.page.locator("#new-token").text_content() or ""
    assert len(token) >= 20
    expect(page.page.locator('tr[data-device="new-meter"]')).to_be_visible()
    page.screenshot()

    # The token really is the device's: it opens the device link.
    async def connect() -> None:
        async with raw_device(hub, "new-meter", token) as dev:
            await dev.telemetry([{"ts": 1_000, "data": {"voltage": 230.0}}])

    trio.run(connect)
    # Shown once: after leaving the page it is gone, and the fleet shows the name as text.
    page.page.click('a[href="#/"]')
    expect(row(page, "new-meter")).to_contain_text("<b>not bold</b>")
    page.page.click("#nav-admin")
    expect(page.page.locator('tr[data-device="new-meter"]')).to_be_visible()
    expect(page.page.locator("#token-box")).to_have_count(0)
    assert token not in (page.page.content())
    assert page.errors == []


def test_the_page_reconnects_after_a_hub_restart(
    hub: HubProcess, new_page: NewPage, agents: Agents
) -> None:
    token = hub.create_device("meter-1")
    agents(hub, "meter-1", token)
    page = new_page()
    log_in(page, hub)
    expect(row(page, "meter-1").locator(".status")).to_have_text("online")
    banner = page.page.locator("#conn")
    expect(banner).to_be_hidden()
    port = hub.port
    hub.stop()
    expect(banner).to_be_visible()
    expect(banner).to_have_text("disconnected — reconnecting…")
    expect(page.page.locator("#live")).to_have_text("offline")
    page.screenshot("-disconnected")
    hub.start(port)
    expect(banner).to_be_hidden()
    expect(page.page.locator("#live")).to_have_text("live")
    # Live again: the agent comes back and its samples reach the page.
    expect(row(page, "meter-1").locator(".status")).to_have_text("online", timeout=90_000)
    value = row(page, "meter-1").locator('[data-metric="voltage"] .v')
    expect(value).to_have_text(re.compile(r"^\d"))
    first = value.text_content()
    expect(value).not_to_have_text(first or "")
    page.screenshot()
    # While the hub was down the browser logged failed connection attempts; nothing else.
    assert [
        e for e in page.errors if "ERR_CONNECTION_REFUSED" not in e and "WebSocket" not in e
    ] == []
