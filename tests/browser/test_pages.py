"""The dashboard's files as HTTP serves them (no browser needed)."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import HubProcess


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/", "text/html; charset=utf-8", b"/static/app.js"),
        ("/static/app.js", "text/javascript; charset=utf-8", b"/ws/dashboard"),
        ("/static/app.css", "text/css; charset=utf-8", b"@media"),
    ],
)
def test_files_are_served_with_their_content_type(
    hub: HubProcess, path: str, content_type: str, marker: bytes
) -> None:
    response = httpx.get(f"{hub.http}{path}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert marker in response.content


@pytest.mark.parametrize(
    "path", ["/static/missing.js", "/static/../api.py", "/static/%2e%2e/api.py", "/static/x.py"]
)
def test_nothing_else_is_served(hub: HubProcess, path: str) -> None:
    response = httpx.get(f"{hub.http}{path}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"
