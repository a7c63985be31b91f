from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..protocol import CompletionRequest, CompletionResponse, CompletionStreamResponse
from ..serving import ClientDisconnected
from .deps import ERROR_RESPONSES

router = APIRouter(tags=["completions"])
STREAM_DOC = {"description": "With `stream`: server-sent events, each `data: <CompletionStreamResponse>`, then "
              "`data: [DONE]`.", "content": {"text/event-stream": {"schema": {"type": "string"}}},
              "model": CompletionStreamResponse}


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**ERROR_RESPONSES, 200: STREAM_DOC})
async def create_completion(body: CompletionRequest, request: Request, response: Response):
    try:
        return await request.app.state.completions.create(body, request, response)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; nginx's 'client closed request'
