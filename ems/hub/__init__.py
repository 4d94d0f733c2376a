"""The EMS hub: `hypercorn -k trio ems.hub:app`."""

from __future__ import annotations

from typing import Any


class _App:
    """`ems.hub:app`, built on first use.

    Importing `ems.hub` (or any of its modules, as tests and tools do) must not read the
    environment or touch the data directory; hypercorn's first ASGI call (the lifespan) builds
    the real QuartTrio application from the `EMS_*` variables.
    """

    def __init__(self) -> None:
        self._app: Any = None

    def _build(self) -> Any:
        if self._app is None:
            from ems.hub.app import create_app

            self._app = create_app()
        return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._build()(scope, receive, send)


app = _App()
