"""`/v1/completions`: prompts (text, ids, or a batch) to engine requests, outputs to OpenAI bodies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from malora_runtime.adapters.registry import HostAdapter
from malora_runtime.engine.sequence import TokenLogprobs
from malora_runtime.sampling_params import SamplingParams

from .engine_client import EngineClient
from .errors import invalid, to_api_error
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving import ServerState, TokenText, UsageCounter, merged_outputs, request_id, sampling_params, sse
from .structured_outputs import request_constraint


class CompletionLogprobsBuilder:
    """The completions logprobs shape for one choice: token texts, their logprobs, top-k, text offsets."""

    def __init__(self, token_text: TokenText, offset: int = 0) -> None:
        self.token_text = token_text
        self.offset = offset

    def build(self, logprobs: list[TokenLogprobs] | None, prompt_ids: list[int] | None = None) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id in prompt_ids or []:  # no prompt logprobs from the engine: null, as OpenAI's first token
            self._append(out, self.token_text(token_id), None, None)
        for lp in logprobs or []:
            top = {self.token_text(t): v for t, v in lp.top}
            self._append(out, self.token_text(lp.token_id), lp.logprob, top)
        return out

    def _append(self, out: CompletionLogprobs, token: str, logprob: float | None, top: dict | None) -> None:
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(self.offset)
        self.offset += len(token)


class CompletionServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(self, body: CompletionRequest, raw: Request, response: Response
                     ) -> CompletionResponse | StreamingResponse:
        engine = self.state.require_engine()
        host = await self.state.resolve_adapter(body.model)
        constraint = await self.state.prepare_constraint(request_constraint(body))
        params = sampling_params(body, body.max_tokens or 16, body.logprobs, self.state.settings, constraint)
        num_prompts = 1 if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else len(body.prompt)
        self.state.check_admissible(params.n * num_prompts, param="prompt" if num_prompts > 1 else "n")
        prompts, texts = await asyncio.to_thread(self._prompts, engine, body.prompt)
        for ids in prompts:
            try:
                engine.check_request(ids, params)  # the adapter is checked at admission
            except ValueError as exc:
                raise to_api_error(exc) from None
        run = _Run(engine, body, params, host, prompts, texts,
                   body.model or self.state.base_model)
        return await self.state.serve(run, params.n * num_prompts, params.max_tokens, host, raw, response)

    @staticmethod
    def _prompts(engine: EngineClient, prompt) -> tuple[list[list[int]], list[str | None]]:
        """Token ids of each prompt and its text (for `echo`; None where ids were given). Runs in a worker
        thread: a long prompt takes the tokenizer most of a second, which the event loop must not wait for."""
        if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                ids.append(list(engine.tokenizer(p)["input_ids"]))
                texts.append(p)
            else:
                ids.append(list(p))
                texts.append(None)
        if any(not p for p in ids):
            raise invalid("prompt must not be empty", param="prompt")
        return ids, texts


class _Run:
    """One completion request: its prompts, settings and the state of each choice."""

    def __init__(self, engine: EngineClient, body: CompletionRequest, params: SamplingParams,
                 adapter: HostAdapter | None, prompts: list[list[int]], texts: list[str | None], model: str) -> None:
        self.engine, self.body, self.params, self.adapter = engine, body, params, adapter
        self.prompts, self.texts, self.model = prompts, texts, model
        self.id = request_id("cmpl")
        self.usage = UsageCounter(prompt_tokens=sum(len(p) for p in prompts))
        self.token_text = TokenText(engine.tokenizer)
        self.builders: dict[int, CompletionLogprobsBuilder] = {}

    def choice_index(self, prompt_index: int, index: int) -> int:
        return prompt_index * self.params.n + index

    def _echo(self, prompt_index: int) -> str:
        text = self.texts[prompt_index]
        return text if text is not None else self.engine.tokenizer.decode(self.prompts[prompt_index])

    def _first_text(self, prompt_index: int, choice: int) -> tuple[str, list[int] | None]:
        """Echoed prompt text (and ids, for logprobs) the first time a choice shows up."""
        if choice in self.builders:
            return "", None
        self.builders[choice] = CompletionLogprobsBuilder(self.token_text)
        if not self.body.echo:
            return "", None
        return self._echo(prompt_index), self.prompts[prompt_index]

    async def response(self) -> CompletionResponse:
        text: dict[int, list[str]] = {}
        logprobs: dict[int, CompletionLogprobs] = {}
        finish: dict[int, tuple[str | None, str | int | None]] = {}
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for p, out in outputs:
                self.usage.update(p, out)
                for c in out.outputs:
                    i = self.choice_index(p, c.index)
                    prefix, echo_ids = self._first_text(p, i)
                    text.setdefault(i, []).append(prefix + c.text)
                    if self.params.logprobs is not None:
                        part = self.builders[i].build(c.logprobs, echo_ids)
                        merged = logprobs.setdefault(i, CompletionLogprobs())
                        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(merged, field).extend(getattr(part, field))
                    if c.finish_reason is not None:
                        finish[i] = (c.finish_reason, c.stop_reason)
        choices = [
            CompletionChoice(index=i, text="".join(text.get(i, [])), logprobs=logprobs.get(i),
                             finish_reason=finish.get(i, (None, None))[0], stop_reason=finish.get(i, (None, None))[1])
            for i in range(len(self.prompts) * self.params.n)
        ]
        return CompletionResponse(id=self.id, model=self.model, choices=choices, usage=self.usage.usage())

    async def events(self) -> AsyncIterator[str]:
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for p, out in outputs:
                self.usage.update(p, out)
                choices = []
                for c in out.outputs:
                    i = self.choice_index(p, c.index)
                    prefix, echo_ids = self._first_text(p, i)
                    lp = None
                    if self.params.logprobs is not None:
                        lp = self.builders[i].build(c.logprobs, echo_ids)
                    if prefix or c.text or lp is not None or c.finish_reason is not None:
                        choices.append(CompletionChoice(index=i, text=prefix + c.text, logprobs=lp,
                                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                if choices:
                    yield sse(CompletionResponse(id=self.id, model=self.model, choices=choices))
        if include_usage:
            yield sse(CompletionResponse(id=self.id, model=self.model, choices=[], usage=self.usage.usage()))

    def _outputs(self):
        return merged_outputs(self.engine, self.prompts, self.params, self.adapter, self.id)

