"""Cached model responses, in this process or shared through Redis.

Only calls with temperature 0 are cached: with sampling, two identical requests are meant
to give different outputs. ``caching.disabled_roles`` turns caching off for some roles.
Keys cover the provider, model, parameters and every message; the key version in
``app.cache.base`` changes when this layout does.
"""

from __future__ import annotations

import hashlib

import orjson

from app.cache.base import CacheKind
from app.cache.service import Cache
from app.core.config import CachingSettings
from app.llm.base import Completion, CompletionRequest


class ResponseCache:
    def __init__(self, cache: Cache, settings: CachingSettings) -> None:
        self.cache = cache
        self.enabled = settings.enabled
        self.disabled_roles = frozenset(settings.disabled_roles)

    def cacheable(self, request: CompletionRequest, role: str = "") -> bool:
        return self.enabled and request.temperature == 0 and role not in self.disabled_roles

    async def get(self, provider: str, request: CompletionRequest) -> Completion | None:
        value = await self.cache.get(CacheKind.LLM_RESPONSE, cache_key(provider, request))
        if value is None:
            return None
        fields = orjson.loads(value)
        return Completion(**fields)

    async def put(self, provider: str, request: CompletionRequest, completion: Completion) -> None:
        value = orjson.dumps(
            {
                "text": completion.text,
                "provider": completion.provider,
                "model": completion.model,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "latency_ms": completion.latency_ms,
                "finish_reason": completion.finish_reason,
            }
        )
        await self.cache.set(CacheKind.LLM_RESPONSE, cache_key(provider, request), value)


def cache_key(provider: str, request: CompletionRequest) -> str:
    material = orjson.dumps(
        [
            provider,
            request.model,
            request.temperature,
            request.max_tokens,
            [[message.role, message.content] for message in request.messages],
        ]
    )
    return hashlib.sha256(material).hexdigest()
