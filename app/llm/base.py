"""The interface every LLM provider implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

MessageRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: MessageRole
    content: str


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    messages: Sequence[ChatMessage]
    model: str
    temperature: float = 0.0
    max_tokens: int = 2048


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished model call with its token accounting."""

    text: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    finish_reason: str = "stop"


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """A piece of streamed text. The last item of a stream is the ``Completion`` itself."""

    text: str


class LLMProvider(Protocol):
    """A chat-completion backend.

    Implementations raise only ``app.errors.LLMError`` subclasses, so that the worker
    can decide on retries from ``error.retryable`` alone.
    """

    name: str

    async def complete(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[StreamDelta | Completion]: ...

    async def aclose(self) -> None: ...
