"""The /speak page: a static HTML page, its ES modules, style and AudioWorklet module (no build step).

`router` serves GET /speak (the page) and mounts Starlette's StaticFiles at /static (the files in
makima_tts/server/static/: page.js imports client.js, player.js and voices.js).
Include it with `app.include_router(router)`.
The page and its files are public; the page passes `?api_key=` on to the API calls it makes.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Our own table, not the platform's mimetypes (which may map .js to text/plain, or to the legacy
# application/javascript): ES modules and AudioWorklet.addModule need a JavaScript MIME type.
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _media_type(path: str | os.PathLike[str]) -> str:
    return _TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


class _Static(StaticFiles):
    """StaticFiles with the page's content types and headers (no-cache: the browser revalidates
    with the ETag StaticFiles sets, so a new version of a module is picked up at once)."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if isinstance(response, FileResponse):     # not a 304 (Not Modified), which has no body
            response.media_type = _media_type(full_path)
            ctype = response.media_type + ("; charset=utf-8" if response.media_type.startswith("text/") else "")
            response.headers["Content-Type"] = ctype
        response.headers.update(_HEADERS)
        return response


router = APIRouter(tags=["page"])
router.mount("/static", _Static(directory=STATIC_DIR), name="static")


@router.api_route("/speak", methods=["GET", "HEAD"], include_in_schema=False)
async def speak_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "speak.html", media_type="text/html; charset=utf-8", headers=_HEADERS)
