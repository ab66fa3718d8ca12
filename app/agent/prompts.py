"""Prompts of the three kinds of task: plan, work and final report.

Every prompt is Markdown with fixed headings (``# Project brief``, ``# Your task: ...``), so
that a model reads a stable structure and the offline provider can find the parts it
templates from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.agent.team import RoleSpec
from app.core.config import PlanningSettings
from app.llm.base import ChatMessage

PLAN_HEADING = "# Your task: plan"
REPORT_HEADING = "# Your task: final report"
TASK_HEADING = "# Your task: "
MAX_DEPENDENCY_CHARS = 6000  # per dependency output quoted in a prompt, to bound its size


KNOWLEDGE_HEADING = "# Knowledge"
MAX_PASSAGE_CHARS = 2000  # per retrieved passage; chunks are about 200 tokens, so this rarely cuts


@dataclass(frozen=True, slots=True)
class Passage:
    source: str
    heading: str
    text: str
    score: float


@dataclass(frozen=True, slots=True)
class PriorOutput:
    key: str
    title: str
    role_title: str
    output: str


def system_message(role: RoleSpec) -> ChatMessage:
    return ChatMessage("system", f"You are the {role.title} of a software delivery team. {role.instructions}")


def plan_messages(
    brief: str, manager: RoleSpec, team: Mapping[str, RoleSpec], limits: PlanningSettings
) -> list[ChatMessage]:
    members = "\n".join(
        f"- {role.name}: {role.title}. {role.instructions}"
        for role in team.values()
        if role.enabled and role.name != manager.name
    )
    request = (
        f"# Project brief\n\n{brief.strip()}\n\n"
        f"# Team\n\n{members}\n\n"
        f"{PLAN_HEADING}\n\n"
        f"Split the project into at most {limits.max_tasks} tasks for the team above. "
        "Respond with only a JSON object of this form:\n\n"
        '{"tasks": [{"id": "T1", "title": "...", "role": "<a role name from the team>", '
        '"description": "...", "depends_on": []}]}\n\n'
        "Rules: ids are unique; `depends_on` lists the ids of tasks whose output this task "
        f"needs, with no cycles; a title has at most {limits.max_title_chars} characters and a "
        f"description at most {limits.max_description_chars}."
    )
    return [system_message(manager), ChatMessage("user", request)]


def plan_correction(error: str) -> ChatMessage:
    return ChatMessage(
        "user",
        f"The plan is invalid: {error}\nRespond again with the corrected JSON object only.",
    )


def work_messages(
    brief: str,
    role: RoleSpec,
    title: str,
    description: str,
    inputs: Sequence[PriorOutput],
    passages: Sequence[Passage] = (),
) -> list[ChatMessage]:
    sections = [f"# Project brief\n\n{brief.strip()}", f"{TASK_HEADING}{title}\n\n{description.strip()}"]
    if inputs:
        sections.append("# Outputs this task depends on\n\n" + _quote_outputs(inputs))
    if passages:
        sections.append(knowledge_section(passages))
    sections.append(
        "# Instructions\n\nWrite your deliverable for this task in Markdown. Build on the outputs "
        "above where they exist, and state assumptions you had to make."
    )
    return [system_message(role), ChatMessage("user", "\n\n".join(sections))]


def report_messages(
    brief: str, manager: RoleSpec, outputs: Sequence[PriorOutput], passages: Sequence[Passage] = ()
) -> list[ChatMessage]:
    knowledge = f"{knowledge_section(passages)}\n\n" if passages else ""
    request = (
        f"# Project brief\n\n{brief.strip()}\n\n"
        f"# Completed tasks\n\n{_quote_outputs(outputs)}\n\n"
        f"{knowledge}"
        f"{REPORT_HEADING}\n\n"
        "Review the outputs above and write the final report in Markdown: a summary of what "
        "was delivered, each task's main result, open risks and the next steps."
    )
    return [system_message(manager), ChatMessage("user", request)]


def knowledge_section(passages: Sequence[Passage]) -> str:
    """Number the retrieved passages so that an output can cite them as [n]."""
    entries = []
    for number, passage in enumerate(passages, start=1):
        text = passage.text.strip()
        if len(text) > MAX_PASSAGE_CHARS:
            text = text[:MAX_PASSAGE_CHARS] + " [...]"
        where = f" ({passage.heading})" if passage.heading else ""
        entries.append(f"[{number}] {passage.source}{where}\n\n{text}")
    return (
        f"{KNOWLEDGE_HEADING}\n\nPassages from the project's knowledge base, most relevant first. "
        "Cite a passage as [n] where you use it.\n\n" + "\n\n".join(entries)
    )


def _quote_outputs(outputs: Sequence[PriorOutput]) -> str:
    parts = []
    for prior in outputs:
        text = prior.output.strip()
        if len(text) > MAX_DEPENDENCY_CHARS:
            text = text[:MAX_DEPENDENCY_CHARS] + "\n\n[... shortened ...]"
        parts.append(f"## {prior.key}: {prior.title} ({prior.role_title})\n\n{text}")
    return "\n\n".join(parts)
