from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import ModelCard, ModelList
from .deps import ERROR_RESPONSES

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return request.app.state.models.list()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request) -> ModelCard:
    return request.app.state.models.get(model_id)
