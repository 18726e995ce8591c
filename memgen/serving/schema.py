"""Request bodies of the OpenAI API as pydantic models, and OpenAI's error body.

Field names and meanings are OpenAI's. Types and ranges are checked here (a violation is a
422); limits that depend on the model or the server (context, queue) are checked by the app.
Parameters memgen does not implement are refused with a 400 when set to anything but their
neutral value, rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import MemoryPolicy
from ..errors import ConfigError


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.status)


def error_body(message: str, kind: str, param: str | None, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class MemgenOptions(BaseModel):
    """The ``memgen`` extension object of a request: how this request uses latent memory."""

    model_config = ConfigDict(extra="forbid")

    memory: str | None = Field(None, description="off | always | trigger | random:P")
    max_insertions: int | None = Field(None, ge=0, le=1024)
    trigger_threshold: float | None = Field(None, ge=0)
    insert_at_prompt_end: bool | None = None
    sample_trigger: bool | None = None

    @field_validator("memory")
    @classmethod
    def _known_policy(cls, value):
        if value is not None:
            try:
                MemoryPolicy.parse(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields a server may not know

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: keep generating past EOS (benchmarks)
    memgen: MemgenOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def unsupported(self) -> str | None:
        """The first parameter set to a value memgen does not implement, if any."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a single string or token list is one prompt)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)
