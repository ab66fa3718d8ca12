import pytest

from app.agent import prompts
from app.agent.planning import parse_plan
from app.agent.team import PROJECT_MANAGER, build_team
from app.core.config import PlanningSettings, load_settings
from app.llm.base import CompletionRequest
from app.llm.offline import NOTICE, OfflineProvider

BRIEF = """# Ticket triage

Support receives 500 tickets a day and routes them by hand.

- Route each ticket to one of 12 queues.
- Explain every routing decision to the agent.
"""


@pytest.fixture
def team(tmp_path):
    return build_team(load_settings(config_dir=tmp_path, environ={}))


async def complete(messages) -> str:
    return (await OfflineProvider().complete(CompletionRequest(messages=messages, model="offline-1"))).text


async def test_plan_is_valid_for_the_team(team):
    limits = PlanningSettings()
    messages = prompts.plan_messages(BRIEF, team[PROJECT_MANAGER], team, limits)

    text = await complete(messages)
    workers = {name: role for name, role in team.items() if name != PROJECT_MANAGER}
    plan = parse_plan(text, workers, limits)

    assert {task.role for task in plan.tasks} == set(workers)


async def test_plan_respects_task_limit(team):
    limits = PlanningSettings(max_tasks=2)
    messages = prompts.plan_messages(BRIEF, team[PROJECT_MANAGER], team, limits)

    plan = parse_plan(await complete(messages), team, limits)

    assert len(plan.tasks) == 2


async def test_deliverable_is_built_from_the_brief(team):
    messages = prompts.work_messages(
        BRIEF, team["developer"], "Implementation plan", "Lay out the modules.", []
    )

    text = await complete(messages)

    assert text.startswith(NOTICE)
    assert "Route each ticket to one of 12 queues." in text
    assert "## Implementation plan" in text


async def test_output_is_deterministic(team):
    messages = prompts.work_messages(BRIEF, team["qa_engineer"], "Tests", "Test it.", [])

    assert await complete(messages) == await complete(messages)


async def test_report_lists_completed_tasks(team):
    outputs = [prompts.PriorOutput("T1", "Requirements", "Product manager", "text")]
    messages = prompts.report_messages(BRIEF, team[PROJECT_MANAGER], outputs)

    text = await complete(messages)

    assert "# Final report: Ticket triage" in text
    assert "- T1 Requirements (Product manager)" in text


async def test_simulated_latency_is_reported():
    provider = OfflineProvider(latency_ms=20)
    request = CompletionRequest(messages=[prompts.plan_correction("x")], model="m")

    completion = await provider.complete(request)

    assert completion.latency_ms >= 20
    assert completion.provider == "offline"


WRAPPED_BRIEF = """# Billing clean-up

Constraints:
- Follow the community conventions for code style and type hints rather than
  house rules, so new hires already know them.
- Ship a test strategy that keeps behaviour unchanged.
"""


async def test_wrapped_bullet_is_one_point(team):
    messages = prompts.work_messages(WRAPPED_BRIEF, team["developer"], "Plan", "Plan it.", [])

    text = await complete(messages)

    assert (
        "- Follow the community conventions for code style and type hints rather than house rules, so new hires already know them."
        in text
    )


async def test_plan_gives_brief_points_to_matching_tasks(team):
    limits = PlanningSettings()
    messages = prompts.plan_messages(WRAPPED_BRIEF, team[PROJECT_MANAGER], team, limits)

    plan = parse_plan(await complete(messages), team, limits)
    descriptions = {task.title: task.description for task in plan.tasks}

    assert "Ship a test strategy" in descriptions["Test strategy"]
    assert "Follow the community conventions" in descriptions["Implementation plan"]
    assert "From the brief" not in descriptions["System design"]


async def test_key_concern_cites_the_passage_that_mentions_it(team):
    passages = [
        prompts.Passage("pep-0008.rst", "Naming", "Function names should be lowercase.", 0.9),
        prompts.Passage("pep-0484.rst", "Rationale", "Type hints for a billing service.", 0.8),
    ]
    messages = prompts.work_messages(WRAPPED_BRIEF, team["developer"], "Plan", "Plan it.", [], passages)

    text = await complete(messages)

    assert "- **billing**: how it is handled is stated and checked in this deliverable. [2]" in text
