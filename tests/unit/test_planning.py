import json

import pytest

from app.agent.planning import parse_plan
from app.agent.team import RoleSpec
from app.core.config import PlanningSettings
from app.errors import PlanValidationError

TEAM = {
    name: RoleSpec(name=name, title=name, instructions="", provider="offline", model="m")
    for name in ("product_manager", "developer", "qa_engineer")
}
LIMITS = PlanningSettings(max_tasks=4, max_title_chars=40, max_description_chars=100)


def plan(*tasks: dict) -> str:
    return json.dumps({"tasks": list(tasks)})


def task(task_id: str, role: str = "developer", depends_on: list[str] | None = None, **extra) -> dict:
    return {"id": task_id, "title": f"Task {task_id}", "role": role, "depends_on": depends_on or [], **extra}


def test_valid_plan_in_dependency_order():
    text = plan(
        task("B", depends_on=["A"]), task("A", "product_manager"), task("C", "qa_engineer", ["A", "B"])
    )

    validated = parse_plan(text, TEAM, LIMITS)

    assert [item.id for item in validated.tasks] == ["A", "B", "C"]


def test_fenced_json_is_accepted():
    text = "```json\n" + plan(task("A")) + "\n```"

    assert parse_plan(text, TEAM, LIMITS).tasks[0].id == "A"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"steps": []}), "tasks: Field required"),
        (plan(), "no tasks"),
        (plan(*[task(f"T{i}") for i in range(5)]), "5 tasks; the limit is 4"),
        (plan(task("A", "designer")), "role 'designer'"),
        (plan(task("A"), task("A")), "used twice"),
        (plan(task("A", depends_on=["Z"])), "depends on 'Z'"),
        (plan(task("A", depends_on=["A"])), "depends on itself"),
        (plan(task("A", depends_on=["B"]), task("B", depends_on=["A"])), "cycle among tasks A, B"),
        (plan(task("A", title="x" * 41)), "title of 41 characters"),
        (plan(task("A", description="x" * 101)), "description of 101 characters"),
    ],
)
def test_invalid_plan_says_what_to_fix(text, message):
    with pytest.raises(PlanValidationError, match=message):
        parse_plan(text, TEAM, LIMITS)


def test_disabled_role_is_rejected():
    team = dict(TEAM, developer=RoleSpec("developer", "d", "", "offline", "m", enabled=False))

    with pytest.raises(PlanValidationError, match="not an enabled role"):
        parse_plan(plan(task("A")), team, LIMITS)
