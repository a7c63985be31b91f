from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .deps import ERROR_RESPONSES

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await request.app.state.tokenize.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await request.app.state.tokenize.detokenize(body)
