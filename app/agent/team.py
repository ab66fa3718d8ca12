"""Roles are data: the built-in team, merged with the ``agents`` section of the settings.

A role is a name, a title, instructions and the model that plays it. Adding a role means
adding an entry to ``agents`` in ``config.json`` with its instructions; no class per role.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.config import Settings
from app.db.models import roles, teams
from app.errors import ConfigError

DEFAULT_TEAM = "default"
PROJECT_MANAGER = "project_manager"


@dataclass(frozen=True, slots=True)
class RoleSpec:
    name: str
    title: str
    instructions: str
    provider: str
    model: str
    temperature: float = 0.0
    max_tokens: int = 2048
    enabled: bool = True


BUILT_IN_ROLES: dict[str, tuple[str, str]] = {
    PROJECT_MANAGER: (
        "Project manager",
        "You plan the project into a small graph of tasks, each owned by one role of the team, "
        "with dependencies only where a task needs another's output. When every task is done "
        "you review the outputs and write the final report: what was delivered, open risks and "
        "next steps.",
    ),
    "product_manager": (
        "Product manager",
        "You turn the brief into requirements: users, goals, scope, non-goals, acceptance "
        "criteria and open questions. Be specific and testable.",
    ),
    "system_architect": (
        "System architect",
        "You design the system: components and their responsibilities, data model, "
        "interfaces, technology choices with reasons, and the risks of the design.",
    ),
    "developer": (
        "Developer",
        "You implement the design: module layout, key code, error handling and the order of "
        "work. Show code where it clarifies a decision.",
    ),
    "qa_engineer": (
        "QA engineer",
        "You write the test strategy: what to test at which level, the hard cases, test data "
        "and the acceptance checks that prove the requirements are met.",
    ),
    "devops_engineer": (
        "DevOps engineer",
        "You plan delivery and operation: build, deployment, configuration, monitoring, "
        "alerting, backups and rollback.",
    ),
}


def build_team(settings: Settings) -> dict[str, RoleSpec]:
    """Return the default team: built-in roles overridden and extended by ``agents``."""
    team = {
        name: RoleSpec(
            name=name,
            title=title,
            instructions=instructions,
            provider=settings.llm.default_provider,
            model=settings.llm.default_model,
        )
        for name, (title, instructions) in BUILT_IN_ROLES.items()
    }

    for agent in settings.agents:
        base = team.get(agent.role)
        if base is None and not agent.instructions:
            raise ConfigError(
                f"agents: role {agent.role!r} is not built in, so it needs `instructions`; "
                f"built-in roles: {', '.join(BUILT_IN_ROLES)}"
            )
        base = base or RoleSpec(
            name=agent.role,
            title=agent.role.replace("_", " ").capitalize(),
            instructions="",
            provider=settings.llm.default_provider,
            model=settings.llm.default_model,
        )
        team[agent.role] = replace(
            base,
            title=agent.title or base.title,
            instructions=agent.instructions or base.instructions,
            provider=agent.provider or base.provider,
            model=agent.model or base.model,
            temperature=agent.temperature,
            max_tokens=agent.max_tokens,
            enabled=agent.enabled,
        )

    if not team[PROJECT_MANAGER].enabled:
        raise ConfigError("agents: the project_manager role plans and reports, so it cannot be disabled")
    return team


async def sync_team(connection: AsyncConnection, team: dict[str, RoleSpec], name: str = DEFAULT_TEAM) -> None:
    """Store the team's roles, replacing what an earlier start stored under the same name.

    Every process calls this at start-up with the same configuration files, so the rows it
    writes are identical whichever process writes last.
    """
    now = datetime.now(UTC)
    existing = await connection.scalar(select(teams.c.name).where(teams.c.name == name))
    if existing is None:
        await connection.execute(teams.insert().values(name=name, description="", created_at=now))

    await connection.execute(delete(roles).where(roles.c.team == name))
    await connection.execute(
        roles.insert(),
        [
            {
                "team": name,
                "name": spec.name,
                "title": spec.title,
                "instructions": spec.instructions,
                "provider": spec.provider,
                "model": spec.model,
                "temperature": spec.temperature,
                "max_tokens": spec.max_tokens,
                "enabled": spec.enabled,
                "updated_at": now,
            }
            for spec in team.values()
        ],
    )


async def load_team(connection: AsyncConnection, name: str) -> dict[str, RoleSpec]:
    """Read a stored team; empty when no team has that name."""
    rows = await connection.execute(select(roles).where(roles.c.team == name))
    return {
        row.name: RoleSpec(
            name=row.name,
            title=row.title,
            instructions=row.instructions,
            provider=row.provider,
            model=row.model,
            temperature=row.temperature,
            max_tokens=row.max_tokens,
            enabled=row.enabled,
        )
        for row in rows
    }
