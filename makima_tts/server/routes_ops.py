"""Health, readiness, metrics, model list."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from .auth import require_api_key
from .metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health", tags=["operations"])
async def health() -> dict:
    """The process is alive (it may still be loading the model)."""
    return {"status": "ok"}


@router.get("/ready", tags=["operations"])
async def ready(request: Request) -> JSONResponse:
    """200 when the model is loaded and speech can be served; 503 with the reason otherwise."""
    ctx = request.app.state.ctx
    status = ctx.status()
    cluster = getattr(ctx.engine, "cluster_status", None)      # serve --ray: the engine replicas
    if cluster is not None:
        status.update(cluster())
    return JSONResponse(status, status_code=200 if status["ready"] else 503)


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    return Response(request.app.state.ctx.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", tags=["openai"], dependencies=[Depends(require_api_key)])
async def models(request: Request) -> dict:
    ctx = request.app.state.ctx
    data = [{"id": "makima-tts", "object": "model", "owned_by": "makima-tts"}]
    if ctx.engine is not None:
        data.append({"id": str(ctx.engine.model_id), "object": "model", "owned_by": ctx.engine.name})
    return {"object": "list", "data": data}


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/speak")
