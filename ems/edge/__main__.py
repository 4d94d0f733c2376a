"""`python -m ems.edge`: run the agent; `python -m ems.edge simulate`: run many in one process.

    python -m ems.edge --config /etc/ems/edge.toml
    EMS_HUB_URL=ws://hub:8000 EMS_DEVICE_ID=pi-1 EMS_TOKEN_FILE=/etc/ems/token python -m ems.edge
    python -m ems.edge simulate --count 3 --hub ws://127.0.0.1:8000 --tokens tokens.json

The token is read from a file, never from the command line. SIGTERM or SIGINT stops sampling,
flushes what the link can send within a few seconds, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import orjson
import trio

from ems import logs
from ems.edge.agent import Agent
from ems.edge.config import ConfigError, EdgeSettings, load_settings
from ems.logs import get_logger

log = get_logger("ems.edge")


async def run_agents(agents: list[Agent]) -> None:
    """Run agents until SIGTERM/SIGINT, then stop them gracefully."""
    async with trio.open_nursery() as nursery:
        for agent in agents:
            await nursery.start(agent.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("agent_stopping", signal=signal.Signals(signum).name, agents=len(agents))
                async with trio.open_nursery() as stopping:
                    for agent in agents:
                        stopping.start_soon(agent.stop)
                break


def simulated_settings(
    tokens_file: Path, hub_url: str, count: int, data_dir: Path, sensors: tuple[str, ...]
) -> list[EdgeSettings]:
    """Settings for `count` simulated devices from a tokens file ({device_id: token})."""
    try:
        tokens = orjson.loads(tokens_file.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(
            f"{tokens_file}: cannot read a JSON object of device_id -> token ({exc})"
        ) from None
    if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
        raise ConfigError(f"{tokens_file}: expected a JSON object of device_id -> token")
    if len(tokens) < count:
        raise ConfigError(f"{tokens_file}: has {len(tokens)} devices, --count asks for {count}")
    out = []
    for device_id in sorted(tokens)[:count]:
        device_dir = data_dir / device_id
        device_dir.mkdir(parents=True, exist_ok=True)
        token_file = device_dir / "token"
        token_file.write_text(tokens[device_id])
        token_file.chmod(0o600)
        environ = {
            "EMS_HUB_URL": hub_url,
            "EMS_DEVICE_ID": device_id,
            "EMS_TOKEN_FILE": str(token_file),
            "EMS_DATA_DIR": str(device_dir),
            "EMS_SENSORS": ",".join(sensors),
        }
        out.append(load_settings(None, environ))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logs.configure(os.environ.get("EMS_LOG_LEVEL", "INFO"))
    if argv and argv[0] == "simulate":
        parser = argparse.ArgumentParser(prog="python -m ems.edge simulate")
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument("--hub", required=True, help="ws://host:port")
        parser.add_argument("--tokens", type=Path, required=True, help="JSON {device_id: token}")
        parser.add_argument("--data-dir", type=Path, default=Path("./edge-sim"))
        parser.add_argument("--sensors", default="simulated_ems,simulated_vehicle")
        args = parser.parse_args(argv[1:])
        try:
            settings = simulated_settings(
                args.tokens, args.hub, args.count, args.data_dir, tuple(args.sensors.split(","))
            )
        except ConfigError as exc:
            print(f"ems-edge: {exc}", file=sys.stderr)  # noqa: T201
            return 2
        agents = [Agent(s, firmware="sim-1.0") for s in settings]
    else:
        parser = argparse.ArgumentParser(prog="python -m ems.edge")
        parser.add_argument("--config", type=Path, help="TOML file (EMS_* variables override it)")
        args = parser.parse_args(argv)
        try:
            settings_one = load_settings(args.config, os.environ)
            settings_one.read_token()
        except ConfigError as exc:
            print(f"ems-edge: {exc}", file=sys.stderr)  # noqa: T201
            return 2
        agents = [Agent(settings_one, firmware=os.environ.get("EMS_FIRMWARE"))]
    trio.run(run_agents, agents)
    return 0


if __name__ == "__main__":
    sys.exit(main())
