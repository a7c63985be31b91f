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
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
)
from .serving import ServerState, TokenText, UsageCounter, merged_outputs, request_id, sampling_params, sse
from .structured_outputs import request_constraint
from .tool_parser import CallDelta, ToolCallParser
from .tools import ToolPlan, conversation, template_knows_tools, tool_plan

log = logging.getLogger(__name__)


def chat_prompt_ids(engine: EngineClient, messages: list[ChatMessage], add_generation_prompt: bool,
                    tools: ToolPlan | None = None) -> list[int]:
    """Token ids of the conversation (and the tools it offers) after the model's chat template."""
    turns, native_tools = conversation(messages, tools, template_knows_tools(engine.tokenizer))
    try:
        ids = engine.tokenizer.apply_chat_template(turns, tools=native_tools,
                                                   add_generation_prompt=add_generation_prompt, tokenize=True)
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
        tools = tool_plan(body)
        constraint = await self.state.prepare_constraint(request_constraint(body, tools))
        # A long conversation takes a while to template and tokenize: off the event loop.
        prompt = await asyncio.to_thread(chat_prompt_ids, engine, body.messages, body.add_generation_prompt, tools)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_model_len - len(prompt))
        params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                 self.state.settings, constraint)
        try:
            engine.check_request(prompt, params)  # the adapter is checked at admission
        except ValueError as exc:
            raise to_api_error(exc) from None
        run = _ChatRun(engine, body, params, host, prompt, body.model or self.state.base_model,
                       tools.parses_calls)
        return await self.state.serve(run, params.n, params.max_tokens, host, raw, response)


class _ChatRun:
    def __init__(self, engine: EngineClient, body: ChatCompletionRequest, params: SamplingParams,
                 adapter: HostAdapter | None, prompt: list[int], model: str, parses_calls: bool) -> None:
        self.engine, self.body, self.params, self.adapter, self.prompt = engine, body, params, adapter, prompt
        self.model = model
        # One parser per choice when the output may hold tool calls.
        self.parsers = [ToolCallParser() for _ in range(params.n)] if parses_calls else None
        self.id = request_id("chatcmpl")
        self.usage = UsageCounter(prompt_tokens=len(prompt))
        self.logprobs = ChatLogprobsBuilder(TokenText(engine.tokenizer))

    def _outputs(self):
        return merged_outputs(self.engine, [self.prompt], self.params, self.adapter, self.id)

    async def response(self) -> ChatCompletionResponse:
        text: dict[int, list[str]] = {i: [] for i in range(self.params.n)}
        calls: dict[int, list[ToolCallOut]] = {i: [] for i in range(self.params.n)}
        logprobs: dict[int, ChatChoiceLogprobs] = {}
        finish: dict[int, tuple[str | None, str | int | None]] = {}
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for _, out in outputs:
                self.usage.update(0, out)
                for c in out.outputs:
                    content, deltas = self._parse(c.index, c.text, c.finish_reason is not None)
                    text[c.index].append(content)
                    fold_calls(calls[c.index], deltas)
                    if self.params.logprobs is not None:
                        part = self.logprobs.build(c.logprobs).content or []
                        logprobs.setdefault(c.index, ChatChoiceLogprobs(content=[])).content.extend(part)
                    if c.finish_reason is not None:
                        finish[c.index] = (self._finish_reason(c.index, c.finish_reason), c.stop_reason)
        choices = []
        for i in range(self.params.n):
            content = "".join(text[i])
            message = ChatResponseMessage(content=content if content or not calls[i] else None,
                                          tool_calls=calls[i] or None)
            choices.append(ChatCompletionChoice(
                index=i, message=message, logprobs=logprobs.get(i),
                finish_reason=finish.get(i, (None, None))[0], stop_reason=finish.get(i, (None, None))[1]))
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=self.usage.usage())

    def _parse(self, index: int, text: str, finished: bool) -> tuple[str, list[CallDelta]]:
        """(content, tool-call deltas) of a choice's new text: all content when tools are not parsed."""
        if self.parsers is None:
            return text, []
        parsed = self.parsers[index].feed(text)
        if finished:
            rest = self.parsers[index].finish()
            parsed.content += rest.content
        return parsed.content, parsed.calls

    def _finish_reason(self, index: int, reason: str) -> str:
        """OpenAI's "tool_calls" for a choice that stopped after calling tools."""
        if reason == "stop" and self.parsers is not None and self.parsers[index].has_calls:
            return "tool_calls"
        return reason

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
                    finished = c.finish_reason is not None
                    content, deltas = self._parse(c.index, c.text, finished)
                    if content or deltas or lp is not None or finished:
                        delta = DeltaMessage(content=content or None, tool_calls=[
                            DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                          function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
                            for d in deltas] or None)
                        choices.append(ChatCompletionStreamChoice(
                            index=c.index, delta=delta, logprobs=lp,
                            finish_reason=self._finish_reason(c.index, c.finish_reason) if finished else None,
                            stop_reason=c.stop_reason,
                        ))
                if choices:
                    yield self._chunk(choices)
        if include_usage:
            yield sse(ChatCompletionStreamResponse(id=self.id, model=self.model, choices=[],
                                                   usage=self.usage.usage()))


def fold_calls(calls: list[ToolCallOut], deltas: list[CallDelta]) -> None:
    """Add streamed call deltas to whole calls (a non-streamed response says what the stream says)."""
    for d in deltas:
        if d.id is not None:
            calls.append(ToolCallOut(id=d.id, function=FunctionCallOut(name=d.name or "", arguments=d.arguments)))
        else:
            calls[d.index].function.arguments += d.arguments
