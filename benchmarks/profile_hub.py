"""Run one hub in this process under cProfile for a fixed time, then print the top costs.

    python benchmarks/profile_hub.py --port 8799 --seconds 40 --out /tmp/hub.prof &
    python benchmarks/fleet.py --hub http://127.0.0.1:8799 --hub-data DIR --hub-pid PID ...

Settings come from `EMS_*` variables as for `hypercorn -k trio ems.hub:app`.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ems.hub.app import create_app


async def serve_for(seconds: float, port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    app = create_app()
    with trio.move_on_after(seconds):
        await serve(app, config)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--out", default="hub.prof")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    print(f"pid {os.getpid()}", flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        trio.run(serve_for, args.seconds, args.port)
    finally:
        profiler.disable()
        profiler.dump_stats(args.out)
    pstats.Stats(args.out).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
