from __future__ import annotations

from fastapi import APIRouter, Request

from ..middleware import is_admin_request
from ..protocol import ModelCard, ModelList
from .deps import ERROR_RESPONSES, state

router = APIRouter(tags=["models"])


def _shows_paths(request: Request) -> bool:
    """Adapter directories are the server's file paths: shown only to callers with the admin key."""
    return is_admin_request(request.scope, state(request).settings.admin_key)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return request.app.state.models.list(show_paths=_shows_paths(request))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request) -> ModelCard:
    return request.app.state.models.get(model_id, show_paths=_shows_paths(request))
