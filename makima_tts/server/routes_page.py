"""The /speak page: a static HTML page, its script, style and AudioWorklet module (no build step).

`router` serves GET /speak (the page) and GET /static/{name} (files in makima_tts/server/static/).
Include it with `app.include_router(router)`.
The page and its files are public; the page passes `?api_key=` on to the API calls it makes.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",   # AudioWorklet.addModule needs a JavaScript MIME type
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["page"])


def _file(name: str) -> FileResponse:
    try:
        if "\x00" in name:       # Path refuses NUL bytes with a ValueError: not a file of ours
            raise ValueError(name)
        path = (STATIC_DIR / name).resolve()
        found = STATIC_DIR in path.parents and path.is_file()
    except (ValueError, OSError):
        found = False
    if not found:
        raise HTTPException(status_code=404, detail="not found")
    media_type = _TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers=_HEADERS)


@router.api_route("/speak", methods=["GET", "HEAD"], include_in_schema=False)
async def speak_page() -> FileResponse:
    return _file("speak.html")


@router.api_route("/static/{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    return _file(name)
