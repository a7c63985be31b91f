"""Request and response bodies of the OpenAI-compatible API (pydantic: the HTTP boundary only)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from malora_runtime.sampling_params import MAX_LOGPROBS

MAX_N = 128
NonNegInt = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Body(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise ValueError(f"{where or 'the body'} is not valid unicode (it holds a lone surrogate such as "
                             "\\ud800)")
        return data


def lone_surrogate_at(data: Any) -> str | None:
    """The path (`messages.0.content`) of the first string in `data` that cannot be UTF-8 encoded, else None.

    JSON allows escapes like \\ud800 that decode to half a character; the tokenizer cannot encode them.
    Iterative, so a deeply nested body cannot exhaust the stack."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and lone_surrogate_at(key) is not None:
                    return child
                pending.append((child, item))
        elif isinstance(value, list):
            pending.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value)
                           if isinstance(item, str | dict | list))
    return None


class StreamOptions(Body):
    include_usage: bool = False
    """Send a last chunk with no choices and the request's usage."""


class JsonSchemaFormat(Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", populate_by_name=True)


class ResponseFormat(Body):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Body):
    """vLLM's `structured_outputs`: at most one constraint on the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema (or its text).")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="A Lark grammar (llguidance's dialect) or a GBNF grammar.")
    json_object: bool | None = None

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", populate_by_name=True)


class SamplingFields(Body):
    """Fields shared by completions and chat; the last group are vLLM's extensions."""

    model: str | None = Field(None, description="The base model's id or an adapter's name (default: the base).")
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (a decimal string) -> bias in [-100, 100], added to its logit before sampling.")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the output is constrained to parse (and follow the schema).")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraints: json (a schema), regex, choice, grammar or json_object.")
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, token ids, or a batch of either (one choice group per prompt)."
    )
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list | str) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value


class TextPart(Body):
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_TOOLS = 128


class FunctionCall(Body):
    name: str = Field(..., max_length=64)
    arguments: str = Field(..., description="The arguments as a JSON text.")


class ToolCall(Body):
    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="The calls an assistant turn made.")
    tool_call_id: str | None = Field(None, description="Which call a tool turn answers.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(Body):
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class ChatTool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function; required and "
        "named choices are enforced by a grammar.")
    parallel_tool_calls: bool = Field(True, description="Allow more than one call in a turn.")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = Field(None, description="The stop string or token id that ended it.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: the first of each call carries its id and name, the rest argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One server-sent event of a streamed completion (same shape as the whole response)."""


class AdapterModule(BaseModel):
    num_experts: int
    rank: int
    subspace_rank: int
    top_k: int
    alpha: float


class AdapterInfo(BaseModel):
    state: Literal["loaded", "cpu", "disk", "failed", "unloaded"] = Field(
        ..., description="loaded: in an engine slot; cpu: parsed in host memory; disk: read on first use; "
        "failed: its last read failed (see error); unloaded: only in the answer to an unload.")
    path: str | None = None
    version: int | None = Field(None, description="Bumped by every (re)load; requests report theirs in the "
                                "x-malora-adapter-version header.")
    slot: int | None = Field(None, description="The engine slot holding it (state loaded).")
    pinned: bool = False
    base_model: str | None = None
    target_modules: list[str] = Field(default_factory=list)
    num_experts: int | None = None
    rank: int | None = None
    subspace_rank: int | None = None
    top_k: int | None = None
    modules: dict[str, AdapterModule] = Field(default_factory=dict)
    error: str | None = None
    source: str | None = Field(None, description="The --adapter-source it came from (None: a local directory).")
    source_url: str | None = Field(None, description="Its directory in that source.")
    source_version: str | None = Field(None, description="The source's version of it: a hash of its files' names, "
                                       "sizes and ETags (or the Hub's commit).")
    fetch_seconds: float | None = Field(None, description="Listing and, when not cached, downloading and "
                                        "validating its latest version.")
    fetched_offline: bool | None = Field(None, description="The source was unreachable: the newest cached version "
                                         "serves.")


class AdapterCard(AdapterInfo):
    name: str
    object: Literal["adapter"] = "adapter"


class AdapterStatsInfo(BaseModel):
    loads: int
    reloads: int
    unloads: int
    host_evictions: int = Field(..., description="Adapters dropped from the host-memory LRU.")
    slot_evictions: int = Field(..., description="Idle adapters evicted from engine slots for another.")
    waiting_for_adapter: int = Field(..., description="Requests waiting for a free slot right now.")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]
    stats: AdapterStatsInfo


class LoadAdapterRequest(Body):
    name: str
    path: str = Field(..., description="Adapter directory, inside an --adapter-root (relative: to the first), or a "
                      "URL directly under an --adapter-source.")
    pinned: bool = False


class ReloadAdapterRequest(Body):
    path: str | None = Field(None, description="Directory of the new version (default: the current one).")
    pinned: bool | None = Field(None, description="Pin or unpin with the new version (default: unchanged).")


class LoadLoRAAdapterRequest(Body):
    """vLLM's body for `POST /v1/load_lora_adapter`."""

    lora_name: str
    lora_path: str
    load_inplace: bool = Field(False, description="Reload an adapter that is already loaded.")


class UnloadLoRAAdapterRequest(Body):
    """vLLM's body for `POST /v1/unload_lora_adapter`."""

    lora_name: str
    lora_int_id: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "malora"
    root: str
    parent: str | None = None
    max_model_len: int
    adapter: AdapterInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StatusResponse(BaseModel):
    status: str


class VersionResponse(BaseModel):
    version: str
    model: str | None = None
    dtype: str | None = Field(None, description="The dtype the engine serves in (`--dtype`, auto resolved).")
    dtype_reason: str | None = Field(None, description="Why: the flag, or what `auto` detected.")
    weights: str | None = Field(None, description="The base model's weights as served: GGUF blocks by format "
                                "(`--quantization gguf`), or float weights in the served dtype (packed for oneDNN, "
                                "int8 one-row copies); null before the model is loaded.")
    cpu_isa: str | None = Field(None, description="The instruction-set level the native CPU kernels are built for "
                                "(scalar, neon, avx2, avx512, avx512_bf16, amx), and the CPU's own where "
                                "MALORA_MAX_ISA caps it; null when serving on a GPU.")


class EngineStatsResponse(BaseModel):
    num_running: int
    num_waiting: int
    num_admitted: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_steps: int
    prefix_cache_hit_rate: float


class TokenizeRequest(Body):
    """vLLM's `/tokenize`: a completion prompt, or chat messages through the model's chat template."""

    model: str | None = Field(None, description="The base model or an adapter (they share one tokenizer).")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="For `prompt`: the tokenizer's special tokens (BOS...).")
    add_generation_prompt: bool = Field(True, description="For `messages`: end with the assistant's turn.")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[NonNegInt]


class DetokenizeResponse(BaseModel):
    prompt: str
