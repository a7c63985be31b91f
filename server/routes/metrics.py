"""`GET /metrics` (Prometheus text), the built-in dashboard page and its JSON summary."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["metrics"])
STATIC = Path(__file__).resolve().parent.parent / "static"


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    telemetry = request.app.state.telemetry
    await telemetry.refresh()
    return Response(generate_latest(telemetry.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html")


@router.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(asset: str) -> Response:
    path = (STATIC / asset).resolve()
    if path.parent != STATIC or not path.is_file():
        return JSONResponse({"error": {"message": f"no dashboard asset {asset!r}", "type": "not_found_error"}},
                            status_code=404)
    return FileResponse(path)


@router.get("/v1/dashboard/summary")
async def summary(request: Request) -> JSONResponse:
    """Live figures for the dashboard: throughput, latency percentiles, queues, KV, adapters, routing."""
    telemetry = request.app.state.telemetry
    await telemetry.refresh()
    return JSONResponse(telemetry.summary())
