"""Token counts and their price in US dollars."""

from __future__ import annotations

import math

from app.core.config import ProviderSettings

TOKENS_PER_PRICE_UNIT = 1_000_000

# A common rule of thumb for English text with BPE tokenizers. It is only an estimate, and
# code or other languages can have far fewer characters per token.
CHARS_PER_TOKEN_ESTIMATE = 4


def estimate_tokens(text: str) -> int:
    """Estimate the token count of ``text`` for servers that report no usage."""
    if not text:
        return 0
    return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE)


def cost_usd(
    settings: ProviderSettings | None, model: str, prompt_tokens: int, completion_tokens: int
) -> float:
    """Return the price of one call in USD from the provider's configured prices.

    ``settings.prices`` maps the exact model name to (input, output) USD per million
    tokens. The cost is 0.0 when the provider or the model has no configured price.
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError(
            f"token counts must not be negative, got prompt_tokens={prompt_tokens} and "
            f"completion_tokens={completion_tokens} for model {model!r}"
        )
    if settings is None or model not in settings.prices:
        return 0.0

    input_price, output_price = settings.prices[model]
    return (prompt_tokens * input_price + completion_tokens * output_price) / TOKENS_PER_PRICE_UNIT
