"""The configured LLM providers, built once at start-up and looked up by name."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from app.core.config import ProviderSettings, Settings, read_secret_file
from app.errors import ConfigError
from app.llm.anthropic import AnthropicProvider
from app.llm.base import LLMProvider
from app.llm.openai_compatible import OpenAICompatibleProvider

logger = logging.getLogger(__name__)

OFFLINE = "offline"
HTTP_PROVIDER_CLASSES = {"openai": OpenAICompatibleProvider, "anthropic": AnthropicProvider}


class ProviderRegistry:
    """One provider per entry of ``llm.providers``, plus the built-in ``offline`` provider."""

    def __init__(
        self, providers: Mapping[str, LLMProvider], settings: Mapping[str, ProviderSettings]
    ) -> None:
        self._providers = dict(providers)
        self._settings = dict(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        """Build every configured provider.

        ``offline`` is always present. It uses settings.offline_latency_ms unless an entry
        named ``offline`` sets its own latency_ms. Raises ConfigError for an entry named
        ``offline`` of another kind, or for an api_key_file that cannot be read.
        """
        configured = dict(settings.llm.providers)
        offline_entry = configured.get(OFFLINE)
        if offline_entry is not None and offline_entry.kind != OFFLINE:
            raise ConfigError(
                f"llm.providers.offline: kind is {offline_entry.kind!r}, but the name 'offline' is "
                "reserved for the built-in offline provider; rename the entry or set its kind to 'offline'"
            )

        providers: dict[str, LLMProvider] = {}
        if offline_entry is None:
            providers[OFFLINE] = _offline_provider(settings.offline_latency_ms)
        for name, entry in configured.items():
            providers[name] = _build(name, entry)

        logger.info(
            "LLM providers ready: %s",
            ", ".join(f"{name} ({_kind(configured.get(name))})" for name in sorted(providers)),
            extra={"action": "llm.providers_ready", "providers": sorted(providers)},
        )
        return cls(providers, configured)

    @property
    def names(self) -> list[str]:
        return sorted(self._providers)

    def get(self, name: str) -> LLMProvider:
        """Return the provider called ``name``, raising ConfigError if none is configured."""
        provider = self._providers.get(name)
        if provider is None:
            raise ConfigError(
                f"unknown LLM provider {name!r}; accepted names: {', '.join(self.names)} "
                "(add it under llm.providers)"
            )
        return provider

    def settings_for(self, name: str) -> ProviderSettings | None:
        """Return the settings of a configured provider, or None for the built-in offline one."""
        return self._settings.get(name)

    async def aclose(self) -> None:
        """Close every provider, logging and skipping any that fails to close."""
        for name, provider in self._providers.items():
            try:
                await provider.aclose()
            except Exception as exc:  # noqa: BLE001 - one broken provider must not keep the others open
                logger.error(
                    "closing LLM provider %s failed: %s: %s",
                    name,
                    type(exc).__name__,
                    exc,
                    extra={"action": "llm.close_failed", "provider": name},
                )


def _build(name: str, entry: ProviderSettings) -> LLMProvider:
    if entry.kind == OFFLINE:
        return _offline_provider(entry.latency_ms)

    # Read the key file here first, so that an unreadable one is reported with the
    # provider's name; the client reads it again through resolved_api_key().
    if entry.api_key is None and entry.api_key_file is not None:
        read_secret_file(entry.api_key_file, f"llm.providers.{name}.api_key_file")
    return HTTP_PROVIDER_CLASSES[entry.kind](name, entry)


def _offline_provider(latency_ms: float) -> LLMProvider:
    from app.llm.offline import OfflineProvider

    return OfflineProvider(latency_ms=latency_ms)


def _kind(entry: ProviderSettings | None) -> str:
    return entry.kind if entry is not None else OFFLINE
