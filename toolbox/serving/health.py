"""GET /health and GET /metrics: the server's own state, answered even while the model loads."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from toolbox.serving import schemas as S
from toolbox.serving.common import state_of

router = APIRouter(tags=["server"])


@router.head("/health", operation_id="health_head", response_model=S.HealthResponse,
             responses={503: {"model": S.HealthResponse, "description": "Loading, failed or stopping."}})
@router.get("/health", operation_id="health", response_model=S.HealthResponse,
            responses={503: {"model": S.HealthResponse, "description": "Loading, failed or stopping."}})
async def health(request: Request):
    """200 once the model is loaded and serving; 503 before (and while shutting down). Never needs a key."""
    state = state_of(request)
    body = {"status": state.current_status(), "model": state.name}
    if body["status"] == "ok":
        return body
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.retry_after)})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
async def metrics(request: Request):
    """Prometheus metrics: requests, tokens in/out, latency and time-to-first-token histograms, queue depth, batch size."""
    state = state_of(request)
    state.current_status()  # a model process that died turns toolbox_model_loaded to 0
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
