"""The objects one process needs, built from the settings and closed in reverse order.

Nothing here is created at import time: each entry point (API, worker, CLI) calls
``Runtime.start()`` with its validated settings and owns the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.agent.executor import TaskExecutor
from app.agent.team import RoleSpec, build_team, sync_team
from app.cache import Cache, build_cache
from app.core.config import Settings
from app.db.engine import Database
from app.db.migrate import check_schema, lock_startup, upgrade
from app.knowledge.chroma_store import ChromaVectorStore
from app.knowledge.embeddings import build_embedder
from app.knowledge.ingestion import DocumentIngestor
from app.knowledge.service import KnowledgeService
from app.knowledge.store import EmbeddedVectorStore, VectorStore
from app.llm.cache import ResponseCache
from app.llm.registry import ProviderRegistry
from app.signals import CommitRelay, SignalBus, build_signal_bus
from app.worker.queue import TaskQueue

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    database: Database
    team: dict[str, RoleSpec]
    providers: ProviderRegistry
    cache: ResponseCache
    queue: TaskQueue
    executor: TaskExecutor
    knowledge: KnowledgeService
    ingestor: DocumentIngestor
    shared_cache: Cache
    signals: SignalBus
    # Set by the all-in-one process so that a new project wakes its embedded worker at once.
    notify_work: Callable[[], None] | None = None

    @classmethod
    async def start(cls, settings: Settings, *, migrate: bool, use_replicas: bool = False) -> Runtime:
        """Connect, migrate (or check the schema), store the team and build the providers.

        ``use_replicas`` connects to the configured read replicas and starts their health
        checks; only API instances read from replicas.
        """
        team = build_team(settings)
        database = Database(settings.database, use_replicas=use_replicas)
        try:
            if migrate:
                await upgrade(database)
            await check_schema(database)
            async with database.transaction() as connection:
                await lock_startup(database, connection)
                await sync_team(connection, team)
            providers = ProviderRegistry.from_settings(settings)
            await database.start_replica_checks()
        except BaseException:
            await database.dispose()
            raise

        logger.info(
            "connected to %s", database.describe(), extra={"action": "runtime.started", "env": settings.env}
        )
        if settings.uses_sqlite and settings.is_production:
            # Logged here rather than while the settings load, which happens before logging
            # is configured.
            logger.warning(
                "database is a SQLite file; use PostgreSQL for several hosts",
                extra={"action": "config.sqlite_in_use", "env": settings.env},
            )
        shared_cache = build_cache(settings)
        await shared_cache.start()
        signals = build_signal_bus(settings)
        CommitRelay(signals, shared_cache).install(database.write_engine)
        cache = ResponseCache(shared_cache, settings.caching)
        queue = TaskQueue(database, settings.worker)
        embedder = build_embedder(settings.knowledge)
        store = build_vector_store(settings, database, embedder.dimension)
        knowledge = KnowledgeService(database, embedder, store, settings.knowledge, shared_cache)
        ingestor = DocumentIngestor(
            database, embedder, store, settings.knowledge, settings.worker.lease_seconds
        )
        executor = TaskExecutor(database, queue, providers, cache, settings, knowledge)
        return cls(
            settings,
            database,
            team,
            providers,
            cache,
            queue,
            executor,
            knowledge,
            ingestor,
            shared_cache,
            signals,
        )

    async def aclose(self) -> None:
        await self.providers.aclose()
        await self.signals.aclose()
        await self.shared_cache.aclose()
        await self.database.dispose()


def build_vector_store(settings: Settings, database: Database, dimension: int) -> VectorStore:
    """Return the store ``vector_db.provider`` selects: embedded, or partitions on Chroma servers."""
    if settings.vector_db.provider == "chroma":
        return ChromaVectorStore(database, dimension, settings.vector_db)
    return EmbeddedVectorStore(database, dimension, settings.knowledge)
