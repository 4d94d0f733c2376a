"""Floor reference for the comparison: one raw ASGI app under either server (benchmark only).

It measures what the serving stack costs, without a framework: the same app (no FastAPI, no
pydantic, no Quart) runs under `hypercorn` on trio (the server EMS's contract fixes) or under
`uvicorn` on asyncio (the FastAPI reference's server). Devices connect at
`/ws/device/{device_id}` with `Authorization: Bearer <token>`; each frame is parsed with orjson
and every sample forwarded as one `telemetry_update` frame to every `/ws/dashboard` that sent a
`subscribe`, as `fastapi_hub.py` does. With `--ack`, each frame is also answered by one
`{"type":"ack","seq":N}` frame, the one frame EMS sends back per message. With `--batch`, the
updates go to each dashboard as one `batch` frame every 20 ms (sent by the dashboard's own
task), as EMS sends them. `--ack --batch` is EMS's wire pattern with none of EMS's work: it
stores nothing and validates nothing beyond the JSON.

    python benchmarks/peers/asgi_floor.py --server hypercorn|uvicorn [--ack] [--batch] [--port 0]

Prints `listening on http://127.0.0.1:PORT` once the app has started.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import orjson

TOKEN = os.environ.get("PEER_TOKEN", "bench-secret").encode()
ACK = False
BATCH_S: float | None = None
"""Seconds between a dashboard's `batch` frames; None: one frame per update, at once."""

dashboards: dict[int, Any] = {}
"""Dashboard key -> its ASGI `send` (one frame per update) or its list of pending updates."""


def authorized(scope: dict[str, Any]) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and token == TOKEN
    return False


async def device_link(scope: dict[str, Any], receive: Any, send: Any) -> None:
    device_id = scope["path"].rsplit("/", 1)[-1]
    while True:
        event = await receive()
        kind = event["type"]
        if kind == "websocket.disconnect":
            return
        if kind != "websocket.receive":
            continue
        try:
            message = orjson.loads(event.get("text") or event.get("bytes") or b"")
            seq = message["seq"]
            samples = message["samples"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if ACK:
            await send({"type": "websocket.send", "text": f'{{"type":"ack","seq":{seq}}}'})
        for sample in samples:
            frame = orjson.dumps(
                {
                    "type": "telemetry_update",
                    "device_id": device_id,
                    "seq": seq,
                    "ts": sample["ts"],
                    "data": sample["data"],
                }
            )
            for key, target in list(dashboards.items()):
                if BATCH_S is not None:
                    target.append(frame)
                    continue
                try:
                    await target({"type": "websocket.send", "text": frame.decode()})
                except Exception:  # a closed dashboard (either server's error) leaves the registry
                    dashboards.pop(key, None)


async def dashboard_link(receive: Any, send: Any) -> None:
    key = id(send)
    try:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            text = event.get("text") or ""
            if '"subscribe"' in text:
                await send({"type": "websocket.send", "text": '{"type":"subscribed"}'})
                if BATCH_S is None:
                    dashboards[key] = send
                else:
                    await send_batches(key, send)
                    return
    finally:
        dashboards.pop(key, None)


async def send_batches(key: int, send: Any) -> None:
    """Every BATCH_S, what the devices queued goes out as one frame (until the send fails)."""
    pending: list[bytes] = []
    dashboards[key] = pending
    while True:
        await SLEEP(BATCH_S)
        if pending:
            frame = b'{"type":"batch","messages":[' + b",".join(pending) + b"]}"
            pending.clear()
            await send({"type": "websocket.send", "text": frame.decode()})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                print(f"listening on http://127.0.0.1:{PORT}", flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await receive()  # websocket.connect
    if not authorized(scope):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    if scope["path"].startswith("/ws/device/"):
        await device_link(scope, receive, send)
    elif scope["path"] == "/ws/dashboard":
        await dashboard_link(receive, send)


PORT = 0
SLEEP: Any = None


def main() -> None:
    global PORT, ACK, BATCH_S, SLEEP
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("hypercorn", "uvicorn"), required=True)
    parser.add_argument("--ack", action="store_true", help="answer every frame with an ack")
    parser.add_argument("--batch", action="store_true", help="dashboard frames every 20 ms")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    ACK = args.ack
    BATCH_S = 0.02 if args.batch else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(4096)
    PORT = sock.getsockname()[1]
    if args.server == "uvicorn":
        import asyncio

        import uvicorn

        SLEEP = asyncio.sleep

        config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=4096)
        uvicorn.Server(config).run(sockets=[sock])
        return
    import signal

    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    SLEEP = trio.sleep
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.backlog = 4096
    config.accesslog = None

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def shutdown_trigger() -> None:
                async for _ in signals:
                    return

            await serve(app, config, shutdown_trigger=shutdown_trigger)

    trio.run(run)


if __name__ == "__main__":
    main()
