"""The offline provider: deterministic template text, no network, no key.

It is the default when no model is configured, so that a first run, the tests and the
benchmarks work anywhere. It reads the fixed headings of the prompts in ``app.agent.prompts``
and builds a valid plan, a role deliverable or a final report from the brief. Every output
starts with a notice that it came from the offline provider, so nobody mistakes it for a
model's work.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator

from app.llm.base import Completion, CompletionRequest, StreamDelta

NOTICE = (
    "> Written by the offline provider: deterministic template text built from the brief, not a model's work."
)

_STOP_WORDS = frozenset(
    """a about above after again all also an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having here how i if in into is it its itself just more most must no nor not
    now of off on once only or other our out over own per same should so some such than that
    the their them then there these they this those through to too under until up very was we
    were what when where which while who whom why will with would you your new use using want
    wants make one two three about need needs each every may might shall".""".split()
)

# The template pipeline: which role works on what, and whose output it needs.
_PIPELINE = (
    (
        "T1",
        "product_manager",
        "Requirements and acceptance criteria",
        (),
        "Write the requirements: users, goals, scope, non-goals and testable acceptance criteria.",
    ),
    (
        "T2",
        "system_architect",
        "System design",
        ("T1",),
        "Design the components, data model, interfaces and technology choices, with their risks.",
    ),
    (
        "T3",
        "developer",
        "Implementation plan",
        ("T2",),
        "Lay out the modules, key code paths, error handling and the order of implementation.",
    ),
    (
        "T4",
        "qa_engineer",
        "Test strategy",
        ("T1", "T2"),
        "Define unit, integration and end-to-end tests, hard cases and the acceptance checks.",
    ),
    (
        "T5",
        "devops_engineer",
        "Delivery and operations",
        ("T2",),
        "Plan build, deployment, configuration, monitoring, backups and rollback.",
    ),
)


class OfflineProvider:
    name = "offline"

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms

    async def complete(self, request: CompletionRequest) -> Completion:
        started = time.perf_counter()
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)

        text = respond(_prompt_of(request))
        return Completion(
            text=text,
            provider=self.name,
            model=request.model,
            prompt_tokens=estimate_tokens(" ".join(message.content for message in request.messages)),
            completion_tokens=estimate_tokens(text),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamDelta | Completion]:
        completion = await self.complete(request)
        for line in completion.text.splitlines(keepends=True):
            yield StreamDelta(line)
        yield completion

    async def aclose(self) -> None:
        return None


def estimate_tokens(text: str) -> int:
    # About 4 characters per token for English text, the usual rule of thumb for BPE models.
    return max(1, len(text) // 4)


def respond(prompt: str) -> str:
    """Return the offline response to the last user message of a prompt."""
    sections = _sections(prompt)
    brief = sections.get("Project brief", "")
    task_heading = next((name for name in sections if name.startswith("Your task: ")), "Your task: work")
    task_name = task_heading.removeprefix("Your task: ")

    if task_name == "plan":
        return _plan(sections.get("Team", ""), _plan_limit(sections.get(task_heading, "")), brief)
    citations = _citations(sections.get("Knowledge", ""))
    if task_name == "final report":
        return _report(brief, sections.get("Completed tasks", "")) + citations
    deliverable = _deliverable(
        brief,
        task_name,
        sections.get(task_heading, ""),
        sections.get("Outputs this task depends on", ""),
        _passages(sections.get("Knowledge", "")),
    )
    return deliverable + citations


def _prompt_of(request: CompletionRequest) -> str:
    """Return the user message to answer: after a plan correction, the original plan request."""
    user_messages = [message.content for message in request.messages if message.role == "user"]
    if not user_messages:
        return ""
    if user_messages[-1].startswith("The plan is invalid"):
        return user_messages[0]
    return user_messages[-1]


_PROMPT_HEADINGS = (
    "Knowledge",
    "Project brief",
    "Team",
    "Outputs this task depends on",
    "Completed tasks",
    "Instructions",
    "Your task: ",
)


def _sections(prompt: str) -> dict[str, str]:
    """Split a prompt into the sections under its fixed headings, keyed by heading text.

    Other level-one headings, such as those inside a brief, stay part of their section.
    """
    sections: dict[str, str] = {}
    current = None
    lines: list[str] = []
    for line in prompt.splitlines():
        if line.startswith("# ") and line[2:].startswith(_PROMPT_HEADINGS):
            if current is not None:
                sections[current] = "\n".join(lines).strip()
            current, lines = line[2:].strip(), []
        else:
            lines.append(line)
    if current is not None:
        sections[current] = "\n".join(lines).strip()
    return sections


def _plan_limit(text: str) -> int:
    found = re.search(r"at most (\d+) tasks", text)
    return int(found.group(1)) if found else 20


def _plan(team_section: str, limit: int, brief: str) -> str:
    roles = re.findall(r"^- ([a-z][a-z0-9_]*):", team_section, re.MULTILINE)
    available = set(roles) if roles else {role for _, role, _, _, _ in _PIPELINE}
    steps = [step for step in _PIPELINE if step[1] in available]
    assigned = _assign_points(_brief_points(brief), steps)

    tasks = []
    for key, role, title, depends_on, description in steps:
        if assigned.get(key):
            description += " From the brief: " + " ".join(assigned[key])
        tasks.append(
            {
                "id": key,
                "title": title,
                "role": role,
                "description": description,
                "depends_on": list(depends_on),
            }
        )
    for index, role in enumerate(role for role in roles if role not in {step[1] for step in _PIPELINE}):
        tasks.append(
            {
                "id": f"X{index + 1}",
                "title": f"Contribution of the {role.replace('_', ' ')}",
                "role": role,
                "description": f"Contribute the {role.replace('_', ' ')}'s view of the project.",
                "depends_on": ["T1"] if "product_manager" in available else [],
            }
        )

    kept = tasks[:limit]
    kept_ids = {task["id"] for task in kept}
    for task in kept:
        task["depends_on"] = [dependency for dependency in task["depends_on"] if dependency in kept_ids]
    return json.dumps({"tasks": kept}, indent=2)


def _assign_points(points: list[str], steps: list[tuple]) -> dict[str, list[str]]:
    """Give each point of the brief to the plan step that shares the most words with it.

    A task's description then names its part of the brief, which is also what its knowledge
    query searches for. Points that share no word with any step go to the developer's step,
    or to the first step when there is none.
    """
    if not steps:
        return {}
    vocabulary = {step[0]: _word_stems(f"{step[2]} {step[4]}") for step in steps}
    fallback = next((step[0] for step in steps if step[1] == "developer"), steps[0][0])
    assigned: dict[str, list[str]] = {}
    for point in points:
        words = _word_stems(point)
        # max() keeps the first of equal scores, so ties go to the earlier step.
        key = max(vocabulary, key=lambda candidate: len(words & vocabulary[candidate]))
        if not words & vocabulary[key]:
            key = fallback
        assigned.setdefault(key, []).append(point)
    return assigned


def _word_stems(text: str) -> set[str]:
    words = re.findall(r"[a-z]{3,}", text.lower())
    return {word.removesuffix("s") for word in words if word not in _STOP_WORDS}


def _deliverable(
    brief: str, title: str, description: str, inputs: str, passages: list[tuple[str, str, str, str]]
) -> str:
    points = _brief_points(brief)
    terms = key_terms(brief)
    dependencies = re.findall(r"^## (\S+): (.+)$", inputs, re.MULTILINE)

    lines = [NOTICE, "", f"## {title}", "", description or "Deliverable for this task.", ""]
    lines += ["### What the brief asks for", ""]
    lines += [f"- {point}" for point in points[:8]] or ["- (the brief lists no separate points)"]
    lines += ["", "### Key concerns", ""]
    lines += [
        f"- **{term}**: how it is handled is stated and checked in this deliverable.{_cite(term, passages)}"
        for term in terms[:6]
    ]
    if dependencies:
        lines += ["", "### Built on", ""]
        lines += [f"- {key}: {dependency_title}" for key, dependency_title in dependencies]
    lines += ["", "### Decisions", ""]
    lines += [
        f'{number}. Address "{point}" with an explicit, tested step.'
        for number, point in enumerate(points[:5], start=1)
    ] or ["1. Confirm the scope with the requester before starting."]
    lines += [
        "",
        "### Assumptions",
        "",
        "- The brief is complete; anything it leaves open is listed as a risk.",
    ]
    return "\n".join(lines)


def _report(brief: str, completed: str) -> str:
    headline = _headline(brief)
    tasks = re.findall(r"^## (\S+): (.+) \((.+)\)$", completed, re.MULTILINE)

    lines = [NOTICE, "", f"# Final report: {headline}", "", "## Delivered", ""]
    lines += [f"- {key} {title} ({role_title})" for key, title, role_title in tasks]
    lines += ["", "## Main points of the brief", ""]
    lines += [f"- {point}" for point in _brief_points(brief)[:6]]
    lines += ["", "## Open risks", ""]
    lines += [
        f"- **{term}**: no model checked how the deliverables handle it; review it with the requester."
        for term in key_terms(brief)[:3]
    ]
    lines += ["", "## Next steps", "", "- Replace the offline provider with a model to get real analysis."]
    return "\n".join(lines)


_PASSAGE = re.compile(
    r"^\[(\d+)\] ([^\n]+?)(?: \(([^\n]*)\))?\n\n(.*?)(?=\n\n\[\d+\] |\Z)", re.MULTILINE | re.DOTALL
)
_QUOTE_CHARS = 240  # of each passage quoted in an offline output


def _passages(knowledge: str) -> list[tuple[str, str, str, str]]:
    """Return (number, source, heading, text) for each passage of a prompt's Knowledge section."""
    return _PASSAGE.findall(knowledge)


def _cite(term: str, passages: list[tuple[str, str, str, str]]) -> str:
    """Return " [n]" for the first passage that mentions ``term``, or "" when none does."""
    for number, _source, _heading, text in passages:
        if term.lower() in text.lower():
            return f" [{number}]"
    return ""


def _citations(knowledge: str) -> str:
    """Quote each retrieved passage with its number and source, the way a model should cite them."""
    passages = _passages(knowledge)
    if not passages:
        return ""
    lines = ["", "", "### Sources", ""]
    for number, source, heading, text in passages:
        body = " ".join(text.split())
        # The chunk starts with its heading path; the quote is more useful without it.
        if heading and body.startswith(heading):
            body = body[len(heading) :].strip()
        quote = body if len(body) <= _QUOTE_CHARS else body[:_QUOTE_CHARS].rsplit(" ", 1)[0] + " ..."
        where = f", {heading}" if heading else ""
        lines.append(f'- [{number}] {source}{where}: "{quote}"')
    return "\n".join(lines)


def _headline(brief: str) -> str:
    for line in brief.splitlines():
        stripped = line.strip().lstrip("#").strip()
        if stripped:
            return stripped[:120]
    return "project"


_BULLET = re.compile(r"^(\s*)(?:[-*]|\d+\.)\s+(.+)$")


def _brief_points(brief: str) -> list[str]:
    """Return the bullet points of the brief, or its sentences when it has none.

    An indented line right after a bullet continues it, as Markdown wraps long items.
    """
    bullets: list[str] = []
    continuing = False
    for line in brief.splitlines():
        bullet = _BULLET.match(line)
        if bullet:
            bullets.append(bullet.group(2).strip())
            continuing = True
        elif continuing and line.strip() and line[:1].isspace():
            bullets[-1] += " " + line.strip()
        else:
            continuing = False
    if bullets:
        return bullets
    body = " ".join(line for line in brief.splitlines() if not line.lstrip().startswith("#"))
    return [sentence.strip() for sentence in re.split(r"(?<=[.!?])\s+", body) if len(sentence.split()) > 3]


def key_terms(text: str, count: int = 8) -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z0-9+-]{2,}", text)
    counts = Counter(word.lower() for word in words if word.lower() not in _STOP_WORDS)
    return [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:count]]
