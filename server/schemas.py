"""Request and response bodies of the OpenAI-compatible routes.

Requests are strict: an unknown field, a batch of prompts, `n > 1`, or a known OpenAI
parameter this server does not implement (logprobs, echo, tools, penalties, ...) is a 400
with a message naming it, never silently ignored. One extension: `method` picks the
decoding method (`ar`, `jacobi`, `tr-jacobi`, `pld`); responses carry a `decoding` object
with the request's steps and mean accepted tokens per step (MAT).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Unsupported(ValueError):
    """A parameter this server does not implement (400 naming the parameter)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


StopField = Annotated[
    str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None,
    Field(description="up to 4 strings; generation stops before any of them"),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: StopField = None
    n: int = Field(1, ge=1, le=128, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # OpenAI parameters accepted only at their no-op value, so clients that send the
    # defaults work and clients that rely on them get a clear 400.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    method: str | None = Field(
        None, max_length=32,
        description="msn extension: decoding method (ar, jacobi, tr-jacobi, pld); "
                    "the server's default when omitted",
    )

    @model_validator(mode="after")
    def _reject_unsupported(self) -> _SamplingRequest:
        if self.n != 1:
            raise Unsupported("n", f"n={self.n} is not supported: this server returns one choice "
                             "per request (n=1)")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options",
                              "stream_options is only allowed when stream=true")
        if self.presence_penalty or self.frequency_penalty:
            raise Unsupported("presence_penalty" if self.presence_penalty
                              else "frequency_penalty",
                              "presence_penalty and frequency_penalty are not supported "
                              "(only 0)")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PromptField = (
    Annotated[str, Field(max_length=1_000_000)]
    | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
                Field(min_length=1)]
)


class CompletionRequest(_SamplingRequest):
    prompt: PromptField
    max_tokens: int | None = Field(16, ge=1, description="default 16, as in OpenAI")
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _reject_unsupported_completion(self) -> CompletionRequest:
        batched = isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))
        if batched and len(self.prompt) != 1:
            raise Unsupported("prompt", f"batched prompts ({len(self.prompt)}) are not "
                              "supported; send one prompt per request")
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix is not supported")
        if self.logprobs is not None:
            raise Unsupported("logprobs", "logprobs is not supported")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of > 1 is not supported")
        return self

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only plain text is supported")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of "
                                   "max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _reject_unsupported_chat(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs is not None:
            raise Unsupported("logprobs", "logprobs is not supported")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


# ----- responses -----

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DecodingInfo(BaseModel):
    """msn extension: how the request was decoded."""
    method: str
    num_steps: int = Field(description="decoding steps (model forward passes after prefill)")
    mat: float | None = Field(description="mean tokens generated per step: completion_tokens, "
                              "plus the end-of-sequence token when one was generated, over "
                              "num_steps (as `msn generate` reports it)")
    num_draft_tokens: int
    num_accepted_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    decoding: DecodingInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    decoding: DecodingInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    decoding: DecodingInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "msn-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    detail: dict[str, Any] | None = None
