"""`ems.hub:app`: the QuartTrio application that `hypercorn -k trio ems.hub:app` serves.

Quart handles REST and pages; the two WebSocket links are dispatched at the ASGI level before
Quart sees them (`EmsAsgi`), which saves Quart's per-frame channel hop and signal dispatch on
the hot path. The `Hub` starts in Quart-Trio's lifespan nursery (`before_serving`) and is
flushed and stopped in `after_serving`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from ems import logs
from ems.hub.api import api, error_response
from ems.hub.dashboard_link import serve_dashboard
from ems.hub.device_link import serve_device
from ems.hub.guard import HubRefused
from ems.hub.hub import Hub
from ems.hub.pages import pages
from ems.hub.settings import HubSettings, SettingsError

DEVICE_PREFIX = "/ws/device/"


class EmsAsgi:
    """Routes the two WebSocket links straight to their drivers; everything else to Quart."""

    def __init__(self, app: QuartTrio, inner: Any) -> None:
        self.app = app
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            path = scope["path"]
            hub: Hub = self.app.config["EMS_HUB"]
            if path.startswith(DEVICE_PREFIX):
                await serve_device(hub, scope, receive, send, path[len(DEVICE_PREFIX) :])
                return
            if path == "/ws/dashboard":
                await serve_dashboard(hub, scope, receive, send)
                return
        await self.inner(scope, receive, send)


def create_app(settings: HubSettings | None = None) -> QuartTrio:
    """A hub application; settings from `EMS_*` variables unless given."""
    logs.configure()
    if settings is None:
        try:
            settings = HubSettings.from_env()
        except SettingsError as exc:
            print(f"ems hub: {exc}", file=sys.stderr)  # noqa: T201
            raise SystemExit(2) from None
    app = QuartTrio("ems.hub", static_folder=None)
    app.config["EMS_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, settings.max_artifact_bytes)
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 15
    hub = Hub(settings)
    app.config["EMS_HUB"] = hub
    app.register_blueprint(api)
    app.register_blueprint(pages)

    @app.before_serving
    async def start_hub() -> None:
        try:
            await app.nursery.start(hub.run)
        except HubRefused as exc:
            print(f"ems hub: refusing to start: {exc}", file=sys.stderr, flush=True)  # noqa: T201
            if multiprocessing.parent_process() is not None:
                # A hypercorn worker: hypercorn would log a failed lifespan and carry on (or
                # start the worker again). Nothing is open yet; the process ends with status 2,
                # and hypercorn stops its other workers and exits with it.
                os._exit(2)
            raise

    @app.after_serving
    async def stop_hub() -> None:
        await hub.stop()

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return _error(404, "NOT_FOUND", "no such route")

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return _error(405, "NOT_FOUND", "method not allowed on this route")

    @app.errorhandler(500)
    async def internal(_: Exception) -> Response:
        return _error(500, "INTERNAL_ERROR", "internal error; it has been logged")

    @app.errorhandler(413)
    async def too_large(_: Exception) -> Response:
        return _error(413, "MESSAGE_TOO_LARGE", "request body too large")

    app.asgi_app = EmsAsgi(app, app.asgi_app)  # type: ignore[method-assign]
    return app


def _error(status: int, code: str, message: str) -> Response:
    return error_response(status, code, message)
