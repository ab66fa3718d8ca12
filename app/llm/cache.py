"""An in-process cache of deterministic model responses.

Only calls with temperature 0 are cached: with sampling, two identical requests are meant
to give different answers. Keys cover the provider, model, parameters and every message,
and carry a version so that a change of the key layout never reads an old entry.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict

from app.core.config import CachingSettings
from app.llm.base import Completion, CompletionRequest

KEY_VERSION = "llm-v1"


class ResponseCache:
    """A bounded LRU map from request to completion, with a time to live per entry."""

    def __init__(self, settings: CachingSettings) -> None:
        self.enabled = settings.enabled
        self.ttl_seconds = settings.ttl
        self.max_entries = settings.max_entries
        self._entries: OrderedDict[str, tuple[float, Completion]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def cacheable(self, request: CompletionRequest) -> bool:
        return self.enabled and request.temperature == 0

    def get(self, provider: str, request: CompletionRequest) -> Completion | None:
        key = cache_key(provider, request)
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, provider: str, request: CompletionRequest, completion: Completion) -> None:
        key = cache_key(provider, request)
        self._entries[key] = (time.monotonic() + self.ttl_seconds, completion)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def cache_key(provider: str, request: CompletionRequest) -> str:
    material = json.dumps(
        [
            KEY_VERSION,
            provider,
            request.model,
            request.temperature,
            request.max_tokens,
            [[message.role, message.content] for message in request.messages],
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(material.encode()).hexdigest()
