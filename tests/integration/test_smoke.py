"""The shortest end-to-end path: a device streams, a dashboard sees it, the store keeps it."""

from __future__ import annotations

from tests.integration.conftest import (
    HubProcess,
    call,
    dashboard_ws,
    device_ws,
    hello,
    receive_until,
    send_json,
)


async def test_sample_is_acked_stored_and_fanned_out(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    admin = await call(hub.admin_token)
    async with dashboard_ws(hub, admin) as dashboard:
        await send_json(dashboard, {"type": "subscribe", "devices": ["*"]})
        subscribed = await receive_until(dashboard, "subscribed")
        assert subscribed["snapshot"][0]["device_id"] == "dev-1"
        async with device_ws(hub, "dev-1", token) as ws:
            welcome = await hello(ws)
            assert welcome["acked_seq"] == 0
            status = await receive_until(dashboard, "device_status")
            assert status["online"] is True
            await send_json(
                ws,
                {
                    "type": "telemetry",
                    "seq": 1,
                    "samples": [{"ts": 1000, "data": {"voltage": 230.5}}],
                },
            )
            assert await receive_until(ws, "ack") == {"type": "ack", "seq": 1}
            update = await receive_until(dashboard, "telemetry_update")
            assert update == {
                "type": "telemetry_update",
                "device_id": "dev-1",
                "seq": 1,
                "ts": 1000,
                "data": {"voltage": 230.5},
            }
    response = await call(hub.request, "GET", "/api/devices/dev-1/telemetry")
    assert response.json() == {"samples": [{"seq": 1, "ts": 1000, "data": {"voltage": 230.5}}]}
