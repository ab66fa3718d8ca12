import json

import pytest

from app.agent.team import BUILT_IN_ROLES, build_team
from app.core.config import load_settings
from app.errors import ConfigError


def settings_with(tmp_path, document):
    (tmp_path / "config.json").write_text(json.dumps(document))
    return load_settings(config_dir=tmp_path, environ={})


def test_built_in_roles_are_present(tmp_path):
    team = build_team(load_settings(config_dir=tmp_path, environ={}))

    assert set(BUILT_IN_ROLES) <= set(team)
    assert {
        "project_manager",
        "product_manager",
        "system_architect",
        "developer",
        "qa_engineer",
        "devops_engineer",
    } <= set(team)


def test_agents_override_model_and_enabled(tmp_path):
    team = build_team(
        settings_with(
            tmp_path,
            {
                "agents": [
                    {"role": "developer", "model": "big-model"},
                    {"role": "devops_engineer", "enabled": False},
                ]
            },
        )
    )

    assert team["developer"].model == "big-model"
    assert team["developer"].instructions == BUILT_IN_ROLES["developer"][1]
    assert team["devops_engineer"].enabled is False


def test_new_role_needs_instructions(tmp_path):
    with pytest.raises(ConfigError, match="needs `instructions`"):
        build_team(settings_with(tmp_path, {"agents": [{"role": "security_reviewer"}]}))


def test_new_role_with_instructions(tmp_path):
    team = build_team(
        settings_with(
            tmp_path, {"agents": [{"role": "security_reviewer", "instructions": "Review the threat model."}]}
        )
    )

    assert team["security_reviewer"].title == "Security reviewer"


def test_project_manager_cannot_be_disabled(tmp_path):
    with pytest.raises(ConfigError, match="cannot be disabled"):
        build_team(settings_with(tmp_path, {"agents": [{"role": "project_manager", "enabled": False}]}))
