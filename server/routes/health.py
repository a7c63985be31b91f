from __future__ import annotations

from fastapi import APIRouter, Request

from malora_runtime.cpu_features import cpu_features

from .. import __version__
from ..errors import APIError
from ..protocol import EngineStatsResponse, StatusResponse, VersionResponse
from .deps import ERROR_RESPONSES, state

router = APIRouter(tags=["health"])


@router.get("/health", response_model=StatusResponse, responses={503: ERROR_RESPONSES[503]})
async def health(request: Request) -> StatusResponse:
    """Liveness: 503 when the engine thread has died, or when work is waiting and no engine step has finished
    for --health-stall-seconds (a hung step). While the model loads or the server drains it answers 200."""
    server = state(request)
    engine = server.engine
    if engine is None or server.draining:
        return StatusResponse(status="ok")
    stalled = engine.stalled_for()
    if stalled == float("inf"):
        raise APIError(503, "the engine thread is not running", code="engine_dead")
    if stalled > server.settings.health_stall_seconds:
        raise APIError(503, f"work is waiting and no engine step has finished for {stalled:.0f} s",
                       code="engine_stalled")
    return StatusResponse(status="ok")


@router.get("/ready", response_model=StatusResponse, responses={503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> StatusResponse:
    """The model is loaded and the engine thread is stepping; 503 otherwise."""
    state(request).require_engine()
    return StatusResponse(status="ready")


@router.get("/version", response_model=VersionResponse)
async def version(request: Request) -> VersionResponse:
    server = state(request)
    engine = server.settings.engine
    return VersionResponse(version=__version__, model=server.base_model if server.engine is not None else None,
                           dtype=engine.dtype, dtype_reason=engine.dtype_reason,
                           weights=server.engine.engine.runner.weights if server.engine is not None else None,
                           cpu_isa=cpu_features().describe() if engine.device.startswith("cpu") else None)


@router.get("/v1/engine/stats", response_model=EngineStatsResponse, responses=ERROR_RESPONSES)
async def engine_stats(request: Request) -> EngineStatsResponse:
    """Scheduler and KV cache counters (for load tests and dashboards)."""
    server = state(request)
    stats = server.require_engine().stats()
    return EngineStatsResponse(
        num_running=stats.num_running, num_waiting=stats.num_waiting, num_admitted=server.num_admitted,
        kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
        num_preemptions=stats.num_preemptions, num_steps=stats.num_steps,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
    )
