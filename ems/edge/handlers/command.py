"""`command`: allowlisted names, params checked against each command's schema, argv only.

Built-ins: `ping` (answers at once), `reboot` and `restart_agent` (run the configured argv lists;
never a shell string). A name that is not allowed, not known, or has invalid params is answered
`rejected` with the reason; a command that runs answers `running`, then `succeeded` or
`failed` with its exit code and the tail of its output.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from ems.logs import get_logger
from ems.protocol import messages as m

log = get_logger("ems.edge.command")

RESTART_COMMANDS = frozenset({"reboot", "restart_agent"})
"""Commands whose success ends the agent: after a restart, a `received`/`running` record of one
of them means it worked."""


class ParamError(ValueError):
    pass


def _no_params(params: dict[str, Any]) -> dict[str, Any]:
    if params:
        raise ParamError(f"takes no params, got {', '.join(sorted(params))}")
    return {}


def _ping_params(params: dict[str, Any]) -> dict[str, Any]:
    extra = set(params) - {"payload"}
    if extra:
        raise ParamError(f"unknown params: {', '.join(sorted(extra))}")
    payload = params.get("payload")
    if payload is not None and (not isinstance(payload, str) or len(payload) > 256):
        raise ParamError("payload: expected a string of at most 256 characters")
    return params


def _reboot_params(params: dict[str, Any]) -> dict[str, Any]:
    extra = set(params) - {"delay_s"}
    if extra:
        raise ParamError(f"unknown params: {', '.join(sorted(extra))}")
    delay = params.get("delay_s", 0)
    if type(delay) not in (int, float) or not math.isfinite(delay) or not 0 <= delay <= 3600:
        raise ParamError("delay_s: expected a number from 0 to 3600")
    return {"delay_s": delay}


PARAM_SCHEMAS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ping": _ping_params,
    "reboot": _reboot_params,
    "restart_agent": _no_params,
}


@attrs.define(eq=False, kw_only=True)
class CommandHandler:
    allowed: Sequence[str]
    argv: dict[str, list[str]]
    report: Callable[[m.CommandResult], Awaitable[None]]
    wall_clock: Callable[[], float]
    timeout_s: float = 60.0
    device_id: str = ""
    message_type: str = "command"

    async def handle(self, command: m.Command) -> None:
        def result(status: m.CommandState, **fields: Any) -> m.CommandResult:
            return m.CommandResult(seq=0, id=command.id, status=status, **fields)

        name = command.name
        if name not in self.allowed or name not in PARAM_SCHEMAS:
            await self.report(result(m.CommandState.REJECTED, error=f"unknown command {name!r}"))
            return
        try:
            params = PARAM_SCHEMAS[name](command.params)
        except ParamError as exc:
            await self.report(result(m.CommandState.REJECTED, error=f"invalid params: {exc}"))
            return
        if name == "ping":
            body: dict[str, Any] = {"pong": True, "ts": self.wall_clock() * 1000}
            if "payload" in params:
                body["payload"] = params["payload"]
            await self.report(result(m.CommandState.SUCCEEDED, result=body))
            return
        argv = self.argv.get(name)
        if not argv:
            await self.report(
                result(m.CommandState.REJECTED, error=f"{name} has no configured command")
            )
            return
        await self.report(result(m.CommandState.RUNNING, progress=0))
        if params.get("delay_s"):
            await trio.sleep(params["delay_s"])
        log.info("command_running", device_id=self.device_id, id=command.id, name=name)
        outcome = await run_argv(argv, self.timeout_s)
        await self.report(result(outcome.status, result=outcome.result, error=outcome.error))


@attrs.frozen
class Outcome:
    status: m.CommandState
    result: dict[str, Any]
    error: str | None = None


async def run_argv(argv: Sequence[str], timeout_s: float) -> Outcome:
    """Run `argv` (no shell) with a time limit; its exit code and output tails."""
    try:
        with trio.fail_after(timeout_s):
            done = await trio.run_process(
                list(argv), capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError:
        return Outcome(m.CommandState.FAILED, {}, f"timed out after {timeout_s} s")
    except OSError as exc:
        return Outcome(m.CommandState.FAILED, {}, f"could not start {argv[0]!r}: {exc.strerror}")
    body = {
        "exit_code": done.returncode,
        "stdout": done.stdout.decode(errors="replace")[-1000:],
        "stderr": done.stderr.decode(errors="replace")[-1000:],
    }
    if done.returncode == 0:
        return Outcome(m.CommandState.SUCCEEDED, body)
    return Outcome(m.CommandState.FAILED, body, f"exit code {done.returncode}")
