"""Run one hub in this process for a fixed time: under cProfile, or bare (for py-spy), with an
optional timeline of its stalls.

    python benchmarks/profile_hub.py --port 8799 --seconds 40 --out /tmp/hub.prof &
    python benchmarks/fleet.py --hub http://127.0.0.1:8799 --hub-data DIR --hub-pid PID ...

`--profiler none` runs the hub without cProfile (attach `py-spy record -p PID` instead: the
figures then include no profiler overhead in the hub). `--timeline FILE` writes, as JSON lines
with wall-clock times, every garbage collection longer than `--min-ms`, every moment the event
loop woke `--min-ms` late, and every `--min-ms` window in which no device frame arrived; lined
up with a dashboard's per-update latencies, it tells a hub stall from a quiet fleet.

Settings come from `EMS_*` variables as for `hypercorn -k trio ems.hub:app`; the data directory
is `EMS_DATA_DIR` (the fleet's `--hub-data` is its parent, the row count reads `data/ems.db`).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import signal
import time
from collections import Counter
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ems.hub.app import create_app


class Timeline:
    """Stalls of this process, by wall-clock time (epoch ms)."""

    def __init__(self, min_ms: float) -> None:
        self.min_ms = min_ms
        self.entries: list[dict[str, Any]] = []
        self._gc_started = 0.0
        self._gc_cpu_started = 0.0

    def gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_cpu_started = time.thread_time()
            return
        took_ms = (time.perf_counter() - self._gc_started) * 1000
        if took_ms >= self.min_ms:
            self.entries.append(
                {
                    "kind": "gc",
                    "at_ms": time.time() * 1000 - took_ms,
                    "ms": round(took_ms, 1),
                    "cpu_ms": round((time.thread_time() - self._gc_cpu_started) * 1000, 1),
                    "generation": info["generation"],
                    "collected": info["collected"],
                }
            )

    async def watch(
        self, app: Any, freeze_at: int = 0, census_after: int = 10_000, tick_s: float = 0.005
    ) -> None:
        """Loop lateness, and gaps in the devices' frames (from the hub's counters).

        With `freeze_at`, once that many device connections are open: `gc.collect()` and
        `gc.freeze()` (an experiment: are the long young collections the connections' objects?).
        After `census_after` device frames, twice: the types in generations 0 and 1 just before
        a gen1 collection.
        """
        hub = app.config["EMS_HUB"]
        last_frames = hub.counters.frames_in
        last_change = time.time() * 1000
        censuses = 2
        while True:
            if (
                censuses
                and last_frames >= census_after
                and gc.get_count()[1] >= gc.get_threshold()[1] - 1
            ):
                # The next young collection is a gen1 one: what it will have to traverse.
                censuses -= 1
                kinds = Counter(
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for generation in (0, 1)
                    for o in gc.get_objects(generation)
                )
                self.entries.append(
                    {
                        "kind": "census",
                        "at_ms": time.time() * 1000,
                        "ms": 0,
                        "objects": sum(kinds.values()),
                        "top": kinds.most_common(15),
                    }
                )
            if freeze_at and len(hub.connections) >= freeze_at:
                freeze_at = 0
                started = time.perf_counter()
                gc.collect()
                gc.freeze()
                took_ms = (time.perf_counter() - started) * 1000
                self.entries.append(
                    {"kind": "freeze", "at_ms": time.time() * 1000, "ms": round(took_ms, 1)}
                )
            before = trio.current_time()
            cpu_before = time.thread_time()
            await trio.sleep(tick_s)
            late_ms = (trio.current_time() - before - tick_s) * 1000
            now_ms = time.time() * 1000
            if late_ms >= self.min_ms:
                # cpu_ms: what the event loop's thread ran meanwhile (ms close to it: busy;
                # far below: the process was not scheduled, or waited on the GIL)
                cpu_ms = (time.thread_time() - cpu_before) * 1000
                self.entries.append(
                    {
                        "kind": "loop_late",
                        "at_ms": now_ms - late_ms,
                        "ms": round(late_ms, 1),
                        "cpu_ms": round(cpu_ms, 1),
                    }
                )
            frames = hub.counters.frames_in
            if frames != last_frames:
                quiet_ms = now_ms - last_change
                if quiet_ms >= self.min_ms and last_frames > 0:
                    self.entries.append(
                        {"kind": "no_frames", "at_ms": last_change, "ms": round(quiet_ms, 1)}
                    )
                last_frames = frames
                last_change = now_ms


async def serve_for(
    seconds: float, port: int, timeline: Timeline | None, freeze_at: int = 0
) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    app = create_app()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(seconds):
            if timeline is not None:

                @app.before_serving
                async def start_watch() -> None:
                    nursery.start_soon(timeline.watch, app, freeze_at)

            await serve(app, config)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--profiler", choices=("cprofile", "none"), default="cprofile")
    parser.add_argument("--out", default="hub.prof")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--timeline", help="write stalls (JSON lines) to this file")
    parser.add_argument("--min-ms", type=float, default=50.0)
    parser.add_argument(
        "--freeze-at",
        type=int,
        default=0,
        help="with --timeline: gc.collect() + gc.freeze() once this many devices are connected",
    )
    args = parser.parse_args()
    print(f"pid {os.getpid()}", flush=True)
    timeline = Timeline(args.min_ms) if args.timeline else None
    if timeline is not None:
        gc.callbacks.append(timeline.gc_callback)
    # SIGTERM ends the run like Ctrl-C: the profile and the timeline are still written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    profiler = cProfile.Profile() if args.profiler == "cprofile" else None
    if profiler is not None:
        profiler.enable()
    try:
        trio.run(serve_for, args.seconds, args.port, timeline, args.freeze_at)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.out)
        if timeline is not None:
            with open(args.timeline, "w") as out:
                for entry in sorted(timeline.entries, key=lambda e: e["at_ms"]):
                    out.write(json.dumps(entry) + "\n")
    if profiler is not None:
        pstats.Stats(args.out).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
