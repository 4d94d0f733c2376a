"""Reference hub for the comparison scenario: python-socketio, written for the benchmark only.

A `socketio.AsyncServer` as an ASGI app under uvicorn. Clients connect at `/socket.io/` with
`Authorization: Bearer <token>` (looked up in a dict); devices give `device_id` in the query
string, dashboards `role=dashboard` and then `subscribe` (acknowledged) to join the room
`dashboards`. A device emits `telemetry` events carrying the EMS `telemetry` message; the
server validates it with the same pydantic model as the FastAPI peer and emits one
`telemetry_update` per sample to the room. It stores nothing and acknowledges nothing.

    python benchmarks/peers/socketio_hub.py [--port 0]

One uvicorn server in this process. Prints `listening on http://127.0.0.1:PORT` once started.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Literal
from urllib.parse import parse_qs

import socketio
import uvicorn
from pydantic import BaseModel, Field, ValidationError

TOKENS: dict[str, str] = {os.environ.get("PEER_TOKEN", "bench-secret"): "bench"}
ROOM = "dashboards"


class Sample(BaseModel):
    ts: float
    data: dict[str, float | bool | str]


class Telemetry(BaseModel):
    type: Literal["telemetry"]
    seq: int
    samples: list[Sample] = Field(min_length=1, max_length=1000)


sio = socketio.AsyncServer(async_mode="asgi")
devices: dict[str, str] = {}  # sid -> device_id
port = 0


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any) -> bool:
    scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer" or token not in TOKENS:
        return False
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "device_id" in query:
        devices[sid] = query["device_id"][0]
    return True


@sio.event
async def disconnect(sid: str, *args: Any) -> None:
    devices.pop(sid, None)


@sio.event
async def subscribe(sid: str, *args: Any) -> bool:
    if sid in devices:
        return False
    await sio.enter_room(sid, ROOM)
    return True


@sio.event
async def telemetry(sid: str, payload: Any) -> None:
    device_id = devices.get(sid)
    if device_id is None:
        return
    try:
        message = Telemetry.model_validate(payload)
    except ValidationError:
        return
    for sample in message.samples:
        await sio.emit(
            "telemetry_update",
            {
                "type": "telemetry_update",
                "device_id": device_id,
                "seq": message.seq,
                "ts": sample.ts,
                "data": sample.data,
            },
            room=ROOM,
        )


def started() -> None:
    print(f"listening on http://127.0.0.1:{port}", flush=True)


app = socketio.ASGIApp(sio, on_startup=started)


def main() -> None:
    global port
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(4096)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=4096)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
