"""HTTP error mapping, retries and stream reading shared by the HTTP providers.

``send_with_retries`` sends one model call and retries it on HTTP 429, HTTP 5xx (including
Anthropic's 529 "overloaded"), connection errors and timeouts. It waits for the server's
``Retry-After`` when there is one, otherwise for an exponential backoff. Every other
failure becomes the matching ``app.errors.LLMError`` at once. ``decode_json`` and
``iter_sse_data`` read a successful response with the same error mapping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from app.core.config import ProviderSettings
from app.errors import (
    ConfigError,
    LLMError,
    LLMRateLimitError,
    LLMRequestError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
)

logger = logging.getLogger(__name__)

# Retrying these can succeed. A 4xx other than 429 or a malformed body would fail again.
RETRIED_ERRORS = (LLMRateLimitError, LLMServerError, LLMTimeoutError)

MAX_ERROR_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class CallTarget:
    """The provider, model and URL of one call, named in every error and log line."""

    provider: str
    model: str
    url: httpx.URL
    settings: ProviderSettings

    def describe(self) -> str:
        # User info and query are dropped because a base_url may carry credentials there.
        shown = self.url.copy_with(username=None, password=None, query=None)
        return f"provider {self.provider!r}, model {self.model!r} at {shown}"


def endpoint_url(provider: str, base_url: str, path: str) -> httpx.URL:
    """Append ``path`` to the path of ``base_url``, raising ConfigError unless it is an http(s) URL.

    A query in ``base_url``, such as an API version, is kept.
    """
    try:
        base = httpx.URL(base_url)
        url = base.copy_with(path=base.path.rstrip("/") + path)
    except httpx.InvalidURL as exc:
        url = None
        problem = str(exc)
    else:
        problem = "it must start with http:// or https://"

    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"llm.providers.{provider}.base_url: invalid URL {base_url!r}: {problem}; "
            "write it like http://127.0.0.1:11434/v1"
        )
    return url


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Convert a ``Retry-After`` header to seconds, or None if it is missing or invalid.

    RFC 9110 allows a number of seconds or an HTTP date. A date in the past gives 0.
    """
    if value is None or not value.strip():
        return None

    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # "inf" and "nan" parse as floats but are not delays.
        return max(0.0, seconds) if math.isfinite(seconds) else None

    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (moment - now).total_seconds())


def backoff_seconds(attempt: int, settings: ProviderSettings) -> float:
    """Return the wait before retry number ``attempt`` (1 for the first retry).

    The wait is a random value between half and all of retry_backoff_seconds × 2^(attempt-1),
    so workers that failed together do not retry together. It never exceeds
    max_retry_after_seconds, the longest single wait the settings allow.
    """
    ceiling = settings.retry_backoff_seconds * 2 ** (attempt - 1)
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    return min(delay, settings.max_retry_after_seconds)


def error_message(response: httpx.Response) -> str:
    """Extract the server's error message from a response body that has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    message = message_in_body(body) or response.text or "(empty body)"
    return message[:MAX_ERROR_MESSAGE_CHARS]


def message_in_body(body: Any) -> str | None:
    """Return the error message of a decoded error body, or None if it has none.

    OpenAI and Anthropic send ``{"error": {"message": ...}}``. Some compatible servers send
    ``{"error": "..."}`` or ``{"message": ...}`` instead, and those are read too.
    """
    if not isinstance(body, dict):
        return None

    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message")
    elif isinstance(error, str):
        message = error
    else:
        message = body.get("message")
    return message if isinstance(message, str) and message else None


def status_error(response: httpx.Response, target: CallTarget) -> LLMError:
    """Map a non-2xx response whose body has been read to the matching LLMError."""
    status = response.status_code
    message = error_message(response)
    where = target.describe()
    names = {"provider": target.provider, "model": target.model}

    if status == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        wait = f"the server asks to wait {retry_after:g}s; " if retry_after is not None else ""
        return LLMRateLimitError(
            f"{where} is rate limited (HTTP 429): {message}; {wait}lower worker.concurrency "
            "or raise the account's rate limit",
            retry_after=retry_after,
            **names,
        )
    if status >= 500:
        return LLMServerError(
            f"{where} failed with HTTP {status}: {message}; check that the server is up and has capacity",
            **names,
        )
    hint = _request_hint(status, target)
    return LLMRequestError(f"{where} rejected the request with HTTP {status}: {message}; {hint}", **names)


def _request_hint(status: int, target: CallTarget) -> str:
    key = f"llm.providers.{target.provider}"
    if status in (401, 403):
        return f"check {key}.api_key or {key}.api_key_file"
    if status == 404:
        return f"check {key}.base_url and that the model {target.model!r} exists on that server"
    return "check the model name, max_tokens and the messages sent"


def transport_error(exc: httpx.HTTPError, target: CallTarget) -> LLMError:
    """Map an httpx timeout or connection error to LLMTimeoutError or LLMServerError."""
    where = target.describe()
    names = {"provider": target.provider, "model": target.model}
    key = f"llm.providers.{target.provider}"

    if isinstance(exc, httpx.TimeoutException):
        return LLMTimeoutError(
            f"{where} timed out after {target.settings.timeout_seconds}s ({type(exc).__name__}); "
            f"raise {key}.timeout_seconds or request fewer max_tokens",
            **names,
        )
    return LLMServerError(
        f"{where} failed: {type(exc).__name__}: {str(exc) or 'connection closed'}; check {key}.base_url "
        "and that the server is running",
        **names,
    )


async def send_with_retries(
    send: Callable[[], Awaitable[httpx.Response]], target: CallTarget
) -> httpx.Response:
    """Call ``send`` until it returns a 2xx response, retrying what may succeed later.

    For a streamed response only the status line and headers have arrived when this
    returns, and the caller must close it. A failure after that point is not retried here.
    When settings.max_retries retries have failed, the last error is raised again with the
    number of attempts in its message.
    """
    attempts = target.settings.max_retries + 1
    attempt = 1
    while True:
        outcome = await _send_once(send, target)
        if isinstance(outcome, httpx.Response):
            return outcome

        error, retry_after = outcome
        if not isinstance(error, RETRIED_ERRORS):
            raise error
        if attempt == attempts:
            raise _gave_up(error, attempts) from error

        delay = _retry_delay(retry_after, attempt, target.settings)
        attempt += 1
        logger.warning(
            "retrying %s after %s (attempt %d of %d, waiting %.2fs)",
            target.describe(),
            type(error).__name__,
            attempt,
            attempts,
            delay,
            extra={
                "action": "llm.retry",
                "provider": target.provider,
                "model": target.model,
                "attempt": attempt,
                "delay_seconds": delay,
                "error": str(error),
            },
        )
        await asyncio.sleep(delay)


async def _send_once(
    send: Callable[[], Awaitable[httpx.Response]], target: CallTarget
) -> httpx.Response | tuple[LLMError, float | None]:
    """Send once and return the 2xx response, or the error with the server's Retry-After."""
    try:
        response = await send()
    except httpx.HTTPError as exc:
        return transport_error(exc, target), None

    if response.is_success:
        return response

    # A streamed error response has an unread body and keeps its pooled connection until closed.
    try:
        await response.aread()
    except httpx.HTTPError as exc:
        return transport_error(exc, target), None
    finally:
        await response.aclose()

    # A 503 may carry Retry-After as well as a 429, and both are honoured.
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    return status_error(response, target), retry_after


def _retry_delay(retry_after: float | None, attempt: int, settings: ProviderSettings) -> float:
    if retry_after is None:
        return backoff_seconds(attempt, settings)
    return min(retry_after, settings.max_retry_after_seconds)


def _gave_up(error: LLMError, attempts: int) -> LLMError:
    message = f"gave up after {attempts} attempts: {error}"
    if isinstance(error, LLMRateLimitError):
        return LLMRateLimitError(
            message, provider=error.provider, model=error.model, retry_after=error.retry_after
        )
    return type(error)(message, provider=error.provider, model=error.model)


def decode_json(text: str, target: CallTarget) -> Any:
    """Decode a successful response body, raising LLMResponseError if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LLMResponseError(
            f"{target.describe()} returned invalid JSON ({exc}): {text[:200]!r}; check that "
            f"llm.providers.{target.provider}.base_url points to a server of kind "
            f"{target.settings.kind!r}",
            provider=target.provider,
            model=target.model,
        ) from exc


async def iter_sse_data(response: httpx.Response, target: CallTarget) -> AsyncIterator[str]:
    """Yield the ``data:`` field of each server-sent event in a streamed response.

    Both APIs send one ``data:`` line per event, so multi-line data fields are not joined.
    Other fields such as ``event:`` are skipped because the JSON data repeats the event type.
    A dropped connection or a read timeout raises LLMServerError or LLMTimeoutError.
    """
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                yield line[5:].removeprefix(" ")
    except httpx.HTTPError as exc:
        raise transport_error(exc, target) from exc
