"""Provider for servers that speak the OpenAI Chat Completions protocol.

Besides api.openai.com this covers vLLM, Ollama (base_url ``http://HOST:11434/v1``) and the
llama.cpp server, which all accept ``POST {base_url}/chat/completions``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.core.config import ProviderSettings
from app.errors import LLMResponseError, LLMServerError
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

DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOST = "api.openai.com"
STREAM_END = "[DONE]"


class OpenAICompatibleProvider:
    """Chat Completions client with one connection pool and retries inside each call."""

    def __init__(
        self, name: str, settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.url = endpoint_url(name, settings.base_url or DEFAULT_BASE_URL, "/chat/completions")

        # OpenAI's API reference marks max_tokens as deprecated, and its o-series models reject
        # it with HTTP 400 "Unsupported parameter". Other servers may only know max_tokens.
        is_openai = self.url.host == OPENAI_HOST
        self._token_limit_field = "max_completion_tokens" if is_openai else "max_tokens"

        # Ollama and llama.cpp servers need no key by default, so the header is optional.
        headers = {}
        api_key = settings.resolved_api_key()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
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
        choice = _first_choice(body, target)

        message = choice.get("message")
        if not isinstance(message, dict):
            raise _response_error(target, "choices[0] has no message object")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise _response_error(
                target, f"choices[0].message.content is {type(content).__name__}, not a string"
            )

        # A tool call or a refusal comes with a null content, which is an empty text here.
        text = content or ""
        prompt_tokens, completion_tokens = _token_counts(body.get("usage"), request, text)
        return Completion(
            text=text,
            provider=self.name,
            model=request.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            finish_reason=choice.get("finish_reason") or "stop",
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamDelta | Completion]:
        """Yield a StreamDelta per piece of text, then the finished Completion.

        Retries cover the call until the response headers arrive. A failure after that
        raises at once, because the caller may already have used part of the text.
        """
        started = time.perf_counter()
        target = self._target(request)
        payload = self._payload(request, stream=True)

        async def open_stream() -> httpx.Response:
            outgoing = self._client.build_request("POST", self.url, json=payload)
            return await self._client.send(outgoing, stream=True)

        response = await send_with_retries(open_stream, target)
        parts: list[str] = []
        usage: Any = None
        finish_reason: str | None = None
        ended = False
        try:
            async for data in iter_sse_data(response, target):
                if data.strip() == STREAM_END:
                    ended = True
                    break

                chunk = decode_json(data, target)
                _raise_stream_error(chunk, target)
                usage = chunk.get("usage") or usage
                for choice in _choices_of(chunk):
                    finish_reason = choice.get("finish_reason") or finish_reason
                    delta = choice.get("delta")
                    piece = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(piece, str) and piece:
                        parts.append(piece)
                        yield StreamDelta(text=piece)
        finally:
            await response.aclose()

        # A finish_reason is accepted in place of [DONE], in case a server omits it. A stream
        # with neither was cut short.
        if not ended and finish_reason is None:
            raise LLMServerError(
                f"{target.describe()} ended the stream without [DONE] or a finish_reason, so the "
                "text may be cut short; retry the call",
                provider=self.name,
                model=request.model,
            )

        text = "".join(parts)
        prompt_tokens, completion_tokens = _token_counts(usage, request, text)
        yield Completion(
            text=text,
            provider=self.name,
            model=request.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            finish_reason=finish_reason or "stop",
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _target(self, request: CompletionRequest) -> CallTarget:
        return CallTarget(provider=self.name, model=request.model, url=self.url, settings=self.settings)

    def _payload(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": message.role, "content": message.content} for message in request.messages],
            "temperature": request.temperature,
            self._token_limit_field: request.max_tokens,
        }
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload


def _first_choice(body: Any, target: CallTarget) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _response_error(target, f"the body is a JSON {type(body).__name__}, not an object")

    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _response_error(target, "the body has no choices")
    return choices[0]


def _choices_of(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    # The final usage chunk has an empty choices list, and a missing one is treated alike.
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice for choice in choices if isinstance(choice, dict)]


def _raise_stream_error(chunk: Any, target: CallTarget) -> None:
    """Raise LLMServerError for an error object that a server sends in place of a chunk."""
    if not isinstance(chunk, dict):
        raise _response_error(target, f"a stream chunk is a JSON {type(chunk).__name__}, not an object")
    if "error" in chunk or chunk.get("object") == "error":
        message = message_in_body(chunk) or "no message"
        raise LLMServerError(
            f"{target.describe()} sent an error in the stream: {message}; retry the call",
            provider=target.provider,
            model=target.model,
        )


def _token_counts(usage: Any, request: CompletionRequest, text: str) -> tuple[int, int]:
    if isinstance(usage, dict):
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        if isinstance(prompt_tokens, int) and isinstance(completion_tokens, int):
            return prompt_tokens, completion_tokens

    # The server reported no usage, so the counts are estimated from the text length
    # (about 4 characters per token). Cost and budget figures for this call are estimates too.
    prompt_tokens = sum(estimate_tokens(message.content) for message in request.messages)
    return prompt_tokens, estimate_tokens(text)


def _response_error(target: CallTarget, problem: str) -> LLMResponseError:
    return LLMResponseError(
        f"{target.describe()} returned a response that is not a chat completion: {problem}; "
        f"check that llm.providers.{target.provider}.base_url is an OpenAI-compatible /v1 endpoint",
        provider=target.provider,
        model=target.model,
    )
