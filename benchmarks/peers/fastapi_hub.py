"""Reference hub for the comparison scenario: FastAPI + uvicorn, written for the benchmark only.

What a plain FastAPI hub does with the same traffic as EMS, and no more: devices connect at
`/ws/device/{device_id}` with `Authorization: Bearer <token>` (looked up in a dict), each frame
is parsed and validated by a pydantic model of the EMS `telemetry` message, and every sample is
forwarded as one `telemetry_update` frame to every WebSocket at `/ws/dashboard` that sent a
`subscribe` (a dict registry). It stores nothing and acknowledges nothing; a bad frame is dropped.

    python benchmarks/peers/fastapi_hub.py [--port 0]

One uvicorn server in this process (no workers, no reload): the process that does the work is
the one started. Prints `listening on http://127.0.0.1:PORT` once the app has started.
"""

from __future__ import annotations

import argparse
import os
import socket
from contextlib import asynccontextmanager
from typing import Literal

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field, ValidationError

# token -> who holds it; the benchmark's clients all present the shared secret
TOKENS: dict[str, str] = {os.environ.get("PEER_TOKEN", "bench-secret"): "bench"}


class Sample(BaseModel):
    ts: float
    data: dict[str, float | bool | str]


class Telemetry(BaseModel):
    type: Literal["telemetry"]
    seq: int
    samples: list[Sample] = Field(min_length=1, max_length=1000)


class TelemetryUpdate(BaseModel):
    type: Literal["telemetry_update"] = "telemetry_update"
    device_id: str
    seq: int
    ts: float
    data: dict[str, float | bool | str]


dashboards: dict[int, WebSocket] = {}
devices: dict[str, WebSocket] = {}


def authorized(websocket: WebSocket) -> bool:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and token in TOKENS


@asynccontextmanager
async def lifespan(app: FastAPI):
    print(f"listening on http://127.0.0.1:{app.state.port}", flush=True)
    yield


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws/device/{device_id}")
async def device_link(websocket: WebSocket, device_id: str) -> None:
    if not authorized(websocket):
        await websocket.close(code=1008)
        return
    await websocket.accept()
    devices[device_id] = websocket
    try:
        while True:
            text = await websocket.receive_text()
            try:
                message = Telemetry.model_validate_json(text)
            except ValidationError:
                continue
            for sample in message.samples:
                frame = TelemetryUpdate(
                    device_id=device_id, seq=message.seq, ts=sample.ts, data=sample.data
                ).model_dump_json()
                for key, dashboard in list(dashboards.items()):
                    try:
                        await dashboard.send_text(frame)
                    except (WebSocketDisconnect, RuntimeError, OSError):
                        dashboards.pop(key, None)
    except WebSocketDisconnect:
        pass
    finally:
        if devices.get(device_id) is websocket:
            del devices[device_id]


@app.websocket("/ws/dashboard")
async def dashboard_link(websocket: WebSocket) -> None:
    if not authorized(websocket):
        await websocket.close(code=1008)
        return
    await websocket.accept()
    try:
        while True:
            # `{"type":"subscribe",...}` (to everything; there are no users here) registers
            # the dashboard, as EMS's dashboards subscribe before they receive.
            if '"subscribe"' in await websocket.receive_text():
                dashboards[id(websocket)] = websocket
                await websocket.send_text('{"type":"subscribed"}')
    except WebSocketDisconnect:
        pass
    finally:
        dashboards.pop(id(websocket), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(4096)
    app.state.port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=4096)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
