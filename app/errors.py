"""Exceptions raised by the service.

Every error the service raises on purpose derives from ``TorontoAIError``::

    TorontoAIError
    ├── ConfigError            invalid or unsafe configuration, found at start-up
    ├── NotFoundError          a project, task or team id that does not exist
    ├── ConflictError          a request that the current state does not allow
    ├── SchemaVersionError     the database schema is not the one this code expects
    ├── DatabaseUnavailableError  the database cannot be reached or refuses the connection
    ├── PlanValidationError    a plan that names unknown roles, has cycles or is too large
    ├── InvalidInputError      a name or value that breaks a documented rule, from a CLI or library call
    ├── DocumentError          a document that is empty, binary, too large or not UTF-8
    ├── EmbeddingError         the embedding model could not be loaded or called
    ├── VectorStoreError       a vector-store layout that cannot serve the request
    │   └── VectorStoreUnavailableError  a Chroma server that cannot be reached
    └── LLMError               a model call that failed
        ├── LLMTimeoutError        no response within the configured timeout
        ├── LLMRateLimitError      HTTP 429; carries the server's Retry-After
        ├── LLMServerError         HTTP 5xx or a dropped connection
        ├── LLMRequestError        HTTP 4xx other than 429: retrying cannot help
        └── LLMResponseError       a response that does not follow the protocol

Third-party errors are mapped to the most specific of these with ``raise ... from exc``.
"""

from __future__ import annotations


class TorontoAIError(Exception):
    """Root of every error raised by the service."""


class ConfigError(TorontoAIError):
    """Invalid or unsafe configuration, reported before the process serves anything."""


class NotFoundError(TorontoAIError):
    """A requested resource does not exist."""


class ConflictError(TorontoAIError):
    """A request that the resource's current state does not allow."""


class SchemaVersionError(TorontoAIError):
    """The database schema is older or newer than this code understands."""


class DatabaseUnavailableError(TorontoAIError):
    """The database cannot be reached, or refused the connection or a statement at start-up."""


class PlanValidationError(TorontoAIError):
    """A plan produced by the project manager is not a valid task graph."""


class InvalidInputError(TorontoAIError, ValueError):
    """A name or value that breaks a documented rule; the message names the rule."""


class DocumentError(TorontoAIError, ValueError):
    """A document that cannot be ingested as given; the message says how to fix it."""


class EmbeddingError(TorontoAIError):
    """The embedding model could not be loaded or did not return vectors."""


class VectorStoreError(TorontoAIError):
    """The vector store cannot serve a request as its layout stands; the message says what to run."""


class VectorStoreUnavailableError(VectorStoreError):
    """A Chroma server did not answer after retries; the message names its host:port."""


class LLMError(TorontoAIError):
    """A model call failed. ``retryable`` says whether the same call may succeed later."""

    retryable = False

    def __init__(self, message: str, *, provider: str = "", model: str = "") -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model


class LLMTimeoutError(LLMError):
    retryable = True


class LLMRateLimitError(LLMError):
    retryable = True

    def __init__(
        self, message: str, *, provider: str = "", model: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, provider=provider, model=model)
        self.retry_after = retry_after


class LLMServerError(LLMError):
    retryable = True


class LLMRequestError(LLMError):
    retryable = False


class LLMResponseError(LLMError):
    retryable = True
