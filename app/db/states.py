"""Statuses of projects and tasks, and which of them are final."""

from __future__ import annotations

from enum import StrEnum


class ProjectStatus(StrEnum):
    QUEUED = "queued"
    PLANNING = "planning"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskStatus(StrEnum):
    BLOCKED = "blocked"  # waits for the tasks it depends on
    READY = "ready"  # may be claimed once available_at has passed
    RUNNING = "running"  # leased by a worker
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskKind(StrEnum):
    PLAN = "plan"
    WORK = "work"
    REPORT = "report"


FINAL_PROJECT_STATUSES = frozenset({ProjectStatus.COMPLETED, ProjectStatus.FAILED, ProjectStatus.CANCELLED})
OPEN_TASK_STATUSES = frozenset({TaskStatus.BLOCKED, TaskStatus.READY, TaskStatus.RUNNING})
