"""AnthropicProvider against a local Messages API server.

The scripted server in scripted_server.py replaces the hosted Anthropic API, which cannot be
reached from the test machine. It runs on 127.0.0.1 and speaks the same protocol, so the
provider's HTTP, SSE, retry and error handling run for real.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from app.core.config import ProviderSettings
from app.errors import LLMRateLimitError, LLMRequestError, LLMResponseError, LLMServerError, LLMTimeoutError
from app.llm.anthropic import AnthropicProvider
from app.llm.base import ChatMessage, Completion, CompletionRequest, StreamDelta
from tests.integration.llm.scripted_server import Reply, ScriptedServer, sse

MakeProvider = Callable[..., AnthropicProvider]

API_KEY = "sk-ant-test-not-a-real-key"
REQUEST = CompletionRequest(
    messages=[
        ChatMessage("system", "You are terse."),
        ChatMessage("system", "Answer in English."),
        ChatMessage("user", "Say hello."),
    ],
    model="claude-test",
    temperature=0.5,
    max_tokens=64,
)


def message_body(text: str = "Hello!", usage: bool = True, stop_reason: str = "end_turn") -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
    }
    if usage:
        body["usage"] = {"input_tokens": 21, "output_tokens": 4}
    return body


def event(data: dict[str, Any]) -> str:
    return sse(data, event=data["type"])


MESSAGE_START = event(
    {
        "type": "message_start",
        "message": {"id": "msg_1", "content": [], "usage": {"input_tokens": 21, "output_tokens": 1}},
    }
)
BLOCK_START = event(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
PING = event({"type": "ping"})
BLOCK_STOP = event({"type": "content_block_stop", "index": 0})
MESSAGE_DELTA = event(
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}
)
MESSAGE_STOP = event({"type": "message_stop"})


def text_delta(text: str) -> str:
    return event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


@pytest_asyncio.fixture
async def make_provider(server: ScriptedServer) -> AsyncIterator[Callable[..., AnthropicProvider]]:
    """Build providers pointed at the local server. Backoffs are tiny so retries take milliseconds."""
    created: list[AnthropicProvider] = []

    def make(**overrides: Any) -> AnthropicProvider:
        fields: dict[str, Any] = {
            "kind": "anthropic",
            "base_url": server.url,
            "api_key": API_KEY,
            "timeout_seconds": 2.0,
            "max_retries": 2,
            "retry_backoff_seconds": 0.01,
            "max_retry_after_seconds": 0.05,
        }
        fields.update(overrides)
        provider = AnthropicProvider("claude", ProviderSettings(**fields))
        created.append(provider)
        return provider

    yield make
    for provider in created:
        await provider.aclose()


async def collect(provider: AnthropicProvider) -> tuple[list[str], list[Completion]]:
    deltas: list[str] = []
    completions: list[Completion] = []
    async for item in provider.stream(REQUEST):
        if isinstance(item, StreamDelta):
            deltas.append(item.text)
        else:
            completions.append(item)
    return deltas, completions


@pytest.mark.asyncio
async def test_complete_with_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=message_body("Hello!")))

    completion = await make_provider().complete(REQUEST)

    assert completion.text == "Hello!"
    assert completion.provider == "claude"
    assert completion.model == "claude-test"
    assert completion.prompt_tokens == 21
    assert completion.completion_tokens == 4
    assert completion.finish_reason == "stop"
    assert completion.latency_ms > 0


@pytest.mark.asyncio
async def test_request_format(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=message_body()))

    await make_provider().complete(REQUEST)

    sent = server.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body["system"] == "You are terse.\n\nAnswer in English."
    assert sent.body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert sent.body["model"] == "claude-test"
    assert sent.body["max_tokens"] == 64
    assert sent.body["temperature"] == 0.5
    assert "stream" not in sent.body


@pytest.mark.asyncio
async def test_complete_without_system(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=message_body()))
    request = CompletionRequest(messages=[ChatMessage("user", "Hi")], model="claude-test")

    await make_provider().complete(request)

    assert "system" not in server.requests[0].body


@pytest.mark.asyncio
async def test_complete_missing_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=message_body("x" * 40, usage=False, stop_reason="max_tokens")))

    completion = await make_provider().complete(REQUEST)

    # At 4 characters per token, the three messages of 14, 18 and 10 characters give 4 + 5 + 3.
    assert completion.prompt_tokens == 12
    assert completion.completion_tokens == 10
    assert completion.finish_reason == "length"


@pytest.mark.asyncio
async def test_complete_joins_text_blocks(server: ScriptedServer, make_provider: MakeProvider) -> None:
    body = message_body()
    body["content"] = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    server.script(Reply(body=body))

    completion = await make_provider().complete(REQUEST)

    assert completion.text == "Hello"


@pytest.mark.asyncio
async def test_stream_with_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    events = [
        MESSAGE_START,
        BLOCK_START,
        PING,
        text_delta("Hel"),
        text_delta("lo"),
        BLOCK_STOP,
        MESSAGE_DELTA,
        MESSAGE_STOP,
    ]
    server.script(Reply(events=events))

    deltas, completions = await collect(make_provider())

    assert deltas == ["Hel", "lo"]
    assert len(completions) == 1
    assert completions[0].text == "Hello"
    assert completions[0].prompt_tokens == 21
    assert completions[0].completion_tokens == 5
    assert completions[0].finish_reason == "stop"
    assert server.requests[0].body["stream"] is True


@pytest.mark.asyncio
async def test_stream_missing_usage(server: ScriptedServer, make_provider: MakeProvider) -> None:
    start = event({"type": "message_start", "message": {"id": "msg_1", "content": []}})
    server.script(Reply(events=[start, text_delta("abcdefgh"), MESSAGE_STOP]))

    _, completions = await collect(make_provider())

    assert completions[0].prompt_tokens == 12
    assert completions[0].completion_tokens == 2


@pytest.mark.asyncio
async def test_stream_error_event(server: ScriptedServer, make_provider: MakeProvider) -> None:
    overloaded = event(error_body("overloaded_error", "Overloaded"))
    server.script(Reply(events=[MESSAGE_START, BLOCK_START, text_delta("par"), overloaded]))
    deltas: list[str] = []

    with pytest.raises(LLMServerError) as caught:
        async for item in make_provider().stream(REQUEST):
            assert isinstance(item, StreamDelta)
            deltas.append(item.text)

    assert deltas == ["par"]
    assert "overloaded_error" in str(caught.value)
    assert "Overloaded" in str(caught.value)
    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_stream_rate_limit_event(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[MESSAGE_START, event(error_body("rate_limit_error", "Too many tokens"))]))

    with pytest.raises(LLMRateLimitError, match="Too many tokens"):
        await collect(make_provider())


@pytest.mark.asyncio
async def test_stream_dropped_connection(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[MESSAGE_START, BLOCK_START, text_delta("par")], drop_connection=True))

    with pytest.raises(LLMServerError) as caught:
        await collect(make_provider())

    assert "/v1/messages" in str(caught.value)
    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_stream_cut_before_stop(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(events=[MESSAGE_START, text_delta("par")]))

    with pytest.raises(LLMServerError, match="without message_stop"):
        await collect(make_provider())


@pytest.mark.asyncio
async def test_stream_retries_529(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(status=529, body=error_body("overloaded_error", "Overloaded")),
        Reply(events=[MESSAGE_START, text_delta("ok"), MESSAGE_DELTA, MESSAGE_STOP]),
    )

    deltas, completions = await collect(make_provider())

    assert deltas == ["ok"]
    assert completions[0].text == "ok"
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_529_then_success(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(status=529, body=error_body("overloaded_error", "Overloaded")),
        Reply(body=message_body("later")),
    )

    completion = await make_provider().complete(REQUEST)

    assert completion.text == "later"
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_500_then_success(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(status=500, body=error_body("api_error", "Internal")), Reply(body=message_body("recovered"))
    )

    completion = await make_provider().complete(REQUEST)

    assert completion.text == "recovered"
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_429_then_success(
    server: ScriptedServer, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    limited = Reply(
        status=429, headers={"retry-after": "0"}, body=error_body("rate_limit_error", "Rate limited")
    )
    server.script(limited, Reply(body=message_body()))
    caplog.set_level(logging.WARNING, logger="app.llm.retry")

    # Without the header the backoff would be about 5 s. retry-after: 0 means no wait.
    completion = await make_provider(retry_backoff_seconds=5.0, max_retry_after_seconds=10.0).complete(
        REQUEST
    )

    assert completion.text == "Hello!"
    assert len(server.requests) == 2
    retries = [record for record in caplog.records if getattr(record, "action", None) == "llm.retry"]
    assert [record.delay_seconds for record in retries] == [0.0]
    assert retries[0].provider == "claude"


@pytest.mark.asyncio
async def test_429_forever(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(
        Reply(
            status=429, headers={"retry-after": "0.02"}, body=error_body("rate_limit_error", "Rate limited")
        )
    )

    with pytest.raises(LLMRateLimitError) as caught:
        await make_provider(max_retries=1).complete(REQUEST)

    assert caught.value.retry_after == 0.02
    assert "gave up after 2 attempts" in str(caught.value)
    assert API_KEY not in str(caught.value)
    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_400_not_retried(server: ScriptedServer, make_provider: MakeProvider) -> None:
    message = "messages: roles must alternate between user and assistant"
    server.script(Reply(status=400, body=error_body("invalid_request_error", message)))

    with pytest.raises(LLMRequestError) as caught:
        await make_provider().complete(REQUEST)

    assert len(server.requests) == 1
    assert message in str(caught.value)
    assert f"{server.url}/v1/messages" in str(caught.value)
    assert "claude-test" in str(caught.value)
    assert API_KEY not in str(caught.value)


@pytest.mark.asyncio
async def test_timeout(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body=message_body(), delay_seconds=5.0))

    with pytest.raises(LLMTimeoutError, match="timeout_seconds"):
        await make_provider(timeout_seconds=0.2, max_retries=0).complete(REQUEST)

    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_malformed_json(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(raw="<html>502 Bad Gateway</html>"))

    with pytest.raises(LLMResponseError, match="invalid JSON"):
        await make_provider().complete(REQUEST)

    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_missing_content(server: ScriptedServer, make_provider: MakeProvider) -> None:
    server.script(Reply(body={"type": "message", "id": "msg_1"}))

    with pytest.raises(LLMResponseError, match="no content list"):
        await make_provider().complete(REQUEST)
