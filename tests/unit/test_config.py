import json
from pathlib import Path

import pytest

from app.core.config import load_settings
from app.errors import ConfigError


def write(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def test_defaults_use_sqlite_and_offline(tmp_path):
    settings = load_settings(config_dir=tmp_path, environ={})

    assert settings.database.sqlalchemy_url().startswith("sqlite")
    assert settings.llm.default_provider == "offline"
    assert settings.env == "development"


def test_precedence_of_files_and_environment(tmp_path):
    write(tmp_path / "config.json", {"port": 8100, "worker": {"concurrency": 4, "max_attempts": 5}})
    write(tmp_path / "config" / "database_config.json", {"database": {"url": "sqlite:///x.db"}})
    write(tmp_path / "config" / "cache_config.json", {"worker": {"concurrency": 6}})

    settings = load_settings(config_dir=tmp_path, environ={"TORONTO_AI_PORT": "8200"})

    assert settings.port == 8200
    assert settings.worker.concurrency == 6
    assert settings.worker.max_attempts == 5
    assert settings.database.url == "sqlite:///x.db"


def test_database_master_builds_postgres_url(tmp_path):
    write(
        tmp_path / "config" / "database_config.json",
        {
            "database": {
                "master": {
                    "host": "db",
                    "port": 5433,
                    "username": "app",
                    "password": "s3cret-value",
                    "database": "agents",
                }
            }
        },
    )

    url = load_settings(config_dir=tmp_path, environ={}).database.sqlalchemy_url()

    assert url == "postgresql+asyncpg://app:s3cret-value@db:5433/agents"


def test_password_from_file(tmp_path):
    secret = tmp_path / "db-password"
    secret.write_text("from-a-file\n")
    environ = {"TORONTO_AI_DATABASE__MASTER__PASSWORD_FILE": str(secret)}

    settings = load_settings(config_dir=tmp_path, environ=environ)

    assert settings.database.master.resolved_password() == "from-a-file"


def test_unknown_key_names_key_and_file(tmp_path):
    write(tmp_path / "config.json", {"worker": {"concurency": 4}})

    with pytest.raises(ConfigError) as caught:
        load_settings(config_dir=tmp_path, environ={})

    message = str(caught.value)
    assert "worker.concurency" in message
    assert "config.json" in message


def test_invalid_value_lists_accepted_values(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_ENV": "prod"})

    message = str(caught.value)
    assert "'prod'" in message
    assert "TORONTO_AI_ENV" in message
    assert "'production'" in message


def test_unknown_environment_variable(tmp_path):
    with pytest.raises(ConfigError, match="TORONTO_AI_WORKERS"):
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_WORKERS": "3"})


def test_single_underscore_variable_suggests_nested_name(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_WORKER_CONCURRENCY": "3"})

    assert "as in TORONTO_AI_WORKER__CONCURRENCY" in str(raised.value)


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "config.json").write_text('{"port": 80,\n}')

    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 2"):
        load_settings(config_dir=tmp_path, environ={})


def test_heartbeat_must_be_shorter_than_lease(tmp_path):
    environ = {"TORONTO_AI_WORKER__LEASE_SECONDS": "5", "TORONTO_AI_WORKER__HEARTBEAT_SECONDS": "5"}

    with pytest.raises(ConfigError, match="heartbeat_seconds"):
        load_settings(config_dir=tmp_path, environ=environ)


def test_agent_with_unknown_provider(tmp_path):
    write(tmp_path / "config.json", {"agents": [{"role": "developer", "provider": "gpt"}]})

    with pytest.raises(ConfigError, match="unknown provider 'gpt'"):
        load_settings(config_dir=tmp_path, environ={})


def test_production_rejects_offline_provider(tmp_path):
    with pytest.raises(ConfigError, match="offline provider"):
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_ENV": "production"})


def test_production_rejects_missing_api_key(tmp_path):
    write(
        tmp_path / "config.json",
        {"llm": {"default_provider": "openai", "providers": {"openai": {"kind": "openai"}}}},
    )

    with pytest.raises(ConfigError, match="llm.providers.openai.api_key"):
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_ENV": "production"})


def test_production_rejects_placeholder_key(tmp_path):
    write(
        tmp_path / "config.json",
        {
            "llm": {
                "default_provider": "openai",
                "providers": {"openai": {"kind": "openai", "api_key": "changeme"}},
            }
        },
    )

    with pytest.raises(ConfigError, match="no real API key"):
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_ENV": "production"})


def test_production_accepts_real_key(tmp_path):
    write(
        tmp_path / "config.json",
        {
            "llm": {
                "default_provider": "openai",
                "providers": {"openai": {"kind": "openai", "api_key": "sk-live-abc123"}},
            }
        },
    )

    settings = load_settings(config_dir=tmp_path, environ={"TORONTO_AI_ENV": "production"})

    assert settings.is_production


def test_missing_secret_file_is_a_config_error(tmp_path):
    write(
        tmp_path / "config.json",
        {
            "llm": {
                "default_provider": "openai",
                "providers": {"openai": {"kind": "openai", "api_key_file": str(tmp_path / "missing")}},
            }
        },
    )

    with pytest.raises(ConfigError, match="cannot read .*missing: No such file"):
        load_settings(config_dir=tmp_path, environ={"TORONTO_AI_ENV": "production"})


def test_empty_password_file_is_a_config_error(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("\n")
    environ = {"TORONTO_AI_DATABASE__MASTER__PASSWORD_FILE": str(secret)}

    with pytest.raises(ConfigError, match="is empty"):
        load_settings(config_dir=tmp_path, environ=environ).database.sqlalchemy_url()


def test_typo_suggests_the_key(tmp_path):
    write(tmp_path / "config.json", {"worker": {"concurency": 4}})

    with pytest.raises(ConfigError, match="did you mean 'concurrency'"):
        load_settings(config_dir=tmp_path, environ={})


def test_cross_key_error_has_no_false_source(tmp_path):
    write(tmp_path / "config.json", {"agents": [{"role": "developer", "provider": "opnai"}]})

    with pytest.raises(ConfigError) as caught:
        load_settings(config_dir=tmp_path, environ={})

    assert "from defaults" not in str(caught.value)


def test_missing_config_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        load_settings(environ={"TORONTO_AI_CONFIG_DIR": str(tmp_path / "nowhere")})


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TORONTO_AI_AGENTS", "developer", "must be JSON"),
        ("TORONTO_AI_WORKER__SHUTDOWN_GRACE_SECONDS", "inf", "finite number"),
    ],
)
def test_unparsable_environment_values(tmp_path, variable, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(config_dir=tmp_path, environ={variable: value})


def test_config_file_that_is_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"port": "\xff"}')

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(config_dir=tmp_path, environ={})


@pytest.mark.parametrize(
    ("url", "message"), [("notaurl", "not a database URL"), ("sqlite:///:memory:", "in-memory")]
)
def test_unusable_database_urls(url, message):
    from app.db.engine import async_url

    with pytest.raises(ConfigError, match=message):
        async_url(url)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgres://user@127.0.0.1:5432/app", "postgresql+asyncpg"),
        ("postgresql+psycopg2://user@127.0.0.1:5432/app", "postgresql+asyncpg"),
        ("sqlite:///data/app.db", "sqlite+aiosqlite"),
    ],
)
def test_database_url_gets_async_driver(url, driver):
    from app.db.engine import async_url

    assert async_url(url).drivername == driver


def test_unsupported_database_named():
    from app.db.engine import async_url

    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        async_url("mysql://user@127.0.0.1/app")


def test_cache_config_file_selects_cluster(tmp_path):
    write(tmp_path / "config.json", {"caching": {"provider": "redis", "redis_port": 6380, "ttl": 60}})
    write(
        tmp_path / "config" / "cache_config.json",
        {
            "distributed_cache": {
                "enabled": True,
                "provider": "redis_cluster",
                "nodes": [{"host": "10.0.0.1", "port": 7000}, {"host": "10.0.0.2", "port": 7001}],
                "default_ttl": 900,
                "max_connections": 40,
            }
        },
    )

    settings = load_settings(config_dir=tmp_path, environ={})

    assert settings.caching.provider == "redis"
    assert settings.caching.redis_port == 6380
    assert settings.caching.ttl == 60
    assert settings.distributed_cache.enabled is True
    assert [(node.host, node.port) for node in settings.distributed_cache.nodes] == [
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7001),
    ]
    assert settings.distributed_cache.default_ttl == 900
    assert settings.distributed_cache.max_connections == 40


def test_cluster_without_nodes_is_rejected(tmp_path):
    write(tmp_path / "config" / "cache_config.json", {"distributed_cache": {"enabled": True}})

    with pytest.raises(ConfigError) as raised:
        load_settings(config_dir=tmp_path, environ={})

    assert "distributed_cache.nodes is empty" in str(raised.value)


def test_unknown_cache_provider_is_rejected(tmp_path):
    write(tmp_path / "config.json", {"caching": {"provider": "memcached"}})

    with pytest.raises(ConfigError) as raised:
        load_settings(config_dir=tmp_path, environ={})

    message = str(raised.value)
    assert "caching.provider = 'memcached'" in message
    assert "'memory' or 'redis'" in message


def test_redis_password_from_file(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("from-a-file\n")
    environ = {"TORONTO_AI_CACHING__REDIS_PASSWORD_FILE": str(secret)}

    settings = load_settings(config_dir=tmp_path, environ=environ)

    assert settings.caching.resolved_redis_password() == "from-a-file"
