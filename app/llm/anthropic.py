"""Provider for the Anthropic Messages API (``POST {base_url}/v1/messages``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.core.config import ProviderSettings
from app.errors import LLMError, LLMRateLimitError, LLMRequestError, LLMResponseError, LLMServerError
from app.llm.base import Completion, CompletionRequest, StreamDelta
from app.llm.pricing import estimate_tokens
from app.llm.retry import (
    CallTarget,
    decode_json,
    endpoint_url,
    iter_sse_data,
    message_in_body,
    send_with_retries,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"

# Anthropic's stop reasons in the Chat Completions vocabulary that Completion uses.
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}

# Error types of an ``error`` stream event that retrying cannot fix.
REQUEST_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
    }
)


@dataclass(slots=True)
class _StreamState:
    parts: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    stop_reason: str | None = None
    stopped: bool = False


class AnthropicProvider:
    """Messages API client with one connection pool and retries inside each call."""

    def __init__(
        self, name: str, settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.url = endpoint_url(name, settings.base_url or DEFAULT_BASE_URL, "/v1/messages")

        # A proxy in front of the API may need no key, so the header is optional.
        headers = {"anthropic-version": API_VERSION}
        api_key = settings.resolved_api_key()
        if api_key:
            headers["x-api-key"] = api_key
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(settings.timeout_seconds), transport=transport
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        """Send one non-streaming call and return the finished completion."""
        started = time.perf_counter()
        target = self._target(request)
        payload = self._payload(request, stream=False)

        response = await send_with_retries(lambda: self._client.post(self.url, json=payload), target)
        body = decode_json(response.text, target)
        text = _text_of(body, target)

        usage = _mapping(body.get("usage"))
        return self._completion(
            request,
            text,
            usage.get("input_tokens"),
            usage.get("output_tokens"),
            body.get("stop_reason"),
            started,
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamDelta | Completion]:
        """Yield a StreamDelta per piece of text, then the finished Completion.

        Retries cover the call until the response headers arrive. A failure after that,
        including an ``error`` event, raises at once because the caller may already have
        used part of the text.
        """
        started = time.perf_counter()
        target = self._target(request)
        payload = self._payload(request, stream=True)

        async def open_stream() -> httpx.Response:
            outgoing = self._client.build_request("POST", self.url, json=payload)
            return await self._client.send(outgoing, stream=True)

        response = await send_with_retries(open_stream, target)
        state = _StreamState()
        try:
            async for data in iter_sse_data(response, target):
                piece = _apply_event(decode_json(data, target), state, target)
                if piece:
                    yield StreamDelta(text=piece)
                if state.stopped:
                    break
        finally:
            await response.aclose()

        if not state.stopped:
            raise LLMServerError(
                f"{target.describe()} ended the stream without message_stop, so the text may be "
                "cut short; retry the call",
                provider=self.name,
                model=request.model,
            )
        text = "".join(state.parts)
        yield self._completion(
            request, text, state.input_tokens, state.output_tokens, state.stop_reason, started
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _target(self, request: CompletionRequest) -> CallTarget:
        return CallTarget(provider=self.name, model=request.model, url=self.url, settings=self.settings)

    def _payload(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        # The Messages API takes the system prompt as a top-level field, not as a message.
        system = "\n\n".join(message.content for message in request.messages if message.role == "system")
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": [
                {"role": message.role, "content": message.content}
                for message in request.messages
                if message.role != "system"
            ],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if system:
            payload["system"] = system
        if stream:
            payload["stream"] = True
        return payload

    def _completion(
        self,
        request: CompletionRequest,
        text: str,
        input_tokens: Any,
        output_tokens: Any,
        stop_reason: Any,
        started: float,
    ) -> Completion:
        # The API always reports usage. A proxy may strip it, and then the counts are
        # estimated from the text length (about 4 characters per token).
        if not isinstance(input_tokens, int):
            input_tokens = sum(estimate_tokens(message.content) for message in request.messages)
        if not isinstance(output_tokens, int):
            output_tokens = estimate_tokens(text)

        reason = stop_reason if isinstance(stop_reason, str) else "end_turn"
        return Completion(
            text=text,
            provider=self.name,
            model=request.model,
            prompt_tokens=input_tokens,
            completion_tokens=output_tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            finish_reason=FINISH_REASONS.get(reason, reason),
        )


def _text_of(body: Any, target: CallTarget) -> str:
    if not isinstance(body, dict):
        raise _response_error(target, f"the body is a JSON {type(body).__name__}, not an object")

    content = body.get("content")
    if not isinstance(content, list):
        raise _response_error(target, "the body has no content list")
    # Only text blocks are read. Tool-use blocks are not requested, so none should arrive.
    return "".join(
        block["text"]
        for block in content
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
    )


def _apply_event(event: Any, state: _StreamState, target: CallTarget) -> str:
    """Record one stream event in ``state`` and return its new text, if any."""
    if not isinstance(event, dict):
        raise _response_error(target, f"a stream event is a JSON {type(event).__name__}, not an object")

    kind = event.get("type")
    if kind == "error":
        raise _stream_error(event, target)
    if kind == "message_start":
        usage = _mapping(_mapping(event.get("message")).get("usage"))
        state.input_tokens = usage.get("input_tokens", state.input_tokens)
        state.output_tokens = usage.get("output_tokens", state.output_tokens)
    elif kind == "message_delta":
        # message_delta carries the cumulative output token count, not an increment.
        state.output_tokens = _mapping(event.get("usage")).get("output_tokens", state.output_tokens)
        state.stop_reason = _mapping(event.get("delta")).get("stop_reason") or state.stop_reason
    elif kind == "message_stop":
        state.stopped = True
    elif kind == "content_block_delta":
        delta = _mapping(event.get("delta"))
        if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            state.parts.append(delta["text"])
            return delta["text"]
    # ping, content_block_start and content_block_stop carry nothing that is kept.
    return ""


def _stream_error(event: dict[str, Any], target: CallTarget) -> LLMError:
    error_type = _mapping(event.get("error")).get("type") or "unknown_error"
    detail = message_in_body(event) or "no message"
    message = f"{target.describe()} sent an error event ({error_type}) in the stream: {detail}"
    names = {"provider": target.provider, "model": target.model}

    if error_type == "rate_limit_error":
        return LLMRateLimitError(
            f"{message}; lower worker.concurrency or raise the account's rate limit", **names
        )
    if error_type in REQUEST_ERROR_TYPES:
        return LLMRequestError(f"{message}; check the model name, max_tokens and the messages sent", **names)
    # overloaded_error, api_error and unknown types are server-side, so a retry may succeed.
    return LLMServerError(f"{message}; retry the call later", **names)


def _mapping(value: Any) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object, else an empty one, so that a field of the wrong
    type reads as missing instead of raising AttributeError."""
    return value if isinstance(value, dict) else {}


def _response_error(target: CallTarget, problem: str) -> LLMResponseError:
    return LLMResponseError(
        f"{target.describe()} returned a response that is not a Messages API message: {problem}; "
        f"check that llm.providers.{target.provider}.base_url is the API root, without /v1",
        provider=target.provider,
        model=target.model,
    )
