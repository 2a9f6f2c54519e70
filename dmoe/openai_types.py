"""The OpenAI request shapes the server accepts, as pydantic models, and its error object.

Strict: a wrong type is a 400 naming the field ("temperature": "hot" is not coerced to a number), while
fields this server does not know are ignored, as OpenAI's own server and vLLM do. Values it knows but
cannot honour (n > 1, logprobs, penalties, ...) are refused rather than ignored: a client that asks for
them would otherwise get an answer it did not ask for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Parameters whose other values this engine cannot honour: refused, not silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "functions": ([],), "suffix": ("",)}


class APIError(Exception):
    """A request the server refuses, sent as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def invalid(cls, e: ValidationError) -> APIError:
        """The first problem pydantic found, as a 400 naming its field the way OpenAI does ("messages[0].role")."""
        error = e.errors(include_url=False)[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".") or None
        if error["type"] == "unsupported":
            return cls(400, error["msg"], error["ctx"]["param"], "unsupported_parameter")
        message = error["msg"].removeprefix("Value error, ")
        return cls(400, f"{param}: {message}" if param else message, param)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # text parts arrive joined (see _text_parts)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError("only text parts are supported")
            return "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise ValueError("must be a string or an array of text parts")
        return content

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role {self.role!r}")
        if self.content is None and not self.tool_calls:
            self.content = ""
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """What chat and text completions share: sampling, length, stops, streaming."""

    model: str | None = None  # any name: this server has one model
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0 = off
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's: generate through end-of-turn tokens (benchmarks)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            return stop
        raise ValueError("must be a string or an array of strings")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, body: Any) -> Any:
        for name, allowed in UNSUPPORTED.items():
            if isinstance(body, dict) and body.get(name) is not None and body[name] not in allowed:
                raise PydanticCustomError("unsupported", "{message}", {
                    "param": name, "message": f"'{name}' = {body[name]!r} is not supported by this server"})
        return body

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def length_param(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens


class ChatPrompt(_Strict):
    """A conversation to render with the model's chat template (a chat completion's, or /tokenize's)."""

    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] = {}
    enable_thinking: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def thinking(self) -> bool:
        flag = self.chat_template_kwargs.get("enable_thinking", self.enable_thinking)
        if flag is not None and not isinstance(flag, bool):
            raise APIError(400, "'enable_thinking' must be a boolean", "chat_template_kwargs.enable_thinking")
        return True if flag is None else flag


class TextPrompt(_Strict):
    """A text completion's prompt (or /tokenize's): a text, or token ids."""

    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in prompt)):
            return prompt
        raise ValueError("must be a string, or an array of token ids (one prompt per request)")


class ChatCompletionRequest(ChatPrompt, _GenerationRequest):
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None

    def length_param(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(TextPrompt, _GenerationRequest):
    pass


class DetokenizeRequest(_Strict):
    tokens: list[int]


# ---- responses: what the server sends (dumped with exclude_unset: a field given as None is sent as null, one
# never given is left out, as OpenAI leaves out a delta's absent parts) -------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's streamed shape (toolcalls.ToolCallParser)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
