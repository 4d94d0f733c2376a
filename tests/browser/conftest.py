"""Browser tests: Playwright (sync API) driving Debian's Chromium against a real hub subprocess.

No browser is downloaded: Playwright launches `/usr/bin/chromium`. Without it these tests skip,
unless `CI=true` (then they fail). Every test is marked `browser`, saves a screenshot under
`tests/artifacts/`, and fails if the page logged a console error it did not expect.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import HubProcess, hub, hub_factory  # noqa: F401 (fixtures)
from tests.integration.edge_helpers import AgentProcess, agent_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
GUARD_MS = 20_000
"""Playwright's `expect` waits at most this long (a hang guard, not a timing check)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (CI=true: install Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright is not installed")
    from playwright.sync_api import expect

    expect.set_options(timeout=GUARD_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A page plus what it logged; `errors` are console errors and uncaught exceptions."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def screenshot(self, suffix: str = "") -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}{suffix}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def new_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Page]]:
    """Open a page (desktop size unless `phone=True`) in a fresh browser context."""
    contexts: list[Any] = []

    def open_page(phone: bool = False) -> Page:
        viewport = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 900}
        context = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone)
        context.set_default_timeout(GUARD_MS)
        contexts.append(context)
        return Page(context.new_page(), request.node.name)

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start simulated agents (`simulated_ems`, fast batches); every one is killed at the end."""
    made: list[AgentProcess] = []

    def start(target: HubProcess, device_id: str, token: str, **env: str) -> AgentProcess:
        root = tmp_path / f"agent-{device_id}"
        agent = AgentProcess(root=root, env=agent_env(root, target.ws, device_id, token, **env))
        made.append(agent)
        agent.start()
        return agent

    yield start
    for agent in made:
        agent.kill()
