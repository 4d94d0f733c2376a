"""The REST API of protocol.md §3 (device-control routes arrive in step 4).

Every body is validated before use and every error is `{"error":{"code","message"}}`. Bodies are
read (or refused by size) before any early answer, so a kept-alive connection never stalls on
an unread body. Handlers fetch the `Hub` from the app once and call it; they hold no state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import orjson
import trio
from quart import Blueprint, Response, current_app, request

from ems.edge.handlers.ssh_access import public_key_fault
from ems.hub import auth
from ems.hub.alerts import RuleError, parse_rules
from ems.hub.artifacts import (
    SHA256_HEX,
    VERSION,
    ArtifactFiles,
    BadSignature,
    TooLarge,
    parse_signature,
)
from ems.hub.artifacts import stream as stream_file
from ems.hub.commands import (
    Delivery,
    DeviceOffline,
    TooManyPending,
    command_json,
    config_json,
)
from ems.hub.dashboard_link import SESSION_COOKIE
from ems.hub.fanout import OTHER
from ems.hub.hub import Hub
from ems.hub.metrics import render_metrics
from ems.hub.store import ArtifactRow, Conflict, SessionRecord, StoreError, UserRecord
from ems.logs import get_logger
from ems.protocol.codec import COMMAND_NAME, DEVICE_ID

log = get_logger("ems.hub.api")
api = Blueprint("api", __name__)

ROLES = ("admin", "operator", "viewer")
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
USERNAME_MAX = 64

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(orjson.dumps(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@api.errorhandler(ApiError)
async def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


@api.errorhandler(StoreError)
async def _store_error(exc: StoreError) -> Response:
    log.warning("store_unavailable", error=str(exc))
    return error_response(503, "INTERNAL_ERROR", "the store is unavailable; try again")


def hub() -> Hub:
    return current_app.config["EMS_HUB"]  # type: ignore[no-any-return]


# --- request helpers ---------------------------------------------------------------------------


async def json_body(*, required: bool = True) -> Any:
    """The request's JSON body, read whole (bounded by EMS_MAX_BODY_BYTES)."""
    limit = hub().settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        await _discard_body()
        raise ApiError(413, "MESSAGE_TOO_LARGE", f"body larger than {limit} bytes")
    raw = await request.get_data(as_text=False)
    if len(raw) > limit:
        raise ApiError(413, "MESSAGE_TOO_LARGE", f"body larger than {limit} bytes")
    if not raw:
        if required:
            raise ApiError(400, "INVALID_MESSAGE_FORMAT", "a JSON body is required")
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, "INVALID_MESSAGE_FORMAT", f"body is not valid JSON: {exc.msg}"
        ) from None


async def json_object(*, required: bool = True) -> dict[str, Any]:
    body = await json_body(required=required)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_MESSAGE_FORMAT", "body must be a JSON object")
    return body


DISCARD_BODY_S = 30.0
"""How long an early answer waits for the rest of an unread request body."""


async def _discard_body() -> None:
    """Read and drop what is left of the request body (time-boxed; nothing when it is in)."""
    body = request.body
    complete = getattr(body, "_complete", None)
    if complete is not None and complete.is_set():
        return  # received in full already (read by the handler, or small)
    with trio.move_on_after(DISCARD_BODY_S):
        try:
            async for _ in body:
                pass
        except Exception:  # over Quart's size limit, or the client went away
            pass


@api.after_app_request
async def _drain_unread_body(response: Response) -> Response:
    """Every answer, early errors included (401, 404, 405...), waits until the request body
    is read: a client still sending it would otherwise never read the answer (the server stops
    reading once the handler is done), and the kept-alive connection would stall."""
    await _discard_body()
    return response


def field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True
) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"{name}: required field missing")
        return None
    if (
        isinstance(value, bool)
        and kind is not bool
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"{name}: wrong type")
    if not isinstance(value, kind):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"{name}: wrong type")
    return value


def _request_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.cookies.get(SESSION_COOKIE) or None


async def current_user() -> UserRecord:
    token = _request_token()
    user = await hub().user_for_token(token) if token else None
    if user is None:
        raise ApiError(401, "AUTHENTICATION_FAILED", "log in first")
    return user


def requires(role: str) -> Callable[[F], F]:
    """Route decorator: the caller must be logged in with at least `role`."""

    def decorate(handler: F) -> F:
        @wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            user = await current_user()
            if ROLE_RANK.get(user.role, -1) < ROLE_RANK[role]:
                if request.method in ("POST", "PUT", "PATCH"):
                    await _discard_body()
                raise ApiError(403, "FORBIDDEN", f"needs the {role} role")
            return await handler(user, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def visible_device(user: UserRecord, device_id: str) -> None:
    """404 (not 403) for devices the user may not see: existence is not disclosed."""
    if not hub().can_see(user.username, user.role == "admin", device_id):
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")


def _number_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "INVALID_MESSAGE_FORMAT", f"{name}: expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ApiError(400, "INVALID_MESSAGE_FORMAT", f"{name}: expected a finite number")
    return value


def _client_address() -> str:
    return request.remote_addr or "unknown"


def _from_loopback() -> bool:
    """The caller is on this host (IPv4, IPv6, or IPv4 mapped into an IPv6 socket)."""
    address = request.remote_addr or ""
    if address == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# --- health and metrics ------------------------------------------------------------------------


@api.get("/health")
async def health() -> Response:
    h = hub()
    store = "ok"
    try:
        with trio.fail_after(5):
            await h.store.ping()
    except (StoreError, trio.TooSlowError):
        store = "down"
    if not h.store_ok:
        store = "down"
    cluster = await h.bus.cluster()
    local = cluster.hubs[0]
    body: dict[str, Any] = {
        "status": "ok" if store == "ok" and h.bus.ok else "degraded",
        "uptime_s": round(trio.current_time() - h.started_at, 3),
        # The whole cluster's (one hub: this one's); `hub` has this process's own figures.
        "connected_devices": len(cluster.devices),
        "connected_dashboards": sum(x["connected_dashboards"] for x in cluster.hubs),
        "store": store,
        "hub": {
            "hub_id": h.bus.hub_id,
            "connected_devices": local["connected_devices"],
            "connected_dashboards": local["connected_dashboards"],
        },
    }
    if h.bus.enabled:
        body["bus"] = "ok" if h.bus.ok else "down"
        body["hubs"] = len(cluster.hubs)
    reasons = []
    if store != "ok":
        reasons.append("store unreachable")
    if not h.bus.ok:
        reasons.append(h.bus.reason or "redis unreachable")
    if reasons:
        body["reason"] = "; ".join(reasons)
    return json_response(body, 200 if store == "ok" else 503)


@api.get("/metrics")
async def metrics() -> Response:
    if not _from_loopback():
        user = await current_user()
        if user.role != "admin":
            raise ApiError(403, "FORBIDDEN", "metrics are for admins")
    return Response(render_metrics(hub()), content_type="text/plain; version=0.0.4")


# --- auth and users ------------------------------------------------------------------------------


@api.post("/api/auth/login")
async def login() -> Response:
    h = hub()
    body = await json_object()
    username = field(body, "username", str)
    password = field(body, "password", str)
    now = trio.current_time()
    address = _client_address()
    if h.login_limiter.blocked(username, address, now):
        raise ApiError(429, "RATE_LIMIT_EXCEEDED", "too many failed logins; wait a minute")
    user = await h.store.get_user(username)
    stored = user.password_hash if user else auth.DUMMY_PASSWORD_HASH
    ok = await trio.to_thread.run_sync(auth.verify_password, password, stored)
    if user is None or not ok:
        h.login_limiter.failed(username, address, now)
        log.info("login_failed", username=username[:USERNAME_MAX], address=address)
        raise ApiError(401, "AUTHENTICATION_FAILED", "wrong username or password")
    token = auth.new_user_token()
    expires_at = h.now_ms() + h.settings.session_ttl_s * 1000
    await h.store.create_session(
        SessionRecord(
            token_hash=auth.token_hash(token), username=user.username, expires_at=expires_at
        )
    )
    log.info("login", username=user.username)
    response = json_response(
        {"token": token, "expires_at": expires_at, "username": user.username, "role": user.role}
    )
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(h.settings.session_ttl_s),
        httponly=True,
        samesite="Strict",
        secure=request.scheme == "https",
        path="/",
    )
    return response


@api.post("/api/auth/logout")
async def logout() -> Response:
    await _discard_body()
    token = _request_token()
    if token:
        h = hub()
        await h.store.delete_session(auth.token_hash(token))
        h.forget_session(token)
    response = Response(status=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@api.get("/api/auth/me")
@requires("viewer")
async def me(user: UserRecord) -> Response:
    return json_response({"username": user.username, "role": user.role})


@api.post("/api/users")
@requires("admin")
async def create_user(_: UserRecord) -> Response:
    body = await json_object()
    username = field(body, "username", str)
    password = field(body, "password", str)
    role = field(body, "role", str, required=False) or "viewer"
    if not DEVICE_ID.fullmatch(username):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "username: 1-64 of A-Z a-z 0-9 _ . -")
    if role not in ROLES:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"role: one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "password: at least 8 characters")
    password_hash = await trio.to_thread.run_sync(auth.hash_password, password)
    try:
        await hub().store.create_user(
            UserRecord(
                username=username, password_hash=password_hash, role=role, created_at=hub().now_ms()
            )
        )
    except Conflict:
        raise ApiError(409, "CONFLICT", f"user {username!r} exists") from None
    log.info("user_created", username=username, role=role)
    return json_response({"username": username, "role": role}, 201)


@api.get("/api/users")
@requires("admin")
async def list_users(_: UserRecord) -> Response:
    users = await hub().store.list_users()
    return json_response(
        {
            "users": [
                {"username": u.username, "role": u.role, "created_at": u.created_at} for u in users
            ]
        }
    )


# --- devices -------------------------------------------------------------------------------------


def _device_json(record: Any) -> dict[str, Any]:
    h = hub()
    info = h.devices.get(record.device_id)
    return {
        "device_id": record.device_id,
        "name": record.name,
        "owner": record.owner,
        "metadata": record.metadata,
        "created_at": record.created_at,
        "online": h.is_online(record.device_id),
        "last_seen": (info.last_seen if info else None) or record.last_seen,
        "firmware": (info.firmware if info else None) or record.firmware,
        "agent": record.agent,
        "config": {
            "desired_version": info.desired_config_version if info else None,
            "reported_version": info.reported_config_version if info else None,
        },
    }


@api.post("/api/devices")
@requires("admin")
async def create_device(_: UserRecord) -> Response:
    body = await json_object()
    device_id = field(body, "device_id", str)
    if not DEVICE_ID.fullmatch(device_id):
        raise ApiError(
            422, "INVALID_MESSAGE_FORMAT", "device_id: must match ^[A-Za-z0-9_.-]{1,64}$"
        )
    name = field(body, "name", str, required=False)
    owner = field(body, "owner", str, required=False)
    metadata = field(body, "metadata", dict, required=False) or {}
    h = hub()
    if owner is not None and await h.store.get_user(owner) is None:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"owner: no user {owner!r}")
    try:
        record, token = await h.create_device(device_id, name=name, owner=owner, metadata=metadata)
    except Conflict:
        raise ApiError(409, "CONFLICT", f"device {device_id!r} exists") from None
    return json_response({**_device_json(record), "token": token}, 201)


@api.get("/api/devices")
@requires("viewer")
async def list_devices(user: UserRecord) -> Response:
    owner = None if user.role == "admin" else user.username
    records = await hub().store.list_devices(owner)
    return json_response({"devices": [_device_json(r) for r in records]})


@api.get("/api/devices/<device_id>")
@requires("viewer")
async def get_device(user: UserRecord, device_id: str) -> Response:
    visible_device(user, device_id)
    record = await hub().store.get_device(device_id)
    if record is None:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")
    return json_response(_device_json(record))


@api.delete("/api/devices/<device_id>")
@requires("admin")
async def delete_device(_: UserRecord, device_id: str) -> Response:
    h = hub()
    if not await h.delete_device(device_id):
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")
    return Response(status=204)


@api.post("/api/devices/<device_id>/token")
@requires("admin")
async def rotate_token(_: UserRecord, device_id: str) -> Response:
    await _discard_body()
    token = await hub().rotate_token(device_id)
    if token is None:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")
    return json_response({"device_id": device_id, "token": token})


@api.get("/api/devices/<device_id>/telemetry")
@requires("viewer")
async def telemetry(user: UserRecord, device_id: str) -> Response:
    visible_device(user, device_id)
    since = _number_arg("since")
    until = _number_arg("until")
    limit_raw = _number_arg("limit")
    limit = 1000 if limit_raw is None else int(limit_raw)
    if limit < 1:
        raise ApiError(400, "INVALID_MESSAGE_FORMAT", "limit: at least 1")
    limit = min(limit, 10_000)
    rows = await hub().store.samples(device_id, since=since, until=until, limit=limit)
    return json_response({"samples": [{"seq": r.seq, "ts": r.ts, "data": r.data} for r in rows]})


@api.get("/api/devices/<device_id>/latest")
@requires("viewer")
async def latest(user: UserRecord, device_id: str) -> Response:
    visible_device(user, device_id)
    row = await hub().store.latest(device_id)
    if row is None:
        raise ApiError(404, "NOT_FOUND", "nothing stored yet")
    return json_response({"device_id": device_id, "seq": row.seq, "ts": row.ts, "data": row.data})


# --- alerts -------------------------------------------------------------------------------------


@api.get("/api/alerts")
@requires("viewer")
async def alerts(user: UserRecord) -> Response:
    h = hub()
    device_id = request.args.get("device_id")
    since = _number_arg("since")
    if device_id:
        visible_device(user, device_id)
        device_ids: list[str] | None = [device_id]
    elif user.role == "admin":
        device_ids = None
    else:
        device_ids = [d for d, info in h.devices.items() if info.owner == user.username]
    rows = await h.store.alerts(device_ids=device_ids, since=since, limit=1000)
    return json_response({"alerts": rows})


@api.get("/api/alert-rules")
@requires("viewer")
async def get_rules(_: UserRecord) -> Response:
    return json_response({"rules": [r.to_json() for r in hub().alerts.rules]})


@api.put("/api/alert-rules")
@requires("admin")
async def put_rules(_: UserRecord) -> Response:
    body = await json_body()
    try:
        rules = parse_rules(body)
    except RuleError as exc:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", str(exc)) from None
    h = hub()
    await h.store.put_alert_rules([r.to_json() for r in rules])
    h.alerts.set_rules(rules)
    h.bus.publish("rules", {})
    log.info("alert_rules_updated", count=len(rules))
    return json_response({"rules": [r.to_json() for r in rules]})


# --- realtime -----------------------------------------------------------------------------------


async def _cluster_devices() -> list[dict[str, Any]]:
    """Devices connected to any hub of the cluster (one hub: this one), with their hub."""
    return sorted((await hub().bus.cluster()).devices, key=lambda d: d["device_id"])


def _connected_users() -> list[dict[str, Any]]:
    h = hub()
    return [
        {
            "username": s.username,
            "connected_at": s.connected_at,
            "subscriptions": sorted(s.devices) + (["*"] if s.wildcard else []),
            "queued": len(s.queue),
            "dropped": s.queue.dropped_total,
            "hub": h.bus.hub_id,
        }
        for s in h.fanout.subscribers
    ]


async def _cluster_users() -> list[dict[str, Any]]:
    """This hub's dashboards in full; the other hubs' by username (all they publish)."""
    cluster = await hub().bus.cluster()
    users = _connected_users()
    for other in cluster.hubs[1:]:
        users.extend({"username": u, "hub": other["hub_id"]} for u in other.get("users", ()))
    return users


@api.get("/api/realtime/connections")
@requires("admin")
async def realtime_connections(_: UserRecord) -> Response:
    devices = await _cluster_devices()
    users = await _cluster_users()
    return json_response(
        {"devices": devices, "users": users, "total_connections": len(devices) + len(users)}
    )


@api.get("/api/realtime/devices")
@requires("admin")
async def realtime_devices(_: UserRecord) -> Response:
    return json_response({"devices": await _cluster_devices()})


@api.get("/api/realtime/users")
@requires("admin")
async def realtime_users(_: UserRecord) -> Response:
    return json_response({"users": await _cluster_users()})


@api.get("/api/realtime/status")
@requires("admin")
async def realtime_status(_: UserRecord) -> Response:
    h = hub()
    c = h.counters
    cluster = await h.bus.cluster()
    return json_response(
        {
            "connected_devices": len(cluster.devices),
            "connected_dashboards": sum(x["connected_dashboards"] for x in cluster.hubs),
            "hubs": len(cluster.hubs),
            "hub_id": h.bus.hub_id,
            "bus": ("ok" if h.bus.ok else "down") if h.bus.enabled else "off",
            "uptime_s": round(trio.current_time() - h.started_at, 3),
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "samples_in": c.samples_in,
            "samples_rejected": c.samples_rejected,
            "ingest_queued": h.ingest.queued(),
            "store": "ok" if h.store_ok else "down",
            "server_time": h.now_ms(),
        }
    )


def _event_body(body: dict[str, Any]) -> tuple[str, Any]:
    event = field(body, "event", str)
    if not event or len(event) > 64:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "event: 1 to 64 characters")
    return event, body.get("data")


@api.post("/api/realtime/broadcast")
@requires("admin")
async def broadcast(_: UserRecord) -> Response:
    event, data = _event_body(await json_object())
    h = hub()
    payload = orjson.dumps({"type": "notification", "event": event, "data": data})
    h.fanout.publish_to(list(h.fanout.subscribers), OTHER, payload)
    h.bus.publish("notify", {"u": None, "k": OTHER, "p": payload.decode()})
    delivered = len(h.fanout.subscribers) + h.bus.other_dashboards()
    return json_response({"delivered": delivered}, 202)


@api.post("/api/realtime/user/<username>")
@requires("admin")
async def notify_user(_: UserRecord, username: str) -> Response:
    event, data = _event_body(await json_object())
    h = hub()
    targets = [s for s in h.fanout.subscribers if s.username == username]
    payload = orjson.dumps({"type": "notification", "event": event, "data": data})
    h.fanout.publish_to(targets, OTHER, payload)
    h.bus.publish("notify", {"u": username, "k": OTHER, "p": payload.decode()})
    delivered = len(targets) + h.bus.other_dashboards(username)
    return json_response({"delivered": delivered}, 202)


# --- device control (commands, config, history requests) ---------------------------------------


def _command_error(exc: Exception, device_id: str) -> ApiError:
    if isinstance(exc, DeviceOffline):
        return ApiError(409, "CONFLICT", f"device {device_id!r} is offline (online-only)")
    cap = hub().settings.max_pending_commands
    return ApiError(
        429, "RATE_LIMIT_EXCEEDED", f"device {device_id!r} already holds {cap} pending commands"
    )


def _expires_in(body: dict[str, Any]) -> float | None:
    value = body.get("expires_in_s")
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value <= 30 * 86_400:
        raise ApiError(
            422, "INVALID_MESSAGE_FORMAT", "expires_in_s: a number of seconds, 0 to 30 days"
        )
    return float(value)


async def _create(device_id: str, **kwargs: Any) -> Response:
    try:
        row = await hub().commands.create(device_id, **kwargs)
    except (DeviceOffline, TooManyPending) as exc:
        raise _command_error(exc, device_id) from None
    return json_response(command_json(row), 202)


@api.post("/api/devices/<device_id>/commands")
@requires("operator")
async def post_command(user: UserRecord, device_id: str) -> Response:
    body = await json_object()
    visible_device(user, device_id)
    name = field(body, "name", str)
    if not COMMAND_NAME.fullmatch(name):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "name: must match ^[a-z][a-z0-9_]{0,63}$")
    params = field(body, "params", dict, required=False) or {}
    return await _create(
        device_id,
        kind="command",
        name=name,
        params=params,
        fields={"name": name, "params": params},
        expires_in_s=_expires_in(body),
    )


@api.get("/api/devices/<device_id>/commands")
@requires("viewer")
async def list_commands(user: UserRecord, device_id: str) -> Response:
    visible_device(user, device_id)
    rows = await hub().store.list_commands(device_id, limit=500)
    return json_response({"commands": [command_json(r) for r in rows]})


@api.get("/api/commands/<command_id>")
@requires("viewer")
async def get_command(user: UserRecord, command_id: str) -> Response:
    row = await hub().store.get_command(command_id)
    if row is None or not hub().can_see(user.username, user.role == "admin", row.device_id):
        raise ApiError(404, "NOT_FOUND", f"no command {command_id!r}")
    return json_response(command_json(row))


@api.get("/api/devices/<device_id>/config")
@requires("viewer")
async def get_config(user: UserRecord, device_id: str) -> Response:
    visible_device(user, device_id)
    return json_response(config_json(await hub().store.get_config(device_id)))


@api.put("/api/devices/<device_id>/config")
@requires("operator")
async def put_config(user: UserRecord, device_id: str) -> Response:
    body = await json_object()
    visible_device(user, device_id)
    config = field(body, "config", dict)
    state = await hub().commands.put_config(device_id, config)
    return json_response(config_json(state))


@api.post("/api/devices/<device_id>/history-request")
@requires("operator")
async def history_request(user: UserRecord, device_id: str) -> Response:
    body = await json_object()
    visible_device(user, device_id)
    start = field(body, "from", (int, float))
    end = field(body, "to", (int, float))
    if end < start:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "to: must not be before from")
    metrics = body.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, list) or not all(isinstance(x, str) for x in metrics)
    ):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "metrics: expected an array of names")
    fields: dict[str, Any] = {"from": start, "to": end}
    if metrics:
        fields["metrics"] = metrics
    return await _create(
        device_id,
        kind="history_request",
        name="history_request",
        params=dict(fields),
        fields=fields,
        expires_in_s=_expires_in(body),
    )


@api.post("/api/realtime/device/<device_id>")
@requires("admin")
async def notify_device(_: UserRecord, device_id: str) -> Response:
    event, data = _event_body(await json_object())
    if not hub().can_see("", True, device_id):
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")
    if not COMMAND_NAME.fullmatch(event):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "event: must match ^[a-z][a-z0-9_]{0,63}$")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "data: expected an object (the params)")
    return await _create(
        device_id,
        kind="command",
        name=event,
        params=data,
        fields={"name": event, "params": data},
        delivery=Delivery.ONLINE_ONLY,
    )


# --- software images and OTA, SSH access ---------------------------------------------------------


def _artifact_files() -> ArtifactFiles:
    return ArtifactFiles(hub().settings.data_dir / "artifacts")


def _artifact_json(row: ArtifactRow) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sha256": row.sha256,
        "size": row.size,
        "version": row.version,
        "created_at": row.created_at,
    }
    if row.signature is not None:
        body["signature"] = row.signature
    return body


def _device_token_ok(token: str) -> bool:
    """`token` is the live token of some device. Compares SHA-256 digests of a 256-bit secret,
    so the comparison's timing says nothing useful; one pass over the in-memory directory."""
    digest = auth.token_hash(token)
    return any(info.token_hash == digest for info in list(hub().devices.values()))


@api.post("/api/artifacts")
@requires("admin")
async def upload_artifact(_: UserRecord) -> Response:
    """Stream a software image to disk under its SHA-256 (never whole in memory)."""
    h = hub()
    limit = h.settings.max_artifact_bytes
    length = request.content_length
    if length is not None and length > limit:
        await _discard_body()
        raise ApiError(413, "MESSAGE_TOO_LARGE", f"image larger than {limit} bytes")
    version = request.headers.get("X-Version", "").strip()
    if not VERSION.fullmatch(version):
        raise ApiError(
            422,
            "INVALID_MESSAGE_FORMAT",
            "X-Version header: required, 1 to 128 printable characters without spaces",
        )
    signature = None
    raw_signature = request.headers.get("X-Signature", "").strip()
    if raw_signature:
        try:
            signature = parse_signature(raw_signature)
        except BadSignature as exc:
            raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"X-Signature header: {exc}") from None
    files = _artifact_files()
    try:
        stored = await files.receive(request.body, limit=limit)
    except TooLarge:
        raise ApiError(413, "MESSAGE_TOO_LARGE", f"image larger than {limit} bytes") from None
    existing = await h.store.get_artifact(stored.sha256)
    if existing is not None:
        if existing.version != version or existing.signature != signature:
            raise ApiError(
                409,
                "CONFLICT",
                f"image {stored.sha256} exists already with version {existing.version!r}"
                + (" and a different signature" if existing.signature != signature else ""),
            )
        return json_response(_artifact_json(existing), 200)
    if stored.size == 0:
        await trio.to_thread.run_sync(lambda: files.path(stored.sha256).unlink(missing_ok=True))
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "the image is empty")
    row = ArtifactRow(
        sha256=stored.sha256,
        size=stored.size,
        version=version,
        signature=signature,
        created_at=h.now_ms(),
    )
    await h.store.put_artifact(row)
    log.info(
        "artifact_stored",
        sha256=row.sha256,
        size=row.size,
        version=version,
        signed=signature is not None,
    )
    return json_response(_artifact_json(row), 201)


@api.get("/api/artifacts")
@requires("admin")
async def list_artifacts(_: UserRecord) -> Response:
    rows = await hub().store.list_artifacts()
    return json_response({"artifacts": [_artifact_json(r) for r in rows]})


@api.get("/api/artifacts/<sha256>")
async def download_artifact(sha256: str) -> Response:
    """The image, to any device (its device token) or an admin."""
    token = _request_token()
    if token is None:
        raise ApiError(401, "AUTHENTICATION_FAILED", "a device token or an admin login is needed")
    if not _device_token_ok(token):
        user = await hub().user_for_token(token)
        if user is None:
            raise ApiError(401, "AUTHENTICATION_FAILED", "unknown or expired token")
        if user.role != "admin":
            raise ApiError(403, "FORBIDDEN", "images are for devices and admins")
    sha256 = sha256.lower()
    row = await hub().store.get_artifact(sha256) if SHA256_HEX.fullmatch(sha256) else None
    if row is None:
        raise ApiError(404, "NOT_FOUND", f"no image {sha256[:64]!r}")
    try:
        file, size = await _artifact_files().open(sha256)
    except FileNotFoundError:
        log.warning("artifact_file_missing", sha256=sha256)
        raise ApiError(404, "NOT_FOUND", f"image {sha256} is not on this hub's disk") from None
    response = Response(stream_file(file), status=200, content_type="application/octet-stream")
    response.headers["Content-Length"] = str(size)
    response.headers["ETag"] = f'"{sha256}"'
    response.headers["X-Version"] = row.version
    if row.signature is not None:
        response.headers["X-Signature"] = row.signature
    return response


def _sha256_field(body: dict[str, Any]) -> str:
    sha256 = field(body, "sha256", str).strip().lower()
    if not SHA256_HEX.fullmatch(sha256):
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", "sha256: expected 64 hex digits")
    return sha256


@api.post("/api/devices/<device_id>/software-update")
@requires("operator")
async def software_update(user: UserRecord, device_id: str) -> Response:
    body = await json_object()
    visible_device(user, device_id)
    sha256 = _sha256_field(body)
    row = await hub().store.get_artifact(sha256)
    if row is None:
        raise ApiError(404, "NOT_FOUND", f"no image {sha256}; upload it to /api/artifacts first")
    fields: dict[str, Any] = {
        "version": row.version,
        "url": f"/api/artifacts/{row.sha256}",
        "sha256": row.sha256,
        "size": row.size,
    }
    if row.signature is not None:
        fields["signature"] = row.signature
    return await _create(
        device_id,
        kind="software_update",
        name="software_update",
        params={"sha256": row.sha256, "version": row.version, "size": row.size},
        fields=fields,
        expires_in_s=_expires_in(body),
    )


@api.get("/api/devices/<device_id>/software-update")
async def assigned_software_update(device_id: str) -> Response:
    """The latest `software_update` for the device (its OTA check), with its wire message.
    For the device itself (its device token) or a user who may see it; 404 when none."""
    token = _request_token()
    h = hub()
    if not (token and DEVICE_ID.fullmatch(device_id) and h.device_token_ok(device_id, token)):
        user = await current_user()
        visible_device(user, device_id)
    rows = await h.store.list_commands(device_id, limit=500)
    latest = next((r for r in reversed(rows) if r.kind == "software_update"), None)
    if latest is None:
        raise ApiError(404, "NOT_FOUND", "no software update assigned")
    return json_response({"command": command_json(latest), "message": latest.payload})


SSH_MAX_DURATION_S = 86_400


def _public_key_field(body: dict[str, Any]) -> str:
    """One OpenSSH public key line (type, base64 key, optional comment; no options, no newline:
    it goes into an authorized_keys file), checked as the agent checks it."""
    key = field(body, "public_key", str).strip(" ")
    fault = public_key_fault(key)
    if fault is not None:
        raise ApiError(422, "INVALID_MESSAGE_FORMAT", f"public_key: {fault}")
    return key


@api.post("/api/devices/<device_id>/ssh-access")
@requires("admin")
async def ssh_access(user: UserRecord, device_id: str) -> Response:
    body = await json_object()
    visible_device(user, device_id)
    duration = field(body, "duration_s", (int, float))
    if not 1 <= duration <= SSH_MAX_DURATION_S:  # NaN fails this too
        raise ApiError(
            422, "INVALID_MESSAGE_FORMAT", f"duration_s: 1 to {SSH_MAX_DURATION_S} seconds"
        )
    public_key = _public_key_field(body)
    fields: dict[str, Any] = {"duration_s": duration, "public_key": public_key}
    return await _create(
        device_id,
        kind="ssh_access",
        name="ssh_access",
        params=dict(fields),
        fields=fields,
        expires_in_s=_expires_in(body),
    )
