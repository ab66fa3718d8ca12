"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.db.states import ProjectStatus

OFFLINE_NOTICE = (
    "Outputs of this project come from the offline provider: deterministic template text built "
    "from the brief, not a model's work. Configure an LLM provider for real outputs."
)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"


def valid_name(value: str) -> str:
    """Check a team or knowledge-base name, with a message that states the rule, not the regex."""
    if not re.fullmatch(NAME_PATTERN, value):
        quoted_value = value if len(value) <= 80 else value[:80] + "..."
        raise ValueError(f"{quoted_value!r} is not a valid name; use {NAME_RULE}")
    return value


# The pattern stays in the OpenAPI schema, so clients can check names before sending them.
ResourceName = Annotated[str, AfterValidator(valid_name), Field(json_schema_extra={"pattern": NAME_PATTERN})]


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def storable_text(value: str) -> str:
    """Reject characters that a database cannot store: NUL, and halves of UTF-16 surrogate pairs."""
    if "\x00" in value:
        raise ValueError("contains a NUL character; remove it, since text fields cannot store one")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains an unpaired surrogate at position {exc.start}, which is not valid Unicode; send UTF-8 text"
        ) from None
    return value


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    brief: str = Field(description="What the team should deliver, in prose")
    team: ResourceName = "default"
    knowledge_base: ResourceName | None = None
    title: str | None = Field(None, max_length=200)

    @field_validator("brief")
    @classmethod
    def brief_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the brief is empty or only whitespace; describe what the team should deliver")
        return storable_text(value)

    @field_validator("title")
    @classmethod
    def title_has_text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "the title is empty or only whitespace; leave it out to derive one from the brief"
            )
        return storable_text(value.strip()) if value else value


class ProjectAccepted(BaseModel):
    id: str
    status: ProjectStatus


class TaskPublic(BaseModel):
    id: str
    key: str
    kind: str
    title: str
    role: str
    status: str
    depends_on: list[str]
    attempts: int
    error: str | None = None


class UsagePublic(BaseModel):
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0


class ProjectPublic(BaseModel):
    id: str
    title: str
    status: ProjectStatus
    team: str
    knowledge_base: str | None
    providers: list[str]
    notice: str | None = Field(None, description="Set when an output comes from the offline provider")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    tasks: list[TaskPublic]
    usage: UsagePublic
    report: str | None = None
    error: str | None = None


class ProjectSummary(BaseModel):
    id: str
    title: str
    status: ProjectStatus
    team: str
    created_at: datetime
    finished_at: datetime | None


class ProjectPage(BaseModel):
    items: list[ProjectSummary]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` to read the next page; null on the last"
    )


class LLMCallPublic(BaseModel):
    attempt: int
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cost_usd: float
    cache_hit: bool
    status: str
    error: str | None
    created_at: datetime


class AttemptPublic(BaseModel):
    number: int
    worker_id: str
    outcome: str
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class MessagePublic(BaseModel):
    sender: str
    content: str


class SourcePublic(BaseModel):
    rank: int
    source: str
    heading: str
    score: float
    chunk_id: str


class TaskDetail(TaskPublic):
    project_id: str
    description: str
    max_attempts: int
    input: list[MessagePublic] = Field(
        description="The prompt of the last stored attempt: system and user messages"
    )
    output: str | None
    attempt_history: list[AttemptPublic]
    llm_calls: list[LLMCallPublic]
    sources: list[SourcePublic] = Field(description="Knowledge-base passages the prompt carried, best first")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EventPublic(BaseModel):
    seq: int
    type: str
    task_id: str | None
    data: dict[str, Any]
    created_at: datetime


class EventPage(BaseModel):
    items: list[EventPublic]
    last_seq: int = Field(description="Pass as `after` to read the events that follow")
