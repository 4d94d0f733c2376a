"""Software updates (OTA) and temporary SSH access, end to end: the real hub and the real agent
(`python -m ems.edge`), both as subprocesses (protocol.md §1 `software_update`, `ssh_access`;
§3 `/api/artifacts`, `software-update`, `ssh-access`).

The installer, health check and rollback the agent runs are tiny Python scripts that leave
marker files, so each test sees what ran. Command outcomes are awaited as `command_status`
updates on a dashboard; file states are polled in bounded loops with hang guards (nothing else
announces them). Nothing sleeps for a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import shlex
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ems.edge.handlers.software_update import SoftwareUpdateHandler
from ems.protocol import messages as m
from ems.protocol._window import CommandRecord
from tests.integration.conftest import (
    HubProcess,
    call,
    dashboard_ws,
    send_json,
)
from tests.integration.edge_helpers import GUARD_S, AgentProcess, agent_env, wait_for

MakeAgent = Callable[..., AgentProcess]
FINAL = {"succeeded", "failed", "rejected", "expired"}
ED25519_KEY = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    .decode()
    + " op@laptop"
)


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def agents(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeAgent]:
    """Make agents (not started); all are killed at the end; on failure their logs are shown."""
    made: list[AgentProcess] = []
    failed_before = request.session.testsfailed

    def make(
        hub: HubProcess, device_id: str, token: str, *, toml: str = "", **env: str
    ) -> AgentProcess:
        root = tmp_path / f"agent{len(made)}"
        root.mkdir()
        args = []
        if toml:
            (root / "edge.toml").write_text(toml)
            args = ["--config", str(root / "edge.toml")]
        agent = AgentProcess(
            root=root, env=agent_env(root, hub.ws, device_id, token, **env), args=args
        )
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.kill()
    if request.session.testsfailed > failed_before:
        text = "".join(f"\n===== agent {a.device_id} ({a.root})\n{a.log_text()}" for a in made)
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            sys.stderr.write(text + f"\n(hub logs: {tmp_path}/hub*/hub-*.log)\n")


@attrs.define
class CommandWatch:
    """Every `command_status` a subscribed admin dashboard receives, by command id."""

    seen: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, hub: HubProcess, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        token = await call(hub.admin_token)
        async with dashboard_ws(hub, token) as ws:
            await send_json(ws, {"type": "subscribe", "devices": ["*"]})
            while True:
                frame = orjson.loads(await ws.get_message())
                for item in frame["messages"] if frame["type"] == "batch" else [frame]:
                    if item["type"] == "subscribed":
                        task_status.started()
                    elif item["type"] == "command_status":
                        command = item["command"]
                        self.seen.setdefault(command["id"], []).append(command)
                        self.changed.set()
                        self.changed = trio.Event()

    async def final(self, command_id: str, guard_s: float = GUARD_S) -> dict[str, Any]:
        """The command once it reached a final status (waits for its `command_status`)."""
        with trio.fail_after(guard_s):
            while True:
                for command in self.seen.get(command_id, []):
                    if command["status"] in FINAL:
                        return command
                await self.changed.wait()

    def statuses(self, command_id: str) -> list[tuple[str, Any]]:
        return [(c["status"], c["progress"]) for c in self.seen.get(command_id, [])]


@contextlib.asynccontextmanager
async def watching(hub: HubProcess) -> Any:
    async with trio.open_nursery() as nursery:
        watch = CommandWatch()
        await nursery.start(watch.run, hub)
        yield watch
        nursery.cancel_scope.cancel()


def script(path: Path, body: str) -> Path:
    path.write_text("import pathlib, shutil, sys\n" + body)
    return path


def argv(*parts: object) -> str:
    return shlex.join([sys.executable, *map(str, parts)])


@attrs.frozen
class Ota:
    """Installer, health check and rollback scripts, and the markers they leave."""

    installed: Path
    checked: Path
    rolled_back: Path
    env: dict[str, str]

    def install_runs(self) -> int:
        return len(Path(f"{self.installed}.runs").read_text().splitlines())


def ota_scripts(root: Path, *, healthy: bool = True) -> Ota:
    root.mkdir(parents=True, exist_ok=True)
    installed, checked, rolled_back = root / "installed.img", root / "checked", root / "rolled"
    install = script(
        root / "install.py",
        "shutil.copyfile(sys.argv[2], sys.argv[1])\n"
        "with open(sys.argv[1] + '.runs', 'a') as runs:\n    runs.write('run\\n')\n",
    )
    health = script(
        root / "health.py",
        f"pathlib.Path(sys.argv[1]).write_text('checked')\nsys.exit({0 if healthy else 3})\n",
    )
    rollback = script(root / "rollback.py", "pathlib.Path(sys.argv[1]).write_text('rolled')\n")
    return Ota(
        installed=installed,
        checked=checked,
        rolled_back=rolled_back,
        env={
            "EMS_OTA_INSTALL": argv(install, installed),
            "EMS_OTA_HEALTHCHECK": argv(health, checked),
            "EMS_OTA_ROLLBACK": argv(rollback, rolled_back),
        },
    )


def upload(
    hub: HubProcess,
    data: bytes,
    version: str,
    signature: str | None = None,
    token: str | None = None,
) -> httpx.Response:
    headers = {"X-Version": version}
    if signature is not None:
        headers["X-Signature"] = signature
    return hub.request("POST", "/api/artifacts", token=token, content=data, headers=headers)


def uploaded(hub: HubProcess, data: bytes, version: str, signature: str | None = None) -> str:
    response = upload(hub, data, version, signature)
    assert response.status_code == 201, response.text
    return str(response.json()["sha256"])


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode()


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


async def post(hub: HubProcess, path: str, body: dict[str, Any], token: str | None = None) -> Any:
    return await call(hub.request, "POST", path, token=token, json=body)


async def update_to(hub: HubProcess, watch: CommandWatch, device_id: str, sha: str) -> Any:
    response = await post(hub, f"/api/devices/{device_id}/software-update", {"sha256": sha})
    assert response.status_code == 202, response.text
    command = response.json()
    assert command["kind"] == "software_update"
    return await watch.final(command["id"])


OTA_CHECK_OFTEN = "[jobs]\nota_check = { interval_s = 0.2, jitter_s = 0 }\n"


def ota_checks(agent: AgentProcess) -> int:
    return sum(1 for e in agent.events("job_done") if e.get("job") == "ota_check")


def image(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"image-{seed}".encode()).digest(size)


# --- artifacts -----------------------------------------------------------------------------------


async def test_artifact_upload_download_and_access_rules(hub_factory: Any) -> None:
    hub: HubProcess = hub_factory(EMS_MAX_ARTIFACT_BYTES="65536")
    token_1 = await call(hub.create_device, "d1")
    token_2 = await call(hub.create_device, "d2")
    operator = await call(hub.create_user, "op", "operator")
    data = image(50_000)

    response = await call(upload, hub, data, "1.2.3")
    assert response.status_code == 201, response.text
    body = response.json()
    sha = hashlib.sha256(data).hexdigest()
    assert (body["sha256"], body["size"], body["version"]) == (sha, len(data), "1.2.3")
    stored = hub.data_dir / "data" / "artifacts" / sha
    assert stored.read_bytes() == data
    # The same bytes again: the same artifact; other metadata for them: a conflict.
    again = await call(upload, hub, data, "1.2.3")
    assert again.status_code == 200
    assert again.json()["sha256"] == sha
    assert (await call(upload, hub, data, "9.9.9")).status_code == 409

    # Any device's token, or an admin, may download; nobody else.
    path = f"/api/artifacts/{sha}"
    for token in (token_1, token_2, None):  # None: the admin
        got = await call(hub.request, "GET", path, token=token)
        assert got.status_code == 200, got.text
        assert got.content == data
        assert got.headers["content-length"] == str(len(data))
        assert got.headers["x-version"] == "1.2.3"
    assert (await call(hub.request, "GET", path, token="")).status_code == 401
    assert (await call(hub.request, "GET", path, token="emsd_not-a-token")).status_code == 401
    assert (await call(hub.request, "GET", path, token=operator)).status_code == 403
    missing = await call(hub.request, "GET", f"/api/artifacts/{'0' * 64}", token=token_1)
    assert missing.status_code == 404
    assert (await call(hub.request, "GET", "/api/artifacts/nope", token=token_1)).status_code == 404

    # Size limit: by Content-Length, and for a chunked body without one.
    too_big = image(65_537, seed=1)
    response = await call(upload, hub, too_big, "2.0")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "MESSAGE_TOO_LARGE"

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(too_big), 8192):
            yield too_big[start : start + 8192]

    response = await call(
        hub.request, "POST", "/api/artifacts", content=chunks(), headers={"X-Version": "2.0"}
    )
    assert response.status_code == 413
    exactly = image(65_536, seed=2)
    assert (await call(upload, hub, exactly, "2.1")).status_code == 201
    leftovers = [p.name for p in stored.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "a refused upload left a temporary file"

    # Headers and roles.
    assert (await call(upload, hub, b"x", "")).status_code == 422  # X-Version missing
    assert (await call(upload, hub, b"x", "1.0", "not base64!")).status_code == 422
    assert (
        await call(upload, hub, b"x", "1.0", base64.b64encode(b"short").decode())
    ).status_code == 422
    forbidden = await call(upload, hub, b"x", "1.0", None, operator)
    assert forbidden.status_code == 403
    listing = await call(hub.request, "GET", "/api/artifacts")
    assert {a["sha256"] for a in listing.json()["artifacts"]} == {
        sha,
        hashlib.sha256(exactly).hexdigest(),
    }


async def test_control_routes_validate_their_bodies(hub: HubProcess) -> None:
    await call(hub.create_device, "d1")
    operator = await call(hub.create_user, "op", "operator")
    sha = await call(uploaded, hub, image(1000), "1.0")

    async def status(path: str, body: dict[str, Any], token: str | None = None) -> int:
        return int((await post(hub, path, body, token)).status_code)

    update = "/api/devices/d1/software-update"
    assert await status(update, {"sha256": "0" * 64}) == 404  # no such artifact
    assert await status(update, {"sha256": "xyz"}) == 422
    assert await status(update, {}) == 422
    assert await status("/api/devices/nope/software-update", {"sha256": sha}) == 404
    response = await post(hub, update, {"sha256": sha.upper()})
    assert response.status_code == 202
    command = response.json()
    assert (command["kind"], command["name"], command["delivery"]) == (
        "software_update",
        "software_update",
        "latest_only",
    )
    assert command["params"] == {"sha256": sha, "version": "1.0", "size": 1000}

    ssh = "/api/devices/d1/ssh-access"
    good = {"duration_s": 60, "public_key": ED25519_KEY}
    assert await status(ssh, good) == 202
    assert await status(ssh, good, operator) == 403  # admin only
    for duration in (0, 0.5, 86_401, "60", True):
        assert await status(ssh, {**good, "duration_s": duration}) == 422, duration
    for key in (
        "",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
        ED25519_KEY + "\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv1 injected",
        'command="sh" ' + ED25519_KEY,
        "ssh-ed25519 not-base64!",
        "ssh-rsa " + ED25519_KEY.split()[1],  # the blob says ed25519
    ):
        assert await status(ssh, {**good, "public_key": key}) == 422, key


# --- OTA ---------------------------------------------------------------------------------------


async def test_good_image_installs_and_reports_progress(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    data = image(3 << 20)  # several chunks: the download reports progress on the way
    sha = await call(uploaded, hub, data, "2.0.0")
    token = await call(hub.create_device, "d1")
    ota = ota_scripts(tmp_path / "ota")
    # The scheduled OTA check runs often too: it must not install the update a second time.
    agent = agents(hub, "d1", token, toml=OTA_CHECK_OFTEN, EMS_LOG_LEVEL="DEBUG", **ota.env)
    async with watching(hub) as watch:
        agent.start()
        command = await update_to(hub, watch, "d1", sha)
        assert command["status"] == "succeeded", command
        assert command["result"]["version"] == "2.0.0"
        assert command["progress"] == 100
        statuses = watch.statuses(command["id"])
        progress = [p for s, p in statuses if s == "running"]
        assert progress, statuses
        assert progress == sorted(progress), statuses
        # (The hub stores a device's updates in batches, so on a fast link several `running`
        # reports may reach the dashboard as their last one.)
    assert ota.installed.read_bytes() == data
    assert ota.checked.exists()
    assert not ota.rolled_back.exists()
    await wait_for(lambda: ota_checks(agent) >= 3, "three OTA checks", agent=agent)
    assert not agent.events("job_failed")
    assert not agent.events("ota_check_failed")
    assert ota.install_runs() == 1, "installed more than once"
    staged = [p.name for p in (agent.data_dir / "ota").iterdir() if p.suffix in (".img", ".part")]
    assert staged == [], "the staged image was left behind"
    record = orjson.loads((agent.data_dir / "ota" / "installed.json").read_bytes())
    assert (record["version"], record["sha256"]) == ("2.0.0", sha)
    assert token not in agent.log_text()


async def test_corrupted_image_is_refused_before_the_installer(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    """The hub's stored copy goes bad (one byte flipped, or cut short) after the upload: the
    agent's own sha256/size check refuses it and the installer never runs."""
    token = await call(hub.create_device, "d1")
    ota = ota_scripts(tmp_path / "ota")
    agent = agents(hub, "d1", token, **ota.env)
    flipped = image(200_000, seed=1)
    cut = image(200_000, seed=2)
    sha_flipped = await call(uploaded, hub, flipped, "3.0")
    sha_cut = await call(uploaded, hub, cut, "3.1")
    artifacts = hub.data_dir / "data" / "artifacts"
    damaged = bytearray(flipped)
    damaged[123_456] ^= 0x01
    (artifacts / sha_flipped).write_bytes(bytes(damaged))
    (artifacts / sha_cut).write_bytes(cut[:-1000])
    async with watching(hub) as watch:
        agent.start()
        command = await update_to(hub, watch, "d1", sha_flipped)
        assert command["status"] == "failed", command
        assert "verification failed: sha256 mismatch" in command["error"]
        command = await update_to(hub, watch, "d1", sha_cut)
        assert command["status"] == "failed", command
        assert "verification failed: size mismatch" in command["error"]
    assert not ota.installed.exists(), "a corrupted image reached the installer"
    assert not ota.checked.exists()
    assert not any((agent.data_dir / "ota").glob("*.img"))


async def test_signatures_are_checked_when_a_public_key_is_configured(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    trusted, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pubkey = tmp_path / "ota.pem"
    pubkey.write_bytes(public_pem(trusted))
    token = await call(hub.create_device, "d1")
    ota = ota_scripts(tmp_path / "ota")
    agent = agents(hub, "d1", token, EMS_OTA_PUBKEY_FILE=str(pubkey), **ota.env)
    wrong_key = image(10_000, seed=1)
    unsigned = image(10_000, seed=2)
    good = image(10_000, seed=3)
    sha_wrong = await call(uploaded, hub, wrong_key, "4.0", sign(other, wrong_key))
    sha_unsigned = await call(uploaded, hub, unsigned, "4.1")
    sha_good = await call(uploaded, hub, good, "4.2", sign(trusted, good))
    async with watching(hub) as watch:
        agent.start()
        command = await update_to(hub, watch, "d1", sha_wrong)
        assert command["status"] == "failed", command
        assert "verification failed: bad signature" in command["error"]
        command = await update_to(hub, watch, "d1", sha_unsigned)
        assert command["status"] == "failed", command
        assert "not signed" in command["error"]
        assert not ota.installed.exists(), "an image with no valid signature was installed"
        command = await update_to(hub, watch, "d1", sha_good)  # the control: this one installs
        assert command["status"] == "succeeded", command
    assert ota.installed.read_bytes() == good


async def test_failing_health_check_rolls_back(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    token = await call(hub.create_device, "d1")
    ota = ota_scripts(tmp_path / "ota", healthy=False)
    agent = agents(hub, "d1", token, **ota.env)
    data = image(5000)
    sha = await call(uploaded, hub, data, "5.0")
    async with watching(hub) as watch:
        agent.start()
        command = await update_to(hub, watch, "d1", sha)
    assert command["status"] == "failed", command
    assert "health check failed" in command["error"]
    assert "rolled back" in command["error"]
    assert command["result"]["healthcheck"]["exit_code"] == 3
    assert ota.installed.read_bytes() == data  # it was installed ...
    assert ota.checked.exists()
    assert ota.rolled_back.read_text() == "rolled"  # ... and rolled back
    assert not (agent.data_dir / "ota" / "installed.json").exists()


async def test_without_an_installer_updates_are_rejected(
    hub: HubProcess, agents: MakeAgent
) -> None:
    token = await call(hub.create_device, "d1")
    agent = agents(hub, "d1", token)
    sha = await call(uploaded, hub, image(100), "6.0")
    async with watching(hub) as watch:
        agent.start()
        command = await update_to(hub, watch, "d1", sha)
    assert command["status"] == "rejected", command
    assert "EMS_OTA_INSTALL" in command["error"]


async def test_ota_check_finds_the_assigned_update(hub: HubProcess, tmp_path: Path) -> None:
    """The scheduled check's path against the real hub: the device asks for its latest update
    with its device token and hands one it has never seen to its dispatcher, once."""
    token = await call(hub.create_device, "d1")
    other = await call(hub.create_device, "d2")
    viewer = await call(hub.create_user, "viewer1", "viewer")
    sha = await call(uploaded, hub, image(100), "7.0")
    path = "/api/devices/d1/software-update"
    assert (await call(hub.request, "GET", path, token=token)).status_code == 404  # none yet
    response = await post(hub, path, {"sha256": sha})
    assert response.status_code == 202
    command_id = response.json()["id"]
    answer = await call(hub.request, "GET", path, token=token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["command"]["id"] == command_id
    assert answer.json()["message"] == {
        "type": "software_update",
        "id": command_id,
        "version": "7.0",
        "url": f"/api/artifacts/{sha}",
        "sha256": sha,
        "size": 100,
    }
    assert (await call(hub.request, "GET", path, token=other)).status_code == 401
    assert (await call(hub.request, "GET", path, token=viewer)).status_code == 404  # not theirs
    assert (await call(hub.request, "GET", path)).status_code == 200  # the admin

    record = CommandRecord()
    submitted: list[m.SoftwareUpdate] = []

    async def submit(update: m.SoftwareUpdate) -> None:
        submitted.append(update)

    async def report(_: m.CommandResult) -> None:
        raise AssertionError("the check reports nothing itself")

    token_file = tmp_path / "token"
    token_file.write_text(token)
    handler = SoftwareUpdateHandler(
        install=["true"],
        healthcheck=None,
        rollback=None,
        pubkey_file=None,
        hub_http_url=hub.http,
        read_token=lambda: token_file.read_text().strip(),
        work_dir=tmp_path / "ota",
        report=report,
        wall_clock=time.time,
        device_id="d1",
    )
    found = await handler.check_assigned(record.begin, submit)
    assert found is not None
    assert (found.id, found.sha256) == (command_id, sha)
    assert await handler.check_assigned(record.begin, submit) is None  # seen: not again
    assert [u.id for u in submitted] == [command_id]


# --- SSH access --------------------------------------------------------------------------------


def key_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def granted(path: Path) -> list[str]:
    return [line for line in key_lines(path) if " ems:" in line]


async def wait_revoked(path: Path, agent: AgentProcess, guard_s: float = GUARD_S) -> float:
    """Poll the file until no granted key is left; the wall time (epoch s) it was seen gone."""
    await wait_for(lambda: not granted(path), "the key removed", agent=agent, guard_s=guard_s)
    return time.time()


async def grant(hub: HubProcess, watch: CommandWatch, device_id: str, duration: float) -> Any:
    response = await post(
        hub,
        f"/api/devices/{device_id}/ssh-access",
        {"duration_s": duration, "public_key": ED25519_KEY},
    )
    assert response.status_code == 202, response.text
    command = await watch.final(response.json()["id"])
    assert command["status"] == "succeeded", command
    return command


async def test_ssh_key_is_granted_then_removed_at_expiry(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    keys = tmp_path / "ssh" / "authorized_keys"
    keys.parent.mkdir()
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF0000 the-owner's-own-key\n")
    token = await call(hub.create_device, "d1")
    agent = agents(hub, "d1", token, EMS_SSH_AUTHORIZED_KEYS=str(keys))
    async with watching(hub) as watch:
        agent.start()
        command = await grant(hub, watch, "d1", 2)
    expires_at = command["result"]["expires_at"] / 1000
    (line,) = granted(keys)
    assert line.startswith('expiry-time="')
    assert " ".join(ED25519_KEY.split()[:2]) in line
    assert f"ems:{command['id']}:" in line
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    gone_at = await wait_revoked(keys, agent)
    assert gone_at - expires_at <= 1.0, f"removed {gone_at - expires_at:.3f} s after expiry"
    assert gone_at >= expires_at - 0.05, "removed before its expiry"
    assert key_lines(keys) == ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF0000 the-owner's-own-key"]
    assert not [p for p in keys.parent.iterdir() if p.name != "authorized_keys"]


async def test_ssh_key_removed_at_expiry_across_a_kill_and_restart(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    """Killed (-9) while a key is live and restarted before it expires: the new process still
    removes it within a second of its expiry."""
    keys = tmp_path / "ssh" / "authorized_keys"
    token = await call(hub.create_device, "d1")
    agent = agents(hub, "d1", token, EMS_SSH_AUTHORIZED_KEYS=str(keys))
    async with watching(hub) as watch:
        agent.start()
        command = await grant(hub, watch, "d1", 4)
    expires_at = command["result"]["expires_at"] / 1000
    assert granted(keys)
    agent.stop(signal.SIGKILL)
    agent.start()
    gone_at = await wait_revoked(keys, agent)
    assert time.time() - expires_at < GUARD_S
    assert gone_at - expires_at <= 1.0, f"removed {gone_at - expires_at:.3f} s after expiry"
    assert gone_at >= expires_at - 0.05, "removed before its expiry"


async def test_ssh_key_that_expired_while_the_agent_was_down_goes_at_start(
    hub: HubProcess, agents: MakeAgent, tmp_path: Path
) -> None:
    """Killed (-9) while a key is live, restarted after its expiry: the key goes at once (and
    while the agent was down, the `expiry-time` option already made sshd refuse it)."""
    keys = tmp_path / "ssh" / "authorized_keys"
    token = await call(hub.create_device, "d1")
    agent = agents(hub, "d1", token, EMS_SSH_AUTHORIZED_KEYS=str(keys))
    async with watching(hub) as watch:
        agent.start()
        command = await grant(hub, watch, "d1", 1)
    expires_at = command["result"]["expires_at"] / 1000
    agent.stop(signal.SIGKILL)
    (line,) = granted(keys)  # nobody removed it: the agent is down
    expiry = line.split('"')[1]
    assert expiry == time.strftime("%Y%m%d%H%M%S", time.localtime(-(-expires_at // 1)))
    # Wait for the expiry moment itself (a deadline, not a guess) and restart after it.
    await trio.sleep(max(0.0, expires_at - time.time()) + 0.01)
    agent.start()
    await wait_revoked(keys, agent)
    started = (await agent.wait_event("agent_started"))["ts"]
    revoked = (await agent.wait_event("ssh_key_revoked"))["ts"]
    assert revoked - started <= 1.0, f"removed {revoked - started:.3f} s after the agent started"
    assert keys.exists()
    assert granted(keys) == []
