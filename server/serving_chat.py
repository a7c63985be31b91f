"""`/v1/chat/completions`: messages through the model's chat template, outputs to OpenAI chat bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from malora_runtime.adapters.registry import HostAdapter
from malora_runtime.engine.sequence import TokenLogprobs
from malora_runtime.sampling_params import SamplingParams

from .engine_client import EngineClient
from .errors import invalid, to_api_error
from .protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
)
from .serving import ServerState, TokenText, UsageCounter, merged_outputs, request_id, sampling_params, sse

log = logging.getLogger(__name__)
_ROLES = {"developer": "system"}


def chat_prompt_ids(engine: EngineClient, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """Token ids of the conversation after the model's chat template."""
    turns = [{"role": _ROLES.get(m.role, m.role), "content": m.text()} for m in messages]
    try:
        ids = engine.tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as exc:  # the template rejects this conversation (jinja raise_exception)
        raise invalid(f"the chat template rejected the messages: {exc}", param="messages") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


class ChatLogprobsBuilder:
    def __init__(self, token_text: TokenText) -> None:
        self.token_text = token_text

    def _top(self, token_id: int, logprob: float) -> ChatTopLogprob:
        token = self.token_text(token_id)
        return ChatTopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    def build(self, logprobs: list[TokenLogprobs] | None) -> ChatChoiceLogprobs:
        content = []
        for lp in logprobs or []:
            head = self._top(lp.token_id, lp.logprob)
            content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[self._top(t, v) for t, v in lp.top]))
        return ChatChoiceLogprobs(content=content)


class ChatServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(self, body: ChatCompletionRequest, raw: Request, response: Response
                     ) -> ChatCompletionResponse | StreamingResponse:
        engine = self.state.require_engine()
        host = await self.state.resolve_adapter(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
        self.state.check_admissible(body.n)
        # A long conversation takes a while to template and tokenize: off the event loop.
        prompt = await asyncio.to_thread(chat_prompt_ids, engine, body.messages, body.add_generation_prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_model_len - len(prompt))
        params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                 self.state.settings)
        try:
            engine.check_request(prompt, params)  # the adapter is checked at admission
        except ValueError as exc:
            raise to_api_error(exc) from None
        run = _ChatRun(engine, body, params, host, prompt,
                       body.model or self.state.base_model)
        return await self.state.serve(run, params.n, params.max_tokens, host, raw, response)


class _ChatRun:
    def __init__(self, engine: EngineClient, body: ChatCompletionRequest, params: SamplingParams,
                 adapter: HostAdapter | None, prompt: list[int], model: str) -> None:
        self.engine, self.body, self.params, self.adapter, self.prompt = engine, body, params, adapter, prompt
        self.model = model
        self.id = request_id("chatcmpl")
        self.usage = UsageCounter(prompt_tokens=len(prompt))
        self.logprobs = ChatLogprobsBuilder(TokenText(engine.tokenizer))

    def _outputs(self):
        return merged_outputs(self.engine, [self.prompt], self.params, self.adapter, self.id)

    async def response(self) -> ChatCompletionResponse:
        text: dict[int, list[str]] = {i: [] for i in range(self.params.n)}
        logprobs: dict[int, ChatChoiceLogprobs] = {}
        finish: dict[int, tuple[str | None, str | int | None]] = {}
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for _, out in outputs:
                self.usage.update(0, out)
                for c in out.outputs:
                    text[c.index].append(c.text)
                    if self.params.logprobs is not None:
                        part = self.logprobs.build(c.logprobs).content or []
                        logprobs.setdefault(c.index, ChatChoiceLogprobs(content=[])).content.extend(part)
                    if c.finish_reason is not None:
                        finish[c.index] = (c.finish_reason, c.stop_reason)
        choices = [
            ChatCompletionChoice(
                index=i, message=ChatResponseMessage(content="".join(text[i])), logprobs=logprobs.get(i),
                finish_reason=finish.get(i, (None, None))[0], stop_reason=finish.get(i, (None, None))[1],
            )
            for i in range(self.params.n)
        ]
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=self.usage.usage())

    def _chunk(self, choices: list[ChatCompletionStreamChoice]) -> str:
        return sse(ChatCompletionStreamResponse(id=self.id, model=self.model, choices=choices))

    async def events(self) -> AsyncIterator[str]:
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        yield self._chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                           for i in range(self.params.n)])
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for _, out in outputs:
                self.usage.update(0, out)
                choices = []
                for c in out.outputs:
                    lp = self.logprobs.build(c.logprobs) if self.params.logprobs is not None else None
                    if c.text or lp is not None or c.finish_reason is not None:
                        choices.append(ChatCompletionStreamChoice(
                            index=c.index, delta=DeltaMessage(content=c.text or None), logprobs=lp,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                        ))
                if choices:
                    yield self._chunk(choices)
        if include_usage:
            yield sse(ChatCompletionStreamResponse(id=self.id, model=self.model, choices=[],
                                                   usage=self.usage.usage()))
