"""vLLM's `/tokenize` and `/detokenize`, for clients that count tokens the way the server does."""

from __future__ import annotations

import asyncio

from .engine_client import EngineClient
from .errors import invalid
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving import ServerState, TokenText
from .serving_chat import chat_prompt_ids


class TokenizeServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        engine = self.state.require_engine()
        await self.state.resolve_adapter(body.model)  # a 404 for an unknown name, as generation would give
        ids = await asyncio.to_thread(self._ids, engine, body)  # a 1 MiB prompt takes a while: off the loop
        text = TokenText(engine.tokenizer)
        strs = [text(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    @staticmethod
    def _ids(engine: EngineClient, body: TokenizeRequest) -> list[int]:
        if body.messages is not None:
            return chat_prompt_ids(engine, body.messages, body.add_generation_prompt)
        return list(engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        engine = self.state.require_engine()
        await self.state.resolve_adapter(body.model)
        vocab = len(engine.tokenizer)
        outside = next((t for t in body.tokens if t >= vocab), None)
        if outside is not None:
            raise invalid(f"tokens must be in [0, {vocab}), got {outside}", param="tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(engine.tokenizer.decode, body.tokens))
