from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse
from ..serving import ClientDisconnected
from .deps import ERROR_RESPONSES

router = APIRouter(tags=["chat"])
STREAM_DOC = {"description": "With `stream`: server-sent events, each `data: <ChatCompletionStreamResponse>`, "
              "then `data: [DONE]`.", "content": {"text/event-stream": {"schema": {"type": "string"}}},
              "model": ChatCompletionStreamResponse}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, 200: STREAM_DOC})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response):
    try:
        return await request.app.state.chat.create(body, request, response)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; nginx's 'client closed request'
