"""OpenAICompatibleProvider against a local Chat Completions server.

The scripted server in scripted_server.py replaces the hosted OpenAI API, which cannot be
reached from the test machine. It runs on 127.0.0.1 and speaks the same protocol, so the
provider's HTTP, SSE, retry and error handling run for real.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.core.config import ProviderSettings
from app.errors import (
    ConfigError,
    LLMRateLimitError,
    LLMRequestError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
)
from app.llm.base import ChatMessage, Completion, CompletionRequest, StreamDelta
from app.llm.openai_compatible import OpenAICompatibleProvider
from tests.integration.llm.scripted_server import Reply, ScriptedServer, sse

MakeProvider = Callable[..., OpenAICompatibleProvider]

API_KEY = "sk-test-not-a-real-key"
REQUEST = CompletionRequest(
    messages=[ChatMessage("system", "You are terse."), ChatMessage("user", "Say hello.")],
    model="test-model",
    max_tokens=64,
)


def chat_body(text: str = "Hello!", usage: bool = True, finish_reason: str = "stop") -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    return body


def chunk(content: str | None = None, finish_reason: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    return sse(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
    )


USAGE_CHUNK = sse(
    {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}}
)
DONE = sse("[DONE]")


@pytest_asyncio.fixture
async def make_provider(server: ScriptedServer) -> AsyncIterator[Callable[..., OpenAICompatibleProvider]]:
    """Build providers pointed at the local server. Backoffs are tiny so retries take milliseconds."""
    created: list[OpenAICompatibleProvider] = []

    def make(**overrides: Any) -> OpenAICompatibleProvider:
        fields: dict[str, Any] = {
            "kind": "openai",
            "base_url": f"{server.url}/v1",
            "api_key": API_KEY,
            "timeout_seconds": 2.0,
            "max_retries": 2,
            "retry_backoff_seconds": 0.01,
            "max_retry_after_seconds": 0.05,
        }
        fields.update(overrides)
        provider = OpenAICompatibleProvider("local", ProviderSettings(**fields))
        created.append(provider)
        return provider

    yield make
    for provider in created:
        await provider.aclose()


async def collect(provider: OpenAICompatibleProvider) -> tuple[list[str], list[Completion]]:
    deltas: list[str] = []
    completions: list[Completion] = []
    async for item in provider.stream(REQUEST):
        if isinstance(item, StreamDelta):
            deltas.append(item.text)
        else:
            completions.append(item)
    return deltas, completions


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        record.delay_seconds for record in caplog.records if getattr(record, "action", None) == "llm.retry"
    ]


@pytest.mark.asyncio
async def test_complete_with_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=chat_body("Hello!")))

    completion = await make_provider().complete(REQUEST)

    assert completion.text == "Hello!"
    assert completion.provider == "local"
    assert completion.model == "test-model"
    assert completion.prompt_tokens == 12
    assert completion.completion_tokens == 3
    assert completion.finish_reason == "stop"
    assert completion.latency_ms > 0

    sent = server.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body["model"] == "test-model"
    assert sent.body["max_tokens"] == 64
    assert sent.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    assert "stream" not in sent.body


@pytest.mark.asyncio
async def test_complete_without_key(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=chat_body()))

    await make_provider(api_key=None).complete(REQUEST)

    assert "authorization" not in server.requests[0].headers


@pytest.mark.asyncio
async def test_complete_missing_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=chat_body("x" * 40, usage=False, finish_reason="length")))

    completion = await make_provider().complete(REQUEST)

    # At 4 characters per token, "You are terse." (14 characters) and "Say hello." (10) give 4 + 3.
    assert completion.prompt_tokens == 7
    assert completion.completion_tokens == 10
    assert completion.finish_reason == "length"


@pytest.mark.asyncio
async def test_stream_with_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[chunk("Hel"), chunk("lo"), chunk(finish_reason="stop"), USAGE_CHUNK, DONE]))

    deltas, completions = await collect(make_provider())

    assert deltas == ["Hel", "lo"]
    assert len(completions) == 1
    assert completions[0].text == "Hello"
    assert completions[0].prompt_tokens == 12
    assert completions[0].completion_tokens == 2
    assert completions[0].finish_reason == "stop"
    assert server.requests[0].body["stream"] is True
    assert server.requests[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.asyncio
async def test_stream_missing_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[chunk("abcdefgh"), chunk(finish_reason="stop"), DONE]))

    _, completions = await collect(make_provider())

    assert completions[0].prompt_tokens == 7
    assert completions[0].completion_tokens == 2


@pytest.mark.asyncio
async def test_stream_dropped_connection(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[chunk("partial")], drop_connection=True))
    deltas: list[str] = []

    with pytest.raises(LLMServerError) as caught:
        async for item in make_provider().stream(REQUEST):
            assert isinstance(item, StreamDelta)
            deltas.append(item.text)

    assert deltas == ["partial"]
    assert "/v1/chat/completions" in str(caught.value)
    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_stream_error_event(server: ScriptedServer, make_provider: MakeProvider) -> None:
    error = sse({"error": {"message": "engine crashed", "type": "server_error"}})
    server.script(Reply(events=[chunk("a"), error]))

    with pytest.raises(LLMServerError, match="engine crashed"):
        await collect(make_provider())


@pytest.mark.asyncio
async def test_stream_cut_before_done(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[chunk("a")]))

    with pytest.raises(LLMServerError, match="without \\[DONE\\]"):
        await collect(make_provider())


@pytest.mark.asyncio
async def test_stream_retries_429(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(status=429, body={"error": {"message": "slow down"}}),
        Reply(events=[chunk("ok"), chunk(finish_reason="stop"), DONE]),
    )

    deltas, completions = await collect(make_provider())

    assert deltas == ["ok"]
    assert completions[0].text == "ok"
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_retry_after_seconds(
    server: ScriptedServer, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(
        Reply(status=429, headers={"Retry-After": "0"}, body={"error": {"message": "slow down"}}),
        Reply(body=chat_body()),
    )
    caplog.set_level(logging.WARNING, logger="app.llm.retry")

    # Without the header the backoff would be about 5 s. Retry-After: 0 means no wait.
    completion = await make_provider(retry_backoff_seconds=5.0, max_retry_after_seconds=10.0).complete(
        REQUEST
    )

    assert completion.text == "Hello!"
    assert len(server.requests) == 2
    assert retry_delays(caplog) == [0.0]
    record = next(record for record in caplog.records if getattr(record, "action", None) == "llm.retry")
    assert record.provider == "local"
    assert record.model == "test-model"
    assert record.attempt == 2
    assert API_KEY not in record.getMessage()


@pytest.mark.asyncio
async def test_retry_after_date(
    server: ScriptedServer, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    past = format_datetime(datetime.now(UTC) - timedelta(minutes=1), usegmt=True)
    server.script(Reply(status=429, headers={"Retry-After": past}, body={}), Reply(body=chat_body()))
    caplog.set_level(logging.WARNING, logger="app.llm.retry")

    await make_provider(retry_backoff_seconds=5.0, max_retry_after_seconds=10.0).complete(REQUEST)

    assert retry_delays(caplog) == [0.0]


@pytest.mark.asyncio
async def test_retry_after_capped(
    server: ScriptedServer, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply(status=429, headers={"Retry-After": "3600"}, body={}), Reply(body=chat_body()))
    caplog.set_level(logging.WARNING, logger="app.llm.retry")

    await make_provider(max_retry_after_seconds=0.05).complete(REQUEST)

    assert retry_delays(caplog) == [0.05]


@pytest.mark.asyncio
async def test_429_forever(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(status=429, headers={"Retry-After": "0.01"}, body={"error": {"message": "quota exceeded"}})
    )

    with pytest.raises(LLMRateLimitError) as caught:
        await make_provider(max_retries=2).complete(REQUEST)

    assert caught.value.retry_after == 0.01
    assert caught.value.provider == "local"
    assert caught.value.model == "test-model"
    assert "gave up after 3 attempts" in str(caught.value)
    assert "quota exceeded" in str(caught.value)
    assert API_KEY not in str(caught.value)
    assert len(server.requests) == 3


@pytest.mark.asyncio
async def test_500_then_success(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(status=500, body={"error": {"message": "internal"}}), Reply(body=chat_body("recovered"))
    )

    completion = await make_provider().complete(REQUEST)

    assert completion.text == "recovered"
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_500_forever(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(status=503, body={"error": "model is loading"}))

    with pytest.raises(LLMServerError, match="HTTP 503: model is loading"):
        await make_provider(max_retries=1).complete(REQUEST)

    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_400_not_retried(server: ScriptedServer, make_provider: MakeProvider) -> None:
    message = "max_tokens is too large: 64000. This model supports at most 4096 completion tokens."
    server.script(Reply(status=400, body={"error": {"message": message, "type": "invalid_request_error"}}))

    with pytest.raises(LLMRequestError) as caught:
        await make_provider().complete(REQUEST)

    assert len(server.requests) == 1
    assert message in str(caught.value)
    assert "HTTP 400" in str(caught.value)
    assert f"{server.url}/v1/chat/completions" in str(caught.value)
    assert API_KEY not in str(caught.value)


@pytest.mark.asyncio
async def test_401_names_key_setting(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(status=401, body={"error": {"message": "Incorrect API key provided"}}))

    with pytest.raises(LLMRequestError, match="llm.providers.local.api_key"):
        await make_provider().complete(REQUEST)

    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_timeout(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=chat_body(), delay_seconds=5.0))

    with pytest.raises(LLMTimeoutError) as caught:
        await make_provider(timeout_seconds=0.2, max_retries=1).complete(REQUEST)

    assert "timeout_seconds" in str(caught.value)
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_connection_refused(make_provider: MakeProvider) -> None:
    # A port that was just bound and released has no listener, so the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = make_provider(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)

    with pytest.raises(LLMServerError) as caught:
        await provider.complete(REQUEST)

    assert "gave up after 2 attempts" in str(caught.value)
    assert "ConnectError" in str(caught.value)
    assert "llm.providers.local.base_url" in str(caught.value)


@pytest.mark.asyncio
async def test_malformed_json(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(raw='{"choices": [{"message": '))

    with pytest.raises(LLMResponseError, match="invalid JSON"):
        await make_provider().complete(REQUEST)

    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_missing_choices(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body={"id": "chatcmpl-1", "choices": []}))

    with pytest.raises(LLMResponseError, match="no choices"):
        await make_provider().complete(REQUEST)


@pytest.mark.asyncio
async def test_openai_host_token_field() -> None:
    # httpx.MockTransport returns the response in-process, so nothing is sent to api.openai.com.
    sent: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=chat_body())

    settings = ProviderSettings(kind="openai", api_key=API_KEY)
    provider = OpenAICompatibleProvider("openai", settings, transport=httpx.MockTransport(answer))
    try:
        await provider.complete(REQUEST)
    finally:
        await provider.aclose()

    assert sent[0]["max_completion_tokens"] == 64
    assert "max_tokens" not in sent[0]


def test_invalid_base_url() -> None:
    settings = ProviderSettings(kind="openai", base_url="localhost:11434/v1")

    with pytest.raises(ConfigError, match="llm.providers.ollama.base_url"):
        OpenAICompatibleProvider("ollama", settings)


@pytest.mark.asyncio
async def test_error_hides_url_credentials(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(status=400, body={"error": {"message": "bad request"}}))
    base_url = server.url.replace("http://", "http://user:url-secret@") + "/v1/?token=query-secret"

    with pytest.raises(LLMRequestError) as caught:
        await make_provider(base_url=base_url).complete(REQUEST)

    assert "url-secret" not in str(caught.value)
    assert "query-secret" not in str(caught.value)
    assert "/v1/chat/completions" in str(caught.value)
    assert server.requests[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("header", ["inf", "nan", "-inf"])
def test_retry_after_rejects_non_finite(header):
    from app.llm.retry import parse_retry_after

    assert parse_retry_after(header) is None
