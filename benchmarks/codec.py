"""Codec throughput: decode + validate (+ encode) of telemetry, in samples per second.

Two shapes: one 5-metric sample per message, and 50-sample batches. Seeded, no sockets, one
core. Run with `make bench` or `python benchmarks/codec.py [--seconds S]`.
"""

from __future__ import annotations

import argparse
import random
import time

import orjson

from ems.protocol import codec


def make_frames(samples_per_message: int, count: int, rng: random.Random) -> list[str]:
    frames = []
    ts = 1_763_800_000_000
    for seq in range(1, count + 1):
        samples = []
        for _ in range(samples_per_message):
            ts += 1000
            samples.append(
                {
                    "ts": ts,
                    "data": {
                        "voltage": round(rng.uniform(220, 240), 2),
                        "current": round(rng.uniform(0, 10), 2),
                        "power": round(rng.uniform(0, 2400), 1),
                        "soc": rng.randint(0, 100),
                        "temperature": round(rng.uniform(10, 40), 1),
                    },
                }
            )
        frames.append(orjson.dumps({"type": "telemetry", "seq": seq, "samples": samples}).decode())
    return frames


def measure(label: str, frames: list[str], samples_per_message: int, seconds: float) -> None:
    decode = codec.decode_device_message
    encode = codec.encode
    for action in ("decode+validate", "decode+validate+encode"):
        with_encode = action.endswith("encode")
        done = 0
        start = time.process_time()
        deadline = start + seconds
        while time.process_time() < deadline:
            for frame in frames:
                message = decode(frame)
                if with_encode:
                    encode(message)
            done += len(frames)
        elapsed = time.process_time() - start
        rate = done * samples_per_message / elapsed
        print(f"{label:<26} {action:<24} {rate:>12,.0f} samples/s  {done / elapsed:>10,.0f} msg/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per measurement")
    args = parser.parse_args()
    rng = random.Random(0)
    print(f"codec benchmark: {args.seconds} CPU-s per line, one core, seed 0")
    measure("1 sample x 5 metrics", make_frames(1, 2000, rng), 1, args.seconds)
    measure("50-sample batches", make_frames(50, 100, rng), 50, args.seconds)


if __name__ == "__main__":
    main()
