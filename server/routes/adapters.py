"""Adapter management, guarded by the admin key (see `AuthMiddleware`): ours and vLLM's two routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..protocol import (
    AdapterCard,
    AdapterList,
    LoadAdapterRequest,
    LoadLoRAAdapterRequest,
    ReloadAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from .deps import ERROR_RESPONSES

router = APIRouter(tags=["adapters"])
ADMIN_RESPONSES = {**ERROR_RESPONSES, 401: {"description": "Missing or wrong admin key"},
                   403: {"description": "No --admin-key configured: management is disabled"},
                   409: {"description": "Already loaded (reload it with PUT)"}}


@router.get("/v1/adapters", response_model=AdapterList, responses=ADMIN_RESPONSES)
async def list_adapters(request: Request) -> AdapterList:
    """Every adapter with its state (loaded, cpu, disk, failed), version, slot and metadata."""
    return request.app.state.adapters.list()


@router.get("/v1/adapters/{name}", response_model=AdapterCard, responses=ADMIN_RESPONSES)
async def get_adapter(name: str, request: Request) -> AdapterCard:
    return request.app.state.adapters.get(name)


@router.post("/v1/adapters", response_model=AdapterCard, responses=ADMIN_RESPONSES)
async def load_adapter(body: LoadAdapterRequest, request: Request) -> AdapterCard:
    """Read and validate an adapter directory (inside an adapter root) and activate it as version 1 or later."""
    return await request.app.state.adapters.load(body.name, body.path, body.pinned, reload=False)


@router.put("/v1/adapters/{name}", response_model=AdapterCard, responses=ADMIN_RESPONSES)
async def reload_adapter(name: str, body: ReloadAdapterRequest, request: Request) -> AdapterCard:
    """A new version in place: running requests finish on the old one, new requests get this one."""
    return await request.app.state.adapters.load(name, body.path, body.pinned, reload=True)


@router.delete("/v1/adapters/{name}", response_model=AdapterCard, responses=ADMIN_RESPONSES)
async def unload_adapter(name: str, request: Request) -> AdapterCard:
    """New requests for it get 404 at once; it is freed once running requests finish."""
    return await request.app.state.adapters.unload(name)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_RESPONSES)
async def vllm_load(body: LoadLoRAAdapterRequest, request: Request) -> str:
    """vLLM's body and answer; `load_inplace` reloads an adapter already loaded."""
    await request.app.state.adapters.load(body.lora_name, body.lora_path, None, reload=body.load_inplace)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_RESPONSES)
async def vllm_unload(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    await request.app.state.adapters.unload(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
