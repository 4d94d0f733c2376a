"""Latency percentiles and hub CPU against fleet size, from the steady scenario's results.

Reads every `benchmarks/results/steady-*.json` (or the files given), keeps the newest run per
(fleet size, rate), and draws p50/p99 latency (left, log scale) and hub CPU-seconds per 1,000
samples (right) against the number of devices. Writes benchmarks/results/steady.png unless
`--out` names another path.

    python benchmarks/plot.py [--out PATH] [FILE.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def load(files: list[Path]) -> dict[tuple[int, float], dict[str, Any]]:
    """Newest steady result per (devices, rate); file names sort by date."""
    rows: dict[tuple[int, float], dict[str, Any]] = {}
    for path in sorted(files, key=lambda p: p.name.rsplit("-", 2)[-2:]):
        document = json.loads(path.read_text())
        for r in document.get("results", []):
            if r.get("scenario", "steady") != "steady" or not r.get("rate_per_device"):
                continue
            rows[(r["devices"], r["rate_per_device"])] = r
    return rows


def plot(rows: dict[tuple[int, float], dict[str, Any]], out: Path) -> None:
    rates = sorted({rate for _, rate in rows})
    fig, latency_ax = plt.subplots(figsize=(8, 5))
    cpu_ax = latency_ax.twinx()
    markers = "osD^v"
    for i, rate in enumerate(rates):
        points = sorted((n, r) for (n, rt), r in rows.items() if rt == rate)
        sizes = [n for n, _ in points]
        marker = markers[i % len(markers)]
        label = f"{rate:g}/s per device"
        latency_ax.plot(
            sizes,
            [r["latency_ms_p50"] for _, r in points],
            marker=marker,
            color="tab:blue",
            label=f"p50, {label}",
        )
        latency_ax.plot(
            sizes,
            [r["latency_ms_p99"] for _, r in points],
            marker=marker,
            color="tab:red",
            label=f"p99, {label}",
        )
        cpu_ax.plot(
            sizes,
            [r["hub_cpu_s_per_1000_samples"] for _, r in points],
            marker=marker,
            linestyle="--",
            color="tab:gray",
            label=f"hub CPU, {label}",
        )
    latency_ax.axhline(100, color="tab:red", linewidth=0.8, linestyle=":", label="100 ms target")
    latency_ax.set_xscale("log")
    latency_ax.set_yscale("log")
    latency_ax.set_xlabel("devices")
    latency_ax.set_ylabel("latency, device to dashboard (ms)")
    cpu_ax.set_ylabel("hub CPU-seconds per 1,000 samples")
    cpu_ax.set_ylim(bottom=0)
    handles = latency_ax.get_legend_handles_labels()
    cpu_handles = cpu_ax.get_legend_handles_labels()
    latency_ax.legend(
        handles[0] + cpu_handles[0], handles[1] + cpu_handles[1], fontsize=8, loc="upper left"
    )
    latency_ax.set_title("EMS hub, steady fleet (one dashboard on *)")
    latency_ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="results JSON (default: steady-*)")
    parser.add_argument("--out", type=Path, default=RESULTS / "steady.png")
    args = parser.parse_args()
    files = args.files or sorted(RESULTS.glob("steady-*.json"))
    rows = load(files)
    if not rows:
        raise SystemExit("no steady results to plot")
    plot(rows, args.out)
    print(f"written: {args.out} ({len(rows)} points)")


if __name__ == "__main__":
    main()
