"""The dashboard's pages: `/` (the app shell) and `/static/<file>` from `ems/hub/static/`.

Plain files shipped in the package (no build step): the page talks to the REST API with the
session cookie and gets everything live from `/ws/dashboard`. Only the files in the static
folder itself are served, with an explicit content type, `nosniff` and a same-origin CSP.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

pages = Blueprint("pages", __name__)

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _file_response(name: str) -> Response:
    path = STATIC_DIR / name
    content_type = CONTENT_TYPES.get(path.suffix)
    # One level, known kinds only: no path separators, no dot files, nothing else on disk.
    if content_type is None or "/" in name or "\\" in name or name.startswith("."):
        return _not_found()
    try:
        body = path.read_bytes()
    except OSError:
        return _not_found()
    response = Response(body, status=200, content_type=content_type)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _not_found() -> Response:
    from ems.hub.api import error_response

    return error_response(404, "NOT_FOUND", "no such file")


@pages.get("/")
async def index() -> Response:
    return _file_response("index.html")


@pages.get("/static/<path:name>")
async def static_file(name: str) -> Response:
    return _file_response(name)
